"""Solvers, one evaluation per call: the engine's L-BFGS against jaxopt.LBFGS, Adam against optax.adam, the
line-search decision, the compact product and the curvature skip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlg_jax.solvers.adam import Adam
from dlg_jax.solvers.jaxopt_lbfgs import make_jaxopt_lbfgs, skip_nonpositive_curvature
from dlg_jax.solvers.lbfgs import LBFGS, armijo_accepts, inverse_hessian_product
from dlg_jax.solvers.torch_lbfgs import two_loop


def drive(solver, f, x0, evaluations):
    """The engine's loop for one lane, without the attempt rules: the iterates and the evaluations they took."""
    value_and_grad = jax.jit(jax.value_and_grad(f))
    tell = jax.jit(solver.tell)
    state, iterates, counts = solver.init(x0), [], []
    for n in range(1, evaluations + 1):
        point = solver.ask(state)
        state, step = tell(state, point, *value_and_grad(point))
        if bool(step.iterated):
            iterates.append(np.asarray(point))
            counts.append(n)
    return iterates, counts


def quartic(n=12, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    matrix = jnp.asarray(a @ a.T / n + 0.1 * np.eye(n))
    return (lambda x: 0.5 * x @ matrix @ x + 0.01 * jnp.sum(x**4) + jnp.sum(x)), jnp.asarray(3 * rng.normal(size=n))


def rosenbrock():
    return (lambda x: jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)), jnp.array([-3.0, 2.0, -1.5, 2.5])


def tiny_dlg():
    """The tiny LeNet's gradient-distance objective from a N(0, 1) dummy: the real problem, small."""
    from dlg_jax.config import AttackConfig
    from dlg_jax.engine.attack import make_attack, make_problem
    from tests.helpers import tiny_case

    case = tiny_case(dtype=jnp.float64)
    attack = make_attack(case, AttackConfig(precision="float64"))
    problem = make_problem(attack, jax.random.uniform(jax.random.key(1), (1, 8, 8, 1), jnp.float64), jnp.array([2]), 0)
    return (lambda z: attack.objective(z, 0.0, problem, case.params)), problem.init


@pytest.mark.parametrize("problem", [quartic, rosenbrock, tiny_dlg])
@pytest.mark.parametrize("condition, decrease", [("armijo", 0.5), ("wolfe", 0.8), ("strong-wolfe", 0.8)])
def test_engine_lbfgs_follows_jaxopt_lbfgs(problem, condition, decrease):
    """The oracle: jaxopt's own LBFGS (its BacktrackingLineSearch configured through the public API, pairs
    with s.y <= 0 dropped) and the engine's one-evaluation-per-call L-BFGS take the same iterates, with the
    same evaluation counts, in float64. 10 iterations: enough for line searches that backtrack, short of where
    rounding departs (measured on Rosenbrock with Wolfe: 3e-9 relative by iteration 3, 2e-6 by iteration 14)."""
    with jax.enable_x64(True):
        f, x0 = problem()
        x0 = jnp.asarray(x0, jnp.float64)
        iterations = 10
        solver = make_jaxopt_lbfgs(f, 10, condition, decrease, 30, iterations)
        state, x, expected, counts = solver.init_state(x0), x0, [], []
        update = jax.jit(solver.update)
        for _ in range(iterations):
            before = state
            x, state = update(x, state)
            state = skip_nonpositive_curvature(10, before, state)
            expected.append(np.asarray(x))
            counts.append(int(state.num_fun_eval))
        ours, our_counts = drive(LBFGS(10, condition, decrease, 30), f, x0, counts[-1])
        assert our_counts[:iterations] == counts
        if problem is rosenbrock:  # its searches backtrack: the trials' decisions are compared too
            assert max(np.diff([1] + counts)) > 1
        for k, (a, b) in enumerate(zip(ours, expected)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=f"iteration {k}")


def test_line_search_refuses_a_decrease_above_the_armijo_line():
    """f(x) = a x^2 from x = 1 (a = 0.99995): the first trial (t = 1, to x = -0.9999) lowers f, but by less than
    Armijo's c1 t |slope|: refused, and the step halved; a step below the line is accepted."""
    a = 0.99995
    f = lambda x: a * jnp.sum(x**2)  # noqa: E731
    solver = LBFGS(history_size=3)
    state = solver.init(jnp.ones(1))
    state, step = solver.tell(state, jnp.ones(1), f(jnp.ones(1)), jax.grad(f)(jnp.ones(1)))
    assert bool(step.started) and not bool(step.iterated)
    trial = solver.ask(state)
    assert float(f(trial)) < float(f(jnp.ones(1)))  # a decrease...
    state, step = solver.tell(state, trial, f(trial), jax.grad(f)(trial))
    assert not bool(step.iterated) and float(state.trial) == pytest.approx(0.5)  # ...refused: halved
    trial = solver.ask(state)
    state, step = solver.tell(state, trial, f(trial), jax.grad(f)(trial))
    assert bool(step.iterated)  # x = 0.00005: far below the line
    # the decision on its own: (value, value0, slope0, t, new slope)
    assert not bool(armijo_accepts(0.99975, 0.99995, -4 * a * a, 1.0, 0.0, "armijo", float("inf")))
    assert bool(armijo_accepts(0.9995, 0.99995, -4 * a * a, 1.0, 0.0, "armijo", float("inf")))


