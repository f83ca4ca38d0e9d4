"""Text attacks as presets, each a pure function of (model, params, shared gradient, batch shape).

- `dlg-text` (the paper): dummy input embeddings and dummy soft labels, L-BFGS on the squared L2 gradient
  distance, every token read as the nearest row of E (Euclidean, blind to the LayerNorm). The baseline.
- `tag`: the same dummies, the L2 + L1 distance (TAG), Adam with cosine decay; LayerNorm-aware decoding.
- `lamp-cos`: the cosine distance, Adam with cosine decay, decoding within the bag of tokens the gradient
  gives away, then LAMP's discrete search: substitutions of tokens (and labels) position by position, and swaps, kept when they lower
  the gradient distance of the discrete sentence (whose token-embedding gradient can then be compared too).
- `rows` (default): exact reading (dlg_jax.text.leakage): the bag from the nonzero token-embedding rows, the
  order from the position-embedding rows, the labels from the head's gradient; accepted when the recovered
  sentence's gradient matches the shared one (relative squared distance < 1e-6), else `lamp-cos` from there.
  For a batch (N > 1) of a masked LM the position rows sum over sentences: `dlg_jax.text.batch` reads it cell
  by cell instead (method `rows-batch`, exact when its row distance is < 1e-9, else the search's best). A causal
  batch goes to `lamp-cos`. A tied head leaves no bag (every row of E gets the head's gradient): the continuous
  attack alone, decoding over the vocabulary.

The continuous dummies: embeddings (N, L, D) and label logits (N, L, V + 1), the last class meaning "no label"
(the attacker does not know which positions a masked LM labelled). The continuous distance leaves out the
token-embedding gradient (a free dummy embedding is no row of E, so its dE is zero whatever it is); the L2
distance is divided by ||shared||^2 (the same minimiser: a random-init model's gradients are ~1e-3, and the
engine's L-BFGS skips pairs with s.y <= 1e-10, so the raw squared distance left it at steepest descent).
Solvers are the engine's (`dlg_jax.solvers.make_solver`); params and the shared gradient enter the compiled
programs as arguments, so each program compiles once per shape and model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dlg_jax.client import client_gradient
from dlg_jax.parts.objectives import DISTANCES
from dlg_jax.text import decode as decode_lib
from dlg_jax.text import leakage

ACCEPT = 1e-6  # relative squared gradient distance below which a discrete sentence counts as the one shared


@dataclasses.dataclass(frozen=True)
class TextAttack:
    name: str
    method: str = "optimise"  # "rows": exact reading first; "optimise": continuous dummies from the start
    distance: str = "cosine"  # dlg_jax.parts.objectives.DISTANCES
    optimizer: str = "adam"  # dlg_jax.solvers.SOLVERS (engine solvers)
    iterations: int = 1000  # evaluations of the objective
    learning_rate: float = 0.05
    schedule: str = "cosine"
    ln_decode: bool = True  # LayerNorm-aware decoding (else the nearest row of E)
    bag_decode: bool = True  # decode within the bag of tokens (when the gradient gives one)
    swap_rounds: int = 6  # rounds of the discrete search (0: none): a sweep over the positions, then swaps
    swap_proposals: int = 32  # candidates scored together
    snapshot_every: int = 10


PRESETS: dict[str, TextAttack] = {
    "rows": TextAttack("rows", method="rows"),
    "lamp-cos": TextAttack("lamp-cos"),
    "tag": TextAttack("tag", distance="l2+l1", bag_decode=False, swap_rounds=0),
    "dlg-text": TextAttack("dlg-text", distance="l2", optimizer="lbfgs", iterations=300, ln_decode=False,
                           bag_decode=False, swap_rounds=0),
}
DEFAULT = "rows"


def get_attack(name: str) -> TextAttack:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown text preset {name!r}: choose from {', '.join(PRESETS)}") from None


class Outcome(NamedTuple):
    ids: np.ndarray  # (N, L) recovered tokens
    snapshots: list  # [(label, (N, L) ids)]: iterations of the optimisation, or stages of the exact reading
    method: str  # what produced ids: "rows", "rows-batch", "optimise", "optimise+swaps"
    distance: float  # relative squared gradient distance of the recovered sentence(s)
    evaluations: int
    seconds: float
    compile_seconds: float


# -- the discrete sentence: inputs and labels, and its gradient distance

def assemble(inputs: np.ndarray, labels: np.ndarray, causal: bool, mask_id: int) -> np.ndarray:
    """The sentence a (model inputs, label ids; -1: none) pair stands for: a masked LM's [MASK]s replaced by their
    labels; a causal LM's last token is the label of the position before it."""
    seq = np.array(inputs)
    if causal:
        seq[:, -1] = np.where(labels[:, -2] >= 0, labels[:, -2], seq[:, -1])
        return seq
    return np.where((seq == mask_id) & (labels >= 0), labels, seq)


