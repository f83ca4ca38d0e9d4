"""Reading a batch of N > 1 masked-LM sentences off the shared gradient (untied head).

For one sentence the position rows give the order at once (dlg_jax.text.leakage). For a batch they sum over
the sentences, so the reading goes cell by cell, a cell being (sentence n, position i) with gradient
g_ni = dL/dz_ni, z_ni = E[x_ni] + P[i]. Four facts make it work:

1. **The embedding LayerNorm makes every cell's gradient orthogonal to its own normalised input**: with
   y = (z - mean z) / sqrt(var z + eps), LN's backward pass gives g . 1 = 0 and g . y = (v . y) eps / (var + eps)
   (v the gradient LN receives): |cos(g, y)| <= eps / (var + eps) ~ 1e-3 for these weights (std 0.02, eps
   1e-6), ~5e-5 measured. A token v that occurs once in the batch has dE[v] = g of its cell, so the position i
   with dE[v] . y(v, i) ~ 0 is its position (the next best position: |cos| ~ 3e-3 to 1e-2). Subtracting the found cell from dP[i]
   can leave a column with one unknown cell, whose gradient is then that residual: the same test names its
   token, and so on (`peel`, a peeling decoder). About 60% of the 64 cells of 4 x 16 tokens come out this way.
2. **Cells of one sentence have nearly parallel gradients** (|cos| ~ 0.98 within a sentence, ~0.1 across, in
   the random-init model: its attention is near uniform, so every cell's gradient is driven by the same masked
   positions), so the peeled cells cluster into the N sentences, one per position (`group`).
3. **The head gives the masked positions**: the output-bias gradient is (sum_c p_c - t_c) / M, so -1/db[l] ~ M /
   count(l) gives M and each label's count; the head's column dW[:, l] ~ -(1/M) sum of the hidden states of the
   cells labelled l, and the hidden state of [MASK] depends mostly on its position: the column of each label.
   Which open sentence of that column holds it is chosen by the batch score (4).
4. **A score that sees every cell**: the plain relative distance is dominated by the masked cells, whose
   gradients are ~350x the others', so it hardly sees where the other tokens sit (a batch with a quarter of its
   tokens misplaced scored 4e-7). `row_distance` is the relative error per row of dE (each token) and dP
   (each position) plus the relative error of the other parameters: ~4e-14 at the truth in float32, and each
   misplaced token moves it by ~1e-3 or more. The labels are not searched: given the inputs, the head's
   gradient is linear in them and `head_labels` solves it.

The open cells are filled with the tokens whose rows the peel did not empty, by least squares on the
predicted cell gradients (the model's gradient of the hypothesis), then a discrete search on `row_distance`
(swaps within a sentence and within a column, single-cell changes over the bag) finishes the order.
Measured (experiments/results/text_leakage.md, row bert-16-batch4) on batches of 4 x 16 tokens.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from dlg_jax.client import client_gradient
from dlg_jax.text import leakage

EXACT = 1e-9  # row_distance below which a batch counts as the one shared (truth: ~4e-14 in float32)
ORTHOGONAL = 1e-3  # |cos(g, y)| below which a cell's gradient is orthogonal to a token's normalised input
EMPTY = 1e-4  # a residual row below this fraction of its start is used up
WIDTH = 32  # candidate batches scored together
FILLS = 3  # rounds of fill + search at most


class Reading(NamedTuple):
    inputs: np.ndarray  # (N, L) model inputs ([MASK] at masked cells)
    labels: np.ndarray  # (N, L) label ids, -1 where none
    distance: float  # row_distance of (inputs, labels)
    stages: list  # [(name, (N, L) inputs so far)]
    evaluations: int
    compile_seconds: float


# -- the linear algebra: cells, sentences, labels

def normalised(z: np.ndarray) -> np.ndarray:
    z = z - z.mean(-1, keepdims=True)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


class Cell(NamedTuple):
    token: int
    position: int
    gradient: np.ndarray  # (D,) dL/dz of the cell


def peel(grads, params, n: int, length: int):
    """Cells whose token and position the orthogonality test settles (module doc, 1), and the tokens whose
    dE rows are not used up (each occurs in the cells left open)."""
    d_e = np.asarray(grads["token_embedding"], np.float64)
    d_p = np.asarray(grads["position_embedding"], np.float64)[:length].copy()
    table = np.asarray(params["token_embedding"], np.float64)
    positions = np.asarray(params["position_embedding"], np.float64)[:length]
    bag = leakage.bag(grads)
    rest = {v: d_e[v].copy() for v in bag}
    start = {v: np.linalg.norm(d_e[v]) for v in bag}
    column_start = np.linalg.norm(d_p, axis=1)
    y = {v: normalised(table[v] + positions) for v in bag}  # (L, D) each
    free = np.full(length, n)  # cells of each column not yet found
    cells: list[Cell] = []

    def live(v):
        return np.linalg.norm(rest[v]) >= EMPTY * start[v]

    progress = True
    while progress:
        progress = False
        for v in bag:  # a token row that is one cell's gradient
            if not live(v):
                continue
            cos = np.abs(y[v] @ rest[v]) / np.linalg.norm(rest[v])
            cos[free == 0] = np.inf
            i = int(np.argmin(cos))
            if cos[i] < ORTHOGONAL:
                cells.append(Cell(int(v), i, rest[v].copy()))
                d_p[i] -= rest[v]
                free[i] -= 1
                rest[v][:] = 0
                progress = True
        for i in np.flatnonzero(free == 1):  # a column with one unknown cell: the residual is its gradient
            if np.linalg.norm(d_p[i]) < EMPTY * column_start[i]:
                continue
            candidates = [v for v in bag if live(v)]
            if not candidates:
                continue
            cos = np.array([abs(y[v][i] @ d_p[i]) for v in candidates]) / np.linalg.norm(d_p[i])
            if cos.min() < ORTHOGONAL:
                v = candidates[int(np.argmin(cos))]
                cells.append(Cell(int(v), int(i), d_p[i].copy()))
                rest[v] -= d_p[i]
                d_p[i][:] = 0
                free[i] = 0
                progress = True
    return cells, np.array([v for v in bag if live(v)], int), rest


def group(cells: list[Cell], n: int, length: int, rounds: int = 10) -> np.ndarray:
    """The sentence of each cell: k-means on the cells' unit gradients (signed cosine), each position's cells
    spread over distinct sentences (an assignment per column)."""
    if not cells:
        return np.zeros(0, int)
    unit = np.array([c.gradient / np.linalg.norm(c.gradient) for c in cells])
    seeds = [0]
    for _ in range(n - 1):  # farthest first
        seeds.append(int(np.argmin(np.max(unit @ unit[seeds].T, axis=1))))
    centres = unit[seeds]
    sentence = np.zeros(len(cells), int)
    for _ in range(rounds):
        for i in range(length):
            here = [k for k, c in enumerate(cells) if c.position == i]
            if here:
                rows, cols = linear_sum_assignment(-(unit[here] @ centres.T))
                sentence[np.array(here)[rows]] = cols
        centres = np.array([normalised(unit[sentence == s].mean(0)) if np.any(sentence == s) else centres[s]
                            for s in range(n)])
    return sentence


def label_counts(grads) -> tuple[np.ndarray, np.ndarray, int]:
    """(labels, count of each, M the number of labelled cells) from the output-bias gradient (module doc, 3)."""
    labels = leakage.bias_labels(grads)
    if not len(labels):
        return labels, np.zeros(0, int), 0
    ratio = -1.0 / np.asarray(grads["output_bias"], np.float64)[labels]  # ~ M / count
    total = int(round(float(ratio.max())))
    return labels, np.maximum(1, np.round(total / ratio).astype(int)), total


def label_columns(model, params, grads, context: np.ndarray, mask_id: int):
    """[(label, column)] for every labelled cell: the column whose [MASK] hidden state best matches the
    head's column of the label (a label that occurs k times: the best k columns together)."""
    labels, counts, total = label_counts(grads)
    length = context.shape[0]
    probes = np.repeat(context[None], length, 0)
    probes[np.arange(length), np.arange(length)] = mask_id
    hidden = np.asarray(leakage._hidden_program(model)(params, probes)[0], np.float64)
    hidden = hidden[np.arange(length), np.arange(length)]  # probe i's state at its [MASK]
    head = np.asarray(grads["output_kernel"], np.float64)
    items = []
    for label, count in zip(labels, counts):
        target = -head[:, label]
        chosen: list[int] = []
        for _ in range(count):  # greedy: add the column that best explains the sum
            base = hidden[chosen].sum(0) if chosen else 0.0
            fit = [((base + hidden[i]) @ target) / np.linalg.norm(base + hidden[i]) for i in range(length)]
            chosen.append(int(np.argmax(fit)))
        items += [(int(label), i) for i in chosen]
    return items, total


