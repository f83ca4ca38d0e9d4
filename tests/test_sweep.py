"""Sweeps: batched attacks equal sequential ones, sharding changes nothing, restarts, resume, refusals, bad input.

Attacks here are tiny (a few LBFGS iterations) so the file runs in well under two minutes on 2 CPU cores;
the equality checks run in float64, where a handful of iterations keeps batched and sequential
trajectories within 1e-6 of each other (the attack is chaotic: rounding differences, from a batched matrix
product or a gather instead of a slice, grow with iterations), and the discrete outcomes (status, attempts,
iterations, evaluations, label) are equal.
"""

import dataclasses
import functools
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

from dlg_jax import attack as A
from dlg_jax import sweep as S
from dlg_jax.batched import build_problem
from dlg_jax.models import LeNet, init_params
from tests.conftest import CIFAR100

ROOT = Path(__file__).resolve().parents[1]
TINY = A.AttackConfig(steps=4, iterations_per_step=5, evaluations_per_step=25, precision="float64", history_size=10,
                      probe_steps=2, probe_reduction=0.5)  # stalls are likely: the retry path runs too
TINY_FLAGS = ["--steps", "2", "--iterations-per-step", "4"]


def sequential(config, images, labels, tasks, restarts=None):
    """Each task (with its restart, default 0) attacked alone by attack.Attack, as `dlg_jax.run` does."""
    model = LeNet(num_classes=100)
    with A.precision_scope(config):
        params = jax.tree.map(lambda p: jnp.asarray(p, config.dtype), init_params(model, 1234, (32, 32, 3)))
        apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
        attack = A.Attack(apply_fn, config)
        results = []
        for task, restart in zip(tasks, restarts or [0] * len(tasks)):
            problem, _ = build_problem(apply_fn, params, config, 100, jnp.asarray(images[task.positions]),
                                       jnp.asarray(labels[task.positions]), jnp.asarray(task.seed), jnp.asarray(restart))
            problem = problem._replace(params=params, key=jax.random.wrap_key_data(problem.key))
            state = attack.advance(attack.init(problem), problem, config.steps)
            results.append(dict(grad_distance=float(state.best_value), status=A.STATUS_NAMES[int(state.status)],
                                attempts=int(state.attempt) + 1, iterations=int(state.iterations),
                                evaluations=int(state.evaluations), images=np.asarray(state.best_dummy["images"][0]),
                                label_pred=int(A.predicted_labels(state, problem)[0])))
        return results


TASKS = [S.Task(0, 5), S.Task(1, 6), S.Task(2, 7), S.Task(3, 8), S.Task(1, 9)]


@pytest.fixture(scope="module")
def alone(cifar100):
    """The TASKS attacked one by one (joint labels): the reference of the engine tests."""
    return sequential(TINY, cifar100["images"][:4], cifar100["labels"][:4], TASKS)


def assert_same(batched, alone):
    for b, s in zip(batched, alone):
        for key in ("status", "attempts", "iterations", "evaluations", "label_pred"):
            assert b[key] == s[key], (key, b[key], s[key])
        np.testing.assert_allclose(b["grad_distance"], s["grad_distance"], rtol=1e-6)
        np.testing.assert_allclose(b["reconstruction"], s["images"], atol=1e-4)


@pytest.mark.parametrize("label_strategy, condition", [("joint", "armijo"), ("idlg", "armijo"), ("joint", "wolfe"),
                                                       ("joint", "strong-wolfe")])
