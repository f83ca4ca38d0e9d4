import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlg_jax import attack as A
from dlg_jax.models import LeNet, init_params


def apply_fn_for(model):
    return lambda p, x: model.apply({"params": p}, x)


@pytest.fixture(scope="module")
def tiny():
    """A tiny LeNet (8x8x1 input, 3 channels, 4 classes) in float64 for exact checks."""
    with jax.enable_x64(True):
        model = LeNet(num_classes=4, channels=3)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), init_params(model, 0, (8, 8, 1)))
        images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1), jnp.float64)
        labels = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, 4), jnp.float64))
    return model, params, images, labels


def test_cross_entropy_is_the_reference_soft_label_loss():
    logits = jnp.array([[1.0, 2.0, 0.5], [0.1, -1.0, 3.0]])
    target = jnp.array([[0.2, 0.7, 0.1], [0.0, 0.0, 1.0]])
    log_p = logits - jnp.log(jnp.sum(jnp.exp(logits), -1, keepdims=True))
    expected = np.mean(np.sum(-np.asarray(target) * np.asarray(log_p), axis=1))
    assert float(A.cross_entropy(logits, target)) == pytest.approx(expected, rel=1e-6)


def test_parameter_gradient_matches_finite_differences(tiny):
    model, params, images, labels = tiny
    with jax.enable_x64(True):
        apply_fn = apply_fn_for(model)
        grads = A.parameter_gradient(apply_fn, params, images, labels)
        loss = lambda p: float(A.cross_entropy(apply_fn(p, images), labels))  # noqa: E731
        rng = np.random.default_rng(0)
        eps = 1e-6
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            grad_leaf = np.asarray(dict(jax.tree_util.tree_flatten_with_path(grads)[0])[path])
            for flat in rng.choice(leaf.size, size=3, replace=False):
                idx = np.unravel_index(flat, leaf.shape)
                bump = lambda s: jax.tree_util.tree_map_with_path(  # noqa: E731
                    lambda q, x: x.at[idx].add(s) if q == path else x, params)
                numeric = (loss(bump(eps)) - loss(bump(-eps))) / (2 * eps)
                assert grad_leaf[idx] == pytest.approx(numeric, rel=1e-5, abs=1e-9), path


def test_gradient_distance_is_zero_at_the_private_data_and_positive_elsewhere(tiny):
    model, params, images, labels = tiny
    with jax.enable_x64(True):
        apply_fn = apply_fn_for(model)
        shared = A.parameter_gradient(apply_fn, params, images, labels)
        at_truth = A.gradient_distance({"images": images}, params, shared, labels, apply_fn)
        assert float(at_truth) == 0.0
        logits = jnp.log(labels)  # softmax(log t) = t
        assert float(A.gradient_distance({"images": images, "label_logits": logits}, params, shared, None,
                                         apply_fn)) < 1e-25
        elsewhere = A.gradient_distance({"images": images + 0.1}, params, shared, labels, apply_fn)
        assert float(elsewhere) > 1e-8


def test_gradient_distance_gradient_matches_finite_differences(tiny):
    model, params, images, labels = tiny
    with jax.enable_x64(True):
        apply_fn = apply_fn_for(model)
        shared = A.parameter_gradient(apply_fn, params, images, labels)
        dummy = {"images": images * 0.8 + 0.1, "label_logits": jnp.zeros((2, 4))}
        objective = lambda d: A.gradient_distance(d, params, shared, None, apply_fn)  # noqa: E731
        grad = jax.grad(objective)(dummy)
        for key, idx in [("images", (0, 3, 4, 0)), ("images", (1, 7, 0, 0)), ("label_logits", (1, 2))]:
            e = jnp.zeros_like(dummy[key]).at[idx].set(1e-6)
            plus = float(objective({**dummy, key: dummy[key] + e}))
            minus = float(objective({**dummy, key: dummy[key] - e}))
            assert float(grad[key][idx]) == pytest.approx((plus - minus) / 2e-6, rel=1e-5, abs=1e-12)


def test_idlg_label_rule_on_real_images_and_every_class(cifar100):
    model = LeNet(num_classes=100)
    params = init_params(model, 1234, (32, 32, 3))
    apply_fn = apply_fn_for(model)
    images = jnp.asarray(cifar100["images"][:6] / 255.0, jnp.float32)
    for n, image in enumerate(images):
        for label in (int(cifar100["labels"][n]), 0, 99, 7 * n + 3):
            grads = A.parameter_gradient(apply_fn, params, image[None], jax.nn.one_hot(jnp.array([label]), 100))
            assert A.analytic_labels(A.last_layer_weight_grad(grads), 1).tolist() == [label]


