"""Models by name. Nothing else in dlg_jax builds a network: it asks `get_model(name, num_classes, input_shape)`.

An entry is a function `(num_classes, input_shape) -> Model`; a new model is one module with such a function
and one line in `MODELS`. A `Model` says what its input is (`"image"`: NHWC in [0, 1]), how to draw its weights
from a seed, how to apply them and what the client's training loss is.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dlg_jax.models.lenet import KERNEL, Conv, LeNet, conv2d, hidden_size, init_params, uniform_init  # noqa: F401

Params = Any


def cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
    """Soft-label cross entropy  mean_n sum_c -t_nc log softmax(z_n)_c  (the DLG reference's loss)."""
    return jnp.mean(jnp.sum(-soft_labels * jax.nn.log_softmax(logits), axis=-1))


class Model(NamedTuple):
    name: str
    input: str  # what the model reads: "image" (NHWC in [0, 1])
    input_shape: tuple  # one example's shape, e.g. (32, 32, 3)
    num_classes: int
    init: Callable[[int, Any], Params]  # (seed, dtype) -> params
    apply: Callable[[Params, jax.Array], jax.Array]  # (params, inputs) -> logits
    loss: Callable[[jax.Array, jax.Array], jax.Array]  # (logits, soft labels) -> the client's training loss


def lenet_model(num_classes: int, input_shape: Sequence[int]) -> Model:
    """The DLG paper's LeNet: sigmoid convolutions, every weight U(-0.5, 0.5)."""
    module = LeNet(num_classes=num_classes)
    shape = tuple(input_shape)

    def init(seed: int, dtype=jnp.float32) -> Params:
        return jax.tree.map(lambda p: jnp.asarray(p, dtype), init_params(module, seed, shape))

    return Model("lenet", "image", shape, num_classes, init, lambda p, x: module.apply({"params": p}, x), cross_entropy)


MODELS: dict[str, Callable[[int, Sequence[int]], Model]] = {"lenet": lenet_model}


def get_model(name: str, num_classes: int, input_shape: Sequence[int]) -> Model:
    try:
        make = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODELS)}") from None
    return make(num_classes, input_shape)