# -- the score

def head_labels(model, params, shared, inputs, labelled):
    """The label of each labelled cell (boolean (N, L)), -1 elsewhere: the least-squares solution of
    H_lab^T T = H_lab^T p_lab - M dW (dlg_jax.text.leakage), for a whole batch."""
    h, probs = leakage._hidden_and_probs(model, params, inputs)
    weight = labelled.reshape(-1).astype(h.dtype)
    hidden = h.reshape(-1, h.shape[-1]) * weight[:, None]
    probs = probs.reshape(-1, probs.shape[-1]) * weight[:, None]
    count = jnp.maximum(weight.sum(), 1)
    t = jnp.linalg.pinv(hidden.T) @ (hidden.T @ probs - count * shared["output_kernel"])
    return jnp.where(weight > 0, jnp.argmax(t, axis=1), -1).reshape(inputs.shape)


def row_distance(model, params, shared, inputs, labels) -> jax.Array:
    """mean over rows v of ||dE_v - s_v||^2 / ||s_v||^2 (rows nonzero on either side) + the same mean over the
    positions' rows of dP + sum ||g - s||^2 / sum ||s||^2 over the other parameters (module doc, 4)."""
    from dlg_jax.text.attacks import one_hot_labels

    length = inputs.shape[1]
    targets = one_hot_labels(labels, model.num_classes, params["position_embedding"].dtype)
    g = client_gradient(model, params, inputs, targets)

    def row_error(a, b):
        return jnp.sum((a - b) ** 2, 1) / jnp.maximum(jnp.sum(b**2, 1), 1e-30)

    used = jnp.any(shared["token_embedding"] != 0, 1) | jnp.any(g["token_embedding"] != 0, 1)
    tokens = jnp.sum(jnp.where(used, row_error(g["token_embedding"], shared["token_embedding"]), 0)) / jnp.sum(used)
    positions = jnp.mean(row_error(g["position_embedding"][:length], shared["position_embedding"][:length]))
    rest = [k for k in shared if k not in ("token_embedding", "position_embedding")]
    ours, theirs = jax.tree.leaves({k: g[k] for k in rest}), jax.tree.leaves({k: shared[k] for k in rest})
    others = sum(jnp.sum((a - b) ** 2) for a, b in zip(ours, theirs)) / sum(jnp.sum(b**2) for b in theirs)
    return tokens + positions + others


