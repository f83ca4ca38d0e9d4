"""The realistic image models Inverting Gradients attacks (Geiping et al., 2020): ReLU and BatchNorm.

- `ConvNet`: inversefed's ConvNet (width 64 there and here): eight 3x3 convolutions of 1w, 2w, 2w, 4w, 4w, 4w |
  4w, 4w channels, each BatchNorm + ReLU, a 3x3 max pool (stride 3) after the sixth and the eighth, one linear
  layer on the 3x3x4w features (32 -> 10 -> 3 pixels).
- `ResNet`: the CIFAR ResNets: a 3x3 stem of `width` channels (stride 1, no max pool), stages of basic blocks
  (two 3x3 convolutions, BatchNorm, ReLU; a 1x1 convolution + BatchNorm on the shortcut where the shape
  changes), global average pooling, one linear layer. ResNet-20: 3 stages of 3 blocks, width 16 (He et al.,
  2016; 0.27 M parameters). ResNet-18: 4 stages of 2 blocks, width 64 (11.2 M parameters).

Convolutions are computed as im2col + one matrix product on CPU (`conv`): inside the engine's while loop XLA:CPU
runs `lax.conv`'s second-order program 10-24x slower than outside it (4 3x3 convolutions of 32 channels, 32x32:
13.3 ms against 1.2 ms per evaluation on 2 cores, 26.1 against 1.0 on one), while im2col costs the same in and out
of it (2.8 ms; 3.5): experiments/results/bench_conv_in_loop.md. On accelerators `lax.conv`. Convolutions are He-normal (fan out) and BatchNorm starts at scale 1, bias 0, as inversefed's ResNets; the
linear layer is Flax's default (LeCun normal, bias 0). Features are flattened NHWC (these models have no PyTorch
reference to match tensor for tensor).

BatchNorm in eval mode normalises with the running statistics (`state`, the model's non-trained variables: a
fresh model's are mean 0, variance 1); in train mode with the statistics of the batch being differentiated, so
the client's private batch statistics enter its gradient and the attacker's dummy brings its own. momentum 0.9
and epsilon 1e-5 are PyTorch's defaults (torch's momentum 0.1 is Flax's 0.9).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlg_jax.models.lenet import conv2d

he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
    """k x k convolution, padding k // 2 (PyTorch's padding=1 for 3x3, 0 for 1x1), HWIO kernel (as nn.Conv)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", he_normal, (k, k, x.shape[-1], self.features), x.dtype)
        if jax.default_backend() == "cpu":
            y = conv2d(x, kernel, self.stride)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (self.stride,) * 2, [(k // 2, k // 2)] * 2,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
        return y


def batch_norm(train: bool, dtype) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=dtype)


class ConvNet(nn.Module):
    num_classes: int = 10
    width: int = 64
    train: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x, dtype = images, images.dtype
        widths = [1, 2, 2, 4, 4, 4, 4, 4]
        for i, multiple in enumerate(widths):
            x = Conv(multiple * self.width)(x)
            x = nn.relu(batch_norm(self.train, dtype)(x))
            if i in (5, 7):
                x = nn.max_pool(x, (3, 3), strides=(3, 3))
        return nn.Dense(self.num_classes, dtype=dtype, param_dtype=dtype)(x.reshape(x.shape[0], -1))


class BasicBlock(nn.Module):
    features: int
    stride: int
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        conv = lambda k, s: Conv(self.features, k, s, use_bias=False)  # noqa: E731
        y = nn.relu(batch_norm(self.train, dtype)(conv(3, self.stride)(x)))
        y = batch_norm(self.train, dtype)(conv(3, 1)(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = batch_norm(self.train, dtype)(conv(1, self.stride)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int] = (3, 3, 3)
    width: int = 16
    num_classes: int = 10
    train: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        dtype = images.dtype
        x = Conv(self.width, use_bias=False)(images)
        x = nn.relu(batch_norm(self.train, dtype)(x))
        for stage, blocks in enumerate(self.stage_sizes):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2**stage, stride, self.train)(x)
        return nn.Dense(self.num_classes, dtype=dtype, param_dtype=dtype)(jnp.mean(x, axis=(1, 2)))
