"""The scheduler (refills, restarts, devices) and the sweep command line (resume, processes, refusals).

The engine's equality with attacks run alone is tests/test_engine.py's.
"""

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlg_jax.cli import sweep as S
from dlg_jax.config import AttackConfig, Rules, Solver
from dlg_jax.engine import memory
from dlg_jax.engine.lanes import restart_seed
from dlg_jax.engine.scheduler import Sweep, Task
from dlg_jax.engine.single import attack_one
from tests.conftest import CIFAR100
from tests.helpers import cifar_case

ROOT = Path(__file__).resolve().parents[1]
TINY = AttackConfig(precision="float64", solver=Solver(history_size=10),
                    rules=Rules(steps=2, iterations_per_step=5, evaluations_per_step=25, retries=0))
TINY_FLAGS = ["--steps", "2", "--iterations-per-step", "4"]


def test_refill_shares_jobs_evenly_between_devices():
    """With fewer jobs than lanes (the end of a sweep, or a small one), each device gets its share: lanes are
    filled on the least busy device first, not in index order (which would load the first device only)."""
    from types import SimpleNamespace

    sweep = Sweep.__new__(Sweep)  # only what _refill reads
    sweep.batch_size = 1
    sweep.engine = SimpleNamespace(devices=[0, 1], input_shape=(1, 2, 2, 3), fill=lambda programs, state, mask, *jobs: mask)
    images, labels = np.zeros((9, 2, 2, 3), np.uint8), np.arange(9)
    tasks = [Task((n,), 0) for n in range(9)]
    slot_job = [(8, 0), None, None, None, None, None, None, None]  # 8 lanes, 4 per device; lane 0 busy
    mask = sweep._refill(None, None, slot_job, collections.deque((t, 0) for t in range(3)), images, labels, tasks)
    assert mask[:4].sum() + 1 == mask[4:].sum() == 2  # device 0 had one job already: 2 + 2, not 4 + 0
    assert sorted(job for job in slot_job if job) == [(0, 0), (1, 0), (2, 0), (8, 0)]  # every job placed once


def test_restarts_keep_the_lowest_gradient_distance(cifar100):
    with jax.enable_x64(True):
        case = cifar_case(jnp.float64)
    images, labels = cifar100["images"][:2], cifar100["labels"][:2]
    tasks = [Task((0,), 3), Task((1,), 4)]
    outcomes = Sweep(case, TINY, restarts=3).run(images, labels, tasks, lanes=4)
    for o in outcomes:
        distances = o.restart_distances
        assert len(distances) == 3 and len(set(distances)) == 3  # three different starts
        assert o.restart == int(np.argmin(distances)) and o.grad_distance == min(distances)
        with jax.enable_x64(True):
            seed = int(restart_seed(jnp.int32(o.task.seed), jnp.int32(o.restart)))
        alone, _ = attack_one(case, TINY, images[list(o.task.positions)], labels[list(o.task.positions)], seed)
        np.testing.assert_allclose(o.reconstruction, alone.reconstruction, atol=1e-4)  # the kept restart's image
        if o.restart != 0:
            assert seed != o.task.seed
    plain, _ = attack_one(case, TINY, images[:1], labels[:1], 3)  # restart 0 is the plain attack from that seed
    np.testing.assert_allclose(outcomes[0].restart_distances[0], plain.grad_distance, rtol=1e-6)


SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from dlg_jax.config import AttackConfig, Rules, Solver
    from dlg_jax.engine.attack import make_case
    from dlg_jax.engine.scheduler import Sweep, Task
    assert len(jax.devices()) == 4, jax.devices()
    with np.load(sys.argv[1]) as npz:
        images, labels = npz["images"][:6], npz["labels"][:6]
    config = AttackConfig(precision="float64", solver=Solver(history_size=10), rules=Rules(steps=3, iterations_per_step=5))
    with jax.enable_x64(True):
        case = make_case("lenet", 100, (32, 32, 3), 1234, np.float64)
    tasks = [Task((n,), 10 + n) for n in range(6)]
    out = {}
    for name, devices, lanes in (("sharded", jax.devices(), 8), ("one", jax.devices()[:1], 8),
                                 ("one_2_lanes", jax.devices()[:1], 2)):
        sweep = Sweep(case, config, restarts=2, devices=devices)
        results = sweep.run(images, labels, tasks, lanes=lanes)
        out[name] = [dict(d=r.grad_distance, dist=r.restart_distances, it=r.iterations, ev=r.evaluations,
                          st=r.status, img=r.reconstruction.ravel()[:50].tolist()) for r in results]
        out[name + "_devices"] = len(sweep.engine.mesh.devices.ravel())
    print(json.dumps(out))
