"""The Colab notebook runs top to bottom (on CPU, 8 fake devices, tiny sizes), so it cannot rot."""

import json
import os
from pathlib import Path

import pytest

from tests.conftest import CIFAR100

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "colab_tpu_sweep.ipynb"
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_colab_notebook_runs_top_to_bottom_on_8_fake_cpu_devices(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    out = tmp_path / "sweep"
    values = dict(DATA=str(CIFAR100), INDICES=[0, 1, 2], SEEDS=[0, 1], ONE_INDEX=25, STEPS=4, LANES=8, OUT=str(out),
                  FAKE_CPU_DEVICES=8, DEFENSES={"prune": "0.1,0.5"}, DEFENSE_INDICES=[0])
    nb.cells.insert(parameters + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items())))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "8 device(s)" in printed and "backend cpu" in printed
    assert "6 attacks in" in printed
    assert "defense      prune=0.5 adaptive: median PSNR" in printed  # the defense study's lines
    assert len(list((out / "defenses").glob("*/prune/prune=*/results.jsonl"))) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["rows"] == 6 and summary["config"]["devices_per_process"] == 8
    assert (out / "results.zip").stat().st_size > 0 and (out / "results.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing written outside OUT
