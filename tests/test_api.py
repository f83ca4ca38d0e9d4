"""The Python API (dlg_jax.attack / dlg_jax.run_sweep) as a notebook uses it: it runs what the CLIs run."""

import json

import numpy as np
import pytest

import dlg_jax
from tests.conftest import CIFAR100

pytestmark = pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
FAST = dict(steps=12, label_strategy="idlg")


def test_version_and_api_names():
    assert dlg_jax.__version__.count(".") >= 2
    assert {"attack", "run_sweep", "setup", "make_config", "load_npz"} <= set(dir(dlg_jax))
    with pytest.raises(AttributeError):
        dlg_jax.no_such_thing  # noqa: B018


def test_attack_returns_the_reconstruction_metrics_and_trace_of_the_cli_attack():
    data = dlg_jax.load_npz(CIFAR100)
    result = dlg_jax.attack(data, index=25, **FAST)
    m = result.metrics
    assert result.reconstruction.shape == (1, 32, 32, 3) and 0 <= result.reconstruction.min() <= result.reconstruction.max() <= 1
    assert m["index"] == 25 and m["label_name_true"] == "table" and m["label_pred"] == 84
    assert result.psnr == m["psnr"] and result.status in ("converged", "max_steps", "max_evaluations")
    assert len(result.trace["grad_distance"]) == len(result.trace["psnr"]) == m["stopped_at_step"] + 1
    assert m["config"]["rules"]["steps"] == 12 and m["config"]["labels"] == "idlg"
    from dlg_jax.engine.single import attack_one  # the same attack as engine.single's (what dlg_jax.run runs)
    from tests.helpers import cifar_case

    outcome, _ = attack_one(cifar_case(), dlg_jax.make_config(**FAST), data.images[25:26], data.labels[25:26], 1234)
    np.testing.assert_array_equal(np.clip(outcome.reconstruction, 0, 1), result.reconstruction)
    floats = dlg_jax.attack(data.images[25] / 255.0, 84, **FAST)  # an image as floats in [0, 1], no batch axis
    np.testing.assert_array_equal(floats.reconstruction, result.reconstruction)


def test_run_sweep_in_memory_and_in_a_resumable_directory(tmp_path):
    data = dlg_jax.load_npz(CIFAR100)
    kept = dlg_jax.run_sweep(data, indices=range(2), seeds=[0, 1], lanes=4, progress=False, **FAST)
    assert kept.out is None and [(r["index"], r["seed"]) for r in kept.rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert kept.summary["rows"] == 4
    out = tmp_path / "sweep"
    first = dlg_jax.run_sweep(data, indices=[0], seeds=[0, 1], lanes=4, out=out, progress=False, **FAST)
    again = dlg_jax.run_sweep(data, indices=range(2), seeds=[0, 1], lanes=4, out=out, progress=False, **FAST)
    assert len(first.rows) == 2 and again.rows[:2] == first.rows and len(again.rows) == 4  # resumed, extended
    assert json.loads((out / "summary.json").read_text())["summary"]["rows"] == 4 and (out / "results.csv").exists()
    for a, b in zip(kept.rows, again.rows):
        assert a["psnr"] == b["psnr"] and a["evaluations"] == b["evaluations"]
    with pytest.raises(Exception, match="another configuration"):
        dlg_jax.run_sweep(data, indices=[0], seeds=[0], out=out, progress=False, steps=13)


def test_run_sweep_with_a_defense_axis_writes_one_directory_per_setting(tmp_path):
    """defenses= is the CLI's --defense: each strength a setting, all in one compiled program."""
    data = dlg_jax.load_npz(CIFAR100)
    kept = dlg_jax.run_sweep(data, indices=[0], seeds=[0], lanes=2, progress=False, defenses=["prune:0,0.9"], **FAST)
    assert sorted(kept.summary) == ["prune=0", "prune=0.9"] and [r["defense"] for r in kept.rows] == ["prune=0", "prune=0.9"]
    clear, pruned = kept.rows
    assert pruned["psnr"] < clear["psnr"]  # 90% of the gradient zeroed: the naive attack does worse
    out = tmp_path / "defended"
    saved = dlg_jax.run_sweep(data, indices=[0], seeds=[0], lanes=2, out=out, progress=False,
                              defenses=["prune:0,0.9"], **FAST)
    assert (out / "prune=0.9" / "results.csv").exists() and "prune=0.9" in (out / "summary.md").read_text()
    assert [r["psnr"] for r in saved.rows] == [r["psnr"] for r in kept.rows]
    with pytest.raises(Exception, match="unknown defense|choose from"):
        dlg_jax.run_sweep(data, indices=[0], seeds=[0], progress=False, defenses=["blur:1"], **FAST)