@pytest.mark.parametrize("condition, short_accepted", [("armijo", True), ("wolfe", False), ("strong-wolfe", False)])
def test_a_step_too_short_for_wolfe_is_accepted_by_armijo_alone(condition, short_accepted):
    """On f(x) = x^2 / 2 from x = 1 along -1, a step of 0.05 decreases f enough but leaves the slope at -0.95."""
    c2 = float("inf") if condition == "armijo" else 0.9
    value, new_slope = 0.5 * 0.95**2, -0.95
    assert bool(armijo_accepts(value, 0.5, -1.0, 0.05, new_slope, condition, c2)) == short_accepted


@pytest.mark.parametrize("count", [0, 1, 3, 5, 12])
def test_compact_product_equals_the_two_loop_recursion(count):
    """The compact L-BFGS product, its s.y / y.y tables kept pair by pair, is the two-loop recursion over the
    valid pairs (a pair with s . y < 0 counting for nothing: rho = 0), before and after the ring wraps."""
    with jax.enable_x64(True):
        size, n = 5, 7
        rng = np.random.default_rng(count)
        s_all, y_all = rng.normal(size=(max(count, 1), n)), rng.normal(size=(max(count, 1), n))
        y_all[: count // 2] = s_all[: count // 2] * 2 + 0.1 * y_all[: count // 2]  # some curved, some not
        s_hist, y_hist = np.zeros((size, n)), np.zeros((size, n))
        sy, yy = jnp.zeros((size, size)), jnp.zeros((size, size))
        g = jnp.asarray(rng.normal(size=n))
        for k in range(count):  # pairs written one by one, the tables brought up to date as the engine does
            s_hist[k % size], y_hist[k % size] = s_all[k], y_all[k]
            _, sy, yy = inverse_hessian_product(g, jnp.asarray(s_hist), jnp.asarray(y_hist), sy, yy, 1.0, k + 1)
        gamma = 0.7
        product, _, _ = inverse_hessian_product(g, jnp.asarray(s_hist), jnp.asarray(y_hist), sy, yy, gamma, count)
        kept = min(count, size)
        start = count % size if count > size else 0
        dots = np.einsum("ij,ij->i", s_hist, y_hist)
        rho = np.where(dots > 0, 1.0 / np.where(dots == 0, 1, dots), 0.0)
        expected = -two_loop(g, jnp.asarray(s_hist), jnp.asarray(y_hist), jnp.asarray(rho), start, kept, gamma)
        np.testing.assert_allclose(product, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", [1.0, -1.0])
def test_jaxopt_pairs_without_positive_curvature_are_skipped(curvature):
    """One jaxopt LBFGS iteration on f(x) = curvature * x^2 / 2: with s . y < 0 the new pair gets rho = 0 and
    gamma keeps its value; with s . y > 0 the state is left as jaxopt made it."""
    f = lambda x: 0.5 * curvature * jnp.sum(x**2)  # noqa: E731
    solver = make_jaxopt_lbfgs(f, 3, "armijo", 0.5, 30, 10)
    x = jnp.array([1.0, -2.0])
    before = solver.init_state(x)
    _, after = solver.update(x, before)
    kept = skip_nonpositive_curvature(3, before, after)
    assert (float(after.rho_history[0]) > 0) == (curvature > 0)
    if curvature > 0:
        np.testing.assert_array_equal(kept.rho_history, after.rho_history)
    else:
        np.testing.assert_array_equal(kept.rho_history, np.zeros(3))
        assert float(kept.gamma) == float(before.gamma) != float(after.gamma)


@pytest.mark.parametrize("schedule, signed", [("constant", False), ("step", True), ("cosine", False)])
def test_adam_equals_a_plain_optax_adam_loop(schedule, signed):
    f, x0 = quartic()
    iterations = 40
    solver = Adam(learning_rate=0.05, schedule=schedule, iterations=iterations, signed=signed)
    ours, _ = drive(solver, f, x0, iterations)
    lr = {"constant": 0.05, "step": optax.piecewise_constant_schedule(0.05, {15: 0.1, 25: 0.1, 35: 0.1}),
          "cosine": optax.cosine_decay_schedule(0.05, iterations)}[schedule]
    tx = optax.adam(lr)
    x, opt_state, points = x0, tx.init(x0), []
    for _ in range(iterations):
        points.append(np.asarray(x))
        g = jax.grad(f)(x)
        updates, opt_state = tx.update(jnp.sign(g) if signed else g, opt_state, x)
        x = optax.apply_updates(x, updates)
    np.testing.assert_allclose(np.stack(ours), np.stack(points), rtol=1e-6, atol=1e-7)
    assert f(jnp.asarray(ours[-1])) < f(x0)


def test_a_pair_below_torchs_curvature_threshold_is_skipped():
    """s.y = 1e-12 (0 < s.y <= 1e-10): the pair counts for nothing (gamma stays 1, the direction stays -g),
    as torch skips it. Without the threshold gamma would be s.y / y.y = 1e6 (measured in float32 at the rounding
    floor of the batch preset's TV stages: wild gammas, then every line search failing)."""
    c = 1e-6
    f = lambda x: 0.5 * c * jnp.sum(x**2)  # noqa: E731
    solver = LBFGS(history_size=3)
    state = solver.init(jnp.ones(1))
    for _ in range(2):  # the start, then the first iteration (accepted: a decrease)
        point = solver.ask(state)
        state, step = solver.tell(state, point, f(point), jax.grad(f)(point))
    assert bool(step.iterated)
    s, y = float(state.s_history[0, 0]), float(state.y_history[0, 0])
    assert 0 < s * y <= 1e-10
    assert float(state.gamma) == 1.0
    np.testing.assert_allclose(state.direction, -state.grad, rtol=1e-6)