def one_hot_labels(labels, vocab: int, dtype):
    return jax.nn.one_hot(jnp.where(labels >= 0, labels, vocab), vocab + 1, dtype=dtype)[..., :vocab]


def relative_distance(model, params, shared, inputs, labels) -> jax.Array:
    """sum ||g - s||^2 / sum ||s||^2 over every parameter, g the gradient of the discrete (inputs, labels)."""
    dtype = params["position_embedding"].dtype
    g = client_gradient(model, params, inputs, one_hot_labels(labels, model.num_classes, dtype))
    num = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(shared)))
    return num / sum(jnp.sum(b**2) for b in jax.tree.leaves(shared))


def causal_labels(inputs: jax.Array) -> jax.Array:
    return jnp.concatenate([inputs[:, 1:], jnp.full((inputs.shape[0], 1), -1, inputs.dtype)], axis=1)


# -- the exact reading

def read_rows(model, params, grads, length: int, mask_id: int):
    """(sentence (1, L), residual, stages) from the gradient alone, or None when there is no clean bag."""
    if model.text.tied:
        return None
    order = leakage.order_from_positions(grads, length)
    inputs = order.ids.copy()
    if model.text.causal:
        labelled = np.arange(length - 1)
        inputs[-1] = max(inputs[-1], 0)
    else:
        labelled = np.flatnonzero(inputs == mask_id)
    labels = np.full(length, -1)
    if len(labelled):
        labels[labelled] = leakage.labels_from_head(model, params, grads, inputs, labelled)
    if model.text.causal:
        inputs[-1] = labels[-2]
    bag = leakage.bag(grads)
    stages = [("bag (sorted ids)", np.pad(bag[:length], (0, max(0, length - len(bag))), constant_values=-1)[None]), ("order (position rows)", order.ids[None].clip(0)),
              ("labels (head)", assemble(inputs[None], labels[None], model.text.causal, mask_id))]
    return inputs[None], labels[None], order.residual, stages


# -- the continuous attack

def _objective(model, distance: Callable, batch: tuple[int, int]):
    vocab = model.num_classes

    def value(z, unravel, params, shared):
        parts = unravel(z)
        soft = jax.nn.softmax(parts["label_logits"], axis=-1)[..., :vocab]
        g = client_gradient(model, params, parts["embeddings"], soft)
        keep = lambda tree: {k: v for k, v in tree.items() if k != "token_embedding"}  # noqa: E731
        d = distance(keep(g), keep(shared))
        if distance is DISTANCES["l2"]:  # relative: the same minimiser, at a scale L-BFGS's thresholds suit
            d = d / sum(jnp.sum(s**2) for s in jax.tree.leaves(keep(shared)))
        return d

    return value


def _solver(attack: TextAttack):
    from dlg_jax.config import get_config
    from dlg_jax.solvers import make_solver

    config = get_config("dlg").override(optimizer=attack.optimizer, learning_rate=attack.learning_rate,
                                        schedule=attack.schedule, steps=attack.iterations, iterations_per_step=1)
    return make_solver(config)


_PROGRAMS: dict = {}


def _programs(attack: TextAttack, model, shape, dtype):
    """The compiled chunk of `snapshot_every` evaluations and the decoder, cached per (attack, model, shape)."""
    key = (attack, model.name, model.num_classes, model.text.max_len, shape, jnp.dtype(dtype).name)
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    n, length = shape
    width, vocab = model.text.width, model.num_classes
    template = {"embeddings": jnp.zeros((n, length, width), dtype), "label_logits": jnp.zeros((n, length, vocab + 1), dtype)}
    _, unravel = ravel_pytree(template)
    solver = _solver(attack)
    value = _objective(model, DISTANCES[attack.distance], shape)
    value_and_grad = jax.value_and_grad(value)

    def chunk(carry, params, shared):
        def body(_, c):
            state, best_x, best_v = c
            point = solver.ask(state)
            v, g = value_and_grad(point, unravel, params, shared)
            better = jnp.isfinite(v) & (v < best_v)
            state, _ = solver.tell(state, point, v, g)
            return state, jnp.where(better, point, best_x), jnp.where(better, v, best_v)

        return jax.lax.fori_loop(0, attack.snapshot_every, body, carry)

    def read(z, params, candidates):
        parts = unravel(z)
        emb = parts["embeddings"]
        table, pos = params["token_embedding"], params["position_embedding"]
        if attack.ln_decode:
            s = decode_lib.scores(emb, table, pos)
            s = jnp.where(candidates[None, None, :], s, -jnp.inf)
            inputs = jnp.argmax(s, axis=-1)
        else:
            inputs = decode_lib.plain_nearest(emb, table)
        probs = jax.nn.softmax(parts["label_logits"], axis=-1)
        labels = jnp.where(probs[..., -1] < 0.5, jnp.argmax(probs[..., :-1], axis=-1), -1)
        return inputs, labels

    programs = (jax.jit(chunk), jax.jit(read), unravel, solver)
    _PROGRAMS[key] = programs
    return programs