_PROGRAMS: dict = {}


def _programs(model, shape, mask_id: int):
    key = (model.name, model.num_classes, model.text.max_len, shape, mask_id)
    if key not in _PROGRAMS:
        def labelled_score(params, shared, inputs):
            labels = head_labels(model, params, shared, inputs, inputs == mask_id)
            return row_distance(model, params, shared, inputs, labels)

        def cell_gradients(params, inputs, labels, count):
            from dlg_jax.text.attacks import one_hot_labels

            emb = params["token_embedding"][inputs]
            t = one_hot_labels(labels, model.num_classes, emb.dtype)
            return jax.grad(lambda z: jnp.sum(-t * jax.nn.log_softmax(model.apply(params, z), -1)) / count)(emb)

        def sentence_error(params, inputs, labels, targets, weight, count):
            """Per sentence: the mean relative error of the model's cell gradients at the weighted cells."""
            g = cell_gradients(params, inputs, labels, count)
            e = jnp.sum((g - targets) ** 2, -1) / jnp.maximum(jnp.sum(targets**2, -1), 1e-30)
            return jnp.sum(e * weight, 1) / jnp.maximum(jnp.sum(weight, 1), 1)

        _PROGRAMS[key] = (jax.jit(jax.vmap(labelled_score, in_axes=(None, None, 0))),
                          jax.jit(lambda p, s, x: head_labels(model, p, s, x, x == mask_id)),
                          jax.jit(jax.vmap(cell_gradients, in_axes=(None, 0, None, None))), jax.jit(sentence_error))
    return _PROGRAMS[key]


