"""ReLU and BatchNorm models, checkpoints, the training script, and the Inverting Gradients attack."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlg_jax.client import client_gradient
from dlg_jax.config import get_config
from dlg_jax.models import MODELS, get_model
from dlg_jax.models import checkpoint
from dlg_jax.models.lenet import conv2d
from dlg_jax.parts.objectives import anisotropic_total_variation, cosine

from tests.conftest import SHARED_DATA
from tests.test_cli import run_cli


def count(params):
    return sum(x.size for x in jax.tree.leaves(params))


def one_hot(labels, classes):
    return jax.nn.one_hot(jnp.asarray(labels), classes)


@pytest.mark.parametrize("name, parameters", [("resnet20", 272_474), ("resnet18", 11_173_962),
                                              ("convnet", 2_904_970), ("lenet-relu", 15_826)])
def test_image_models_have_the_published_sizes(name, parameters):
    model = get_model(name, 10, (32, 32, 3))
    shapes = jax.eval_shape(lambda: model.init(0))
    assert count(shapes) == parameters
    if name + "-train" in MODELS:  # train mode: the same weights
        assert jax.tree.map(lambda s: s.shape, jax.eval_shape(lambda: get_model(name + "-train", 10, (32, 32, 3))
                                                                 .init(0))) == jax.tree.map(lambda s: s.shape, shapes)


def test_an_input_the_model_cannot_take_is_a_value_error():
    with pytest.raises(ValueError, match=r"convnet cannot take inputs of shape \(8, 8, 3\)"):
        get_model("convnet", 10, (8, 8, 3))
    with pytest.raises(ValueError, match="unknown model 'resnet2'"):
        get_model("resnet2", 10, (32, 32, 3))


@pytest.mark.parametrize("k, stride", [(3, 1), (3, 2), (1, 2)])
def test_the_cpu_convolution_is_lax_conv_with_torch_padding(k, stride):
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
    kernel = jax.random.normal(jax.random.key(1), (k, k, 4, 5))
    ref = jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(k // 2, k // 2)] * 2,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv2d(x, kernel, stride), ref, rtol=1e-4, atol=1e-4)


def test_batchnorm_train_mode_couples_the_batch_and_eval_mode_does_not():
    """Eval mode: the batch's gradient is the mean of its examples' gradients. Train mode: each example is
    normalised with the batch's statistics, so it is not (what the attacker must model with its own dummy)."""
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    y = one_hot([1, 4], 10)
    for name, coupled in (("resnet20", False), ("resnet20-train", True)):
        model = get_model(name, 10, (8, 8, 3))
        params = model.init(3)
        gradient = jax.jit(lambda p, x, y, model=model: client_gradient(model, p, x, y))
        batch = gradient(params, x, y)
        alone = [gradient(params, x[i:i + 1], y[i:i + 1]) for i in range(2)]
        mean = jax.tree.map(lambda a, b: (a + b) / 2, *alone)
        gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(mean)))
        assert (gap > 1e-3) == coupled, (name, gap)


def test_checkpoint_round_trip_and_what_does_not_fit(tmp_path):
    model = get_model("resnet20", 10, (8, 8, 3))
    params = model.init(5)
    state = jax.tree.map(lambda v: v + 0.25, model.state)  # as if trained
    path = tmp_path / "w.npz"
    checkpoint.save(path, model, params, dict(steps=7), state=state)
    assert checkpoint.info(path)["steps"] == 7 and checkpoint.info(path)["model"] == "resnet20"
    loaded_model, loaded = checkpoint.load(path, get_model("resnet20-train", 10, (8, 8, 3)))
    assert loaded_model.name == "resnet20-train"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(loaded_model.state)):
        np.testing.assert_array_equal(a, b)
    # the loaded running statistics are the ones eval mode normalises with
    x = jax.random.uniform(jax.random.key(1), (1, 8, 8, 3))
    fresh = get_model("resnet20", 10, (8, 8, 3))
    trained_stats, _ = checkpoint.load(path, fresh)
    assert not np.allclose(jax.jit(trained_stats.apply)(params, x), jax.jit(fresh.apply)(params, x))
    with pytest.raises(ValueError, match=r"parameter Dense_0/bias has shape \(10,\), the model.s is \(100,\)"):
        checkpoint.load(path, get_model("resnet20", 100, (8, 8, 3)))
    with pytest.raises(ValueError, match="it has no parameter"):
        checkpoint.load(path, get_model("lenet-relu", 10, (8, 8, 3)))
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        checkpoint.load(tmp_path / "missing.npz", model)


