"""The engine: every lane equals the attack run alone (by jaxopt's own LBFGS under the same rules), for every
solver and lane count; attempts, fresh starts, budgets and prior stages; the best iterate is what comes back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlg_jax.config import AttackConfig, Objective, Rules, Solver
from dlg_jax.engine.attack import make_attack, make_problem, precision_scope
from dlg_jax.engine.lanes import NEVER, Engine
from dlg_jax.engine.scheduler import Sweep, Task
from dlg_jax.engine.single import attack_one
from dlg_jax.results.metrics import image_metrics
from tests.helpers import cifar_case

# float64 and tiny: 4 steps of 5 iterations; the stall probe after 2 steps makes retries likely.
TINY = AttackConfig(precision="float64", solver=Solver(history_size=10),
                    rules=Rules(steps=4, iterations_per_step=5, evaluations_per_step=25, probe_steps=2,
                                probe_reduction=0.5))
TASKS = [Task((0,), 5), Task((1,), 6), Task((2,), 7), Task((3,), 8), Task((1,), 9)]


@pytest.fixture(scope="module")
def case64():
    with jax.enable_x64(True):
        return cifar_case(jnp.float64)


@pytest.fixture(scope="module")
def data(cifar100):
    return cifar100["images"][:4], cifar100["labels"][:4]


def alone(case, config, images, labels, tasks):
    """Each task attacked on its own by jaxopt's LBFGS under the same attempt rules (dlg_jax.run's direct path)."""
    out = []
    for task in tasks:
        outcome, _ = attack_one(case, config.override(optimizer="jaxopt-lbfgs"), images[list(task.positions)],
                                labels[list(task.positions)], task.seed)
        out.append(outcome)
    return out


def assert_same(batched, expected, rtol=1e-6, atol=1e-4):
    for b, s in zip(batched, expected):
        for key in ("status", "attempts", "iterations", "evaluations", "label_pred"):
            assert getattr(b, key) == getattr(s, key), (key, getattr(b, key), getattr(s, key))
        np.testing.assert_allclose(b.grad_distance, s.grad_distance, rtol=rtol)
        np.testing.assert_allclose(b.reconstruction, s.reconstruction, atol=atol)


@pytest.mark.parametrize("labels, condition, decrease", [("joint", "armijo", 0.5), ("idlg", "armijo", 0.5),
                                                         ("joint", "wolfe", 0.8), ("joint", "strong-wolfe", 0.8)])
def test_lanes_equal_jaxopt_lbfgs_alone(case64, data, labels, condition, decrease):
    """3 lanes for 5 attacks (lanes refilled), with retries: each equals jaxopt's LBFGS run alone. (The evaluation
    budget is set out of reach: Wolfe's long searches would spend it inside a search, where the engine stops at
    once and jaxopt's iteration runs on.)"""
    config = TINY.override(labels=labels, linesearch_condition=condition, linesearch_decrease=decrease,
                           evaluations_per_step=200)
    images, labels_ = data
    outcomes = Sweep(case64, config).run(images, labels_, TASKS, lanes=3)
    assert [o.task for o in outcomes] == TASKS
    expected = alone(case64, config, images, labels_, TASKS)
    assert any(o.attempts > 1 for o in expected)  # the retry path is exercised
    assert_same(outcomes, expected)


def test_lanes_that_converge_equal_jaxopt_lbfgs_alone(case64, data):
    """A loose tolerance: the lanes converge (the convergence rule is exercised, not only the budgets)."""
    config = TINY.override(tolerance=0.1, steps=20, retries=0, probe_steps=100)
    images, labels = data
    outcomes = Sweep(case64, config).run(images, labels, TASKS[:2], lanes=2)
    for o in outcomes:  # measured: both at ~50 of the 100 iterations
        assert o.status == "converged" and o.iterations < config.rules.max_iterations and o.grad_distance > 0
    assert_same(outcomes, alone(case64, config, images, labels, TASKS[:2]))


@pytest.mark.parametrize("optimizer", ["lbfgs", "torch-lbfgs", "adam"])
def test_lane_count_does_not_change_any_solvers_results(case64, data, optimizer):
    """Lane by lane every lane runs the unbatched program: 1 lane and 3 lanes give the same results bit for bit;
    all lanes at once (vmapped, as on accelerators) give them to rounding."""
    config = TINY.override(optimizer=optimizer, learning_rate=0.05)
    images, labels = data
    one = Sweep(case64, config).run(images, labels, TASKS, lanes=1)
    three = Sweep(case64, config).run(images, labels, TASKS, lanes=3)
    for a, b in zip(one, three):
        assert (a.status, a.iterations, a.evaluations, a.attempts) == (b.status, b.iterations, b.evaluations, b.attempts)
        assert a.grad_distance == b.grad_distance
        np.testing.assert_array_equal(a.reconstruction, b.reconstruction)
    vmapped = Sweep(case64, config, lane_by_lane=False).run(images, labels, TASKS, lanes=3)
    assert_same(vmapped, one)
    if optimizer == "torch-lbfgs":  # 20 moves (iterations) per step, max_eval 25: as torch with max_iter 5
        assert all(o.evaluations <= o.iterations + o.attempts * config.rules.steps for o in one)


