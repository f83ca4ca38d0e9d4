"""Defenses on hand-made gradients, the adaptive attacker's counterparts, and a defended attack in the engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlg_jax import defenses as D
from dlg_jax.client import client_gradient
from dlg_jax.errors import UsageError
from tests.helpers import tiny_case


def _grads():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(50, 40)), jnp.float32), "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}


@pytest.mark.parametrize("name", ["gauss", "laplace"])
def test_noise_has_the_asked_variance_and_zero_mean(name):
    g = {"w": jnp.zeros((400, 400), jnp.float32)}
    out = D.KINDS[name].apply(jax.random.key(3), g, jnp.float32(1e-2))["w"]
    assert float(jnp.mean(out)) == pytest.approx(0.0, abs=2e-3)
    assert float(jnp.var(out)) == pytest.approx(1e-2, rel=0.03)  # 160,000 draws: Laplace sample variance std 0.6%
    kurtosis = float(jnp.mean(out**4) / jnp.var(out) ** 2)
    assert kurtosis == pytest.approx(3.0 if name == "gauss" else 6.0, rel=0.1)  # Gaussian 3, Laplace 6
    again = D.KINDS[name].apply(jax.random.key(3), g, jnp.float32(1e-2))["w"]
    np.testing.assert_array_equal(out, again)  # a fixed key: the same noise


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.2, 0.7, 0.99])
def test_pruning_zeroes_exactly_the_smallest_fraction_of_each_tensor(fraction):
    g = _grads()
    out = D.prune(None, g, jnp.float32(fraction))
    for name in g:
        a, b = np.asarray(g[name]), np.asarray(out[name])
        k = int(np.floor(fraction * a.size))
        assert int((b == 0).sum()) == k
        if k:
            assert np.abs(a[b == 0]).max() <= np.abs(a[b != 0]).min()  # the smallest ones went
        np.testing.assert_array_equal(b[b != 0], a[b != 0])  # the rest untouched


def test_int8_round_trip_error_is_at_most_half_a_step():
    g = _grads()
    out = D.KINDS["int8"].apply(None, g, 0.0)
    for name in g:
        scale = np.abs(np.asarray(g[name])).max() / 127
        error = np.abs(np.asarray(out[name]) - np.asarray(g[name]))
        assert error.max() <= scale / 2 * (1 + 1e-5)
        assert len(np.unique(np.round(np.asarray(out[name]) / scale))) <= 255


def test_casts_round_as_the_format_does():
    g = _grads()
    for name, dtype in (("fp16", jnp.float16), ("bf16", jnp.bfloat16)):
        out = D.KINDS[name].apply(None, g, 0.0)
        np.testing.assert_array_equal(out["w"], g["w"].astype(dtype).astype(jnp.float32))
        assert out["w"].dtype == jnp.float32


def test_adaptive_counterparts_make_the_truth_match_exactly():
    """Against pruning, casts and int8 the true gradient, adapted, equals what was shared: D = 0 at the truth."""
    g = _grads()
    for name, strength in (("prune", 0.5), ("fp16", 0.0), ("bf16", 0.0), ("int8", 0.0)):
        shared = D.KINDS[name].apply(None, g, jnp.float32(strength))
        adapted = D.adapt((name,), g, shared)
        for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(shared)):
            np.testing.assert_array_equal(a, b)


def test_dp_clips_every_example_and_matches_a_direct_computation():
    case = tiny_case()
    model, params = case.model, case.params
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(size=(3, 8, 8, 1)), jnp.float32)
    y = jax.nn.one_hot(jnp.array([0, 1, 3]), 4)
    per_example = [client_gradient(model, params, x[n:n + 1], y[n:n + 1]) for n in range(3)]
    norms = [float(jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(g)))) for g in per_example]
    clip = 0.5 * min(norms)  # every example is clipped
    direct = jax.tree.map(lambda *gs: sum(g * min(1.0, clip / nrm) for g, nrm in zip(gs, norms)) / 3, *per_example)
    noiseless = D.dp_gradient(model, params, x, y, None, 0.0, clip, noise=False)
    for a, b in zip(jax.tree.leaves(noiseless), jax.tree.leaves(direct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the sum of clipped examples has norm <= 3 C; divided by the batch, <= C
    assert float(jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(noiseless)))) <= clip * (1 + 1e-5)
    noisy = D.dp_gradient(model, params, x, y, jax.random.key(0), jnp.float32(2.0), clip)
    diff = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(noiseless))])
    assert np.std(diff) == pytest.approx(2.0 * clip / 3, rel=0.1)  # std z C / N (586 draws: 3% std)


def test_epsilon_from_the_accountant():
    run = D.TrainingRun(steps=1000, rate=0.01, delta=1e-5)
    assert D.epsilon(1.0, run) == pytest.approx(2.10, abs=0.01)
    assert D.epsilon(4.0, run) < D.epsilon(1.0, run)


@pytest.mark.parametrize("spec", ["nope:1", "prune:1", "prune:-0.1", "gauss:2", "gauss", "dp:0", "fp16:3", "prune:x"])
def test_bad_specs_are_usage_errors(spec):
    with pytest.raises(UsageError):
        D.parse(spec)


def test_specs_parse_to_strength_axes():
    assert D.parse("prune:0.01,0.1,0.2") == D.Defense("prune", (0.01, 0.1, 0.2))
    assert D.parse("fp16") == D.Defense("fp16", (0.0,))
    assert D.label(("gauss", "prune"), (1e-3, 0.1)) == "gauss=0.001+prune=0.1"
    with pytest.raises(UsageError):
        D.check_chain(["prune", "dp"])
    with pytest.raises(UsageError):
        D.check_run(D.TrainingRun(rate=1.0, delta=1e-5), batch=1)  # a dataset of one


# ---- through the engine: per-lane strengths, adaptive attacks


def _tiny_setup():
    from dlg_jax.config import AttackConfig, Rules, Solver

    config = AttackConfig(precision="float64", solver=Solver(history_size=10),
                          rules=Rules(steps=4, iterations_per_step=5, evaluations_per_step=200, retries=1,
                                      probe_steps=2, probe_reduction=0.5))
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
    return config, images, np.array([0, 2, 3])


@pytest.mark.parametrize("name, strengths, adaptive", [("prune", (0.0, 0.3, 0.9), True), ("gauss", (1e-4, 1e-2, 0.0), True),
                                                       ("int8", (0.0, 0.0, 0.0), True), ("prune", (0.3, 0.9, 0.5), False)])
def test_a_sweep_over_strengths_equals_each_defended_attack_alone(name, strengths, adaptive):
    """One program, each lane its own strength (3 lanes for 3 tasks, 2 lanes for 3: refilled); each equals the
    attack run alone (jaxopt's LBFGS, the case at that strength)."""
    from dlg_jax.engine.scheduler import Sweep, Task
    from dlg_jax.engine.single import attack_one

    config, images, labels = _tiny_setup()
    config = config.override(adaptive=adaptive)
    with jax.enable_x64(True):
        case = tiny_case(dtype=jnp.float64)._replace(defenses=(name,), strengths=(0.0,))
        tasks = [Task((i,), 7 + i, (s,)) for i, s in enumerate(strengths)]
        batched = Sweep(case, config).run(images, labels, tasks, lanes=2)
        for task, b in zip(tasks, batched):
            alone, _ = attack_one(case._replace(strengths=task.strengths), config.override(optimizer="jaxopt-lbfgs"),
                                  images[list(task.positions)], labels[list(task.positions)], task.seed)
            assert (b.status, b.iterations, b.evaluations) == (alone.status, alone.iterations, alone.evaluations)
            np.testing.assert_allclose(b.grad_distance, alone.grad_distance, rtol=1e-6)
            np.testing.assert_allclose(b.reconstruction, alone.reconstruction, atol=1e-4)  # as tests/test_engine.py


def test_no_strength_is_no_defense():
    """prune 0 and gauss 0 share the plain gradient: the attack is the undefended one (to the rounding of another
    compiled program: 2e-12 measured in float64)."""
    from dlg_jax.engine.scheduler import Sweep, Task

    config, images, labels = _tiny_setup()
    with jax.enable_x64(True):
        case = tiny_case(dtype=jnp.float64)
        plain = Sweep(case, config).run(images, labels, [Task((0,), 3)], lanes=1)[0]
        defended = case._replace(defenses=("gauss", "prune"), strengths=(0.0, 0.0))
        for adaptive in (False, True):
            out = Sweep(defended, config.override(adaptive=adaptive)).run(images, labels, [Task((0,), 3)], lanes=1)[0]
            np.testing.assert_allclose(out.reconstruction, plain.reconstruction, atol=1e-9)
            assert (out.status, out.iterations) == (plain.status, plain.iterations)


def test_adaptive_objective_is_zero_at_the_truth_under_pruning_and_casts():
    from dlg_jax.engine.attack import make_attack, make_problem

    config, images, labels = _tiny_setup()
    config = config.override(labels="idlg", adaptive=True)
    case = tiny_case()
    pixels = jnp.asarray(images[:1], jnp.float32) / 255.0
    for name, s in (("prune", 0.7), ("bf16", 0.0), ("int8", 0.0)):
        defended = case._replace(defenses=(name,), strengths=(s,))
        for adaptive, zero in ((True, True), (False, False)):
            attack = make_attack(defended, config.override(adaptive=adaptive, precision="float32"))
            problem = make_problem(attack, pixels, jnp.asarray(labels[:1]), 0)
            z = attack.layout.ravel(dict(inputs=pixels))
            value = float(attack.objective(z, 0.0, problem, defended.params))
            assert (value == 0.0) == zero, (name, adaptive, value)


# ---- the command line

CIFAR = __import__("tests.conftest", fromlist=["CIFAR100"]).CIFAR100


@pytest.mark.parametrize("flags, fragment", [
    (["--defense", "nope:1"], "unknown defense"), (["--defense", "prune:1"], "[0, 1)"),
    (["--defense", "prune:-0.5"], "[0, 1)"), (["--defense", "gauss"], "give a strength"),
    (["--defense", "dp:1", "--dp-clip", "0"], "--dp-clip"), (["--defense", "dp:1", "--dp-rate", "1"], "dataset of 1"),
    (["--defense", "dp:1", "--dp-delta", "0.5"], "--dp-delta"), (["--defense", "prune:0.1", "--defense", "dp:1"], "first"),
    (["--defense", "prune:0.1,0.2"], "dlg_jax.sweep")])
def test_bad_defenses_are_one_line_and_exit_2(flags, fragment, capsys, tmp_path):
    from dlg_jax.cli import run, sweep

    for module, extra in ((run, []), (sweep, ["--single-device", "--indices", "0:1"])):
        if module is sweep and "dlg_jax.sweep" in fragment:
            continue  # a list of strengths is the sweep's axis
        try:
            code = module.main(["--data", str(CIFAR), "--out", str(tmp_path / "o"), *extra, *flags])
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0] and "Traceback" not in err[0], (module, err)