def test_batched_sweep_equals_attacks_run_one_by_one(cifar100, alone, label_strategy, condition):
    """3 lanes for 5 attacks (so lanes are refilled), some with retries: each equals attack.Attack alone, with
    each line-search condition. (Strong) Wolfe shrinks by jaxopt's 0.8: halving makes one search here fail
    after 30 trials, and the ~1e-9 step it takes leaves a pair whose s . y is mostly rounding, which 1 / (s . y)
    then amplifies beyond the tolerance below."""
    decrease = TINY.linesearch_decrease if condition == "armijo" else 0.8
    config = dataclasses.replace(TINY, label_strategy=label_strategy, linesearch_condition=condition,
                                 linesearch_decrease=decrease)
    images, labels = cifar100["images"][:4], cifar100["labels"][:4]
    outcomes = S.Sweep(100, (32, 32, 3), config).run(images, labels, TASKS, batch=3)
    assert [o["task"] for o in outcomes] == TASKS
    expected = alone if config == TINY else sequential(config, images, labels, TASKS)
    assert any(o["attempts"] > 1 for o in expected)  # the retry path is exercised
    assert_same(outcomes, expected)


def test_budget_of_evaluations_ends_attacks_alike(cifar100):
    """An attack stops (max_steps) once its evaluations reach steps x evaluations_per_step, at the end of the
    iteration that reached it, however many iterations remain: batched as alone."""
    assert A.AttackConfig().max_evaluations == 300 * 25  # torch's max_eval, max_iter * 5 // 4, per step
    assert A.AttackConfig(iterations_per_step=100).max_evaluations == 300 * 125
    config = dataclasses.replace(TINY, evaluations_per_step=3, retries=0)  # 12 evaluations for 20 iterations
    images, labels = cifar100["images"][:4], cifar100["labels"][:4]
    expected = sequential(config, images, labels, TASKS[:3])
    for o in expected:
        assert o["status"] == "max_steps" and o["iterations"] < config.max_iterations
        assert config.max_evaluations <= o["evaluations"] < config.max_evaluations + config.max_linesearch_steps
    assert_same(S.Sweep(100, (32, 32, 3), config).run(images, labels, TASKS[:3], batch=2), expected)


@pytest.mark.parametrize("count", [0, 1, 3, 5, 12])
def test_compact_product_equals_jaxopt_two_loop(count):
    """The engine's compact L-BFGS product, its s.y / y.y tables kept pair by pair, is jaxopt's two-loop
    recursion over the valid pairs (a pair with s . y < 0 skipped: rho = 0): before the ring is full (stale
    slots hold other numbers) and after it wraps."""
    from jaxopt._src.lbfgs import inv_hessian_product

    from dlg_jax.batched import lbfgs_inverse_hessian_product

    size, n, rng = 5, 7, np.random.default_rng(count)
    with jax.enable_x64(True):
        s_history, y_history = rng.normal(size=(size, n)), rng.normal(size=(size, n))  # stale: another attempt's
        sy, yy = jnp.asarray(rng.normal(size=(size, size))), jnp.asarray(rng.normal(size=(size, size)))
        g, gamma = jnp.asarray(rng.normal(size=n)), 0.7
        for k in range(1, count + 1):  # pair k-1 goes to slot (k-1) % size, then the product sees count k
            s = rng.normal(size=n)
            curving = -1.0 if k == 2 else 2.0  # pair 2 has s . y < 0: it must count for nothing
            s_history[(k - 1) % size], y_history[(k - 1) % size] = s, curving * s + 0.3 * rng.normal(size=n)
            product, sy, yy = lbfgs_inverse_hessian_product(g, jnp.asarray(s_history), jnp.asarray(y_history), sy, yy,
                                                            gamma, jnp.asarray(k))
        if count == 0:
            product, _, _ = lbfgs_inverse_hessian_product(g, jnp.asarray(s_history), jnp.asarray(y_history), sy, yy,
                                                          gamma, jnp.asarray(0))
        valid = np.arange(size) < count
        s_valid, y_valid = np.where(valid[:, None], s_history, 0.0), np.where(valid[:, None], y_history, 0.0)
        curvature = np.sum(s_valid * y_valid, 1)
        rho = np.where(valid & (curvature > 0), 1.0 / np.where(valid, curvature, 1.0), 0.0)
        assert count < 2 or (rho == 0).sum() > size - count  # a pair was skipped
        expected = inv_hessian_product(g, jnp.asarray(s_valid), jnp.asarray(y_valid), jnp.asarray(rho), gamma,
                                       start=count % size)
        np.testing.assert_allclose(product, expected, rtol=1e-10, atol=1e-12)


