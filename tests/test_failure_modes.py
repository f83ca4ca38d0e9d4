"""The attempt rules that close the attack's failure modes (issue: every image, every seed), each pinned on a
case that needs it: fresh starts while the budget lasts, and the plateau rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlg_jax.config import PRESETS, AttackConfig, Rules, Solver
from dlg_jax.engine.attack import make_case
from dlg_jax.engine.scheduler import Sweep, Task
from dlg_jax.engine.single import attack_one
from dlg_jax.results.metrics import matched_psnr
from tests.conftest import SHARED_DATA
from tests.helpers import cifar_case

MNIST = SHARED_DATA / "mnist_test_0-499.npz"
# float64 and tiny: 1 iteration a step, checkpoints every 2 steps; the probe never stalls (an L-BFGS attempt
# cannot end its first 2 steps above its start), so only the plateau rule can end an attempt.
PLATEAU = AttackConfig(precision="float64", solver=Solver(history_size=10),
                       rules=Rules(steps=12, iterations_per_step=1, evaluations_per_step=25, probe_steps=2,
                                   probe_reduction=1.0, retries=2,
                                   plateau_reduction=1e-30, plateau_floor=0.0))


def test_retries_default_to_what_the_budget_has_room_for():
    assert AttackConfig().rules.max_retries == 300 // 25 - 1 == 11
    assert Rules(steps=600).max_retries == 23 and Rules(retries=2).max_retries == 2
    assert Rules(probe_steps=0).max_retries == 0  # no probe: nothing ever stalls
    assert PRESETS["batch"].rules.max_retries == 3 and PRESETS["reference"].rules.max_retries == 0
    with pytest.raises(ValueError, match="plateau_reduction"):
        AttackConfig().override(plateau_reduction=1.0)


@pytest.fixture(scope="module")
def case64():
    with jax.enable_x64(True):
        return cifar_case(jnp.float64)


def test_an_attempt_that_stops_falling_after_the_probe_starts_afresh(case64, cifar100):
    """plateau_reduction 1e-30: D never falls that much, so every attempt that passed the probe stalls at its
    next checkpoint (4 iterations in) while retries remain: 2 retries, 3 attempts, the last to the end; with
    the rule off, or D below the floor, one attempt. The engine and the jaxopt path agree."""
    images, labels = cifar100["images"][:1], cifar100["labels"][:1]
    task = [Task((0,), 3)]
    with jax.enable_x64(True):
        stalled = Sweep(case64, PLATEAU).run(images, labels, task, lanes=1)[0]
        assert stalled.attempts == 3 and stalled.iterations == PLATEAU.rules.max_iterations
        jaxopt, _ = attack_one(case64, PLATEAU.override(optimizer="jaxopt-lbfgs"), images, labels, 3)
        assert jaxopt.attempts == 3 and jaxopt.iterations == stalled.iterations
        for off in (PLATEAU.override(plateau_reduction=0.0), PLATEAU.override(plateau_floor=1e300)):
            assert Sweep(case64, off).run(images, labels, task, lanes=1)[0].attempts == 1


@pytest.mark.skipif(not MNIST.exists(), reason="shared data missing")
def test_mnist_seed_1_image_7_needs_a_fifth_start():
    """Measured: from seed 1's first four dummies MNIST test[7] stalls four times and the fourth attempt, never
    probed, sat at D ~ 34 (3 dB) for 225 steps; the fifth start converges. The default spends the budget on
    starts."""
    with np.load(MNIST) as npz:
        images, labels = npz["images"][7:8, ..., None], npz["labels"][7:8]
    case = make_case("lenet", 10, (28, 28, 1))
    outcome, _ = attack_one(case, AttackConfig(), images, labels, seed=1)
    assert outcome.status == "converged" and outcome.attempts == 5
    assert matched_psnr(images / 255.0, outcome.reconstruction) >= 30
    old, _ = attack_one(case, AttackConfig().override(retries=3), images, labels, seed=1)
    assert old.attempts == 4 and matched_psnr(images / 255.0, old.reconstruction) < 10


@pytest.mark.skipif(not MNIST.exists(), reason="shared data missing")
def test_mnist_seed_0_image_261_is_probed_by_evaluations_when_line_searches_fail():
    """Measured: seed 0's first attempt on MNIST test[261] took the wrong label (3 for 5) and sat at D ~ 25 with
    failing line searches: 7,500 evaluations went by before its 500th iteration, so a probe counted in
    iterations never came (3.4 dB, max_evaluations). Counted in steps of 20 iterations or 25 evaluations, the
    probe ends it at 625 evaluations and the second start converges."""
    with np.load(MNIST) as npz:
        images, labels = npz["images"][261:262, ..., None], npz["labels"][261:262]
    outcome, _ = attack_one(make_case("lenet", 10, (28, 28, 1)), AttackConfig(), images, labels, seed=0)
    assert outcome.status == "converged" and outcome.attempts == 2 and outcome.label_pred == [5]
    assert matched_psnr(images / 255.0, outcome.reconstruction) >= 30


def test_the_probe_measures_progress_above_the_noise_floor():
    """An attempt from D = 10 that reaches D = 8.2 above a floor of 8.19 has cut D - floor 180-fold: not stalled;
    with no floor (the raw D fell by a fifth) it is, and it starts again."""
    import jax.numpy as jnp

    from dlg_jax.parts import attempts as A

    rules = A.Rules(max_iterations=100, max_evaluations=1000, probe_iteration=2, probe_evaluations=50,
                    probe_reduction=1e-2, plateau_reduction=0.5, plateau_floor=1e3, retries=3, stages=1,
                    stage_iterations=100, tv_weight=0.0)
    z = jnp.zeros(3)
    started, iterated = A.Step(jnp.array(True), jnp.array(False)), A.Step(jnp.array(False), jnp.array(True))
    for floor, stalled in ((8.19, False), (0.0, True)):
        target = jnp.asarray(floor + 1e-6)
        a, again, _ = A.after_evaluation(rules, A.begin(z), started, z, jnp.asarray(10.0), 1, target, floor)
        for k, value in enumerate((9.0, 8.2)):
            a, again, _ = A.after_evaluation(rules, a, iterated, z, jnp.asarray(value), 2 + k, target, floor)
        assert bool(again) == stalled and int(a.attempt) == int(stalled), floor


CIFAR10 = SHARED_DATA / "cifar10_train_0-199.npz"


@pytest.mark.skipif(not CIFAR10.exists(), reason="shared data missing")
def test_cifar10_class_5_image_51_needs_the_float64_retry():
    """Measured: the seeded LeNet predicts class 5 for every CIFAR-10 image, so class 5's gradient is weak; at
    seed 1 image 51 descends to float32's floor and ends its budget at 26.2 dB, D ~ 10x its target. The retry
    in float64 (the same start, the same weights) converges at 36.8 dB; without it the attack fails."""
    with np.load(CIFAR10) as npz:
        images, labels = npz["images"][51:52], npz["labels"][51:52]
    case = make_case("lenet", 10, (32, 32, 3))
    outcome, trace = attack_one(case, AttackConfig(), images, labels, seed=1)
    assert outcome.precision == "float64" and outcome.status == "converged"
    assert matched_psnr(images / 255.0, outcome.reconstruction) >= 30
    alone, _ = attack_one(case, AttackConfig().override(float64_retry=False), images, labels, seed=1)
    assert alone.precision == "float32" and alone.status != "converged"
    assert matched_psnr(images / 255.0, alone.reconstruction) < 30 and outcome.seconds > alone.seconds


def test_the_float64_retry_is_for_attacks_near_their_target_and_keeps_the_lower_distance():
    """Only float32 attacks that ended on a budget within plateau_floor x the target are retried; the kept one
    is the converged or lower-D attack, with the time of both. In a sweep each task is delivered once."""
    from dlg_jax.engine.scheduler import Outcome, keep_better, wants_float64_retry

    def outcome(status, d, target=1.0, precision="float32", seconds=1.0):
        return Outcome(Task((0,), 0), np.zeros((1, 2)), [0], [0], d, status, 1, 10, 1, 10, seconds, 0.0,
                       precision=precision, target=target)

    config = AttackConfig()
    assert wants_float64_retry(config, outcome("max_evaluations", 999.0))
    assert not wants_float64_retry(config, outcome("max_evaluations", 1001.0))  # stuck: float64 would not help
    assert not wants_float64_retry(config, outcome("converged", 0.5))
    assert not wants_float64_retry(config, outcome("diverged", 2.0))
    assert not wants_float64_retry(config.override(float64_retry=False), outcome("max_steps", 2.0))
    assert not wants_float64_retry(config.override(precision="float64"), outcome("max_steps", 2.0))
    assert not wants_float64_retry(PRESETS["batch"], outcome("max_steps", 2.0))
    first, retry = outcome("max_steps", 5.0), outcome("max_steps", 3.0, precision="float64", seconds=2.0)
    kept = keep_better(first, retry)
    assert kept.precision == "float64" and kept.grad_distance == 3.0 and kept.seconds == 3.0
    assert keep_better(outcome("max_steps", 2.0), outcome("max_steps", 3.0, precision="float64")).precision == "float32"


@pytest.mark.skipif(not CIFAR10.exists(), reason="shared data missing")
def test_a_sweep_delivers_a_retried_attack_once_with_its_float64_result():
    with np.load(CIFAR10) as npz:
        images, labels = npz["images"], npz["labels"]
    case = make_case("lenet", 10, (32, 32, 3))
    delivered = []
    tasks = [Task((51,), 1), Task((0,), 1)]  # image 0 (class 6) converges in float32
    outcomes = Sweep(case, AttackConfig()).run(images, labels, tasks, lanes=2, on_results=delivered.extend)
    assert sorted(o.task.positions for o in delivered) == [(0,), (51,)]
    by_image = {o.task.positions[0]: o for o in outcomes}
    assert by_image[51].precision == "float64" and by_image[51].status == "converged"
    assert by_image[0].precision == "float32" and by_image[0].status == "converged"
