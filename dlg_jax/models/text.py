"""Tiny language models for the text attacks: a BERT-like masked-LM encoder and a GPT-like causal decoder.

Both are one Flax module, `TextTransformer`: token embeddings E (V x D) plus learned position embeddings P
(max_len x D), an embedding LayerNorm, `layers` post-LN blocks (h = LN(h + attention(h)); h = LN(h + MLP(h)),
GELU), and an output head: untied (its own D x V matrix and bias, the default) or tied (E^T plus a bias).
Weights are drawn as BERT's (normal, std 0.02; LayerNorm 1/0) from a seed: no pretrained weights exist here.

The module reads *input embeddings* (N, L, D), the rows of E the ids pick, so an attacker can feed it free
dummy embeddings; `apply(params, ids)` looks the ids up first (the client's side), and the gradient of E then
has nonzero rows exactly for the ids that occur (for an untied head).

The loss is a per-position soft cross entropy weighted by each position's label mass:

    L = sum_{n,i} sum_v -t_{n,i,v} log softmax(z_{n,i})_v  /  sum_{n,i,v} t_{n,i,v}

so positions without a label (the unmasked ones of a masked LM; the last one of a causal LM) carry t = 0.
`text_labels` builds the client's targets for either objective.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INIT_STD = 0.02  # BERT's initializer range


class Block(nn.Module):
    """Post-LN transformer block: h = LN(h + MHA(h)); h = LN(h + W2 gelu(W1 h))."""

    width: int
    heads: int
    causal: bool

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        init = nn.initializers.normal(INIT_STD)
        length = h.shape[1]
        mask = nn.make_causal_mask(jnp.ones((h.shape[0], length))) if self.causal else None
        attention = nn.MultiHeadDotProductAttention(num_heads=self.heads, kernel_init=init, param_dtype=h.dtype,
                                                    deterministic=True, name="attention")
        h = nn.LayerNorm(param_dtype=h.dtype, name="attention_norm")(h + attention(h, h, mask=mask))
        m = nn.Dense(4 * self.width, kernel_init=init, param_dtype=h.dtype, name="mlp_in")(h)
        m = nn.Dense(self.width, kernel_init=init, param_dtype=h.dtype, name="mlp_out")(nn.gelu(m, approximate=False))
        return nn.LayerNorm(param_dtype=h.dtype, name="mlp_norm")(h + m)


class TextTransformer(nn.Module):
    """Input embeddings (N, L, D) -> logits (N, L, V). `causal`: GPT-like; else BERT-like (bidirectional)."""

    vocab: int
    max_len: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    causal: bool = False
    tied: bool = False

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        init = nn.initializers.normal(INIT_STD)
        dtype = embeddings.dtype
        table = self.param("token_embedding", init, (self.vocab, self.width), dtype)
        positions = self.param("position_embedding", init, (self.max_len, self.width), dtype)
        h = nn.LayerNorm(param_dtype=dtype, name="embedding_norm")(embeddings + positions[: embeddings.shape[1]])
        for i in range(self.layers):
            h = Block(self.width, self.heads, self.causal, name=f"block_{i}")(h)
        bias = self.param("output_bias", nn.initializers.zeros, (self.vocab,), dtype)
        if self.tied:
            return h @ table.T + bias
        kernel = self.param("output_kernel", init, (self.width, self.vocab), dtype)
        return h @ kernel + bias


def embed(params, ids: jax.Array) -> jax.Array:
    """The input embeddings of token ids: rows of the token-embedding table."""
    return jnp.take(params["token_embedding"], ids, axis=0)


def text_apply(module: TextTransformer):
    """(params, ids or embeddings) -> logits: integer inputs are looked up first, float ones used as they are."""

    def apply(params, inputs):
        x = embed(params, inputs) if jnp.issubdtype(inputs.dtype, jnp.integer) else inputs
        return module.apply({"params": params}, x)

    return apply


def weighted_cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
    """sum -t log softmax(z) over every position and token, divided by the total label mass (module doc)."""
    total = jnp.sum(-soft_labels * jax.nn.log_softmax(logits, axis=-1))
    return total / jnp.maximum(jnp.sum(soft_labels), 1e-6)


def init_text_params(module: TextTransformer, seed: int, dtype=jnp.float32):
    dummy = jnp.zeros((1, module.max_len, module.width), dtype)
    return module.init(jax.random.key(seed), dummy)["params"]


def mask_positions(length: int, rate: float, seed: int) -> np.ndarray:
    """Which positions a masked LM client masks: round(rate x length), at least 1, drawn from `seed`."""
    count = max(1, int(round(rate * length)))
    return np.sort(np.random.default_rng(seed).choice(length, size=count, replace=False))


def text_labels(ids: np.ndarray, vocab: int, causal: bool, masked: Sequence[np.ndarray] | None = None,
                mask_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The client's (input ids, soft labels (N, L, V)) for a batch of token ids (N, L).

    Causal: the label of position i is token i+1 (the last position has none). Masked: the positions in
    `masked[n]` read `mask_id` and are labelled with their original token; the others have no label.
    """
    ids = np.asarray(ids)
    n, length = ids.shape
    labels = np.zeros((n, length, vocab), np.float32)
    inputs = ids.copy()
    for b in range(n):
        if causal:
            labels[b, np.arange(length - 1), ids[b, 1:]] = 1.0
        else:
            labels[b, masked[b], ids[b, masked[b]]] = 1.0
            inputs[b, masked[b]] = mask_id
    return inputs, labels