""")


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_sharded_over_4_devices_equals_one_device():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(CIFAR100)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sharded_devices"] == 4 and out["one_devices"] == 1
    # On CPU every lane runs the same unbatched programs whatever the number of lanes: bit for bit equal.
    assert out["one_2_lanes"] == out["one"]
    # Across device counts XLA's CPU runtime rounds the first evaluation differently (~1e-14 in float64), and
    # the long line searches from N(0, 1) starts amplify that (one restart here: 271 evaluations in 15
    # iterations, ~1e-6 relative at the end); the discrete outcomes must agree exactly.
    for a, b in zip(out["sharded"], out["one"]):
        assert (a["it"], a["ev"], a["st"]) == (b["it"], b["ev"], b["st"])
        np.testing.assert_allclose(a["dist"], b["dist"], rtol=1e-5)
        np.testing.assert_allclose(a["img"], b["img"], atol=1e-4)


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_cli_batch_size_rows_are_batches_with_per_image_rows(tmp_path):
    out = tmp_path / "sweep"
    proc = run_cli("--data", CIFAR100, "--indices", "0:5", "--batch-size", "2", "--label-strategy", "idlg",
                   "--pixel-range", "sigmoid", "--tv-weight", "1e-5", "--tv-stages", "2", "--batch", "2", "--out", out,
                   "--quiet", *TINY_FLAGS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = sorted(read_rows(out), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == [0, 2]  # batches 0-1 and 2-3; image 4 has no partner
    for r in rows:
        assert r["indices"] == [r["index"], r["index"] + 1] and r["batch_size"] == 2 and len(r["images"]) == 2
        assert r["label_accuracy"] == 1.0 and r["psnr"] == pytest.approx(np.mean([i["psnr"] for i in r["images"]]))
        with np.load(out / "reconstructions" / f"{r['index']}-1234.npz") as saved:
            assert saved["truth"].shape == saved["reconstruction"].shape == (2, 32, 32, 3)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["rows"] == 2 and summary["images"] == 4 and summary["batch_size"] == 2
    assert (out / "worst.png").stat().st_size > 0
    changed = run_cli("--data", CIFAR100, "--indices", "0:5", "--batch-size", "1", "--label-strategy", "idlg",
                      "--pixel-range", "sigmoid", "--tv-weight", "1e-5", "--tv-stages", "2", "--batch", "2",
                      "--out", out, "--quiet", *TINY_FLAGS, cwd=tmp_path)
    assert changed.returncode == 2 and "batch_size 2 -> 1" in changed.stderr


# ----------------------------------------------------------------------------------------------------------
# The command line


def run_cli(*args, cwd, wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the session's compilation cache (conftest)
    command = [sys.executable, "-m", "dlg_jax.sweep", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_processes_share_the_attacks_and_equal_one_process(tmp_path):
    """--processes 2: two pinned workers write results.p0/p1.jsonl, every (index, seed) once, each row what one
    process computes; a rerun adds nothing; the launcher writes one summary."""
    common = ["--data", CIFAR100, "--indices", "0:4", "--seeds", "0:2", "--lanes", "2", "--quiet", *TINY_FLAGS]
    two = run_cli(*common, "--processes", "2", "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    one = run_cli(*common, "--single-device", "--out", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "two").glob("results*.jsonl"))
    assert files == ["results.p0.jsonl", "results.p1.jsonl"]
    rows = [json.loads(line) for f in files for line in (tmp_path / "two" / f).read_text().splitlines()]
    expected = {(r["index"], r["seed"]): r for r in read_rows(tmp_path / "one")}
    assert sorted((r["index"], r["seed"]) for r in rows) == sorted(expected)
    for r in rows:
        e = expected[(r["index"], r["seed"])]
        assert (r["iterations"], r["evaluations"], r["status"]) == (e["iterations"], e["evaluations"], e["status"])
        np.testing.assert_allclose(r["grad_distance"], e["grad_distance"], rtol=1e-6)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())["summary"]
    assert summary["rows"] == 8
    # the workers ran side by side: the attack time is the slower worker's, not the sum of both
    per_worker = [sum(json.loads(line)["seconds"] for line in (tmp_path / "two" / f).read_text().splitlines())
                  for f in files]
    assert summary["attack_seconds"] == pytest.approx(max(per_worker))
    again = run_cli(*common, "--processes", "2", "--out", tmp_path / "two", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sum(len((tmp_path / "two" / f).read_text().splitlines()) for f in files) == 8


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_resume_after_kill_neither_loses_nor_duplicates_rows(tmp_path):
    out = tmp_path / "sweep"
    args = ["--data", CIFAR100, "--indices", "0:5", "--seeds", "0:2", "--batch", "4", "--out", out, "--quiet",
            *TINY_FLAGS]
    proc = run_cli(*args, cwd=tmp_path, wait=False)
    rows_file = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if rows_file.exists() and rows_file.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = read_rows(out)
    assert 1 <= len(first) <= 10
    with rows_file.open("a") as f:  # a row whose write was cut short
        f.write('{"index": 4, "seed": 1, "restarts": 1, "label_tr')
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "truncated last line" in again.stderr
    rows = read_rows(out)
    keys = [(r["index"], r["seed"]) for r in rows]
    assert sorted(keys) == [(i, s) for i in range(5) for s in range(2)]  # every row once
    assert rows[:len(first)] == first  # what was there is kept as it was
    for key in ("index", "label_true", "label_pred", "mse", "psnr", "ssim", "grad_distance", "steps", "iterations",
                "evaluations", "seconds", "compile_seconds", "status", "attempts", "seed", "restarts",
                "restart_distances"):
        assert key in rows[0], key
    assert all(r["steps"] <= 2 and r["restarts"] == 1 and len(r["restart_distances"]) == 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["rows"] == 10 and 0 <= summary["success_rate"] <= 1 and summary["attacks_per_hour"] > 0
    for name in ("summary.md", "psnr_histogram.png", "worst.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "reconstructions").glob("*.npz"))) == 10
    import csv

    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and list(table[0])[:4] == ["index", "seed", "batch_index", "slot"]
    assert {(int(r["index"]), int(r["seed"])) for r in table} == set(keys)
    assert all(float(r["psnr"]) == pytest.approx(next(x["psnr"] for x in rows if (x["index"], x["seed"]) ==
                                                      (int(r["index"]), int(r["seed"])))) for r in table)

    same = run_cli(*args, cwd=tmp_path)  # all done: nothing to do, nothing appended
    assert same.returncode == 0 and read_rows(out) == rows and "resuming: 10 done, 0 to go" in same.stderr

    (out / "summary.json").unlink()
    (out / "results.csv").unlink()
    redo = subprocess.run([sys.executable, "-m", "dlg_jax.report", str(out)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert redo.returncode == 0 and "10 attacks in" in redo.stdout, redo.stderr
    assert json.loads((out / "summary.json").read_text())["summary"]["rows"] == 10
    assert len((out / "results.csv").read_text().splitlines()) == 11
    bad = subprocess.run([sys.executable, "-m", "dlg_jax.report", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no config.json" in bad.stderr


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_changed_configuration_is_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    base = ["--data", str(CIFAR100), "--indices", "0:2", "--out", str(out), "--quiet", "--single-device"]
    identity, provenance = S._identity(S.build_parser().parse_args(base + TINY_FLAGS), S.data_lib.load_npz(CIFAR100),
                                       AttackConfig().override(steps=2, iterations_per_step=4), 1)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dict(identity, provenance=provenance)))
    (out / "results.jsonl").write_text("")
    assert S.main(base + ["--steps", "3", "--iterations-per-step", "4"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "another configuration" in error[0] and "attack.rules.steps 2 -> 3" in error[0]
    assert S.main(base + TINY_FLAGS + ["--restarts", "2"]) == 2
    assert "restarts 1 -> 2" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "results.jsonl"]  # nothing touched


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")  # some cases read it
@pytest.mark.parametrize("args, fragment", [
    (["--indices", "5:5"], "--indices '5:5': 5:5 is an empty or inverted range"),
    (["--indices", "9:2"], "inverted"),
    (["--indices", "0:51"], "index 50 is out of range"),
    (["--indices", "3,x"], "--indices '3,x': expected"),
    (["--seeds", "4:1"], "--seeds '4:1'"),
    (["--seeds", "-1"], "--seeds: -1 is out of range"),
    (["--batch", "0"], "--lanes/--batch"),
    (["--lanes", "-4"], "--lanes"),
    (["--restarts", "0"], "--restarts"),
    (["--bogus"], "unrecognized arguments"),
    (["--optimizer", "jaxopt-lbfgs"], "runs one attack at a time"),
    (["--preset", "bogus"], "--preset"),
    (["--model", "resnet"], "--model: unknown model 'resnet'"),
    (["--model-s", "3"], "unrecognized arguments"),
    (["--coordinator", "h:1"], "need --distributed"),
    (["--batch-size", "0"], "--batch-size"),
    (["--indices", "0:3", "--batch-size", "4"], "fewer than --batch-size 4"),
    (["--tv-weight", "1e6"], "tv_weight must be in"),
    (["--tv-weight", "-2"], "--tv-weight"),
    (["--processes", "0"], "--processes"),
    (["--out", ""], "--out: an empty path"),
    (["--seeds", "0:20000000"], "more than 1,000,000 values"),
    (["--indices", "0:50", "--seeds", "0:300000"], "more than 10,000,000 attacks"),
    (["--processes", "2", "--distributed"], "--processes and --distributed: choose one"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, fragment):
    out = tmp_path / "out"
    argv = ["--data", str(CIFAR100), "--out", str(out), "--single-device", *args]
    try:
        code = S.main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and fragment in error[0], error
    assert not out.exists()


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_cli_bad_input_in_a_real_process(tmp_path):
    proc = run_cli("--data", CIFAR100, "--indices", "40:60", "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dlg_jax.sweep: error: index 50 is out of range: " f"{CIFAR100} has 50 images (0..49)"]


def test_batch_too_large_names_one_that_fits(monkeypatch):
    """XLA's memory estimate for 64 lanes against a pretend 20 MiB device: refused, with a lane count that fits."""
    sweep = Sweep(cifar_case(), AttackConfig().override(steps=1, iterations_per_step=1, history_size=10),
                  devices=jax.devices()[:1])
    monkeypatch.setattr(memory, "available_bytes", lambda device: 20 * 2**20)
    with pytest.raises(memory.BatchTooLarge, match=r"^--lanes 64: needs ~.* GiB per device \((.*) MiB per attack\) but "
                                                   r"0.0 GiB is free: use --lanes (\d+) or less$") as error:
        sweep.compile(64)
    message = str(error.value)
    per_attack = float(message.split("(")[1].split(" MiB")[0])
    fits = int(message.split("use --lanes ")[1].split()[0])
    assert 1 <= fits < 64 and fits * per_attack <= 20 * 0.85 < (fits + 1) * per_attack + 0.1


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_presets_round_trip_through_config_json_and_a_changed_preset_is_refused(tmp_path):
    """config.json holds the nested config; from_dict gives the same config back; --preset batch and the same
    flags spelled out are one sweep (resumed, nothing added); another preset on the same DIR is refused."""
    from dlg_jax.config import PRESETS

    for preset in PRESETS.values():
        assert AttackConfig.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
    out = tmp_path / "sweep"
    common = ["--data", CIFAR100, "--indices", "0:2", "--batch-size", "2", "--lanes", "1", "--out", out, "--quiet"]
    first = run_cli(*common, "--preset", "batch", "--steps", "4", "--tv-stages", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    stored = json.loads((out / "config.json").read_text())
    assert AttackConfig.from_dict(stored["attack"]) == PRESETS["batch"].override(steps=4, tv_stages=2)
    spelled = run_cli(*common, "--label-strategy", "idlg", "--pixel-range", "sigmoid", "--tv-weight", "1e-5",
                      "--tv-stages", "2", "--steps", "4", "--retries", "3", "--plateau-reduction", "0",
                      "--float64-retry", "off", cwd=tmp_path)
    assert spelled.returncode == 0, spelled.stderr[-2000:]
    assert len(read_rows(out)) == 1
    other = run_cli(*common, "--preset", "idlg", "--steps", "4", "--tv-stages", "2", cwd=tmp_path)
    assert other.returncode == 2 and "another configuration" in other.stderr


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_too_many_lanes_are_refused_before_out_is_created(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)  # a pretend 1 MiB device
    out = tmp_path / "out"
    assert S.main(["--data", str(CIFAR100), "--indices", "0:8", "--lanes", "8", "--single-device", "--out", str(out),
                   *TINY_FLAGS]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--lanes 8: needs" in error[0]
    assert not out.exists()
