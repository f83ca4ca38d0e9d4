"""The client: what a federated participant shares after computing its loss on private data.

    shared = shared_gradient(model, params, inputs, labels, transforms, key)

is the gradient of the model's training loss on the private batch, then each gradient transform in order
(`(key, grads) -> grads`: a defense such as noise or pruning; none by default). The attacker differentiates
`client_gradient` of its dummy, so the two sides compute the same function.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from dlg_jax.models import Model

Params = Any
GradientTransform = Callable[[jax.Array, Params], Params]  # (key, gradient) -> what is shared instead


def client_gradient(model: Model, params: Params, inputs: jax.Array, soft_labels: jax.Array) -> Params:
    """dL/dw for every parameter, L the model's training loss on (inputs, soft labels)."""
    return jax.grad(lambda p: model.loss(model.apply(p, inputs), soft_labels))(params)


def shared_gradient(model: Model, params: Params, inputs: jax.Array, soft_labels: jax.Array,
                    transforms: Sequence[GradientTransform] = (), key: jax.Array | None = None) -> Params:
    """What the client shares: its gradient, then every transform in order (each with a key of its own)."""
    grads = client_gradient(model, params, inputs, soft_labels)
    if transforms:
        keys = jax.random.split(jax.random.key(0) if key is None else key, len(transforms))
        for k, transform in zip(keys, transforms):
            grads = transform(k, grads)
    return grads