class _Scorer:
    """Scores candidate batches WIDTH at a time and keeps the best one seen."""

    def __init__(self, many, params, shared, inputs):
        self.many, self.params, self.shared = many, params, shared
        self.inputs = np.array(inputs)
        self.evaluations = 0
        self.best = float(self(self.inputs[None])[0])

    def __call__(self, candidates: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(candidates), WIDTH):
            block = candidates[start:start + WIDTH]
            pad = WIDTH - len(block)
            if pad:
                block = np.concatenate([block, np.repeat(block[-1:], pad, 0)])
            out.append(np.asarray(self.many(self.params, self.shared, block))[:WIDTH - pad])
            self.evaluations += WIDTH
        return np.concatenate(out)

    def offer(self, candidates: list | np.ndarray) -> int:
        """Keep the best candidate if it beats the best so far; its index, or -1."""
        if len(candidates) == 0:
            return -1
        candidates = np.asarray(candidates)
        values = self(candidates)
        k = int(np.argmin(values))
        if values[k] < self.best * (1 - 1e-6):
            self.best, self.inputs = float(values[k]), candidates[k].copy()
            return k
        return -1


# -- the steps that use the model

def place_labels(sentence_error, params, items, inputs, found, targets, count, mask_id: int, rounds: int = 4):
    """Put each labelled cell ([MASK], label) in an open sentence of its column, by coordinate descent on the
    summed per-sentence error (how far the model's gradients of the found cells are from theirs)."""
    n, length = inputs.shape
    columns = [i for _, i in items]
    weight = found.astype(np.float32)

    def batch(choice):
        x, labels = inputs.copy(), np.full(inputs.shape, -1)
        for (label, i), s in zip(items, choice):
            x[s, i], labels[s, i] = mask_id, label
        return x, labels

    def error(choice):
        x, labels = batch(choice)
        return float(np.sum(np.asarray(sentence_error(params, jnp.asarray(x), jnp.asarray(labels),
                                                      jnp.asarray(targets), jnp.asarray(weight), count))))

    owner = []
    for k, i in enumerate(columns):  # start: the open sentences of each column, in turn
        taken = {owner[j] for j in range(k) if columns[j] == i}
        free = [s for s in range(n) if not found[s, i] and s not in taken] or [s for s in range(n) if s not in taken]
        owner.append(free[0] if free else 0)
    best = error(owner)
    for _ in range(rounds):
        changed = False
        for k, i in enumerate(columns):
            for s in range(n):
                if s == owner[k] or any(owner[j] == s and columns[j] == i for j in range(len(owner)) if j != k):
                    continue
                trial = list(owner)
                trial[k] = s
                value = error(trial)
                if value < best:
                    best, owner, changed = value, trial, True
        if not changed:
            break
    return batch(owner)[0]


def fill_by_least_squares(cell_gradients, params, inputs, labels, count, open_cells, tokens, rest, rounds: int = 3):
    """Give each open cell one of `tokens` so that each token's residual row rest[v] (its dE row less the
    peeled cells) is the sum of the predicted gradients of the cells that hold it. A cell's predicted gradient
    is the model's with that very token in it (the LayerNorm's Jacobian at the cell depends on the token), the
    rest of the batch as it stands; recomputed after each round."""
    x = inputs.copy()
    if not open_cells or not len(tokens):
        return x
    target = np.array([rest[v] for v in tokens])  # (K, D)
    index = {int(v): k for k, v in enumerate(tokens)}
    cells = np.array(open_cells)
    for _ in range(rounds):
        trials = np.repeat(x[None], len(cells) * len(tokens), 0)  # every (cell, token) change of x
        rows = np.repeat(np.arange(len(cells)), len(tokens))
        trials[np.arange(len(trials)), cells[rows, 0], cells[rows, 1]] = np.tile(tokens, len(cells))
        pred = np.empty((len(trials), target.shape[1]))  # each trial's gradient at the cell it changed
        for start in range(0, len(trials), WIDTH):
            block, at = trials[start:start + WIDTH], cells[rows[start:start + WIDTH]]
            grads = np.asarray(cell_gradients(params, jnp.asarray(block), jnp.asarray(labels), count), np.float64)
            pred[start:start + len(block)] = grads[np.arange(len(block)), at[:, 0], at[:, 1]]
        pred = pred.reshape(len(cells), len(tokens), -1)
        held = np.array([index.get(int(x[s, i]), -1) for s, i in open_cells])
        sums = np.zeros_like(target)
        for c, k in enumerate(held):
            if k >= 0:
                sums[k] += pred[c, k]
        for _ in range(5):
            changed = False
            for c in range(len(cells)):
                g, here = pred[c], held[c]
                residual = target - sums
                # the change in sum_v ||residual_v||^2 when the cell moves from its token to token k
                delta = -2 * np.sum(residual * g, 1) + np.sum(g * g, 1)
                if here >= 0:
                    delta += 2 * residual[here] @ g[here] + g[here] @ g[here]
                    delta[here] = 0.0
                k = int(np.argmin(delta))
                if delta[k] < -1e-30:
                    if here >= 0:
                        sums[here] -= g[here]
                    sums[k] += g[k]
                    held[c] = k
                    changed = True
            if not changed:
                break
        x[cells[:, 0], cells[:, 1]] = np.where(held >= 0, tokens[held.clip(0)], x[cells[:, 0], cells[:, 1]])
    return x


