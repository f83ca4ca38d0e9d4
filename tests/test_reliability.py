"""A sweep never loses a row, the output folder cannot be turned against the user, every bad input is one
line (issue 20). The CLIs are the subject here, so most tests run them as processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CIFAR100

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--steps", "2", "--iterations-per-step", "4", "--quiet"]
pytestmark = pytest.mark.skipif(not CIFAR100.exists() and os.environ.get("CI") != "true", reason="shared data missing")


def cli(module, *args, cwd, wait=True, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", f"dlg_jax.{module}", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def sweep(*args, cwd, **kwargs):
    return cli("sweep", "--data", CIFAR100, *TINY_FLAGS, *args, cwd=cwd, **kwargs)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("results*.jsonl")) for line in f.read_text().splitlines()]


def one_line(proc, fragment, code=2):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr and fragment in lines[0], proc.stderr[-2000:]


def wait_for(predicate, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_resume_after_a_cut_newline_loses_no_row(tmp_path):
    out = tmp_path / "x"
    args = ["--indices", "0:3", "--seeds", "0:2", "--lanes", "4", "--out", out]
    assert sweep(*args, cwd=tmp_path).returncode == 0
    file = out / "results.jsonl"
    file.write_bytes(file.read_bytes()[:-1])  # `truncate -s -1`: the last row is whole JSON, but unterminated
    again = sweep(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    keys = sorted((r["index"], r["seed"]) for r in rows(out))
    assert keys == [(i, s) for i in range(3) for s in range(2)]


def test_planted_symlinks_are_refused_not_followed(tmp_path):
    for victim in ("victim1", "victim2", "victim3"):
        (tmp_path / victim).write_text("precious\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.jsonl").symlink_to(tmp_path / "victim1")
    proc = sweep("--indices", "0:1", "--out", out, cwd=tmp_path)
    one_line(proc, "results.jsonl is a symbolic link")
    run_out = tmp_path / "r"
    run_out.mkdir()
    (run_out / "history.png").symlink_to(tmp_path / "victim2")
    proc = cli("run", "--data", CIFAR100, "--index", "0", *TINY_FLAGS, "--out", run_out, cwd=tmp_path)
    one_line(proc, "history.png is a symbolic link")
    (out / "results.jsonl").unlink()
    (out / "reconstructions").mkdir()
    (out / "reconstructions" / "0-1234.npz").symlink_to(tmp_path / "victim3")
    one_line(sweep("--indices", "0:1", "--out", out, cwd=tmp_path), "0-1234.npz is a symbolic link")
    assert all((tmp_path / v).read_text() == "precious\n" for v in ("victim1", "victim2", "victim3"))


def test_temporary_files_are_unpredictable_and_atomic(tmp_path):
    from dlg_jax.results.files import write_atomic

    target = tmp_path / "summary.json"
    (tmp_path / "summary.json.tmp").symlink_to(tmp_path / "victim")  # the old, guessable temporary name
    write_atomic(target, "{}\n")
    assert target.read_text() == "{}\n" and not (tmp_path / "victim").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "summary.json.tmp"]
    from dlg_jax.results import files

    old = os.umask(0o022)
    files._umask.cache_clear()  # read once per process: read it again under this umask
    try:
        write_atomic(target, "{}\n")
    finally:
        os.umask(old)
        files._umask.cache_clear()
    assert target.stat().st_mode & 0o777 == 0o644  # an ordinary file's permissions, not mkstemp's 0600


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "90000000", "--iterations-per-step", "20"], "must stay below 2^31"),
    (["--seed", "9223372036854775808"], "--seed: must lie in 0..2147483647"),
    (["--model-seed", "100000000000000000000"], "--model-seed: must lie in"),
    (["--model-seed", "1e20"], "--model-seed: expected an integer seed"),
    (["--tv-weight", "1e38"], "tv_weight must be in [0, 1e6)"),
    (["--out", ""], "--out: an empty path"),
    (["--indices", "0:20000000"], "more than 1,000,000 values"),
])
def test_bad_run_input_is_one_line_before_any_work(tmp_path, args, fragment, capsys):
    from dlg_jax.cli import run as R

    argv = ["--data", str(CIFAR100), "--index", "0", *TINY_FLAGS, "--out", str(tmp_path / "out"), *args]
    try:
        code = R.main(argv)
    except SystemExit as exit:
        code = exit.code
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and fragment in error[0], error
    assert not (tmp_path / "out").exists()


def test_bad_data_is_one_line(tmp_path, monkeypatch):
    from PIL import Image

    from dlg_jax import data
    from dlg_jax.errors import UsageError

    np.save(tmp_path / "a.npy", np.zeros((2, 3)))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    cases = {"a.npz": "not an npz archive"}
    for name, labels, fragment in (("s.npz", np.array(["3", "x"]), "labels must be integers"),
                                   ("f.npz", np.array([84.7, 1.0]), "whole numbers, found 84.7"),
                                   ("n.npz", np.array([np.nan, 1.0]), "NaN or inf")):
        np.savez(tmp_path / name, images=np.zeros((2, 8, 8, 3), np.uint8), labels=labels)
        cases[name] = fragment
    for name, fragment in cases.items():
        with pytest.raises(UsageError, match=fragment):
            data.load_npz(tmp_path / name)
    proc = cli("run", "--data", tmp_path / "f.npz", "--index", "0", *TINY_FLAGS, "--out", tmp_path / "o", cwd=tmp_path)
    one_line(proc, "whole numbers, found 84.7")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's bomb limit, scaled down to a small image
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(UsageError, match="too large to decode safely"):
        data.load_images([tmp_path / "big.png"], (32, 32, 3), None, ["a"])


def test_an_unwritable_out_is_one_line_before_the_attack(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = cli("run", "--data", CIFAR100, "--index", "0", *TINY_FLAGS, "--out", tmp_path / "file" / "sub", cwd=tmp_path)
    one_line(proc, "cannot write there")
    assert "evaluations" not in proc.stdout  # refused before the attack
    one_line(sweep("--indices", "0:1", "--out", tmp_path / "file" / "sub", cwd=tmp_path), "cannot write there")


def mounted_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_read_only_and_full_file_systems_are_one_line(tmp_path):
    ro, full = tmp_path / "ro", tmp_path / "full"
    if not (mounted_tmpfs(ro, "ro,size=1m") and mounted_tmpfs(full, "size=64k")):
        pytest.skip("cannot mount a tmpfs here")
    try:
        one_line(cli("run", "--data", CIFAR100, "--index", "0", *TINY_FLAGS, "--out", ro / "o", cwd=tmp_path),
                 "cannot write there")
        (full / "filler").write_bytes(b"\0" * 60_000)  # one 4 KiB page left: too little for the figures
        proc = cli("run", "--data", CIFAR100, "--index", "0", *TINY_FLAGS, "--out", full / "o", cwd=tmp_path)
        one_line(proc, "No space left on device")
        assert not (full / "o").exists()  # nothing half-written
        proc = sweep("--indices", "0:2", "--out", full / "s", cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "No space left" in proc.stderr
    finally:
        subprocess.run(["umount", str(ro)])
        subprocess.run(["umount", str(full)])


def test_a_row_without_a_key_is_not_counted(tmp_path):
    out = tmp_path / "x"
    args = ["--indices", "0:2", "--lanes", "2", "--out", out]
    assert sweep(*args, cwd=tmp_path).returncode == 0
    file = out / "results.jsonl"
    lines = file.read_text().splitlines()
    broken = json.loads(lines[0])
    del broken["psnr"]
    file.write_text(json.dumps(broken) + "\n" + lines[1] + "\n")
    again = sweep(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    counted = [r for r in rows(out) if "psnr" in r]
    assert sorted(r["index"] for r in counted) == [0, 1]
    assert json.loads((out / "summary.json").read_text())["summary"]["rows"] == 2


def test_config_json_deleted_does_not_let_two_settings_mix_and_data_is_known_by_content(tmp_path):
    out = tmp_path / "x"
    assert sweep("--indices", "0:1", "--out", out, cwd=tmp_path).returncode == 0
    copy = tmp_path / "copy.npz"
    shutil.copy(CIFAR100, copy)
    same = cli("sweep", "--data", copy, *TINY_FLAGS, "--indices", "0:1", "--out", out, cwd=tmp_path)
    assert same.returncode == 0, same.stderr  # an identical copy elsewhere is the same data
    assert json.loads((out / "config.json").read_text())["provenance"]["data"] == str(CIFAR100)  # as typed
    (out / "config.json").unlink()
    other = cli("sweep", "--data", CIFAR100, "--steps", "3", "--iterations-per-step", "4", "--quiet", "--indices", "0:2",
                "--out", out, cwd=tmp_path)
    one_line(other, "holds rows of another configuration")
    with np.load(CIFAR100) as npz:
        np.savez(copy, images=npz["images"][::-1], labels=npz["labels"][::-1], label_names=npz["label_names"])
    (out / "config.json").write_text("{}")
    shutil.rmtree(out)
    assert sweep("--indices", "0:1", "--out", out, cwd=tmp_path).returncode == 0
    changed = cli("sweep", "--data", copy, *TINY_FLAGS, "--indices", "0:1", "--out", out, cwd=tmp_path)
    one_line(changed, "data.sha256")  # other content: refused


def test_a_plain_sweep_cannot_join_a_processes_sweep_and_the_layout_is_recorded(tmp_path):
    out = tmp_path / "x"
    first = sweep("--indices", "0:6", "--seeds", "0:2", "--lanes", "2", "--processes", "2", "--out", out,
                  cwd=tmp_path, wait=False)
    try:
        assert wait_for(lambda: (out / ".lock").exists() and (out / "config.json").exists())
        plain = sweep("--indices", "0:6", "--seeds", "0:2", "--single-device", "--out", out, cwd=tmp_path)
        one_line(plain, "another sweep is writing there")
    finally:
        first.communicate(timeout=300)
    assert first.returncode == 0
    two_devices = sweep("--indices", "0:6", "--seeds", "0:2", "--out", out, cwd=tmp_path)  # 2 CPU devices, one process
    if os.cpu_count() and len(os.sched_getaffinity(0)) > 1:
        one_line(two_devices, "devices_per_process 1 -> 2")


def test_killing_the_launcher_leaves_no_worker(tmp_path):
    out = tmp_path / "x"
    launcher = sweep("--indices", "0:50", "--seeds", "0:8", "--lanes", "2", "--processes", "2", "--out", out,
                     cwd=tmp_path, wait=False)
    def workers() -> list[int]:  # the sweep's worker processes, from their command lines in /proc
        found = []
        for proc in Path("/proc").iterdir():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--worker" in args and str(out).encode() in args:
                found.append(int(proc.name))
        return found

    assert wait_for(lambda: len(workers()) == 2)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert wait_for(lambda: not workers(), 30), workers()


def test_ctrl_c_is_one_line_keeps_the_rows_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "x"
    args = ["--indices", "0:10", "--seeds", "0:3", "--lanes", "2", "--single-device", "--out", out]
    proc = sweep(*args, cwd=tmp_path, wait=False)
    assert wait_for(lambda: (out / "results.jsonl").exists() and (out / "results.jsonl").read_text().count("\n") >= 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    saved = len(rows(out))
    assert f"interrupted: {saved} rows saved in {out}; rerun the same command to resume" in lines[0]
    again = sweep(*args, cwd=tmp_path)
    assert again.returncode == 0 and f"resuming: {saved} done, {30 - saved} to go" in again.stderr
    assert len(rows(out)) == 30


def test_ctrl_c_in_a_run_writes_nothing(tmp_path):
    out = tmp_path / "r"
    proc = cli("run", "--data", CIFAR100, "--index", "0", "--steps", "300", "--out", out, cwd=tmp_path, wait=False)
    assert proc.stdout.readline().startswith("compiling")
    first = proc.stdout.readline()  # the first printed distance: the attack is under way
    assert first.startswith("0 "), first
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stderr.strip().splitlines() == [f"dlg_jax.run: interrupted; nothing written to {out}"]
    assert not out.exists()


def test_json_never_holds_non_finite_numbers(tmp_path):
    from dlg_jax.results.files import dumps
    from dlg_jax.results.store import ResultsDir

    assert dumps({"a": float("nan"), "b": [float("inf"), 1.0]}) == '{"a": null, "b": [null, 1.0]}'
    results = ResultsDir(tmp_path / "x", {"k": 1})
    results.open()
    row = dict(index=0, seed=1, psnr=float("nan"), status="diverged", seconds=1.0, grad_distance=float("inf"),
               iterations=3, evaluations=4)
    results.append([row], {})
    text = (tmp_path / "x" / "results.jsonl").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite {c} in JSON"))
    assert [(r["psnr"], r["grad_distance"]) for r in results.rows()] == [(None, None)]
