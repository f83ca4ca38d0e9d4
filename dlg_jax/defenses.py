"""Defenses on the shared gradient (DLG paper, section 5), and what an adaptive attacker does against each.

    --defense gauss:1e-3 --defense prune:0.2        # noise of variance 1e-3, then the smallest 20% zeroed

A defense is a row of `KINDS`: the range of its strength, `apply(key, grads, strength) -> grads` (pure; the
strength may be a traced array, so one compiled program serves every strength of a sweep lane by lane), the
attacker's adaptive counterpart `adapt(dummy_grads, shared_grads) -> dummy_grads` (what the dummy's gradient
is turned into before it is compared with the shared one) and `floor(strength, parameters, batch)`: the
squared L2 distance expected at the true data (the noise's energy); the adaptive attack stops at it less the
part of the noise a dummy of d numbers can fit, floor (1 - d / P) (`engine.attack.make_problem`). The client applies a chain of defenses in order (`share`); the adaptive attacker composes their
`adapt`s in the same order (`adapt`).

The kinds (strength in brackets):
- `gauss` [variance s in [0, 1]]: N(0, s) added to every entry (the paper sweeps 1e-4 .. 1e-1).
- `laplace` [variance s in [0, 1]]: Laplace of scale sqrt(s / 2) (variance s) added to every entry.
- `fp16`, `bf16` [none]: every entry cast to float16 / bfloat16 and back. Adaptive: the dummy cast alike.
- `int8` [none]: per-tensor symmetric quantisation, scale = max|g| / 127, q = round(g / scale) in [-127, 127],
  shared q * scale (error <= scale / 2 per entry). Adaptive: the dummy quantised with the shared tensor's scale
  (max|s| / 127, which the shared values reveal), straight through (the rounding's gradient taken as 1).
- `prune` [fraction p in [0, 1)]: the floor(p n) smallest-magnitude entries of each tensor of n entries set to
  zero, exactly that many (ties by position). Adaptive: only the shared (nonzero) entries compared.
- `dp` [noise multiplier z in (0, 1000]]: DP-SGD's step (Abadi et al., 2016) through jax-privacy: every
  example's gradient clipped to L2 norm C (`jax_privacy.clipping.clipped_grad`), summed, Gaussian noise of std
  z C added (`jax_privacy.noise_addition.gaussian_privatizer`), divided by the batch. It replaces the client's
  gradient, so it comes first in a chain. Adaptive: the attacker clips its dummy's per-example gradients to
  the same C (it knows C and N) and stops at the noise floor (z C / N)^2 per entry. Its (epsilon, delta) for a
  stated training run comes from dp-accounting's RDP accountant (`epsilon`).
- `fedavg` [local steps k, an integer in [1, 1000]]: federated averaging's client (McMahan et al., 2017; the
  local-updates case of breaching): k SGD steps of learning rate lr on local batches of B of its N examples,
  in order (step i on batch i mod N/B), sharing the weight difference in gradient units,
  (w_0 - w_k) / (k lr), the mean gradient along the way (k = 1: the gradient itself). It replaces the
  client's gradient, so it comes first. Adaptive: the attacker, who knows k, lr and B (the protocol's),
  runs the same k steps on its dummy and differentiates through them; the naive attacker matches one gradient.
  The steps are unrolled to a static `max_steps` and masked beyond k, so k may be a per-lane value.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dlg_jax.errors import UsageError

Params = Any


class Kind(NamedTuple):
    low: float  # the strength's range: low <= s <= high (low < s when open_low; s < high when open_high)
    high: float
    apply: Callable  # (key, grads, strength) -> what the client shares
    adapt: Callable = lambda dummy, shared: dummy  # what the adaptive attacker compares with the shared gradient
    floor: Callable = lambda strength, parameters, batch: 0.0  # E||shared - true gradient||^2
    open_low: bool = False
    open_high: bool = False
    strength: bool = True  # False: the kind takes no strength (casts, int8)
    integer: bool = False  # the strength is a count (fedavg's local steps)
    replaces: bool = False  # it replaces the client's gradient (in `share`), so it comes first in a chain


def _each(f: Callable, *trees):
    return jax.tree.map(f, *trees)


def gaussian(key, grads, variance):
    """g + N(0, variance) entrywise, one key per tensor."""
    keys = jax.random.split(key, len(jax.tree.leaves(grads)))
    noise = [jax.random.normal(k, g.shape, g.dtype) for k, g in zip(keys, jax.tree.leaves(grads))]
    return jax.tree.unflatten(jax.tree.structure(grads), [g + jnp.sqrt(variance).astype(g.dtype) * n
                                                          for g, n in zip(jax.tree.leaves(grads), noise)])


def laplacian(key, grads, variance):
    """g + Laplace(scale b) entrywise, b = sqrt(variance / 2) (a Laplace of scale b has variance 2 b^2)."""
    keys = jax.random.split(key, len(jax.tree.leaves(grads)))
    noise = [jax.random.laplace(k, g.shape, g.dtype) for k, g in zip(keys, jax.tree.leaves(grads))]
    return jax.tree.unflatten(jax.tree.structure(grads), [g + jnp.sqrt(variance / 2).astype(g.dtype) * n
                                                          for g, n in zip(jax.tree.leaves(grads), noise)])


def cast(dtype) -> Callable:
    """The gradient in `dtype` (float16, bfloat16) and back: what arrives when a client sends it so."""
    return lambda grads: _each(lambda g: g.astype(dtype).astype(g.dtype), grads)


def int8_scale(g: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.max(jnp.abs(g)), jnp.finfo(g.dtype).tiny) / 127


def quantise(g: jax.Array, scale: jax.Array) -> jax.Array:
    """round(g / scale) in [-127, 127], times scale; the rounding passes gradients straight through."""
    q = jnp.clip(jnp.round(g / scale), -127, 127) * scale
    return g + jax.lax.stop_gradient(q - g)


def prune(key, grads, fraction):
    """The floor(fraction x n) smallest |g| of each tensor set to zero: ranks by sorting, so the count is exact
    and `fraction` may be traced."""
    def one(g):
        n = g.size
        order = jnp.argsort(jnp.abs(g).ravel())
        keep = jnp.zeros(n, bool).at[order].set(jnp.arange(n) >= jnp.floor(fraction * n).astype(jnp.int32))
        return jnp.where(keep.reshape(g.shape), g, 0)

    return _each(one, grads)


def _noise_floor(strength, parameters, batch):
    return strength * parameters


KINDS: dict[str, Kind] = {
    "gauss": Kind(0.0, 1.0, gaussian, floor=_noise_floor),
    "laplace": Kind(0.0, 1.0, laplacian, floor=_noise_floor),
    "fp16": Kind(0.0, 0.0, lambda key, g, s: cast(jnp.float16)(g), lambda d, s: cast(jnp.float16)(d), strength=False),
    "bf16": Kind(0.0, 0.0, lambda key, g, s: cast(jnp.bfloat16)(g), lambda d, s: cast(jnp.bfloat16)(d), strength=False),
    "int8": Kind(0.0, 0.0, lambda key, g, s: _each(lambda a: quantise(a, int8_scale(a)), g),
                 lambda d, s: _each(lambda a, b: quantise(a, int8_scale(b)), d, s), strength=False),
    "prune": Kind(0.0, 1.0, prune, lambda d, s: _each(lambda a, b: jnp.where(b != 0, a, 0), d, s), open_high=True),
    # the clipped, noised gradient is the client's own (`dp_gradient`); nothing is left to do after it
    "dp": Kind(0.0, 1000.0, lambda key, g, s: g, floor=lambda z, parameters, batch: (z / batch) ** 2 * parameters,
               open_low=True, replaces=True),
    # the local steps are the client's own update (`local_update`)
    "fedavg": Kind(1.0, 1000.0, lambda key, g, s: g, integer=True, replaces=True),
}


# ---- federated averaging's client: local steps, the weight difference shared

class LocalTraining(NamedTuple):
    """What a FedAvg client does besides its number of steps (the protocol's, known to the server): the
    learning rate, the local batch (None: all N examples at every step) and how far the steps are unrolled."""

    learning_rate: float = 0.01
    batch: int | None = None
    max_steps: int = 1  # the largest k of the run or sweep (static: reverse mode needs a fixed unroll)


def local_update(model, params, inputs, soft_labels, steps, local: LocalTraining):
    """(w_0 - w_k) / (k lr) after k = `steps` SGD steps w <- w - lr dL(batch_i)/dw, batch i = examples
    [i B, (i + 1) B) mod N in order. `steps` may be traced (steps beyond it are masked out of a fixed unroll of
    `local.max_steps`); differentiable in `inputs` (the adaptive attacker's dummy goes through the same steps)."""
    from dlg_jax.client import client_gradient

    n = inputs.shape[0]
    size = n if local.batch is None else local.batch
    if n % size:
        raise UsageError(f"--fedavg-batch {size}: must divide the client's {n} example(s)")
    blocks = n // size
    dtype = jax.tree.leaves(params)[0].dtype  # the weights' (a text model's inputs are token ids)
    lr = jnp.asarray(local.learning_rate, dtype)
    steps = jnp.asarray(steps, dtype)

    def step(weights, i):
        start = (i % blocks) * size
        x = jax.lax.dynamic_slice_in_dim(inputs, start, size)
        y = jax.lax.dynamic_slice_in_dim(soft_labels, start, size)
        g = client_gradient(model, weights, x, y)
        on = i.astype(dtype) < steps
        return _each(lambda w, d: jnp.where(on, w - lr * d, w), weights, g), None

    final, _ = jax.lax.scan(step, params, jnp.arange(max(1, local.max_steps)))
    return _each(lambda w0, w: (w0 - w) / (steps * lr), params, final)


# ---- DP-SGD's gradient (jax-privacy) and its accountant (dp-accounting)

def dp_gradient(model, params, inputs, soft_labels, key, noise_multiplier, clip: float, noise: bool = True):
    """(sum_n clip_C(g_n) + N(0, (z C)^2)) / N, g_n the gradient of example n alone; without `noise` the
    attacker's adaptive counterpart. C is static (the library takes it as a number); z may be traced.
    The noise is scaled by C below: `noise_multiplier` z times the clip."""
    from jax_privacy.clipping import clipped_grad
    from jax_privacy.noise_addition import gaussian_privatizer

    loss = lambda p, x, y: model.loss(model.apply(p, x), y)  # noqa: E731  (one example: a batch of one)
    summed = clipped_grad(loss, l2_clip_norm=clip, batch_argnums=(1, 2))(params, inputs, soft_labels)
    if noise:
        privatizer = gaussian_privatizer(stddev=noise_multiplier * clip, prng_key=key)
        summed, _ = privatizer.update(summed, privatizer.init(params))
    return _each(lambda g: g / inputs.shape[0], summed)


class TrainingRun(NamedTuple):
    """The training run an epsilon is stated for: `steps` DP-SGD steps, each on a Poisson sample of the data
    at `rate` (batch / dataset size), at `delta`. Default: 10 epochs of CIFAR (50,000 images) at batch 500."""

    steps: int = 1000
    rate: float = 0.01
    delta: float = 1e-5


def epsilon(noise_multiplier: float, run: TrainingRun) -> float:
    """epsilon at run.delta for `steps` Poisson-subsampled Gaussian mechanisms of noise multiplier z (RDP
    accountant, dp-accounting). Measured: z = 0.5, 1, 2, 4 at the default run -> 15.5, 2.10, 0.686, 0.301."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(run.rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, run.steps)
    return float(accountant.get_epsilon(run.delta))


def check_run(run: TrainingRun, batch: int) -> None:
    """A run whose epsilon means something: the sampling rate implies a dataset of batch / rate examples, and
    delta must stay below one over it (a delta of 1/n allows publishing one example outright). A batch of one
    at rate 1 is a dataset of one: its epsilon protects nothing, refused."""
    if run.steps < 1:
        raise UsageError(f"--dp-steps: must be >= 1, got {run.steps}")
    if not 0 < run.rate <= 1:
        raise UsageError(f"--dp-rate: the sampling rate must lie in (0, 1], got {run.rate}")
    size = batch / run.rate
    if size < 2:
        raise UsageError(f"--dp-rate {run.rate} with a batch of {batch}: a dataset of {size:g} example(s), whose "
                         "epsilon protects nothing; pass --dp-rate batch/n for the n examples of the training run")
    if not 0 < run.delta < 1 / size:
        raise UsageError(f"--dp-delta {run.delta}: must lie in (0, 1/n) for the n = batch / rate = {size:g} "
                         "examples the sampling rate implies (with a batch of one, pass --dp-rate 1/n for a dataset "
                         "of n); epsilon means nothing otherwise")


# ---- chains: what the client shares, what the adaptive attacker compares

class Defense(NamedTuple):
    name: str
    strengths: tuple[float, ...]  # one for a single run, several for a sweep axis


def parse(spec: str) -> Defense:
    """NAME or NAME:S or NAME:S1,S2,... (a sweep axis); one-line UsageError for anything else."""
    name, _, text = spec.partition(":")
    kind = KINDS.get(name)
    if kind is None:
        raise UsageError(f"--defense {spec!r}: unknown defense {name!r}: choose from {', '.join(KINDS)}")
    if not kind.strength:
        if text:
            raise UsageError(f"--defense {spec!r}: {name} takes no strength")
        return Defense(name, (0.0,))
    if not text:
        raise UsageError(f"--defense {spec!r}: give a strength, {name}:S (several: {name}:S1,S2)")
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise UsageError(f"--defense {spec!r}: {item!r} is not a number") from None
        low_ok = value > kind.low if kind.open_low else value >= kind.low
        high_ok = value < kind.high if kind.open_high else value <= kind.high
        if not (low_ok and high_ok and math.isfinite(value)):
            raise UsageError(f"--defense {spec!r}: {name}'s strength must lie in {'(' if kind.open_low else '['}"
                             f"{kind.low:g}, {kind.high:g}{')' if kind.open_high else ']'}, got {item}")
        if kind.integer and value != int(value):
            raise UsageError(f"--defense {spec!r}: {name}'s strength is a count, got {item}")
        values.append(value)
    return Defense(name, tuple(values))


def check_chain(names: Sequence[str]) -> None:
    for name in names[1:]:
        if KINDS[name].replaces:
            raise UsageError(f"--defense {name} replaces the client's gradient: give it first, and only one such")
    if names and names.count(names[0]) > 1 and KINDS[names[0]].replaces:
        raise UsageError(f"--defense {names[0]}: once")


def share(model, params, inputs, soft_labels, names: Sequence[str], strengths, key, clip: float = 1.0,
          local: LocalTraining = LocalTraining()) -> Params:
    """What a defended client shares: its gradient (DP-SGD's when `dp` leads, FedAvg's update when `fedavg`
    does), then each defense in order, each with a key of its own. `strengths`: an array (len(names),), traced
    or not."""
    from dlg_jax.client import client_gradient

    keys = jax.random.split(key, len(names) + 1)
    if names and names[0] == "dp":
        grads = dp_gradient(model, params, inputs, soft_labels, keys[-1], strengths[0], clip)
    elif names and names[0] == "fedavg":
        grads = local_update(model, params, inputs, soft_labels, strengths[0], local)
    else:
        grads = client_gradient(model, params, inputs, soft_labels)
    for i, name in enumerate(names):
        grads = KINDS[name].apply(keys[i], grads, strengths[i])
    return grads


def adapt(names: Sequence[str], dummy: Params, shared: Params) -> Params:
    """The dummy's gradient as the adaptive attacker compares it: each defense's counterpart, in order."""
    for name in names:
        dummy = KINDS[name].adapt(dummy, shared)
    return dummy


def noise_floor(names: Sequence[str], strengths, parameters: int, batch: int, clip: float = 1.0):
    """E||shared - true gradient||^2 of the chain's noise: the sum of each noise's (a pruning after noise lowers
    it by the pruned fraction; not counted, so the target errs on the side of stopping late)."""
    total = 0.0
    for i, name in enumerate(names):
        total = total + KINDS[name].floor(strengths[i] * (clip if name == "dp" else 1.0), parameters, batch)
    return total


def label(names: Sequence[str], strengths: Sequence[float]) -> str:
    """`prune=0.1`, `gauss=0.001+prune=0.1`, `fp16`: a setting's name (its sweep subdirectory)."""
    return "+".join(name if not KINDS[name].strength else f"{name}={float(s):g}" for name, s in zip(names, strengths))
