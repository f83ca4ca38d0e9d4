"""How the attacker parametrises what it does not know, and where it starts.

A dummy parametrisation maps the optimised variables to model inputs: `free` pixels are the inputs themselves
(the paper); `sigmoid` pixels are sigmoid(z), always in (0, 1) (an image prior for batches); `box` pixels are
free but projected onto [0, 1] after every solver step (Inverting Gradients' box constraint: a projected
gradient method, so Adam only). A new one (text embeddings, say) is a `Dummy` and a line in `DUMMIES`.

Solvers see one flat vector: `Layout` ravels the dummy's parts, {"inputs": (N, ...), "label_logits": (N,
classes)} for joint label recovery, in that (sorted) order. Starts are N(0, 1), drawn in float32 whatever the
precision, so float32 and float64 attacks start alike.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


class Dummy(NamedTuple):
    decode: Callable[[jax.Array], jax.Array]  # optimised variables -> model inputs
    project: Callable[[jax.Array], jax.Array] | None = None  # onto the feasible set, after every step (or None)


DUMMIES: dict[str, Dummy] = {"free": Dummy(lambda z: z), "sigmoid": Dummy(jax.nn.sigmoid),
                             "box": Dummy(lambda z: z, lambda z: jnp.clip(z, 0.0, 1.0))}
PROJECTED = tuple(name for name, d in DUMMIES.items() if d.project is not None)


class Layout(NamedTuple):
    """The shapes of a dummy's parts and the flat vector they make."""

    shapes: dict  # name -> shape, e.g. {"inputs": (1, 32, 32, 3), "label_logits": (1, 100)}
    dtype: object

    def template(self) -> dict:
        return {name: jnp.zeros(shape, self.dtype) for name, shape in self.shapes.items()}

    def unravel(self, flat: jax.Array) -> dict:
        return ravel_pytree(self.template())[1](flat)

    def ravel(self, parts: dict) -> jax.Array:
        return ravel_pytree(parts)[0]


def layout(input_shape, num_classes: int, joint_labels: bool, dtype) -> Layout:
    """The dummy for a batch of `input_shape` (N, ...) inputs; label logits too when labels are optimised."""
    shapes = {"inputs": tuple(input_shape)}
    if joint_labels:
        shapes["label_logits"] = (input_shape[0], num_classes)
    return Layout(shapes, dtype)


def standard_normal(key: jax.Array, shape, dtype) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def first_start(key: jax.Array, lay: Layout) -> jax.Array:
    """The first attempt's dummy: inputs from split(key)[0], label logits from split(key)[1] (the reference's
    order of draws: image, then label)."""
    input_key, label_key = jax.random.split(key)
    keys = {"inputs": input_key, "label_logits": label_key}
    return lay.ravel({name: standard_normal(keys[name], shape, lay.dtype) for name, shape in lay.shapes.items()})


def fresh_start(key: jax.Array, attempt: jax.Array, lay: Layout) -> jax.Array:
    """The start of retry `attempt`: from fold_in(key, attempt), one key per part (sorted by name)."""
    keys = jax.random.split(jax.random.fold_in(key, attempt), len(lay.shapes))
    parts = {name: standard_normal(k, lay.shapes[name], lay.dtype) for k, name in zip(keys, sorted(lay.shapes))}
    return lay.ravel(parts)
