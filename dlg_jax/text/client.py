"""The client of a language model: its private token ids become (model inputs, soft labels), and it shares
the gradient of the LM loss with respect to every parameter (dlg_jax.client.client_gradient, as for images).

A masked-LM client (BERT-like) masks round(15%) of each sentence's positions (at least one; drawn from
`mask_seed`, the sentence's index added), replacing them by [MASK] (always: not BERT's 80/10/10) and labelling
them with their token; a causal client (GPT-like) labels position i with token i+1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from dlg_jax.client import client_gradient
from dlg_jax.models.text import mask_positions, text_labels

MASK_RATE = 0.15


class TextClient(NamedTuple):
    ids: np.ndarray  # (N, L) the private tokens
    inputs: np.ndarray  # (N, L) what the model read ([MASK] at masked positions)
    labels: np.ndarray  # (N, L, V) one-hot labels, zero where a position has none
    grads: Any  # the shared gradient


def text_client(model, params, ids, mask_id: int, mask_seed: int = 0, mask_rate: float = MASK_RATE) -> TextClient:
    ids = np.asarray(ids, np.int32)
    n, length = ids.shape
    masked = None if model.text.causal else [mask_positions(length, mask_rate, mask_seed + b) for b in range(n)]
    inputs, labels = text_labels(ids, model.num_classes, model.text.causal, masked, mask_id)
    dtype = jnp.asarray(params["position_embedding"]).dtype
    grads = client_gradient(model, params, jnp.asarray(inputs), jnp.asarray(labels, dtype))
    return TextClient(ids, inputs, labels, grads)
