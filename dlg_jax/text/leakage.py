"""What a language model's shared gradient gives away exactly, read off it with linear algebra (no search).

The model computes z_{n,i} = E[x_{n,i}] + P[i] and then LN(z). Hence, for an untied head:

- the token-embedding gradient dE[v] = sum over the positions holding v of dL/dz: its nonzero rows are the
  bag of input tokens (`bag`); rows of absent tokens are exactly zero (a scatter-add of nothing).
- the position-embedding gradient dP[i] = sum_n dL/dz_{n,i}. For one sentence dP[i] = dL/dz_i, so
  dE[bag] = A dP with A[k, i] = 1 where position i holds token bag[k]: A = dE[bag] pinv(dP) recovers the order,
  repeated tokens included (a row of A is then the indicator of a subset of positions), whenever the L rows of dP
  are linearly independent (L <= width, generic). Checked bit for bit in float32 and float64 (tests/test_text.py).
- the negative entries of the output-bias gradient are labels (p_v - #v < 0 for a random-init model).
- once the inputs are known the attacker runs the model: hidden states H and probabilities p. The head's
  gradient is dW = (1/M) sum_{i labelled} h_i (p_i - t_i)^T, so  H_lab^T T = H_lab^T p_lab - M dW  is linear in
  the labels T and `labels_from_head` solves it for the labelled positions (the masked ones of a masked LM; all
  but the last of a causal LM, whose last token is the label of the one before it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


def bag(grads) -> np.ndarray:
    """Token ids whose token-embedding gradient row is not zero (sorted)."""
    d_e = np.asarray(grads["token_embedding"])
    return np.flatnonzero(np.any(d_e != 0, axis=1))


def bias_labels(grads) -> np.ndarray:
    """Token ids with a negative output-bias gradient: the labels of the loss (sorted)."""
    return np.flatnonzero(np.asarray(grads["output_bias"]) < 0)


class Order(NamedTuple):
    ids: np.ndarray  # (L,) the token at each position (-1 where no position gradient: a causal LM's last)
    residual: float  # ||dE[bag] - A_rounded dP|| / ||dE[bag]||: ~1e-7 (float32) when the order is exact


def order_from_positions(grads, length: int) -> Order:
    """The input token at each of the `length` positions of one sentence, from dE[bag] = A dP (module doc)."""
    d_e = np.asarray(grads["token_embedding"], np.float64)
    d_p = np.asarray(grads["position_embedding"], np.float64)[:length]
    tokens = bag(grads)
    live = np.flatnonzero(np.any(d_p != 0, axis=1))  # a causal LM's last position has no gradient at all
    ids = np.full(length, -1)
    if len(tokens) == 0 or len(live) == 0:
        return Order(ids, float("inf"))
    a = d_e[tokens] @ np.linalg.pinv(d_p[live])  # (K, live)
    ids[live] = tokens[np.argmax(a, axis=0)]
    rounded = np.zeros_like(a)
    rounded[np.argmax(a, axis=0), np.arange(len(live))] = 1.0
    residual = np.linalg.norm(d_e[tokens] - rounded @ d_p[live]) / max(np.linalg.norm(d_e[tokens]), 1e-300)
    return Order(ids, float(residual))


def labels_from_head(model, params, grads, input_ids: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """The label token of each position in `labelled` (one sentence, untied head), from the head's gradient."""
    h, probs = (np.asarray(a, np.float64)[0] for a in _hidden_program(model)(params, input_ids[None]))
    h_lab, p_lab = h[labelled], probs[labelled]
    d_w = np.asarray(grads["output_kernel"], np.float64)
    rhs = h_lab.T @ p_lab - len(labelled) * d_w  # (D, V) = H_lab^T T
    t = np.linalg.lstsq(h_lab.T, rhs, rcond=None)[0]  # (M, V)
    return np.argmax(t, axis=1)


_HIDDEN: dict = {}


def _hidden_program(model):
    key = (model.name, model.num_classes, model.text.max_len)
    if key not in _HIDDEN:
        _HIDDEN[key] = jax.jit(lambda p, x: _hidden_and_probs(model, p, x))
    return _HIDDEN[key]


def _hidden_and_probs(model, params, ids):
    """The final hidden states (input of the head) and the softmax of the logits."""
    logits, state = model.text.apply({"params": params}, params["token_embedding"][ids],
                                     capture_intermediates=lambda mdl, name: name == "__call__" and
                                     mdl.name is not None and mdl.name.startswith("block_"))
    last = f"block_{model.text.layers - 1}"
    return state["intermediates"][last]["__call__"][0], jax.nn.softmax(logits, axis=-1)
