import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlg_jax.models import LeNet, conv2d, hidden_size, init_params


def count(params):
    return sum(x.size for x in jax.tree.leaves(params))


def test_cifar_lenet_shapes_and_parameter_count():
    params = init_params(LeNet(num_classes=100), 1234, (32, 32, 3))
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == {
        "Conv_0": {"kernel": (5, 5, 3, 12), "bias": (12,)},
        "Conv_1": {"kernel": (5, 5, 12, 12), "bias": (12,)},
        "Conv_2": {"kernel": (5, 5, 12, 12), "bias": (12,)},
        "Dense_0": {"kernel": (768, 100), "bias": (100,)},
    }
    assert count(params) == 912 + 3612 + 3612 + 76900
    logits = LeNet(100).apply({"params": params}, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 100)


def test_mnist_lenet_has_588_hidden_features():
    assert hidden_size((28, 28, 1)) == 588 and hidden_size((32, 32, 3)) == 768
    params = init_params(LeNet(num_classes=10), 0, (28, 28, 1))
    assert params["Dense_0"]["kernel"].shape == (588, 10)
    assert params["Conv_0"]["kernel"].shape == (5, 5, 1, 12)


def test_every_parameter_is_uniform_in_half_interval_and_seeded():
    a = init_params(LeNet(), 1234, (32, 32, 3))
    b = init_params(LeNet(), 1234, (32, 32, 3))
    c = init_params(LeNet(), 1235, (32, 32, 3))
    leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    assert leaves.min() >= -0.5 and leaves.max() <= 0.5
    assert abs(leaves.mean()) < 0.01 and abs(leaves.std() - 1 / np.sqrt(12)) < 0.01  # U(-.5,.5): sd 0.2887
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not np.array_equal(a["Dense_0"]["bias"], c["Dense_0"]["bias"])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [28, 32, 7])
def test_conv2d_matches_lax_conv_with_torch_padding(stride, size):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    k = jax.random.normal(jax.random.key(1), (5, 5, 3, 4))
    ref = jax.lax.conv_general_dilated(x, k, (stride, stride), ((2, 2), (2, 2)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out = conv2d(x, k, stride)
    assert out.shape == ref.shape == (2, (size - 1) // stride + 1, (size - 1) // stride + 1, 4)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_flatten_is_nchw_order():
    """The dense layer must see features in PyTorch's view(N, -1) order of an NCHW tensor."""
    model = LeNet(num_classes=3, strides=(2, 2, 1))
    params = init_params(model, 0, (32, 32, 3))
    x = jax.random.uniform(jax.random.key(2), (1, 32, 32, 3))
    _, state = model.apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"])
    conv_out = jax.nn.sigmoid(state["intermediates"]["Conv_2"]["__call__"][0])  # (1, 8, 8, 12) NHWC
    nchw = np.transpose(np.asarray(conv_out), (0, 3, 1, 2)).reshape(1, -1)
    expected = nchw @ np.asarray(params["Dense_0"]["kernel"]) + np.asarray(params["Dense_0"]["bias"])
    np.testing.assert_allclose(model.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)