def test_diverged_pairs_are_stored_as_zeros():
    """A lane's history outlives its attempt: a non-finite pair must not poison the next attack's products."""
    from types import SimpleNamespace
    from typing import NamedTuple

    from dlg_jax.batched import FlatEngine

    class Lanes(NamedTuple):
        lbfgs_iter: jax.Array
        s_history: jax.Array
        y_history: jax.Array

    lanes = Lanes(jnp.array([1, 2, 1]), jnp.ones((3, 4, 2)), jnp.ones((3, 4, 2)))
    s = jnp.array([[jnp.nan, 1.0], [2.0, jnp.inf], [3.0, 3.0]])
    write = functools.partial(FlatEngine._write_history, SimpleNamespace(history=4))
    out = jax.vmap(write)(lanes, s, -s, jnp.array([True, True, False]))
    np.testing.assert_array_equal(out.s_history[0, 0], [0.0, 1.0])
    np.testing.assert_array_equal(out.y_history[1, 1], [-2.0, 0.0])
    np.testing.assert_array_equal(out.s_history[2], np.ones((4, 2)))  # not writing: untouched


def test_all_lanes_at_once_equal_attacks_run_one_by_one(cifar100, alone):
    """Every lane taking its trip at once (vmapped, as on accelerators) gives what the lane-by-lane CPU path gives."""
    images, labels = cifar100["images"][:4], cifar100["labels"][:4]
    sweep = S.Sweep(100, (32, 32, 3), TINY)
    assert sweep.engine.lane_by_lane  # the CPU default
    sweep.engine.lane_by_lane = False
    assert_same(sweep.run(images, labels, TASKS, batch=3), alone)


def test_refill_shares_jobs_evenly_between_devices():
    """With fewer jobs than lanes (the end of a sweep, or a small one), each device gets its share: lanes are
    filled on the least busy device first, not in index order (which would load the first device only)."""
    import collections
    from types import SimpleNamespace

    sweep = S.Sweep.__new__(S.Sweep)  # only what _refill reads
    sweep.batch_size, sweep.image_shape = 1, (2, 2, 3)
    sweep.engine = SimpleNamespace(devices=[0, 1], fill=lambda programs, state, mask, *jobs: mask)
    images, labels = np.zeros((9, 2, 2, 3), np.uint8), np.arange(9)
    tasks = [S.Task(n, 0) for n in range(9)]
    slot_job = [(8, 0), None, None, None, None, None, None, None]  # 8 lanes, 4 per device; lane 0 busy
    mask = sweep._refill(None, None, slot_job, collections.deque((t, 0) for t in range(3)), images, labels, tasks)
    assert mask[:4].sum() + 1 == mask[4:].sum() == 2  # device 0 had one job already: 2 + 2, not 4 + 0
    assert sorted(job for job in slot_job if job) == [(0, 0), (1, 0), (2, 0), (8, 0)]  # every job placed once


def test_vmap_engine_equals_attacks_run_one_by_one(cifar100, alone):
    images, labels = cifar100["images"][:4], cifar100["labels"][:4]
    outcomes = S.Sweep(100, (32, 32, 3), TINY, engine="vmap").run(images, labels, TASKS[:2], batch=2)
    assert_same(outcomes, alone[:2])


def attack_alone(config, images, labels, seed):
    """One attack on the mean gradient of `images` by attack.Attack, as `dlg_jax.run` runs it."""
    model = LeNet(num_classes=100)
    with A.precision_scope(config):
        params = jax.tree.map(lambda p: jnp.asarray(p, config.dtype), init_params(model, 1234, (32, 32, 3)))
        apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
        problem = A.make_problem(apply_fn, params, jnp.asarray(images, config.dtype) / 255.0, jnp.asarray(labels), 100,
                                 config, seed)
        attack = A.Attack(apply_fn, config)
        state = attack.advance(attack.init(problem), problem, config.steps)
        return dict(grad_distance=float(state.best_value), iterations=int(state.iterations),
                    evaluations=int(state.evaluations), images=np.asarray(A.dummy_images(state.best_dummy, config)),
                    label_pred=[int(c) for c in A.predicted_labels(state, problem)])


