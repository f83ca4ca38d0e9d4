"""LeNet of the DLG paper as a Flax module, laid out to match the PyTorch original tensor for tensor.

The reference network (Zhu et al., 2019) is three 5x5 convolutions with padding 2 and strides 2, 2, 1,
each followed by a sigmoid, then a flatten in NCHW order and one linear layer. Every weight and bias is
drawn from U(-0.5, 0.5): that wide, smooth initialisation is what makes the gradients invertible.

Kernels are stored HWIO (Flax's convention; PyTorch's OIHW is a transpose away) and the dense kernel is
(in, out) (PyTorch's weight transposed). The convolution is written as im2col (one gather) + einsum rather than
`lax.conv`: DLG differentiates through the weight gradient, and on CPU XLA runs that second-order program
~1.3x faster this way unbatched and several times faster under `vmap` (experiments/bench_objective.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KERNEL = 5


def uniform_init(low: float = -0.5, high: float = 0.5):
    """Initializer drawing from U(low, high), the reference's `uniform_(-0.5, 0.5)`."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, low, high)

    return init


def conv2d(images: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Zero-padded ('same' for odd kernels) strided convolution of NHWC images with an HWIO kernel.

    Computes  y[n,i,j,o] = sum_{a,b,c} xpad[n, s*i+a, s*j+b, c] * k[a,b,c,o]  with padding k//2 on every
    side, as PyTorch's `Conv2d(padding=k//2)`: output size floor((H + 2p - k) / s) + 1. The patches are one
    gather with indices fixed at trace time; its transpose is one scatter-add, which keeps the
    second-order program DLG differentiates small (fewer, larger XLA ops than 25 strided slices). The indices
    are promised in bounds (they are, by construction): `jnp.take`'s default masks out-of-range ones with
    selects that the second-order program carries too (5% of an evaluation inside the sweep engine).
    """
    kh, kw, c, features = kernel.shape
    n, h, w, _ = images.shape
    padded_h, padded_w = h + 2 * (kh // 2), w + 2 * (kw // 2)
    out_h, out_w = (padded_h - kh) // stride + 1, (padded_w - kw) // stride + 1
    rows = np.arange(out_h)[:, None, None, None] * stride + np.arange(kh)[None, None, :, None]
    cols = np.arange(out_w)[None, :, None, None] * stride + np.arange(kw)[None, None, None, :]
    patch_index = (rows * padded_w + cols).reshape(-1)  # (out_h, out_w, kh, kw) flattened
    padded = jnp.pad(images, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    patches = padded.reshape(n, padded_h * padded_w, c).at[:, patch_index].get(mode="promise_in_bounds")
    patches = patches.reshape(n, out_h, out_w, kh * kw * c)
    return jnp.einsum("nhwp,po->nhwo", patches, kernel.reshape(kh * kw * c, features))


class Conv(nn.Module):
    """5x5 convolution with bias, padding 2, U(-0.5, 0.5) parameters."""

    features: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", uniform_init(), (KERNEL, KERNEL, x.shape[-1], self.features), x.dtype)
        bias = self.param("bias", uniform_init(), (self.features,), x.dtype)
        return conv2d(x, kernel, self.stride) + bias


class LeNet(nn.Module):
    """The DLG LeNet: conv(s=2) -> conv(s=2) -> conv(s=1), sigmoid after each, NCHW flatten, linear.

    Input NHWC in [0, 1]; a CIFAR image (32x32x3) gives 12*8*8 = 768 features, MNIST (28x28x1) 12*7*7 = 588.
    """

    num_classes: int = 100
    channels: int = 12
    strides: Sequence[int] = (2, 2, 1)
    activation: Callable[[jax.Array], jax.Array] = nn.sigmoid  # nn.relu: `lenet-relu` (iDLG issue #5)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for stride in self.strides:
            x = self.activation(Conv(self.channels, stride)(x))
        features = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # NCHW order, as torch's view()
        dense = nn.Dense(self.num_classes, kernel_init=uniform_init(), bias_init=uniform_init(), param_dtype=x.dtype)
        return dense(features)


def init_params(model: "LeNet", seed: int, image_shape: Sequence[int], dtype=jnp.float32):
    """Parameters of `model` for images of shape (H, W, C), every entry ~ U(-0.5, 0.5) from `seed`."""
    dummy = jnp.zeros((1, *image_shape), dtype)
    return model.init(jax.random.key(seed), dummy)["params"]


def hidden_size(image_shape: Sequence[int], channels: int = 12, strides: Sequence[int] = (2, 2, 1)) -> int:
    """Width of the flattened features entering the linear layer."""
    h, w = image_shape[0], image_shape[1]
    for s in strides:
        h, w = (h - 1) // s + 1, (w - 1) // s + 1
    return channels * h * w