def optimise(attack: TextAttack, model, params, shared, shape, mask_id: int, seed: int, bag=None):
    """Continuous dummies from a seeded N(0, 1) start; returns (inputs, labels, snapshots, evaluations, compile s)."""
    dtype = params["position_embedding"].dtype
    chunk, read, unravel, solver = _programs(attack, model, shape, dtype)
    n, length = shape
    k1, k2 = jax.random.split(jax.random.key(seed))
    x0, _ = ravel_pytree({"embeddings": jax.random.normal(k1, (n, length, model.text.width), dtype),
                          "label_logits": jax.random.normal(k2, (n, length, model.num_classes + 1), dtype)})
    candidates = np.zeros(model.num_classes, bool)
    candidates[bag if bag is not None and attack.bag_decode and len(bag) else slice(None)] = True
    candidates = jnp.asarray(candidates)
    carry = (solver.init(x0), x0, jnp.asarray(jnp.inf, dtype))
    snapshots, compile_seconds, done = [], 0.0, 0
    causal = model.text.causal

    def snap(label, z):
        inputs, labels = (np.asarray(a) for a in read(z, params, candidates))
        snapshots.append((label, assemble(inputs, labels, causal, mask_id)))
        return inputs, labels

    snap(0, x0)
    while done < attack.iterations:
        started = time.perf_counter()
        carry = jax.block_until_ready(chunk(carry, params, shared))
        if done == 0:
            compile_seconds = time.perf_counter() - started  # the first call compiles (and runs one chunk)
        done += attack.snapshot_every
        snap(done, carry[0].x if hasattr(carry[0], "x") else carry[1])
    inputs, labels = snap("final (best)", carry[1])
    snapshots.pop()
    return inputs, labels, snapshots, done, compile_seconds


# -- the discrete search

_SEARCH: dict = {}


def _search_program(model, shape, proposals: int):
    key = (model.name, model.num_classes, model.text.max_len, shape, proposals)
    if key not in _SEARCH:
        causal = model.text.causal

        def score(params, shared, inputs, labels):
            labels = causal_labels(inputs) if causal else labels
            return relative_distance(model, params, shared, inputs, labels)

        _SEARCH[key] = (jax.jit(score), jax.jit(jax.vmap(score, in_axes=(None, None, 0, 0))))
    return _SEARCH[key]


def options(model, bag, label_pool, mask_id: int) -> np.ndarray:
    """(input, label) pairs a position may hold: a bag token with no label, or (masked LM) [MASK] with a label
    the bias gradient reveals; for a causal LM, any bag or label token (its labels follow from the inputs)."""
    bag = np.asarray(bag if len(bag) else np.arange(model.num_classes))
    if model.text.causal:
        tokens = np.union1d(bag, label_pool)
        return np.stack([tokens, np.full(len(tokens), -1)], 1)
    plain = [(v, -1) for v in bag if v != mask_id]
    masked = [(mask_id, l) for l in (label_pool if len(label_pool) else bag)]
    return np.array(plain + masked)