def test_training_lowers_the_loss_and_the_checkpoint_loads_into_an_attack(tmp_path):
    data = SHARED_DATA / "mnist_test_0-499.npz"
    out = tmp_path / "lenet-relu.npz"
    run = run_cli("--model", "lenet-relu", "--data", data, "--indices", "0:64", "--steps", "40", "--save-every",
                  "20", "--batch-size", "16", "--out", out, module="dlg_jax.train")
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    first, last = (float(line.split("loss ")[1].split(",")[0]) for line in (lines[0], lines[-1]))
    assert len(lines) == 2 and last < first, run.stdout
    assert checkpoint.info(out)["steps"] == 40 and checkpoint.info(out)["clip_norm"] == 1.0
    model, params = checkpoint.load(out, get_model("lenet-relu", 10, (28, 28, 1)))
    with np.load(data) as npz:
        image, label = npz["images"][100:101, :, :, None] / 255.0, npz["labels"][100:101]
    grads = client_gradient(model, params, jnp.asarray(image, jnp.float32), one_hot(label, 10))
    assert float(jnp.linalg.norm(grads["Conv_0"]["kernel"])) > 0  # alive: its ReLUs did not all die
    attack = run_cli("--model", "lenet-relu", "--checkpoint", out, "--data", data, "--index", "100", "--steps", "2",
                     "--out", tmp_path / "attack")
    assert attack.returncode == 0, attack.stderr
    bad = run_cli("--model", "lenet", "--checkpoint", out, "--data", SHARED_DATA / "cifar10_train_0-199.npz",
                  "--steps", "2", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "--checkpoint" in bad.stderr and "shape" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    unknown = run_cli("--model", "gpt", "--data", data, "--steps", "1", "--out", out, module="dlg_jax.train")
    assert unknown.returncode == 2 and "image model" in unknown.stderr


# ---- Inverting Gradients: each part against a direct computation

def test_cosine_is_one_minus_the_cosine_of_the_flattened_gradients():
    keys = jax.random.split(jax.random.key(0), 4)
    g = {"a": jax.random.normal(keys[0], (3, 4)), "b": jax.random.normal(keys[1], (5,))}
    s = {"a": jax.random.normal(keys[2], (3, 4)), "b": jax.random.normal(keys[3], (5,))}
    u = np.concatenate([np.ravel(g["a"]), g["b"]]).astype(np.float64)
    v = np.concatenate([np.ravel(s["a"]), s["b"]]).astype(np.float64)
    assert float(cosine(g, s)) == pytest.approx(1 - u @ v / np.linalg.norm(u) / np.linalg.norm(v), rel=1e-5)


def test_anisotropic_tv_is_inversefeds_mean_absolute_differences():
    x = np.random.default_rng(0).random((2, 5, 6, 3))
    dx = np.abs(x[:, :, :-1] - x[:, :, 1:]).mean()  # inversefed: x[:, :, :, :-1] - x[:, :, :, 1:] in NCHW
    dy = np.abs(x[:, :-1] - x[:, 1:]).mean()
    assert float(anisotropic_total_variation(jnp.asarray(x, jnp.float32))) == pytest.approx(dx + dy, rel=1e-5)


def test_the_preset_is_inverting_gradients():
    c = get_config("inverting-gradients")
    assert (c.labels, c.dummy, c.objective.distance, c.objective.prior) == ("idlg", "box", "cosine", "tv-anisotropic")
    assert c.objective.constant_prior and c.objective.stages == 1
    assert (c.solver.optimizer, c.solver.learning_rate, c.solver.schedule, c.solver.signed) == ("adam", 0.1, "step", True)
    assert c.rules.max_iterations == 4800 and c.rules.max_retries == 0 and c.rules.tolerance == 0
    with pytest.raises(ValueError, match="projected after every step"):
        c.override(optimizer="lbfgs")
    # config.json: the default prior is left out, so sweeps stored before priors had names still resume
    assert "prior" not in get_config("dlg").to_dict()["objective"] and c.to_dict()["objective"]["prior"] == "tv-anisotropic"
    from dlg_jax.config import AttackConfig

    assert AttackConfig.from_dict(c.to_dict()) == c


def test_the_engines_inverting_gradients_is_optax_adam_run_alone():
    """Ten iterations through the engine (its lanes, the attempt rules) land where a plain loop of optax.adam
    on the sign of the objective's gradient, clipped to [0, 1], lands: the schedule, the sign, the box and the
    constant TV weight are the preset's and nothing else."""
    from dlg_jax.engine.attack import make_attack, make_case, make_problem, precision_scope
    from dlg_jax.engine.single import attack_one

    config = get_config("inverting-gradients").override(steps=2, iterations_per_step=5)
    case = make_case("lenet-relu", 10, (12, 12, 3), 0)
    images = (np.random.default_rng(1).random((1, 12, 12, 3)) * 255).astype(np.uint8)
    labels = np.array([3])
    with precision_scope(config):
        attack = make_attack(case, config)
        problem = make_problem(attack, jnp.asarray(images, jnp.float32) / 255.0, jnp.asarray(labels), 7)
        schedule = optax.piecewise_constant_schedule(0.1, {int(10 * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8)})
        adam = optax.adam(schedule)
        value_and_grad = jax.jit(jax.value_and_grad(attack.objective))
        x, opt_state, iterates = problem.init, adam.init(problem.init), []
        for _ in range(10):
            _, g = value_and_grad(x, config.objective.tv_weight, problem, case.params)
            updates, opt_state = adam.update(jnp.sign(g), opt_state, x)
            x = jnp.clip(optax.apply_updates(x, updates), 0.0, 1.0)
            iterates.append(x)
        outcome, trace = attack_one(case, config, images, labels, seed=7)
    assert outcome.iterations == 10
    current = np.asarray(trace.snapshots[-1][1]).ravel()  # the last iterate: the tenth evaluated point
    np.testing.assert_allclose(current, np.asarray(iterates[8]), rtol=0, atol=1e-6)
    assert current.min() >= 0 and current.max() <= 1 and np.abs(current - iterates[7]).max() > 5e-5  # lr 1e-4 by then


def test_inverting_gradients_recovers_an_image_through_a_resnet(tmp_path):
    """200 iterations of the preset on an untrained ResNet-20 in eval mode already show the image (a fixed,
    real CIFAR-10 image; 16-17 dB measured, a random guess is ~8-10 dB)."""
    run = run_cli("--model", "resnet20", "--preset", "inverting-gradients", "--steps", "10", "--data",
                  SHARED_DATA / "cifar10_train_0-199.npz", "--index", "3", "--out", tmp_path, "--quiet")
    assert run.returncode == 0, run.stderr
    import json

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["iterations"] == 200 and result["model"] == "resnet20"
    assert result["psnr"] > 13.0, result["psnr"]