def test_budget_of_evaluations_ends_attacks_at_the_evaluation_that_spends_it(case64, data):
    assert AttackConfig().rules.max_evaluations == 300 * 25  # torch's max_eval, max_iter * 5 // 4, per step
    config = TINY.override(evaluations_per_step=3, retries=0)  # 12 evaluations for 20 iterations
    images, labels = data
    for o in Sweep(case64, config).run(images, labels, TASKS[:3], lanes=2):
        assert o.status == "max_evaluations" and o.evaluations == config.rules.max_evaluations
        assert o.iterations < config.rules.max_iterations


def run_one_lane(case, config, images, labels, seed):
    """One lane of the engine, by hand: the lanes after the attack (to read its progress)."""
    with precision_scope(config):
        engine = Engine(make_attack(case, config, len(images)), jax.local_devices()[:1])
        programs = engine.compile(1)
        lanes = engine.fill(programs, programs["blank"](), np.ones(1, bool), images[None],
                            labels[None].astype(np.int32), np.array([seed], np.int32), np.zeros(1, np.int32))
        lanes, _ = engine.run(programs, lanes, NEVER, 1)
        return engine, lanes


def test_a_chain_of_four_attempts_starts_each_from_its_own_fresh_dummy(case64, data):
    """The stall probe after one iteration (probe_reduction 1e-30): every attempt stalls, 3 retries make 4
    attempts. Each attempt's start is drawn from fold_in(key(seed), attempt) (written out here, independently
    of the library's helper), differs from the others, and the engine and the jaxopt path agree on the chain,
    its iterations and its evaluations (counted independently: trips vs jaxopt's num_fun_eval)."""
    config = TINY.override(iterations_per_step=1, probe_steps=1, probe_reduction=1e-30, retries=3, steps=20)
    images, labels = data[0][:1], data[1][:1]
    outcomes = Sweep(case64, config).run(images, labels, [Task((0,), 3)], lanes=1)
    expected = alone(case64, config, images, labels, [Task((0,), 3)])
    assert outcomes[0].attempts == expected[0].attempts == 4
    assert_same(outcomes, expected)
    with precision_scope(config):
        attack = make_attack(case64, config)
        problem = make_problem(attack, jnp.asarray(images, jnp.float64) / 255.0, jnp.asarray(labels), 3)
        starts = [problem.init]
        for attempt in (1, 2, 3):
            k_images, k_labels = jax.random.split(jax.random.fold_in(jax.random.key(3), attempt))
            starts.append(jnp.concatenate([jax.random.normal(k_images, (3072,), jnp.float32),
                                           jax.random.normal(k_labels, (100,), jnp.float32)]).astype(jnp.float64))
        values = [float(attack.objective(z, 0.0, problem, case64.params)) for z in starts]
        assert len(set(values)) == 4
        for retries in (1, 2, 3):  # the last attempt's start value is D at that attempt's own fresh dummy
            _, lanes = run_one_lane(case64, config.override(retries=retries), images, labels, 3)
            assert int(lanes.progress.attempt[0]) == retries
            assert float(lanes.progress.attempt_value[0]) == pytest.approx(values[retries], rel=1e-12)


def test_what_comes_back_is_the_best_iterate_not_the_last(case64, data):
    """Two attempts: the first cut D by 100x before the probe called it stalled (probe_reduction 1e-6); the
    second ran out of budget higher. The outcome is the first attempt's best: its D, and the D of the returned
    reconstruction, below where the attack ended."""
    config = TINY.override(probe_steps=2, probe_reduction=1e-6, retries=1, steps=3)
    images, labels = data[0][1:2], data[1][1:2]
    engine, lanes = run_one_lane(case64, config, images, labels, 11)
    out = engine.harvest(engine.compile(1), lanes)
    with precision_scope(config):
        attack = engine.attack
        problem = make_problem(attack, jnp.asarray(images, jnp.float64) / 255.0, jnp.asarray(labels), 11)
        best = float(out["grad_distance"][0])
        at_returned = float(attack.objective(lanes.progress.best[0], 0.0, problem, case64.params))
        last = float(lanes.progress.current_value[0])
    assert int(out["attempts"][0]) == 2
    assert best == pytest.approx(at_returned, rel=1e-10) and best < last
    np.testing.assert_allclose(out["inputs"][0], np.asarray(attack.inputs(lanes.progress.best[0])))
    outcome, trace = attack_one(case64, config, images, labels, 11)
    assert outcome.grad_distance == pytest.approx(best, rel=1e-12) and outcome.grad_distance < trace.values[-1][1]


