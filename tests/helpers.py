"""Small cases the tests share: a tiny LeNet (fast to compile) and the paper's CIFAR-100 LeNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlg_jax.engine.attack import Case, make_case
from dlg_jax.models import LeNet, Model, cross_entropy, init_params


def tiny_model(input_shape=(8, 8, 1), num_classes=4, channels=3) -> Model:
    module = LeNet(num_classes=num_classes, channels=channels)

    def init(seed, dtype=jnp.float32):
        return jax.tree.map(lambda p: jnp.asarray(p, dtype), init_params(module, seed, input_shape))

    return Model("tiny-lenet", "image", tuple(input_shape), num_classes, init,
                 lambda p, x: module.apply({"params": p}, x), cross_entropy)


def tiny_case(seed=0, dtype=jnp.float32, **kwargs) -> Case:
    model = tiny_model(**kwargs)
    return Case(model, model.init(seed, dtype))


def cifar_case(dtype=jnp.float32) -> Case:
    return make_case("lenet", 100, (32, 32, 3), 1234, dtype)