def discrete_search(attack: TextAttack, model, params, shared, inputs, labels, choices, seed: int):
    """LAMP's discrete step, made systematic: sweeps over the positions, each trying every (input, label) choice
    (`options`), then random swaps of two positions; a change is kept when it lowers the relative gradient
    distance of the discrete batch (token-embedding gradient included). Stops below ACCEPT or when a round
    changes nothing. Returns (inputs, labels, distance, evaluations)."""
    width = attack.swap_proposals
    one, many = _search_program(model, inputs.shape, width)
    rng = np.random.default_rng(seed)
    n, length = inputs.shape
    inputs, labels = np.array(inputs), np.array(labels)
    best = float(one(params, shared, inputs, labels))
    evaluations = 1

    def try_all(cand_in, cand_lab):
        nonlocal best, inputs, labels, evaluations
        improved = False
        for start in range(0, len(cand_in), width):
            block_in, block_lab = cand_in[start:start + width], cand_lab[start:start + width]
            pad = width - len(block_in)
            if pad:
                block_in = np.concatenate([block_in, np.repeat(block_in[-1:], pad, 0)])
                block_lab = np.concatenate([block_lab, np.repeat(block_lab[-1:], pad, 0)])
            values = np.asarray(many(params, shared, block_in, block_lab))
            evaluations += width
            k = int(np.argmin(values))
            if values[k] < best:
                best, inputs, labels, improved = float(values[k]), block_in[k], block_lab[k], True
        return improved

    for _ in range(attack.swap_rounds):
        if best < ACCEPT:
            break
        changed = False
        for a, b in rng.permutation([(a, b) for a in range(n) for b in range(length)]):
            cand_in = np.repeat(inputs[None], len(choices), 0)
            cand_lab = np.repeat(labels[None], len(choices), 0)
            cand_in[:, a, b], cand_lab[:, a, b] = choices[:, 0], choices[:, 1]
            changed |= try_all(cand_in, cand_lab)
            if best < ACCEPT:
                break
        cand_in = np.repeat(inputs[None], width, 0)
        cand_lab = np.repeat(labels[None], width, 0)
        for c in range(width):
            a, b, a2, b2 = rng.integers(n), rng.integers(length), rng.integers(n), rng.integers(length)
            cand_in[c, a, b], cand_in[c, a2, b2] = cand_in[c, a2, b2], cand_in[c, a, b]
            cand_lab[c, a, b], cand_lab[c, a2, b2] = cand_lab[c, a2, b2], cand_lab[c, a, b]
        changed |= try_all(cand_in, cand_lab)
        if not changed:
            break
    return inputs, labels, best, evaluations


# -- the preset, end to end

def run_attack(attack: TextAttack, model, params, shared, shape, mask_id: int, seed: int = 0) -> Outcome:
    """Recover a batch of `shape` = (N, L) tokens from the shared gradient of `model` at `params`."""
    started = time.perf_counter()
    n, length = shape
    causal = model.text.causal
    bag = leakage.bag(shared) if not model.text.tied else np.array([], int)
    label_pool = leakage.bias_labels(shared)
    one, _ = _search_program(model, shape, attack.swap_proposals)
    if attack.method == "rows" and n == 1:
        read = read_rows(model, params, shared, length, mask_id)
        if read is not None:
            inputs, labels, _, stages = read
            t0 = time.perf_counter()
            d = float(one(params, shared, inputs, labels))
            compile_seconds = time.perf_counter() - t0
            if d < ACCEPT:
                return Outcome(assemble(inputs, labels, causal, mask_id), stages, "rows", d, 1,
                               time.perf_counter() - started - compile_seconds, compile_seconds)
    if attack.method == "rows" and n > 1 and not causal and not model.text.tied and len(bag):
        from dlg_jax.text.batch import read_batch

        reading = read_batch(model, params, shared, shape, mask_id)
        ids = assemble(reading.inputs, reading.labels, causal, mask_id)
        stages = [(name, x.clip(0)) for name, x in reading.stages] + [("labels (head)", ids)]  # -1 (unread): [PAD]
        return Outcome(ids, stages, "rows-batch", reading.distance, reading.evaluations,
                       time.perf_counter() - started - reading.compile_seconds, reading.compile_seconds)
    inputs, labels, snapshots, evaluations, compile_seconds = optimise(
        attack, model, params, shared, shape, mask_id, seed, bag)
    if causal:  # the last input has no gradient: it is the label of the position before it
        inputs = assemble(inputs, labels, causal, mask_id)
        labels = np.asarray(causal_labels(jnp.asarray(inputs)))
    method = "optimise"
    if attack.swap_rounds and len(bag):  # without a bag (tied head) every position would try every token
        if not causal:  # a position holds a label exactly when it reads [MASK]
            labels = np.where(inputs == mask_id, np.where(labels >= 0, labels, label_pool[0] if len(label_pool) else 0), -1)
        choices = options(model, bag, label_pool, mask_id)
        inputs, labels, d, more = discrete_search(attack, model, params, shared, inputs, labels, choices, seed)
        evaluations += more
        method = "optimise+swaps"
        snapshots.append(("after swaps", assemble(inputs, labels, causal, mask_id)))
    else:
        d = float(one(params, shared, inputs, labels if not causal else causal_labels(jnp.asarray(inputs))))
    return Outcome(assemble(inputs, labels, causal, mask_id), snapshots, method, d, evaluations,
                   time.perf_counter() - started - compile_seconds, compile_seconds)


Params = Any
