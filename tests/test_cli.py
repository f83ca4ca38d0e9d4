"""The command line as a user meets it: exit codes, files written, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CIFAR100

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None, module="dlg_jax.run"):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the session's compilation cache (conftest)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and fragment in lines[0], lines[0]


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_cli_short_run_writes_all_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--data", CIFAR100, "--index", 25, "--steps", 20, "--label-strategy", "idlg", "--out", out,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = [line.split() for line in proc.stdout.splitlines() if line[:1].isdigit()]
    assert [int(p[0]) for p in printed] == [0, 10, 19]  # every 10 steps, as the original, and the last
    result = json.loads((out / "result.json").read_text())
    for key in ("index", "label_true", "label_pred", "mse", "psnr", "ssim", "grad_distance", "steps", "evaluations",
                "seconds", "compile_seconds", "status"):
        assert key in result, key
    assert result["index"] == 25 and result["label_true"] == 84 and result["label_pred"] == 84
    assert result["status"] in ("converged", "max_steps", "max_evaluations") and 0 < result["steps"] <= 20
    assert np.isfinite(result["grad_distance"]) and result["evaluations"] >= result["steps"]
    for name in ("history.png", "reconstruction.png", "trace.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 200
    with Image.open(out / "history.gif") as gif:
        assert gif.n_frames == 3  # steps 0, 10 and the last (19)
    trace = result["trace"]
    assert trace["step"] == list(range(result["stopped_at_step"] + 1)) and len(trace["psnr"]) == len(trace["step"])
    assert trace["grad_distance"][0] > trace["grad_distance"][-1] and trace["evaluations"][-1] == result["evaluations"]
    assert not (out / "result.json.tmp").exists()


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_cli_says_where_the_attack_stopped_and_prints_nothing_after(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--data", CIFAR100, "--index", 25, "--steps", 100, "--label-strategy", "idlg", "--tolerance", "1e-2",
                   "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    stop = result["stopped_at_step"]
    assert result["status"] == "converged" and 0 < stop < 99 and result["steps"] == stop + 1
    printed = [int(line.split()[0]) for line in proc.stdout.splitlines() if line[:1].isdigit()]
    assert printed == list(range(0, stop, 10)) + [stop] * (stop % 10 != 0)  # every 10 steps, then the stop only
    assert f"converged at step {stop}" in proc.stdout.splitlines()[-1]
    assert proc.stdout.splitlines()[0].startswith("compiling")
    assert len(result["trace"]["step"]) == stop + 1 and result["trace"]["grad_distance"][-1] <= result["grad_distance"] * 1.0001


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_cli_image_file_source(tmp_path):
    image = tmp_path / "cat.png"
    with np.load(CIFAR100) as npz:
        Image.fromarray(npz["images"][3]).resize((64, 48)).save(image)
    proc = run_cli("--image", image, "--label", 7, "--steps", 2, "--label-strategy", "idlg", "--out", tmp_path / "o",
                   "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["label_true"] == 7 and result["label_pred"] == 7 and result["label_name_true"] == "beetle"


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")  # some cases read it
@pytest.mark.parametrize("args, fragment", [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--index", "50", "--data", str(CIFAR100)], "index 50 is out of range"),
    (["--index", "-1", "--data", str(CIFAR100)], "index -1 is out of range"),
    (["--data", "/nonexistent/x.npz"], "no such file"),
    (["--image", "/nonexistent/x.png"], "no such file"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--label-strategy", "guess"], "--label-strategy"),
    (["--bogus"], "unrecognized arguments"),
    (["--image", "x.png", "--data", "y.npz"], "exclusive"),
    (["--data", str(CIFAR100), "--indices", "48:52"], "index 50 is out of range"),
    (["--data", str(CIFAR100), "--indices", "5:3"], "empty or inverted range"),
    (["--data", str(CIFAR100), "--indices", "a,b"], "--indices"),
    (["--data", str(CIFAR100), "--indices", "1,2", "--batch-size", "2"], "either --indices or --index"),
    (["--data", str(CIFAR100), "--batch-size", "0"], "--batch-size"),
    (["--image", "a.png", "b.png", "--label", "3"], "1 label(s) for 2 image(s)"),
    (["--tv-weight", "-1"], "--tv-weight"),
    (["--tv-weight", "nan"], "--tv-weight"),
    (["--pixel-range", "clip"], "--pixel-range"),
    (["--tv-weight", "1e-5", "--optimizer", "torch-lbfgs"], "is not for torch-lbfgs"),
    (["--tv-weight", "1e-5", "--steps", "3", "--tv-stages", "4"], "tv_stages between 0 (constant) and steps"),
    (["--data", str(CIFAR100), "--model", "resnet2"], "unknown model 'resnet2'"),
    (["--data", str(CIFAR100), "--model", "resnet20", "--checkpoint", "missing.npz"], "cannot read checkpoint"),
    (["--data", str(CIFAR100), "--pixel-range", "box"], "projected after every step"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    out = tmp_path / "out"
    proc = run_cli(*args, "--out", out, cwd=tmp_path)
    assert_one_line_error(proc, fragment)
    assert not out.exists()  # nothing half-written


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_cli_batch_writes_per_image_rows_and_means(tmp_path):
    out = tmp_path / "batch"
    proc = run_cli("--data", CIFAR100, "--indices", "3,9", "--steps", 2, "--label-strategy", "idlg", "--out", out,
                   "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["indices"] == [3, 9] and result["batch_size"] == 2 and len(result["images"]) == 2
    assert [r["index"] for r in result["images"]] == [3, 9]
    assert result["label_accuracy"] == 1.0  # analytic batch labels
    assert result["psnr"] == pytest.approx(np.mean([r["psnr"] for r in result["images"]]), rel=1e-6)


def test_cli_default_tfds_source_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DLG_JAX_OFFLINE", "1")  # never download, even where there is network
    proc = run_cli("--index", 25, "--tfds-dir", tmp_path / "tfds", "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(proc, "--data")
    assert "--image" in proc.stderr and not (tmp_path / "out").exists()


def test_cli_npz_without_labels(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 32, 32, 3), np.uint8))
    proc = run_cli("--data", bad, "--index", 0, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(proc, "missing key(s) labels")
    assert not (tmp_path / "out").exists()


def test_cli_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    proc = run_cli("--image", bad, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(proc, "not a readable image")