def multiset_hits(estimate, truth) -> int:
    from collections import Counter

    return sum((Counter(np.asarray(estimate).tolist()) & Counter(np.asarray(truth).tolist())).values())


@pytest.mark.parametrize("n", [2, 4, 8])
def test_analytic_batch_labels_on_shared_batches(cifar100, n):
    """Measured on every batch of consecutive shared images: all labels right (CIFAR-100, seed 1234)."""
    model = LeNet(num_classes=100)
    params = init_params(model, 1234, (32, 32, 3))
    for start in range(0, 50 - n + 1, n):
        labels = cifar100["labels"][start : start + n]
        images = jnp.asarray(cifar100["images"][start : start + n] / 255.0, jnp.float32)
        grads = A.parameter_gradient(apply_fn_for(model), params, images, jax.nn.one_hot(labels, 100))
        assert multiset_hits(A.analytic_labels(A.last_layer_weight_grad(grads), n), labels) == n, start


def test_analytic_labels_count_repeated_classes():
    """Constructed batches where labels repeat (N exceeds the distinct labels): counts come out exact."""
    model = LeNet(num_classes=10, channels=6)
    params = init_params(model, 3, (16, 16, 3))
    rng = np.random.default_rng(0)
    for labels in ([4, 4, 4, 4], [1, 1, 7, 7, 7, 2, 2, 2], [0, 9, 9, 9, 9, 9]):
        images = jnp.asarray(rng.uniform(size=(len(labels), 16, 16, 3)), jnp.float32)
        grads = A.parameter_gradient(apply_fn_for(model), params, images, jax.nn.one_hot(jnp.array(labels), 10))
        estimate = A.analytic_labels(A.last_layer_weight_grad(grads), len(labels))
        assert sorted(estimate.tolist()) == sorted(labels)


def test_make_problem_shapes_for_both_label_strategies(cifar100):
    model = LeNet(num_classes=100)
    params = init_params(model, 1234, (32, 32, 3))
    images = jnp.asarray(cifar100["images"][25:26] / 255.0)
    labels = jnp.asarray(cifar100["labels"][25:26])
    joint = A.make_problem(apply_fn_for(model), params, images, labels, 100, A.AttackConfig(precision="float32"), 0)
    assert set(joint.init) == {"images", "label_logits"} and joint.init["label_logits"].shape == (1, 100)
    idlg = A.make_problem(apply_fn_for(model), params, images, labels, 100,
                          A.AttackConfig(precision="float32", label_strategy="idlg"), 0)
    assert set(idlg.init) == {"images"} and int(jnp.argmax(idlg.known_labels[0])) == 84
    np.testing.assert_array_equal(joint.init["images"], idlg.init["images"])  # same seed, same start


@pytest.mark.parametrize("strategy", ["joint", "idlg"])
def test_end_to_end_attack_recovers_shared_images(cifar100, strategy):
    """The real thing, with default settings: the demo image and two more reach PSNR >= 30 dB."""
    from dlg_jax.metrics import image_metrics
    from dlg_jax.run import attack_images

    indices = [25, 0] if strategy == "joint" else [25, 6]
    for index in indices:
        images = cifar100["images"][index : index + 1]
        outcome = attack_images(images, cifar100["labels"][index : index + 1], 100,
                                A.AttackConfig(label_strategy=strategy))
        psnr = image_metrics(images / 255.0, outcome["reconstruction"])["psnr"][0]
        assert psnr >= 30.0, (index, psnr, outcome["status"])
        assert outcome["status"] == "converged"
        assert int(outcome["label_pred"][0]) == int(cifar100["labels"][index])
        assert outcome["evaluations"] > outcome["iterations"] > 0