@pytest.mark.skipif(not CIFAR.exists(), reason="shared data missing")
def test_the_sweep_axis_writes_one_row_per_strength_and_resumes(tmp_path, capsys):
    import json

    from dlg_jax.cli import sweep

    out = tmp_path / "sw"
    argv = ["--data", str(CIFAR), "--indices", "0:2", "--steps", "3", "--lanes", "3", "--single-device", "--quiet",
            "--out", str(out), "--defense", "prune:0.1,0.5", "--defense", "fp16"]
    assert sweep.main(argv) == 0
    for label, fraction in (("prune=0.1+fp16", 0.1), ("prune=0.5+fp16", 0.5)):
        rows = [json.loads(line) for line in (out / label / "results.jsonl").read_text().splitlines()]
        assert sorted(r["index"] for r in rows) == [0, 1]
        assert all(r["defense"] == label and r["defenses"][0] == dict(name="prune", strength=fraction)
                   and r["epsilon"] is None for r in rows)
        assert json.loads((out / label / "config.json").read_text())["defense"]["defense"] == label
    assert "prune=0.5+fp16" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert sweep.main(argv[:3] + ["0:3"] + argv[4:]) == 0  # one more image: only its attacks run
    assert "4 done, 2 to go" in capsys.readouterr().err
    assert len((out / "prune=0.1+fp16" / "results.jsonl").read_text().splitlines()) == 3