def test_prior_stages_run_in_the_engine_as_in_the_jaxopt_path(case64, data):
    """Sigmoid pixels and the staged TV prior on batches of 2 (analytic labels): lanes equal the attack alone,
    through every stage; the images stay in (0, 1); the last stage's D is the gradient distance alone."""
    config = TINY.override(labels="idlg", dummy="sigmoid", tv_weight=1e-3, tv_stages=2, retries=0)
    images, labels = data
    tasks = [Task((0, 1), 5), Task((2, 3), 6), Task((1, 2), 7)]
    outcomes = Sweep(case64, config, batch_size=2).run(images, labels, tasks, lanes=2)
    expected = [attack_one(case64, config.override(optimizer="jaxopt-lbfgs"), images[list(t.positions)],
                           labels[list(t.positions)], t.seed)[0] for t in tasks]
    assert_same(outcomes, expected)
    for o in outcomes:
        assert o.reconstruction.shape == (2, 32, 32, 3) and 0 < o.reconstruction.min() < o.reconstruction.max() < 1
        assert sorted(o.label_pred) == sorted(o.label_true)


def test_prior_weight_falls_tenfold_per_stage_and_ends_at_zero():
    from dlg_jax.parts.attempts import Rules as R, begin, prior_weight

    config = AttackConfig(objective=Objective(tv_weight=1e-3, tv_stages=3), rules=Rules(steps=6, iterations_per_step=2))
    rules = R.from_config(config)
    assert rules.stage_iterations == 4 and rules.stages == 3
    a = begin(jnp.zeros(3))
    weights = [float(prior_weight(rules, a._replace(iterations=jnp.int32(i)))) for i in range(12)]
    assert weights[:4] == pytest.approx([1e-3] * 4) and weights[4:8] == pytest.approx([1e-4] * 4)
    assert weights[8:] == [0.0] * 4
    plain = R.from_config(AttackConfig())
    assert plain.stages == 1 and float(prior_weight(plain, a._replace(iterations=jnp.int32(5)))) == 0.0


def test_diverged_attempts_are_retried_and_never_returned(data):
    """A non-finite objective (a shared gradient with an inf) stops every attempt; what comes back is the start."""
    from tests.helpers import tiny_case

    case = tiny_case()
    config = AttackConfig(rules=Rules(steps=4, iterations_per_step=5, retries=1))
    poison = lambda key, g: jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.inf), g)  # noqa: E731
    poisoned = case._replace(transforms=(poison,))
    images = (np.asarray(jax.random.uniform(jax.random.key(1), (1, 8, 8, 1))) * 255).astype(np.uint8)
    engine, lanes = run_one_lane(poisoned, config, images, np.array([2]), 0)
    out = engine.harvest(engine.compile(1), lanes)
    assert int(out["status"][0]) == 3 and int(out["attempts"][0]) == 2  # diverged, after its one retry
    with precision_scope(config):
        problem = make_problem(engine.attack, jnp.asarray(images, jnp.float32) / 255.0, jnp.array([2]), 0)
    np.testing.assert_array_equal(lanes.progress.best[0], problem.init)
    healthy, _ = attack_one(case, config, images, np.array([2]), 0)
    assert np.isfinite(healthy.grad_distance) and healthy.status != "diverged"


def test_real_length_sweep_of_two_images_reaches_30_db(cifar100):
    """Default settings, two shared images in two lanes: both converge above 30 dB with the right labels."""
    images, labels = cifar100["images"], cifar100["labels"]
    outcomes = Sweep(cifar_case(), AttackConfig()).run(images, labels, [Task((25,), 1234), Task((0,), 1234)], lanes=2)
    for o in outcomes:
        psnr = image_metrics(images[list(o.task.positions)] / 255.0, o.reconstruction)["psnr"][0]
        assert o.status == "converged" and psnr >= 30.0, (o.task, o.status, psnr)
        assert o.label_pred == o.label_true and o.evaluations > o.iterations > 0


def test_batch_of_two_reaches_the_psnr_bar_with_the_batch_preset(cifar100):
    """The batch preset (analytic labels, sigmoid pixels, TV 1e-5 in 4 stages) at 300 steps recovers both
    images of a shared pair, matched, at PSNR >= 30 dB."""
    from dlg_jax.config import get_config
    from dlg_jax.results.metrics import match_to_truth

    images, labels = cifar100["images"][0:2], cifar100["labels"][0:2]
    outcome, _ = attack_one(cifar_case(), get_config("batch").override(steps=300), images, labels)
    order = match_to_truth(images / 255.0, outcome.reconstruction)
    psnr = image_metrics(images / 255.0, outcome.reconstruction[order])["psnr"]
    assert psnr.min() >= 30.0, (psnr, outcome.status)
    assert sorted(outcome.label_pred) == sorted(labels.tolist())