def test_diverged_attempts_are_retried_and_never_returned():
    """A non-finite objective stops the attempt; the returned dummy is the best finite one."""
    with jax.enable_x64(False):
        model = LeNet(num_classes=4, channels=3)
        params = init_params(model, 0, (8, 8, 1))
        apply_fn = apply_fn_for(model)
        images = jax.random.uniform(jax.random.key(1), (1, 8, 8, 1))
        config = A.AttackConfig(steps=4, iterations_per_step=5, precision="float32", retries=1)
        problem = A.make_problem(apply_fn, params, images, jnp.array([2]), 4, config, seed=0)
        # Poison the shared gradient for one parameter with inf: every D is then inf from the start.
        poisoned = problem._replace(shared_grads=jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.inf),
                                                               problem.shared_grads))
        attack = A.Attack(apply_fn, config)
        state = attack.advance(attack.init(poisoned), poisoned, config.steps)
        assert A.STATUS_NAMES[int(state.status)] == "diverged" and int(state.attempt) == 1
        assert jnp.all(state.best_dummy["images"] == poisoned.init["images"])  # nothing better than the start
        healthy = attack.advance(attack.init(problem), problem, config.steps)
        assert np.isfinite(float(healthy.best_value)) and float(healthy.best_value) < float(
            A.gradient_distance(problem.init, *problem.solver_args, apply_fn))


def test_total_variation_is_the_smoothed_isotropic_sum():
    flat = jnp.full((2, 4, 4, 3), 0.3)
    eps = 1e-4
    assert float(A.total_variation(flat, eps)) == pytest.approx(2 * 3 * 3 * np.sqrt(eps), rel=1e-5)
    colour = jnp.zeros((1, 2, 2, 3)).at[:, 1, :, :].set(jnp.array([0.3, 0.4, 0.0]))  # one step down, in 2 colours
    assert float(A.total_variation(colour, eps)) == pytest.approx(np.sqrt(0.3**2 + 0.4**2 + eps), rel=1e-6)
    step = jnp.zeros((1, 3, 3, 1)).at[:, :, 1:].set(1.0)  # a vertical edge between columns 0 and 1
    # 2x2 positions see differences: rows 0-1, column 0 -> right = -1 (edge), column 1 -> 0.
    expected = 2 * np.sqrt(1 + eps) + 2 * np.sqrt(eps)
    assert float(A.total_variation(step, eps)) == pytest.approx(expected, rel=1e-6)


def test_prior_weight_falls_tenfold_per_stage_and_ends_at_zero():
    config = A.AttackConfig(steps=6, iterations_per_step=2, tv_weight=1e-3, tv_stages=3)
    assert config.stage_iterations == 4 and config.has_prior
    weights = [float(config.prior_weight(jnp.asarray(i))) for i in range(12)]
    assert weights[:4] == pytest.approx([1e-3] * 4) and weights[4:8] == pytest.approx([1e-4] * 4)
    assert weights[8:] == [0.0] * 4
    plain = A.AttackConfig()
    assert not plain.has_prior and plain.stage_iterations == plain.max_iterations
    assert float(plain.prior_weight(jnp.asarray(5))) == 0.0
    with pytest.raises(ValueError, match="lbfgs optimizer"):
        A.AttackConfig(optimizer="torch-lbfgs", pixel_range="sigmoid")


@pytest.mark.parametrize("condition, short_accepted", [("armijo", True), ("wolfe", False), ("strong-wolfe", False)])
def test_line_search_condition_and_shrink_factor(condition, short_accepted):
    """The solver's backtracking search, on f(x) = x^2 / 2 from x = 1 along -1: a step of 0.05 decreases f
    enough (Armijo) but leaves the slope at -0.95 (too short for Wolfe's curvature test, which backtracking
    cannot fix: it only shortens); a step of 2.5 overshoots (f = 1.125) and is halved once to 1.25."""
    config = A.AttackConfig(linesearch_condition=condition, linesearch_decrease=0.5)
    search = A.make_solver(lambda p, x: x, config).linesearch_solver
    search = dataclasses.replace(search, fun=lambda x: 0.5 * jnp.sum(x**2), value_and_grad=False, has_aux=False, maxiter=5,
                                 max_stepsize=10.0)
    x, g = jnp.ones(1), jnp.ones(1)

    def run(step):
        stepsize, state = search.run(step, x, value=0.5, grad=g, descent_direction=-g)
        return round(float(stepsize), 6), int(state.iter_num), bool(state.failed)

    assert (run(0.05) == (0.05, 1, False)) == short_accepted
    assert run(2.5) == (1.25, 2, False)
    with pytest.raises(ValueError, match="linesearch_condition"):
        A.AttackConfig(linesearch_condition="goldstein")
    with pytest.raises(ValueError, match="linesearch_decrease"):
        A.AttackConfig(linesearch_decrease=1.0)