@pytest.mark.parametrize("engine, prior", [("flat", {}), ("vmap", dict(pixel_range="sigmoid", tv_weight=1e-3))])
def test_sweep_of_image_batches_equals_batched_attacks_run_alone(cifar100, engine, prior):
    """Lanes that each attack the mean gradient of 2 images (with the staged TV prior on the vmap engine)."""
    config = dataclasses.replace(TINY, label_strategy="idlg", retries=0, tv_stages=2, **prior)
    images, labels = cifar100["images"][:4], cifar100["labels"][:4]
    tasks = [S.Task((0, 1), 5), S.Task((2, 3), 6), S.Task((1, 2), 7)]
    outcomes = S.Sweep(100, (32, 32, 3), config, engine=engine, batch_size=2).run(images, labels, tasks, batch=2)
    for task, o in zip(tasks, outcomes):
        expected = attack_alone(config, images[list(task.image)], labels[list(task.image)], task.seed)
        assert o["reconstruction"].shape == (2, 32, 32, 3) and o["label_true"] == labels[list(task.image)].tolist()
        assert o["label_pred"] == expected["label_pred"]
        assert (o["iterations"], o["evaluations"]) == (expected["iterations"], expected["evaluations"])
        np.testing.assert_allclose(o["grad_distance"], expected["grad_distance"], rtol=1e-6)
        np.testing.assert_allclose(o["reconstruction"], expected["images"], atol=1e-4)
    if prior:
        assert all(0 < o["reconstruction"].min() and o["reconstruction"].max() < 1 for o in outcomes)


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


def test_restarts_keep_the_lowest_gradient_distance(cifar100):
    config = dataclasses.replace(TINY, steps=2, retries=0)
    images, labels = cifar100["images"][:2], cifar100["labels"][:2]
    tasks = [S.Task(0, 3), S.Task(1, 4)]
    outcomes = S.Sweep(100, (32, 32, 3), config, restarts=3).run(images, labels, tasks, batch=4)
    for o in outcomes:
        distances = o["restart_distances"]
        assert len(distances) == 3 and len(set(distances)) == 3  # three different starts
        assert o["restart"] == int(np.argmin(distances)) and o["grad_distance"] == min(distances)
    kept = sequential(config, images, labels, tasks + tasks[:1], [o["restart"] for o in outcomes] + [0])
    for o, alone_kept in zip(outcomes, kept):  # the image kept is that restart's
        np.testing.assert_allclose(o["reconstruction"], alone_kept["images"], atol=1e-4)
    np.testing.assert_allclose(outcomes[0]["restart_distances"][0], kept[2]["grad_distance"], rtol=1e-6)  # restart 0
    # is the plain attack from that seed


def test_restart_0_starts_where_dlg_jax_run_starts(cifar100):
    """The sweep's int32 seeds give make_problem(seed=<int>)'s key and dummy, as `dlg_jax.run --seed` has them
    (float64: where a Python int seed becomes int64)."""
    config = A.AttackConfig(precision="float64")
    model = LeNet(num_classes=100)
    with A.precision_scope(config):
        params = jax.tree.map(lambda p: jnp.asarray(p, config.dtype), init_params(model, 1234, (32, 32, 3)))
        apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
        for seed in (1234, 2**31 - 1):
            run = A.make_problem(apply_fn, params, jnp.asarray(cifar100["images"][3:4], config.dtype) / 255.0,
                                 jnp.asarray(cifar100["labels"][3:4]), 100, config, seed)
            lane, _ = build_problem(apply_fn, params, config, 100, cifar100["images"][3:4],
                                    cifar100["labels"][3:4].astype(np.int32), np.int32(seed), np.int32(0))
            np.testing.assert_array_equal(lane.key, jax.random.key_data(run.key))
            for a, b in zip(jax.tree.leaves(lane.init), jax.tree.leaves(run.init)):
                np.testing.assert_array_equal(a, b)


SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from dlg_jax.attack import AttackConfig
    from dlg_jax.sweep import Sweep, Task
    assert len(jax.devices()) == 4, jax.devices()
    with np.load(sys.argv[1]) as npz:
        images, labels = npz["images"][:6], npz["labels"][:6]
    config = AttackConfig(steps=3, iterations_per_step=5, precision="float64", history_size=10)
    tasks = [Task(n, 10 + n) for n in range(6)]
    out = {}
    for name, devices, batch in (("sharded", jax.devices(), 8), ("one", jax.devices()[:1], 8),
                                 ("one_2_lanes", jax.devices()[:1], 2)):
        sweep = Sweep(100, (32, 32, 3), config, restarts=2, devices=devices)
        results = sweep.run(images, labels, tasks, batch=batch)
        out[name] = [dict(d=r["grad_distance"], dist=r["restart_distances"], it=r["iterations"], ev=r["evaluations"],
                          st=r["status"], img=r["reconstruction"].ravel()[:50].tolist()) for r in results]
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


# ----------------------------------------------------------------------------------------------------------
# The command line


def run_cli(*args, cwd, wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DLG_JAX_CACHE_DIR": str(Path(cwd) / ".xla-cache")}
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
    common = ["--data", CIFAR100, "--indices", "0:4", "--seeds", "0:2", "--batch", "2", "--quiet", *TINY_FLAGS]
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

    same = run_cli(*args, cwd=tmp_path)  # all done: nothing to do, nothing appended
    assert same.returncode == 0 and read_rows(out) == rows


@pytest.mark.skipif(not CIFAR100.exists(), reason="shared data missing")
def test_changed_configuration_is_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    base = ["--data", str(CIFAR100), "--indices", "0:2", "--out", str(out), "--quiet", "--single-device"]
    identity = S._identity(S.build_parser().parse_args(base + TINY_FLAGS), S.data_lib.load_npz(CIFAR100),
                           A.AttackConfig(steps=2, iterations_per_step=4))
    out.mkdir()
    (out / "config.json").write_text(json.dumps(identity))
    (out / "results.jsonl").write_text("")
    assert S.main(base + ["--steps", "3", "--iterations-per-step", "4"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "another configuration" in error[0] and "attack.steps 2 -> 3" in error[0]
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
    (["--batch", "0"], "--batch"),
    (["--batch", "-4"], "--batch"),
    (["--restarts", "0"], "--restarts"),
    (["--bogus"], "unrecognized arguments"),
    (["--optimizer", "torch-lbfgs"], "sweeps run jaxopt LBFGS"),
    (["--coordinator", "h:1"], "need --distributed"),
    (["--batch-size", "0"], "--batch-size"),
    (["--indices", "0:3", "--batch-size", "4"], "fewer than --batch-size 4"),
    (["--tv-weight", "1e-5", "--engine", "flat"], "--engine vmap"),
    (["--tv-weight", "-2"], "--tv-weight"),
    (["--processes", "0"], "--processes"),
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
    """XLA's memory estimate for 64 lanes against a pretend 20 MiB device: refused, with a batch that fits."""
    sweep = S.Sweep(100, (32, 32, 3), A.AttackConfig(steps=1, iterations_per_step=1, history_size=10),
                    devices=jax.devices()[:1])
    monkeypatch.setattr(S, "available_bytes", lambda device: 20 * 2**20)
    with pytest.raises(S.BatchTooLarge, match=r"^--batch 64: needs ~.* GiB per device \((.*) MiB per attack\) but "
                                              r"0.0 GiB is free: use --batch (\d+) or less$") as error:
        sweep.compile(64)
    message = str(error.value)
    per_attack = float(message.split("(")[1].split(" MiB")[0])
    fits = int(message.split("use --batch ")[1].split()[0])
    assert 1 <= fits < 64 and fits * per_attack <= 20 * 0.85 < (fits + 1) * per_attack + 0.1