@pytest.mark.skipif(not CIFAR.exists(), reason="shared data missing")
def test_dp_rows_carry_epsilon(tmp_path):
    import json

    from dlg_jax import defenses as D
    from dlg_jax.cli import run

    out = tmp_path / "r"
    assert run.main(["--data", str(CIFAR), "--index", "3", "--steps", "2", "--quiet", "--out", str(out),
                     "--defense", "dp:1.0", "--dp-clip", "5", "--dp-steps", "1000", "--dp-rate", "0.01"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["epsilon"] == pytest.approx(D.epsilon(1.0, D.TrainingRun(1000, 0.01, 1e-5)))
    assert result["dp_clip"] == 5 and result["dp_run"] == dict(steps=1000, rate=0.01, delta=1e-5)


def test_the_adaptive_target_is_the_noise_left_after_the_dummy_fits_what_it_can():
    """target = tolerance ||s||^2 + variance (P - d): the least-squares residual of P noisy entries fitted by d
    dummy numbers; the naive attack keeps the tolerance alone."""
    from dlg_jax.config import AttackConfig
    from dlg_jax.engine.attack import make_attack, make_problem

    case = tiny_case()._replace(defenses=("gauss",), strengths=(1e-3,))
    pixels = jnp.full((1, 8, 8, 1), 0.5, jnp.float32)
    for adaptive in (False, True):
        attack = make_attack(case, AttackConfig(adaptive=adaptive))
        problem = make_problem(attack, pixels, jnp.array([1]), 0)
        energy = float(sum(jnp.sum(g**2) for g in jax.tree.leaves(problem.shared_grads)))
        parameters = sum(g.size for g in jax.tree.leaves(case.params))
        d = problem.init.size  # 64 pixels + 4 label logits
        expected = 1e-7 * energy + (1e-3 * (parameters - d) if adaptive else 0.0)
        assert float(problem.target) == pytest.approx(expected, rel=1e-5)


# ---- federated averaging: local steps, the weight difference shared


@jax.enable_x64(True)
def test_one_local_step_shares_the_gradient_itself():
    """(w0 - (w0 - lr g)) / lr = g (float64: in float32 the difference of nearby weights keeps ~3 digits)."""
    case = tiny_case(dtype=jnp.float64)
    pixels = jnp.asarray(_tiny_setup()[1][:2], jnp.float64) / 255.0
    soft = jax.nn.one_hot(jnp.array([0, 2]), case.model.num_classes, dtype=jnp.float64)
    update = D.local_update(case.model, case.params, pixels, soft, 1, D.LocalTraining(learning_rate=0.1))
    plain = client_gradient(case.model, case.params, pixels, soft)
    for u, g in zip(jax.tree.leaves(update), jax.tree.leaves(plain)):
        np.testing.assert_allclose(u, g, rtol=1e-10, atol=1e-13)


@jax.enable_x64(True)
def test_local_steps_match_a_direct_loop_and_are_masked_beyond_k():
    """k = 3 steps of SGD on local batches of one (examples 0, 1, 0), shared as (w0 - w3) / (3 lr); unrolled to 3
    or to 6 with the last 3 masked, the same; k may be traced."""
    case = tiny_case(dtype=jnp.float64)
    pixels = jnp.asarray(_tiny_setup()[1][:2], jnp.float64) / 255.0
    soft = jax.nn.one_hot(jnp.array([0, 2]), case.model.num_classes, dtype=jnp.float64)
    lr, w = 0.05, case.params
    for i in (0, 1, 0):
        w = jax.tree.map(lambda a, g: a - lr * g, w, client_gradient(case.model, w, pixels[i:i + 1], soft[i:i + 1]))
    direct = jax.tree.map(lambda a, b: (a - b) / (3 * lr), case.params, w)
    for unroll in (3, 6):
        local = D.LocalTraining(learning_rate=lr, batch=1, max_steps=unroll)
        traced = jax.jit(lambda k: D.local_update(case.model, case.params, pixels, soft, k, local))(jnp.float64(3))
        for u, d in zip(jax.tree.leaves(traced), jax.tree.leaves(direct)):
            np.testing.assert_allclose(u, d, rtol=1e-9, atol=1e-12)
    one_step = D.local_update(case.model, case.params, pixels, soft, 1, D.LocalTraining(lr, 1, 6))
    assert not np.allclose(jax.tree.leaves(one_step)[0], jax.tree.leaves(direct)[0])


def test_the_adaptive_attacker_differentiates_through_the_local_steps():
    """Under fedavg:4 the adaptive objective is zero at the truth (the dummy runs the same four steps) and has a
    gradient there of zero; the naive one (one gradient against the mean of four) is not zero."""
    from dlg_jax.engine.attack import make_attack, make_problem

    config, images, labels = _tiny_setup()
    config = config.override(labels="idlg", precision="float32")
    case = tiny_case()._replace(defenses=("fedavg",), strengths=(4.0,),
                                local=D.LocalTraining(learning_rate=0.5, max_steps=4))
    pixels = jnp.asarray(images[:1], jnp.float32) / 255.0
    values = {}
    for adaptive in (False, True):
        attack = make_attack(case, config.override(adaptive=adaptive))
        problem = make_problem(attack, pixels, jnp.asarray(labels[:1]), 0)
        z = attack.layout.ravel(dict(inputs=pixels))
        values[adaptive], grad = jax.value_and_grad(attack.objective)(z, 0.0, problem, case.params)
        if adaptive:
            assert float(jnp.max(jnp.abs(grad))) == 0.0
    assert float(values[True]) == 0.0 and float(values[False]) > 1e-6


@pytest.mark.parametrize("flags, fragment", [
    (["--defense", "fedavg:1.5"], "a count"), (["--defense", "fedavg:0"], "[1, 1000]"),
    (["--defense", "prune:0.1", "--defense", "fedavg:2"], "first"),
    (["--defense", "fedavg:2", "--fedavg-lr", "0"], "--fedavg-lr"),
    (["--defense", "fedavg:2", "--fedavg-batch", "2"], "divide")])
def test_bad_fedavg_flags_are_one_line_and_exit_2(flags, fragment, capsys, tmp_path):
    from dlg_jax.cli import run

    try:
        code = run.main(["--data", str(CIFAR), "--out", str(tmp_path / "o"), *flags])
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err


@pytest.mark.skipif(not CIFAR.exists(), reason="shared data missing")
def test_a_fedavg_axis_of_local_steps_runs_as_one_sweep(tmp_path):
    import json

    from dlg_jax.cli import sweep

    out = tmp_path / "fa"
    assert sweep.main(["--data", str(CIFAR), "--indices", "0:1", "--steps", "2", "--lanes", "2", "--single-device",
                       "--quiet", "--out", str(out), "--defense", "fedavg:1,3", "--fedavg-lr", "0.1", "--adaptive"]) == 0
    for label in ("fedavg=1", "fedavg=3"):
        row = json.loads((out / label / "results.jsonl").read_text())
        assert row["defense"] == label and row["fedavg_lr"] == 0.1 and row["fedavg_batch"] is None


@pytest.mark.skipif(not CIFAR.exists(), reason="shared data missing")
def test_a_defense_study_is_one_command_over_kinds_with_processes(tmp_path, capsys):
    """--defense-study: the undefended client and each defense alone, one program per kind, shared between two
    worker processes (every other task of the whole list); rows per setting, one summary, and a rerun resumes."""
    import json

    from dlg_jax.cli import sweep

    out = tmp_path / "study"
    argv = ["--data", str(CIFAR), "--indices", "0:2", "--steps", "2", "--lanes", "2", "--quiet", "--out", str(out),
            "--defense-study", "prune:0.1,0.5", "--defense-study", "fp16", "--processes", "2"]
    assert sweep.main(argv) == 0
    for setting in ("none", "prune=0.1", "prune=0.5", "fp16"):
        rows = [json.loads(line) for f in sorted((out / setting).glob("results.p*.jsonl"))
                for line in f.read_text().splitlines()]
        assert sorted(r["index"] for r in rows) == [0, 1], setting
        assert {r["defense"] or "none" for r in rows} == {setting}
    assert len(list(out.glob("*/results.p1.jsonl"))) >= 1  # the second worker wrote rows too
    summary = (out / "summary.md").read_text()
    assert all(f"| {s} |" in summary for s in ("none", "prune=0.1", "prune=0.5", "fp16")) and "attacks/hour" in summary
    capsys.readouterr()
    assert sweep.main(argv) == 0  # a rerun: nothing left to attack, the same rows
    assert sum(len(f.read_text().splitlines()) for f in out.glob("*/results.p*.jsonl")) == 8
    assert sweep.main(argv[:-4] + ["--defense-study", "prune:0.1", "--defense", "fp16"]) == 2
    assert "leave out --defense" in capsys.readouterr().err


def test_fedavg_on_a_text_model_steps_in_the_weights_precision():
    """A text client's inputs are token ids: the local steps' learning rate is the weights' float, not an int
    (which would make every step zero and the shared update 0/0)."""
    from dlg_jax.models import get_model

    model = get_model("bert", 50, (6,))
    params = model.init(0, jnp.float32)
    ids = jnp.asarray([[3, 7, 9, 4, 2, 11]], jnp.int32)
    soft = jax.nn.one_hot(ids, 50) * (jnp.arange(6) == 2)[None, :, None]
    update = D.local_update(model, params, ids, soft, 2, D.LocalTraining(0.01, None, 2))
    first = client_gradient(model, params, ids, soft)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(update))
    cosine = sum(jnp.vdot(u, g) for u, g in zip(jax.tree.leaves(update), jax.tree.leaves(first))) / jnp.sqrt(
        sum(jnp.vdot(u, u) for u in jax.tree.leaves(update)) * sum(jnp.vdot(g, g) for g in jax.tree.leaves(first)))
    assert 0.5 < float(cosine) < 1.0  # two small steps: near the first gradient, not equal to it