@pytest.mark.parametrize("curvature", [1.0, -1.0])
def test_pairs_without_positive_curvature_are_skipped(curvature):
    """One LBFGS iteration on f(x) = curvature * x^2 / 2: with s . y < 0 (concave f) the new pair gets rho = 0
    and gamma keeps its value; with s . y > 0 the iteration's state is left as jaxopt made it."""
    import jaxopt

    solver = jaxopt.LBFGS(fun=lambda x: 0.5 * curvature * jnp.sum(x**2), history_size=3, linesearch="backtracking")
    x = jnp.array([1.0, -2.0])
    before = solver.init_state(x)
    _, after = solver.update(x, before)
    kept = A.skip_nonpositive_curvature(solver, before, after)
    assert (float(after.rho_history[0]) > 0) == (curvature > 0)
    if curvature > 0:
        np.testing.assert_array_equal(kept.rho_history, after.rho_history)
        assert float(kept.gamma) == float(after.gamma)
    else:
        np.testing.assert_array_equal(kept.rho_history, np.zeros(3))
        assert float(kept.gamma) == float(before.gamma) != float(after.gamma)


def test_prior_attack_walks_through_its_stages_and_stays_in_pixel_range():
    """Sigmoid pixels and a staged TV weight on a tiny batch of 2: every stage runs, the objective at
    the end is D alone (last weight 0), the images lie in (0, 1) and the dummy fits the gradient."""
    with jax.enable_x64(False):
        model = LeNet(num_classes=4, channels=3)
        params = init_params(model, 0, (8, 8, 1))
        apply_fn = apply_fn_for(model)
        images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
        config = A.AttackConfig(steps=8, iterations_per_step=10, precision="float32", label_strategy="idlg",
                                pixel_range="sigmoid", tv_weight=1e-2, tv_stages=4, tolerance=0.0, retries=0)
        problem = A.make_problem(apply_fn, params, images, jnp.array([1, 3]), 4, config, seed=0)
        attack = A.Attack(apply_fn, config)
        state = attack.init(problem)
        values = []
        for step in (2, 4, 6, 8):  # one stage each
            state = attack.advance(state, problem, step)
            assert int(state.iterations) == step * config.iterations_per_step
            values.append(float(state.best_value))
        reconstruction = A.dummy_images(state.best_dummy, config)
        assert float(reconstruction.min()) > 0.0 and float(reconstruction.max()) < 1.0
        d_only = float(A.gradient_distance({"images": reconstruction}, *problem.solver_args, apply_fn))
        assert float(state.best_value) == pytest.approx(d_only, rel=1e-4)  # weight 0 in the last stage
        start = float(A.gradient_distance({"images": jax.nn.sigmoid(problem.init["images"])},
                                          *problem.solver_args, apply_fn))
        assert d_only < 1e-2 * start
        assert values == sorted(values, reverse=True)  # a lower weight, a lower objective


def test_batch_of_two_shared_images_reaches_the_psnr_bar_with_the_batch_recipe(cifar100):
    """The documented recipe for batches (README 'Batches': analytic labels, sigmoid pixels, TV 1e-5 in 4
    stages, 300 steps) recovers both images of a shared pair, matched, at PSNR >= 30 dB."""
    from dlg_jax.metrics import image_metrics, match_to_truth
    from dlg_jax.run import attack_images

    images, labels = cifar100["images"][0:2], cifar100["labels"][0:2]
    config = A.AttackConfig(label_strategy="idlg", pixel_range="sigmoid", tv_weight=1e-5)
    outcome = attack_images(images, labels, 100, config)
    order = match_to_truth(images / 255.0, outcome["reconstruction"])
    psnr = image_metrics(images / 255.0, outcome["reconstruction"][order])["psnr"]
    assert psnr.min() >= 30.0, (psnr, outcome["status"])
    assert sorted(outcome["label_pred"].tolist()) == sorted(labels.tolist())


def test_compiler_options_only_on_cpu_and_only_what_this_jaxlib_accepts(monkeypatch):
    assert A.compiler_options("gpu") == {} and A.compiler_options("tpu") == {}
    options = A.compiler_options("cpu")
    assert options in ({}, A.CPU_COMPILER_OPTIONS)
    if options:  # accepted: a program compiled with them computes what the default one does
        f = lambda x: jnp.sum(jnp.tanh(x @ x.T) ** 2)  # noqa: E731
        x = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)
        tuned = jax.jit(jax.grad(f), compiler_options=options)(x)
        np.testing.assert_allclose(tuned, jax.jit(jax.grad(f))(x), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(A, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option_dlg_jax": "1"})
    assert A.compiler_options("cpu") == {}  # rejected by the probe: compile with XLA's defaults