def polish(scorer: _Scorer, fixed: np.ndarray, tokens: np.ndarray, bag: np.ndarray, rounds: int = 8):
    """Discrete search on the score: swaps within a sentence and within a column, then single-cell changes
    to the open tokens; once that stalls, every cell may take any bag token."""
    n, length = scorer.inputs.shape
    choices, locked = tokens, fixed.copy()
    for _ in range(rounds):
        if scorer.best < EXACT:
            break
        x = scorer.inputs
        changed = False
        swaps = []
        for s in range(n):
            for i in range(length):
                for j in range(i + 1, length):
                    if x[s, i] != x[s, j] and not (locked[s, i] and locked[s, j]):
                        y = x.copy()
                        y[s, i], y[s, j] = x[s, j], x[s, i]
                        swaps.append(y)
        for i in range(length):
            for s in range(n):
                for t in range(s + 1, n):
                    if x[s, i] != x[t, i]:
                        y = x.copy()
                        y[s, i], y[t, i] = x[t, i], x[s, i]
                        swaps.append(y)
        changed |= scorer.offer(swaps) >= 0
        singles = []
        for s, i in zip(*np.nonzero(~locked)):
            y = np.repeat(scorer.inputs[None], len(choices), 0)
            y[:, s, i] = choices
            singles.extend(y)
        changed |= scorer.offer(singles) >= 0
        if not changed:
            if choices is bag:
                break
            choices, locked = bag, np.zeros_like(fixed)
    return scorer.inputs.copy()


def read_batch(model, params, shared, shape, mask_id: int) -> Reading:
    """The batch of `shape` = (N, L) a masked LM's shared gradient came from (module doc)."""
    n, length = shape
    many, labels_of, cell_gradients, sentence_error = _programs(model, shape, mask_id)
    cells, tokens, rest = peel(shared, params, n, length)
    plain = [c for c in cells if c.token != mask_id]  # masked cells come from the head
    sentence = group(plain, n, length)
    bag = leakage.bag(shared)
    tokens = np.array([v for v in tokens if v != mask_id] or [v for v in bag if v != mask_id] or [mask_id])
    inputs = np.full(shape, tokens[0])
    found = np.zeros(shape, bool)
    targets = np.zeros(shape + (params["token_embedding"].shape[1],), np.float32)
    for c, s in zip(plain, sentence):
        inputs[s, c.position], found[s, c.position], targets[s, c.position] = c.token, True, c.gradient
    stages = [("cells (orthogonality)", np.where(found, inputs, -1))]
    items, count = label_columns(model, params, shared, np.where(found, inputs, tokens[0])[0], mask_id)
    inputs = place_labels(sentence_error, params, items, inputs, found, targets, max(count, 1), mask_id)
    t0 = time.perf_counter()
    scorer = _Scorer(many, params, shared, inputs)
    compile_seconds = time.perf_counter() - t0
    stages.append(("masked cells (head)", np.where(found | (inputs == mask_id), inputs, -1)))
    for attempt in range(FILLS):  # the search may move a [MASK]; the fill is then redone around it
        fixed = found | (inputs == mask_id)
        open_cells = [(s, i) for s, i in zip(*np.nonzero(~fixed))]
        labels = np.asarray(labels_of(params, shared, jnp.asarray(inputs)))
        filled = fill_by_least_squares(cell_gradients, params, inputs, labels, max(count, 1), open_cells, tokens, rest)
        value = float(scorer(filled[None])[0])
        if attempt == 0 or value < scorer.best:
            scorer.inputs, scorer.best = filled, value
        if attempt == 0:
            stages.append(("open cells (least squares)", filled.copy()))
        before = scorer.inputs.copy()
        inputs = polish(scorer, fixed, tokens, bag)
        if scorer.best < EXACT or np.array_equal(before == mask_id, inputs == mask_id):
            break
    labels = np.asarray(labels_of(params, shared, jnp.asarray(inputs)))
    stages.append(("search (row distance)", inputs.copy()))
    return Reading(inputs, labels, scorer.best, stages, scorer.evaluations, compile_seconds)
