"""What the shared gradient says about the labels: iDLG (one image, exact) and LLG's counts (batches)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def last_layer_weight_grad(grads: Any) -> jax.Array:
    """The gradient of the final dense kernel (in, classes): the last 2-D leaf in parameter order."""
    return [g for g in jax.tree.leaves(grads) if g.ndim == 2][-1]


def analytic_labels(last_weight_grad: jax.Array, n: int) -> jax.Array:
    """The labels of a batch of n images, read off the last layer's weight gradient (n,).

    With features h >= 0 (sigmoid outputs) and soft-label CE averaged over the batch, the column sums of
    dL/dW (in, classes) are  s_c = (1/n) sum_i (p_ic - y_ic) |h_i|_1:  a class no image has gets s_c > 0, so
    every class with s_c < 0 holds at least one label. For one image only the true class is negative and
    this is iDLG (Zhao et al., 2020), exact. For a batch (LLG, Wainakh et al., 2022) each negative class
    first takes one label; the rest go one at a time to the class whose sum is still most negative after
    removing, per label it holds, the mean impact of one image  m = sum_c min(s_c, 0) / n.  The counts are
    an estimate: exact when each image pushes its class alike, wrong when a class the model already
    predicts strongly is in the batch (its s_c can be >= 0).
    """
    sums = jnp.sum(last_weight_grad, axis=0)
    impact = jnp.sum(jnp.minimum(sums, 0.0)) / n

    def pick(counts, _):
        unclaimed = (sums < 0) & (counts == 0)
        label = jnp.where(unclaimed.any(), jnp.argmin(jnp.where(unclaimed, sums, jnp.inf)),
                          jnp.argmin(sums - impact * counts))
        return counts.at[label].add(1), label

    _, labels = jax.lax.scan(pick, jnp.zeros(sums.shape, jnp.int32), None, length=n)
    return labels
