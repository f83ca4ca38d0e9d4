"""The attack's parts: the client's gradient, distances and the prior, labels, dummies, the objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlg_jax.client import client_gradient, shared_gradient
from dlg_jax.config import AttackConfig, Objective, get_config
from dlg_jax.engine.attack import make_attack, make_problem
from dlg_jax.models import cross_entropy
from dlg_jax.parts import objectives as O
from dlg_jax.parts.labels import analytic_labels, last_layer_weight_grad
from tests.helpers import cifar_case, tiny_case


O_TV = Objective(tv_weight=1e-3, tv_stages=2)


@pytest.fixture(scope="module")
def tiny():
    """A tiny LeNet (8x8x1 input, 3 channels, 4 classes) in float64 for exact checks."""
    with jax.enable_x64(True):
        case = tiny_case(dtype=jnp.float64)
        images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1), jnp.float64)
        labels = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, 4), jnp.float64))
    return case, images, labels


def test_cross_entropy_is_the_reference_soft_label_loss():
    logits = jnp.array([[1.0, 2.0, 0.5], [0.1, -1.0, 3.0]])
    target = jnp.array([[0.2, 0.7, 0.1], [0.0, 0.0, 1.0]])
    log_p = logits - jnp.log(jnp.sum(jnp.exp(logits), -1, keepdims=True))
    expected = np.mean(np.sum(-np.asarray(target) * np.asarray(log_p), axis=1))
    assert float(cross_entropy(logits, target)) == pytest.approx(expected, rel=1e-6)


def test_client_gradient_matches_finite_differences(tiny):
    case, images, labels = tiny
    with jax.enable_x64(True):
        grads = client_gradient(case.model, case.params, images, labels)
        loss = lambda p: float(cross_entropy(case.model.apply(p, images), labels))  # noqa: E731
        rng = np.random.default_rng(0)
        eps = 1e-6
        for path, leaf in jax.tree_util.tree_flatten_with_path(case.params)[0]:
            grad_leaf = np.asarray(dict(jax.tree_util.tree_flatten_with_path(grads)[0])[path])
            for flat in rng.choice(leaf.size, size=3, replace=False):
                idx = np.unravel_index(flat, leaf.shape)
                bump = lambda s: jax.tree_util.tree_map_with_path(  # noqa: E731
                    lambda q, x: x.at[idx].add(s) if q == path else x, case.params)
                numeric = (loss(bump(eps)) - loss(bump(-eps))) / (2 * eps)
                assert grad_leaf[idx] == pytest.approx(numeric, rel=1e-5, abs=1e-9), path


def test_shared_gradient_applies_the_client_transforms_in_order(tiny):
    case, images, labels = tiny
    with jax.enable_x64(True):
        plain = shared_gradient(case.model, case.params, images, labels)
        double = lambda key, g: jax.tree.map(lambda a: 2 * a, g)  # noqa: E731
        plus_one = lambda key, g: jax.tree.map(lambda a: a + 1, g)  # noqa: E731
        out = shared_gradient(case.model, case.params, images, labels, (double, plus_one), jax.random.key(0))
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(plain)):
            np.testing.assert_allclose(a, 2 * b + 1)


def test_distances_equal_a_direct_computation():
    rng = np.random.default_rng(0)
    a = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))}
    b = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))}
    fa = np.concatenate([np.ravel(a["b"]), np.ravel(a["w"])])
    fb = np.concatenate([np.ravel(b["b"]), np.ravel(b["w"])])
    assert float(O.squared_l2(a, b)) == pytest.approx(np.sum((fa - fb) ** 2), rel=1e-6)
    cos = 1 - fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb))
    assert float(O.cosine(a, b)) == pytest.approx(cos, rel=1e-5)
    assert float(O.l2_plus_l1(a, b)) == pytest.approx(np.sum((fa - fb) ** 2) + np.sum(np.abs(fa - fb)), rel=1e-6)
    assert float(O.cosine(a, jax.tree.map(lambda x: 3 * x, a))) == pytest.approx(0.0, abs=1e-6)  # scale-blind


def test_objective_is_zero_at_the_private_data_and_positive_elsewhere(tiny):
    case, images, soft = tiny
    with jax.enable_x64(True):
        labels = jnp.array([1, 3])
        config = AttackConfig(precision="float64")
        attack = make_attack(case, config, batch_size=2)
        problem = make_problem(attack, images, labels, seed=0)
        truth = attack.layout.ravel({"inputs": images, "label_logits": 30.0 * jax.nn.one_hot(labels, 4) - 15.0})
        assert float(attack.objective(truth, 0.0, problem, case.params)) < 1e-20
        assert float(attack.objective(truth + 0.1, 0.0, problem, case.params)) > 1e-8
        # the objective is the gradient distance of the dummy's decoded parts, as written out here
        z = problem.init
        parts = attack.layout.unravel(z)
        direct = O.squared_l2(client_gradient(case.model, case.params, parts["inputs"],
                                              jax.nn.softmax(parts["label_logits"])), problem.shared_grads)
        assert float(attack.objective(z, 0.0, problem, case.params)) == pytest.approx(float(direct), rel=1e-12)


def test_objective_gradient_matches_finite_differences(tiny):
    case, images, _ = tiny
    with jax.enable_x64(True):
        attack = make_attack(case, AttackConfig(precision="float64", dummy="sigmoid", objective=O_TV), batch_size=2)
        problem = make_problem(attack, images, jnp.array([0, 2]), seed=1)
        f = lambda z: attack.objective(z, 1e-3, problem, case.params)  # noqa: E731
        z = problem.init * 0.5
        grad = jax.grad(f)(z)
        for i in (3, 77, z.size - 2):
            e = jnp.zeros_like(z).at[i].set(1e-6)
            assert float(grad[i]) == pytest.approx((float(f(z + e)) - float(f(z - e))) / 2e-6, rel=1e-5, abs=1e-12)


def test_idlg_label_rule_on_real_images_and_every_class(cifar100):
    case = cifar_case()
    images = jnp.asarray(cifar100["images"][:6] / 255.0, jnp.float32)
    for n, image in enumerate(images):
        for label in (int(cifar100["labels"][n]), 0, 99, 7 * n + 3):
            grads = client_gradient(case.model, case.params, image[None], jax.nn.one_hot(jnp.array([label]), 100))
            assert analytic_labels(last_layer_weight_grad(grads), 1).tolist() == [label]


def multiset_hits(estimate, truth) -> int:
    from collections import Counter

    return sum((Counter(np.asarray(estimate).tolist()) & Counter(np.asarray(truth).tolist())).values())


@pytest.mark.parametrize("n", [2, 4, 8])
def test_analytic_batch_labels_on_shared_batches(cifar100, n):
    """Measured on every batch of consecutive shared images: all labels right (CIFAR-100, seed 1234)."""
    case = cifar_case()
    for start in range(0, 50 - n + 1, n):
        labels = cifar100["labels"][start : start + n]
        images = jnp.asarray(cifar100["images"][start : start + n] / 255.0, jnp.float32)
        grads = client_gradient(case.model, case.params, images, jax.nn.one_hot(labels, 100))
        assert multiset_hits(analytic_labels(last_layer_weight_grad(grads), n), labels) == n, start


def test_analytic_labels_count_repeated_classes():
    """Constructed batches where labels repeat (N exceeds the distinct labels): counts come out exact."""
    case = tiny_case(seed=3, input_shape=(16, 16, 3), num_classes=10, channels=6)
    rng = np.random.default_rng(0)
    for labels in ([4, 4, 4, 4], [1, 1, 7, 7, 7, 2, 2, 2], [0, 9, 9, 9, 9, 9]):
        images = jnp.asarray(rng.uniform(size=(len(labels), 16, 16, 3)), jnp.float32)
        grads = client_gradient(case.model, case.params, images, jax.nn.one_hot(jnp.array(labels), 10))
        estimate = analytic_labels(last_layer_weight_grad(grads), len(labels))
        assert sorted(estimate.tolist()) == sorted(labels)


def test_make_problem_for_both_label_strategies(cifar100):
    case = cifar_case()
    images = jnp.asarray(cifar100["images"][25:26] / 255.0)
    labels = jnp.asarray(cifar100["labels"][25:26])
    joint_attack = make_attack(case, AttackConfig())
    joint = make_problem(joint_attack, images, labels, 0)
    assert joint_attack.layout.shapes == {"inputs": (1, 32, 32, 3), "label_logits": (1, 100)}
    idlg_attack = make_attack(case, get_config("idlg"))
    idlg = make_problem(idlg_attack, images, labels, 0)
    assert idlg_attack.layout.shapes == {"inputs": (1, 32, 32, 3)} and int(jnp.argmax(idlg.known_labels[0])) == 84
    np.testing.assert_array_equal(joint.init[:3072], idlg.init)  # same seed, same start
    target = 1e-7 * sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(joint.shared_grads))
    assert float(joint.target) == pytest.approx(target, rel=1e-5)


def test_total_variation_is_the_smoothed_isotropic_sum():
    flat = jnp.full((2, 4, 4, 3), 0.3)
    eps = 1e-4
    assert float(O.total_variation(flat, eps)) == pytest.approx(2 * 3 * 3 * np.sqrt(eps), rel=1e-5)
    colour = jnp.zeros((1, 2, 2, 3)).at[:, 1, :, :].set(jnp.array([0.3, 0.4, 0.0]))  # one step down, in 2 colours
    assert float(O.total_variation(colour, eps)) == pytest.approx(np.sqrt(0.3**2 + 0.4**2 + eps), rel=1e-6)
    step = jnp.zeros((1, 3, 3, 1)).at[:, :, 1:].set(1.0)  # a vertical edge between columns 0 and 1
    expected = 2 * np.sqrt(1 + eps) + 2 * np.sqrt(eps)
    assert float(O.total_variation(step, eps)) == pytest.approx(expected, rel=1e-6)


def test_compiler_options_only_on_cpu_and_only_what_this_jaxlib_accepts(monkeypatch):
    from dlg_jax.engine import devices as D

    assert D.compiler_options("gpu") == {} and D.compiler_options("tpu") == {}
    options = D.compiler_options("cpu")
    assert options in ({}, D.CPU_COMPILER_OPTIONS)
    if options:  # accepted: a program compiled with them computes what the default one does
        f = lambda x: jnp.sum(jnp.tanh(x @ x.T) ** 2)  # noqa: E731
        x = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)
        tuned = jax.jit(jax.grad(f), compiler_options=options)(x)
        np.testing.assert_allclose(tuned, jax.jit(jax.grad(f))(x), rtol=1e-5, atol=1e-6)
    assert D._cpu_accepts((("xla_backend_optimization_level", "2"),))  # the probe accepts an option XLA knows
    monkeypatch.setattr(D, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option_dlg_jax": "1"})
    assert D.compiler_options("cpu") == {}  # rejected by the probe: compile with XLA's defaults
