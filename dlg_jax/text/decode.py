"""Dummy input embeddings -> tokens, respecting the embedding LayerNorm.

The model reads LN(x_i + p_i), which does not change when x_i + p_i is shifted or scaled, so the nearest row of E
to a dummy x_i can be the wrong token. Token v at position i is the one whose centred, unit-norm e_v + p_i is
closest (largest dot product) to the centred, unit-norm x_i + p_i; `candidates` restricts v (e.g. to the bag).
"""

from __future__ import annotations

import jax.numpy as jnp


def normalise(z: jnp.ndarray) -> jnp.ndarray:
    z = z - jnp.mean(z, axis=-1, keepdims=True)
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def scores(embeddings: jnp.ndarray, table: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """(N, L, V) similarity of LN-normalised x_{n,i} + p_i with e_v + p_i."""
    length = embeddings.shape[1]
    p = positions[:length]
    u = normalise(embeddings + p)  # (N, L, D)
    c = normalise(table[None, :, :] + p[:, None, :])  # (L, V, D)
    return jnp.einsum("nld,lvd->nlv", u, c)


def nearest_tokens(embeddings, table, positions, candidates=None) -> jnp.ndarray:
    """(N, L) token ids; `candidates` (ids) limits the choice when given."""
    s = scores(embeddings, table, positions)
    if candidates is None:
        return jnp.argmax(s, axis=-1)
    candidates = jnp.asarray(candidates)
    return candidates[jnp.argmax(s[..., candidates], axis=-1)]


def plain_nearest(embeddings, table) -> jnp.ndarray:
    """The paper's decoding: the nearest row of E in Euclidean distance (blind to the LayerNorm)."""
    d = jnp.sum(embeddings**2, -1)[..., None] - 2 * embeddings @ table.T + jnp.sum(table**2, -1)
    return jnp.argmin(d, axis=-1)
