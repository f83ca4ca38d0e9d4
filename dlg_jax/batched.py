"""Many DLG attacks in one compiled program, on every local device: the engine under `dlg_jax.sweep`.

A batch of independent attacks lives in *lanes*: arrays with a leading lane axis, sharded over a 1-D device
mesh (`jax.sharding`), each device running its own lanes with `shard_map` (no communication: the attacks
are independent). The host refills lanes whose attack has finished with new attacks between chunks, so a
sweep of thousands of attacks is one compiled program called over and over.

Why not simply `vmap` `attack.advance`? That is `NaiveEngine` below, and on CPU it made every attack 4-7x
slower than running it alone. `vmap` of a `while_loop` whose condition differs per lane runs the loop until
the *last* lane is done and then `select`s every carried array (masking the finished lanes), so:

1. jaxopt's LBFGS iteration contains the backtracking line search, itself a `while_loop`: under `vmap`
   every LBFGS iteration costs the *longest* line search of the batch. From N(0, 1) starts jaxopt's
   strong-Wolfe searches of 25-30 trials are common while the mean is ~5, so a batch of 32 did 2.5x the
   evaluations it needed.
2. Each iteration of the vmapped outer loop selects the whole carry, 100-pair LBFGS histories included
   (5 MB per float64 lane), and the ring-buffer reads/writes at a per-lane position become gathers and
   scatters over it.
3. The lanes that finish early (converged, or a cheap trajectory) idle until the whole batch is done.

`FlatEngine` runs the same algorithm (jaxopt's LBFGS with its backtracking line search, and
`attack.advance`/`retry`'s best-iterate, stall, divergence and retry rules) as a flat state machine in which
*one trip of a lane is one objective evaluation* (`_lane_trip`): a lane is either trying a line-search step or
(re)starting an attempt, and when its trial is accepted it completes the LBFGS iteration and computes its next
direction in the same trip, by the compact form of the L-BFGS product (`lbfgs_inverse_hessian_product`: two
matrix passes over the history instead of jaxopt's 200-step two-loop recursion, which cost as much as an
evaluation of D). Retries draw their fresh start under a `cond` (rarely taken) and finished lanes are
refilled by the host. Its decisions are jaxopt's (line search, step sizes, gamma: the same helper functions)
and its product is the two-loop's in exact arithmetic, so each lane follows the trajectory a lone
`attack.Attack` takes, to float rounding (tests/test_sweep.py checks it).

The same lane trip runs two ways. On accelerators every lane takes a trip at once (`vmap`): no lane waits for
another's line search. On CPU, where a device runs one operation at a time anyway, each lane takes its trips
alone, lane after lane: the unbatched programs, in a loop whose state is that one lane, so its 2.5 MB of
history is read and written in place rather than copied out of the batch at every direction.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.flatten_util import ravel_pytree
from jaxopt._src.lbfgs import compute_gamma
from jaxopt._src.linesearch_util import _init_stepsize
from jaxopt.tree_util import tree_add_scalar_mul, tree_sub, tree_vdot_real

from dlg_jax import attack as A

AXIS = "lanes"  # the mesh axis the lane axis is sharded over
RESTART_STREAM = 0x5EED  # restarts draw their seeds from fold_in(key(seed), RESTART_STREAM)


def use_all_cpu_cores() -> int:
    """Give JAX one CPU device per core this process may use, so that sharding the lanes over the CPU devices
    runs them on every core. Returns the number of CPU devices JAX will have.

    XLA's CPU backend runs the small operations of an attack on one thread; separate devices run their shards
    of the lanes concurrently (measured on 2 cores: 1.7-2x the throughput of one device). Must run before JAX
    initialises its backends (the first computation); an explicit
    XLA_FLAGS=--xla_force_host_platform_device_count wins. Accelerators are not affected.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return int(flags.split("xla_force_host_platform_device_count=")[1].split()[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # too late: the backends are up; keep what they have
        return len(jax.devices("cpu"))
    return cores


# ----------------------------------------------------------------------------------------------------------
# Problems: one (image, seed, restart) per lane.


def restart_seed(seed: jax.Array, restart: jax.Array) -> jax.Array:
    """The seed `attack.make_problem` gets for restart `restart` of the attack on one image with `seed`.

    Restart 0 is `seed` itself, so a one-restart sweep repeats `dlg_jax.run --seed`. Later restarts get a
    31-bit seed drawn from a separate stream, fold_in(key(seed), RESTART_STREAM): the retries of an attempt
    already draw from fold_in(key(seed), attempt), and a restart must not start where a retry would.
    Going through `make_problem` (rather than drawing the start here) keeps one recipe for every start.
    """
    stream = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), RESTART_STREAM), restart)
    derived = (jax.random.bits(stream, dtype=jnp.uint32) >> 1).astype(jnp.int32)
    return jnp.where(restart == 0, seed, derived)


def build_problem(apply_fn, params, config: A.AttackConfig, num_classes: int, images: jax.Array, labels: jax.Array,
                  seed: jax.Array, restart: jax.Array) -> tuple[A.Problem, jax.Array]:
    """The attack on the mean gradient of uint8 images (N, H, W, C) with labels (N,), as `dlg_jax.run` sets it
    up, for restart `restart` (N = 1: one image).

    Returns the problem (params None: lanes share them; `key` as raw key data, which every transform carries)
    and the convergence target of `attack.advance`.
    """
    pixels = jnp.asarray(images, config.dtype) / 255.0
    problem = A.make_problem(apply_fn, params, pixels, labels, num_classes, config, restart_seed(seed, restart))
    target = config.tolerance * sum(jnp.sum(g**2) for g in jax.tree.leaves(problem.shared_grads))
    return problem._replace(params=None, key=jax.random.key_data(problem.key)), target


def _fresh_dummy(key_data: jax.Array, attempt: jax.Array, init: dict) -> dict:
    """The N(0, 1) start of retry `attempt`, drawn exactly as `attack.retry` draws it."""
    return A.fresh_dummy(jax.random.wrap_key_data(key_data), attempt, init)


def _select(mask: jax.Array, new, old):
    """Per-lane `where` over pytrees: lanes where `mask` take `new`. `mask` is (lanes,)."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (b.ndim - 1)), a, b), new, old)


def _tree_where(flag: jax.Array, new, old):
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def _take(tree, i):
    """Lane `i` (in range) of every leaf (a dynamic slice: a copy, when what reads it cannot read in place)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _put(tree, new, i):
    """`tree` with lane `i` (in range) replaced by `new`: an in-place dynamic update."""
    return jax.tree.map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0), tree, new)


def lbfgs_inverse_hessian_product(g, s_history, y_history, sy, yy, gamma, count):
    """H g for L-BFGS's inverse-Hessian approximation H, from a ring buffer of pairs, in compact form.

    jaxopt computes H g by the two-loop recursion (Nocedal & Wright, Alg. 7.4): 2 x history dependent steps
    of a dot product and an axpy, each a few tiny operations (~0.4 ms for 100 pairs on a CPU core, as much as
    an evaluation of D). The same product in the compact representation of Byrd, Nocedal and Schnabel (1994;
    Nocedal & Wright eq. 7.24), with the k valid pairs as columns of S, Y (n x k) in chronological order,

        H = gamma I + [S  gamma Y] [[R^-T (D + gamma Y'Y) R^-1, -R^-T], [-R^-1, 0]] [S'; gamma Y']

    (R the upper triangle of S'Y, D its diagonal) gives

        H g = gamma g + S R^-T ((D + gamma Y'Y) c - gamma Y'g) - gamma Y c,   c = R^-1 S'g:

    two matrix products over the history and k x k triangular solves (~0.1 ms). `sy` (s_i . y_j) and `yy`
    (y_i . y_j) are kept by slot; the pair written last, at slot (count - 1) % history, enters them here, in
    the same pass over the history as S'g and Y'g (at count 0 that slot is stale and what enters is masked:
    writing it unconditionally lets XLA update the tables in place instead of copying every lane's). Slots >=
    count are stale and a pair with s . y <= 0 counts for nothing (rho = 0: `attack.skip_nonpositive_curvature`):
    both are masked out, which leaves H as the two-loop over the valid pairs.

    Args: g (n,), s_history and y_history (history, n), finite (stale slots too: they are multiplied by 0),
    sy and yy (history, history), gamma, count (the pairs written in this attempt). Returns (H g, sy, yy).
    """
    size = s_history.shape[0]
    newest = (count - 1) % size
    vectors = jnp.stack([y_history[newest], s_history[newest], g], axis=1)  # one pass: (history, 3) each
    s_dots, y_dots = s_history @ vectors, y_history @ vectors
    sy = sy.at[:, newest].set(s_dots[:, 0]).at[newest, :].set(y_dots[:, 1])
    yy = yy.at[:, newest].set(y_dots[:, 0]).at[newest, :].set(y_dots[:, 0])
    order = (count + jnp.arange(size)) % size  # slots oldest first
    sy_ordered = sy[order][:, order]
    valid = (order < count) & (jnp.diagonal(sy_ordered) > 0)
    both = valid[:, None] & valid[None, :]
    upper = jnp.arange(size)[:, None] <= jnp.arange(size)[None, :]
    r = jnp.where(both & upper, sy_ordered, 0.0) + jnp.diag(jnp.where(valid, 0.0, 1.0)).astype(sy.dtype)
    d = jnp.where(valid, jnp.diagonal(sy_ordered), 0.0)
    a = jnp.where(valid, s_dots[order, 2], 0.0)
    b = jnp.where(valid, y_dots[order, 2], 0.0)
    c = jax.scipy.linalg.solve_triangular(r, a, lower=False)
    yy_c = jnp.where(both, yy[order][:, order], 0.0) @ c
    top = jax.scipy.linalg.solve_triangular(r, d * c + gamma * (yy_c - b), lower=False, trans="T")
    slot_of = (jnp.arange(size) - count) % size  # back from chronological to slot order (order's inverse)
    return gamma * g + top[slot_of] @ s_history - gamma * c[slot_of] @ y_history, sy, yy


# ----------------------------------------------------------------------------------------------------------
# The flat engine.


class Lanes(NamedTuple):
    """Everything about a batch of attacks, lane axis first. Fields mirror jaxopt's LbfgsState, the line
    search in progress and `attack.AttackState`."""

    occupied: jax.Array  # bool: the lane holds an attack
    shared_grads: Any
    known_labels: jax.Array
    init: dict
    key: jax.Array  # raw key data of the attack
    target: jax.Array  # converged when D <= target
    # LBFGS
    x: dict  # the current iterate
    value: jax.Array  # D(x)
    grad: dict  # dD/dx
    s_history: jax.Array  # (lanes, history, n) ring buffers of raveled pairs; slots >= lbfgs_iter are stale
    y_history: jax.Array
    sy: jax.Array  # (lanes, history, history): sy[i, j] = s_i . y_j, kept up to date pair by pair
    yy: jax.Array  # (lanes, history, history): yy[i, j] = y_i . y_j
    gamma: jax.Array
    lbfgs_iter: jax.Array  # LBFGS iterations of this attempt: ring position, and how many slots are valid
    stepsize: jax.Array  # the last accepted step size (jaxopt's state.stepsize)
    # the line search in progress
    direction: dict
    slope: jax.Array  # grad . direction
    trial: jax.Array  # step size of the next trial
    ls_iter: jax.Array  # trials done in this line search
    fresh: jax.Array  # bool: the next evaluation (re)starts the attempt at x instead of trying a step
    # the attack
    best_dummy: dict
    best_value: jax.Array
    iterations: jax.Array
    status: jax.Array
    attempt: jax.Array
    attempt_start: jax.Array
    attempt_value: jax.Array
    num_fun_eval: jax.Array  # evaluations of this attempt
    earlier_evaluations: jax.Array

    @property
    def live(self) -> jax.Array:
        return self.occupied & (self.status == A.RUNNING)


def _lane_axes(tree):
    return jax.tree.map(lambda _: P(AXIS), tree)


class _EngineBase:
    """What both engines share: problems, the device mesh, compilation and the host-facing calls.

    `fill(lanes, mask, images, labels, seeds, restarts)` starts new attacks in the masked lanes,
    `run(lanes, max_trips, min_live)` advances them (trips of all lanes at once stop early once fewer than
    `min_live` lanes of a device are still running; lane by lane, the trips of a lane that finishes go to the
    others) and `harvest(lanes)` returns their outcome as numpy arrays.
    """

    def __init__(self, apply_fn, params, config: A.AttackConfig, num_classes: int, image_shape: Sequence[int],
                 devices: Sequence[jax.Device] | None = None, batch_size: int = 1):
        self.apply_fn, self.params, self.config = apply_fn, params, config
        self.num_classes, self.batch_size = num_classes, batch_size
        self.image_shape = (batch_size, *image_shape)  # what one lane attacks: a batch of N images
        self.solver = A.make_solver(apply_fn, config)
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.lane_sharding = NamedSharding(self.mesh, P(AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(params, self.replicated)  # every device holds the (shared) model
        self._compiled: dict[int, dict] = {}

    # -- to be provided by an engine: per-shard functions
    def _blank(self, batch: int):
        raise NotImplementedError

    def _fill(self, lanes, mask, images, labels, seeds, restarts, params):
        raise NotImplementedError

    def _run(self, lanes, params, max_trips, min_live):
        raise NotImplementedError

    def _harvest(self, lanes) -> dict:
        raise NotImplementedError

    # -- shared
    lane_by_lane = False  # build problems (and, in FlatEngine, run lanes) one lane at a time
    min_chunk_trips = 8  # the fewest trips a `run` call is asked for

    def _problems(self, images, labels, seeds, restarts, params):
        """Every lane's problem: vmapped, or lane after lane with the unbatched program (the same arithmetic
        whatever the number of lanes, so the rounding, and a chaotic trajectory, do not depend on it)."""
        build = functools.partial(build_problem, self.apply_fn, params, self.config, self.num_classes)
        if self.lane_by_lane:
            return jax.lax.map(lambda job: build(*job), (images, labels, seeds, restarts))
        return jax.vmap(build)(images, labels, seeds, restarts)

    def lane_count(self, wanted: int) -> int:
        """`wanted` rounded up to a multiple of the device count (every device gets the same number of lanes)."""
        n = len(self.devices)
        return max(n, -(-wanted // n) * n)

    def compile(self, batch: int) -> dict:
        """Compile (or fetch) the programs for `batch` lanes; abstractly, so nothing of that size is allocated.

        The returned dict has the callables and `bytes`: XLA's estimate of the memory one `run` needs per
        device (arguments + temporaries; the lanes are donated, so outputs reuse them).
        """
        if batch in self._compiled:
            return self._compiled[batch]
        shard = lambda f, ins, outs: jax.shard_map(f, mesh=self.mesh, in_specs=ins, out_specs=outs,  # noqa: E731
                                                   check_vma=False)
        lanes_shape = jax.eval_shape(functools.partial(self._blank, batch))
        lane_spec = _lane_axes(lanes_shape)
        param_spec = jax.tree.map(lambda _: P(), self.params)
        jit = functools.partial(jax.jit, compiler_options=A.compiler_options(self.devices[0].platform))
        blank = jit(functools.partial(self._blank, batch), out_shardings=jax.tree.map(
            lambda _: self.lane_sharding, lanes_shape))
        fill = jit(shard(self._fill, (lane_spec, P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), param_spec), lane_spec),
                   donate_argnums=0)
        run = jit(shard(self._run, (lane_spec, param_spec, P(), P()), (lane_spec, P(AXIS))), donate_argnums=0)
        harvest = jit(shard(self._harvest, (lane_spec,), P(AXIS)))
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
        lanes_abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.lane_sharding),
                                      lanes_shape)
        params_abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=self.replicated),
                                       self.params)
        per_lane = lambda shape, dtype: jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=self.lane_sharding)  # noqa: E731
        jobs = (per_lane((), bool), per_lane(self.image_shape, jnp.uint8), per_lane((self.batch_size,), jnp.int32),
                per_lane((), jnp.int32), per_lane((), jnp.int32))
        run = run.lower(lanes_abstract, params_abstract, scalar, scalar).compile()
        memory = run.memory_analysis()
        cost = run.cost_analysis() or {}
        self._compiled[batch] = dict(
            blank=blank.lower().compile(), fill=fill.lower(lanes_abstract, *jobs, params_abstract).compile(), run=run,
            harvest=harvest.lower(lanes_abstract).compile(),
            bytes=None if memory is None else memory.argument_size_in_bytes + memory.temp_size_in_bytes,
            state_bytes=sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(lanes_shape)),
            flops=cost.get("flops"))
        return self._compiled[batch]

    def fill(self, programs: dict, lanes, mask, images, labels, seeds, restarts):
        put = lambda a: jax.device_put(np.asarray(a), self.lane_sharding)  # noqa: E731
        return programs["fill"](lanes, put(mask), put(images), put(labels), put(seeds), put(restarts), self.params)

    def run(self, programs: dict, lanes, max_trips: int, min_live: int):
        """Advance the lanes by at most `max_trips` trips; returns (lanes, trips done per device)."""
        put = lambda v: jax.device_put(np.int32(v), self.replicated)  # noqa: E731
        return programs["run"](lanes, self.params, put(max_trips), put(min_live))

    def harvest(self, programs: dict, lanes) -> dict:
        return jax.device_get(programs["harvest"](lanes))

    def _outcome(self, best_dummy, known_labels, best_value, status, attempt, iterations, evaluations, live, occupied):
        labels = best_dummy.get("label_logits", known_labels)
        return dict(images=A.dummy_images(best_dummy, self.config), label_pred=jnp.argmax(labels, axis=-1),
                    grad_distance=best_value, status=status, attempts=attempt + 1, iterations=iterations,
                    evaluations=evaluations, live=live, occupied=occupied)


class FlatEngine(_EngineBase):
    """jaxopt's LBFGS + backtracking line search, one objective evaluation per lane per loop trip."""

    def __init__(self, *args, lane_by_lane: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        config, solver = self.config, self.solver
        ls = solver.linesearch_solver
        if config.optimizer != "lbfgs" or config.linesearch != "backtracking":
            raise ValueError("FlatEngine runs jaxopt LBFGS with a backtracking line search only "
                             f"(optimizer {config.optimizer!r}, linesearch {config.linesearch!r}): use NaiveEngine")
        if config.tv_weight > 0:
            raise ValueError("FlatEngine does not run the staged TV prior (tv_weight > 0): use NaiveEngine")
        self.history = solver.history_size
        self.ls = dict(c1=ls.c1, c2=ls.c2, decrease=ls.decrease_factor, tol=ls.tol, maxls=ls.maxiter,
                       max_stepsize=ls.max_stepsize, strong=ls.condition == "strong-wolfe")  # else weak Wolfe
        # On CPU a device runs one operation at a time anyway, so each lane takes its trips alone (the unbatched
        # programs, histories in place: experiments/results/bench_sweep.md); accelerators take a trip of every
        # lane at once, vmapped.
        self.lane_by_lane = self.devices[0].platform == "cpu" if lane_by_lane is None else lane_by_lane
        if self.lane_by_lane:  # a lane's state (its history: 2.5 MB) is copied out and back once per run call and
            self.min_chunk_trips = 128  # lane: ~2 trips' worth, so a call must give each lane many more trips
        self._value_and_grad = jax.value_and_grad(solver.fun)

    # ---- lane creation
    def _blank(self, batch: int) -> Lanes:
        problem, target = jax.eval_shape(
            lambda: self._problems(jnp.zeros((1, *self.image_shape), jnp.uint8), jnp.zeros((1, self.batch_size), jnp.int32),
                                   jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32), self.params))
        one = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), (problem, target))
        lane = self._start(*one)
        flat = ravel_pytree(lane.x)[0]
        history = jnp.zeros((self.history, flat.size), flat.dtype)
        lane = lane._replace(s_history=history, y_history=history, occupied=jnp.zeros((), bool))
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), lane)

    def _start(self, problem: A.Problem, target: jax.Array) -> Lanes:
        """A lane about to start `problem`, its first evaluation pending; without histories (None): a lane
        keeps its history buffers from attack to attack (stale slots are never read: `lbfgs_iter` counts the
        valid ones)."""
        dtype = target.dtype
        zero_i = jnp.zeros((), jnp.int32)
        zero_x = jax.tree.map(jnp.zeros_like, problem.init)
        return Lanes(
            occupied=jnp.ones((), bool), shared_grads=problem.shared_grads, known_labels=problem.known_labels,
            init=problem.init, key=problem.key, target=target,
            x=problem.init, value=jnp.zeros((), dtype), grad=zero_x,
            s_history=None, y_history=None, sy=jnp.zeros((self.history, self.history), dtype),
            yy=jnp.zeros((self.history, self.history), dtype), gamma=jnp.ones((), dtype), lbfgs_iter=zero_i,
            stepsize=jnp.asarray(self.ls["max_stepsize"], dtype),
            direction=zero_x, slope=jnp.zeros((), dtype), trial=jnp.zeros((), dtype), ls_iter=zero_i,
            fresh=jnp.ones((), bool),
            best_dummy=problem.init, best_value=jnp.asarray(jnp.inf, dtype), iterations=zero_i,
            status=jnp.asarray(A.RUNNING, jnp.int32), attempt=zero_i, attempt_start=zero_i,
            attempt_value=jnp.zeros((), dtype), num_fun_eval=zero_i, earlier_evaluations=zero_i)

    def _fill(self, lanes: Lanes, mask, images, labels, seeds, restarts, params) -> Lanes:
        problems, targets = self._problems(images, labels, seeds, restarts, params)
        started = jax.vmap(self._start)(problems, targets)
        keep = ("s_history", "y_history")  # never rewritten whole: 2.5 MB a lane in float32
        return Lanes(**{f: getattr(lanes, f) if f in keep else _select(mask, getattr(started, f), getattr(lanes, f))
                        for f in Lanes._fields})

    # ---- running: trips of one evaluation per lane
    def _run(self, lanes: Lanes, params, max_trips, min_live):
        """Advance the lanes by up to `max_trips` trips each (lane by lane: as many lane-trips in all); returns
        (lanes, the trips done)."""
        if self.lane_by_lane:
            return self._run_lane_by_lane(lanes, params, max_trips)

        def going(carry):
            trips, lanes = carry
            return (trips < max_trips) & (jnp.sum(lanes.live) >= jnp.maximum(min_live, 1))

        def trip(carry):  # every lane at once: one evaluation per lane, vmapped
            trips, lanes = carry
            lanes, again = jax.vmap(self._lane_trip, in_axes=(0, None))(lanes, params)
            x = jax.lax.cond(jnp.any(again), self._restart_attempts, lambda *a: a[0], lanes.x, lanes.key,
                             lanes.attempt, lanes.init, again)  # most trips draw no fresh start: skip the draws
            return trips + 1, lanes._replace(x=x)

        trips, lanes = jax.lax.while_loop(going, trip, (jnp.zeros((), jnp.int32), lanes))
        return lanes, trips[None]

    def _run_lane_by_lane(self, lanes: Lanes, params, max_trips):
        """Each running lane takes its trips alone, lane after lane: the unbatched programs, in a loop whose
        state is the lane itself, so its histories are read and written in place.

        The call does `max_trips` x lanes lane-trips, shared evenly by the running lanes (what a lane that
        finishes early leaves goes to the lanes after it), so every device works for as long as the others
        however many of its lanes are still running. Returns (lanes, lane-trips done / lanes).
        """
        live = lanes.live
        batch, running = live.shape[0], jnp.sum(live)
        order = jnp.nonzero(live, size=batch, fill_value=0)[0]
        budget = jnp.minimum(max_trips, jnp.iinfo(jnp.int32).max // batch) * batch

        def lane_trips(j, carry):
            lanes, used = carry
            share = (budget - used) // (running - j)

            def going(carry):
                trips, lane = carry
                return (trips < share) & lane.live

            def trip(carry):
                trips, lane = carry
                lane, again = self._lane_trip(lane, params)
                x = jax.lax.cond(again, lambda: _fresh_dummy(lane.key, lane.attempt, lane.init), lambda: lane.x)
                return trips + 1, lane._replace(x=x)

            i = order[j]  # a running lane
            trips, lane = jax.lax.while_loop(going, trip, (jnp.zeros((), jnp.int32), _take(lanes, i)))
            return _put(lanes, lane, i), used + trips

        lanes, used = jax.lax.fori_loop(0, running, lane_trips, (lanes, jnp.zeros((), jnp.int32)))
        return lanes, (-(-used // batch))[None]

    def _lane_trip(self, lane: Lanes, params) -> tuple[Lanes, jax.Array]:
        """One lane's trip: evaluate D at its trial point (or its fresh start), take the line-search decision,
        store the new pair and, if the iteration is complete, compute the next direction.

        Returns the lane and whether its attempt starts afresh; the caller draws the new start (`x`): one lane
        under a `cond`, all lanes under one `cond` that most trips skip.
        """
        live = lane.live
        point = _tree_where(lane.fresh, lane.x, tree_add_scalar_mul(lane.x, lane.trial, lane.direction))
        value, grad = self._value_and_grad(point, params, lane.shared_grads, lane.known_labels)
        value, grad = _tree_where(live, (value, grad), jax.tree.map(jnp.zeros_like, (value, grad)))
        lane, s, y, write, again, need = self._step(lane, live, point, value, grad)
        lane = self._write_history(lane, s, y, write)
        return jax.lax.cond(need, self._start_line_search, lambda lane: lane, lane), again

    def _step(self, lane: Lanes, live, point, value, grad):
        """One lane after its evaluation at `point`: line-search test, LBFGS update, attack bookkeeping.

        Mirrors jaxopt's BacktrackingLineSearch.update and LBFGS.update, and
        `attack.advance`'s iterate / `attack.init_state` / `attack.retry`, decision for decision.
        """
        c, cfg = self.ls, self.config
        fresh = lane.fresh
        # line search (jaxopt BacktrackingLineSearch.update, (strong) Wolfe; Armijo is weak Wolfe with c2 = inf)
        t = lane.trial
        new_slope = tree_vdot_real(grad, lane.direction)
        diff1 = value - (lane.value + c["c1"] * t * lane.slope)
        error1 = jnp.maximum(jnp.where(jnp.isnan(diff1), jnp.inf, diff1), 0.0)
        diff2 = jnp.abs(new_slope) - c["c2"] * jnp.abs(lane.slope) if c["strong"] else c["c2"] * lane.slope - new_slope
        error2 = jnp.maximum(jnp.where(jnp.isnan(diff2), jnp.inf, diff2), 0.0)
        done = jnp.maximum(error1, error2) <= c["tol"]
        failed = (lane.ls_iter + 1 == c["maxls"]) & ~done
        finished = live & ~fresh & (done | failed)  # an LBFGS iteration is complete: accept `point`
        retried = live & ~fresh & ~(done | failed)  # shrink the step, try again
        started = live & fresh  # the first evaluation of an attempt
        # LBFGS update (jaxopt LBFGS.update after its line search)
        s = ravel_pytree(tree_sub(point, lane.x))[0]
        y = ravel_pytree(tree_sub(grad, lane.grad))[0]
        gamma = jnp.where(s @ y > 0, compute_gamma(s[None], y[None], 0), lane.gamma)  # attack.skip_nonpositive_curvature
        # attack.advance's iterate
        finite = jnp.isfinite(value) & jnp.all(jnp.array([jnp.isfinite(a).all() for a in jax.tree.leaves(point)]))
        improved = finished & finite & (value < lane.best_value)
        iterations = lane.iterations + finished
        stalled = ((iterations - lane.attempt_start == cfg.probe_steps * cfg.iterations_per_step)
                   & (value > cfg.probe_reduction * lane.attempt_value) & (lane.attempt < cfg.retries))
        num_fun_eval = jnp.where(started, 1, lane.num_fun_eval + (live & ~fresh))
        evaluations = lane.earlier_evaluations + num_fun_eval
        spent = (iterations >= cfg.max_iterations) | (evaluations >= cfg.max_evaluations)
        iterate_status = jnp.select([~finite, value <= lane.target, stalled, spent],
                                    [A.DIVERGED, A.CONVERGED, A.STALLED, A.MAX_STEPS], A.RUNNING)
        # attack.init_state (first attempt) / the fresh solver state of attack.retry (later ones)
        first = lane.attempt == 0
        start_status = jnp.where(jnp.isfinite(value), A.RUNNING, A.DIVERGED)
        status = jnp.where(finished, iterate_status, jnp.where(started, start_status, lane.status))
        # attack.retry: a stalled or diverged attempt starts afresh while retries and budget remain
        failed_attempt = live & ((status == A.STALLED) | (status == A.DIVERGED))
        again = (failed_attempt & (lane.attempt < cfg.retries) & (iterations < cfg.max_iterations)
                 & (evaluations < cfg.max_evaluations))
        status = jnp.where(again, A.RUNNING, jnp.where(failed_attempt & (status == A.STALLED), A.MAX_STEPS, status))
        evaluated = finished | started
        lane = lane._replace(
            x=_tree_where(finished, point, lane.x),
            value=jnp.where(evaluated, value, lane.value),
            grad=_tree_where(evaluated, grad, lane.grad),
            gamma=jnp.where(started, 1.0, jnp.where(finished, gamma, lane.gamma)),
            lbfgs_iter=jnp.where(started, 0, lane.lbfgs_iter + finished),
            stepsize=jnp.where(started, c["max_stepsize"], jnp.where(finished, t, lane.stepsize)),
            trial=jnp.where(retried, jnp.minimum(c["max_stepsize"], t * c["decrease"]), lane.trial),
            ls_iter=lane.ls_iter + retried,
            fresh=(fresh & ~live) | again,
            best_dummy=_tree_where(improved, point, lane.best_dummy),
            best_value=jnp.where(improved | (started & first), value, lane.best_value),
            iterations=iterations,
            status=status,
            attempt=lane.attempt + again,
            attempt_start=jnp.where(again, iterations, lane.attempt_start),
            attempt_value=jnp.where(started, value, lane.attempt_value),
            num_fun_eval=jnp.where(again, 0, num_fun_eval),
            earlier_evaluations=jnp.where(again, evaluations, lane.earlier_evaluations),
        )
        need = evaluated & ~again & (status == A.RUNNING)  # needs the direction of its next iteration
        return lane, s, y, finished, again, need

    def _write_history(self, lane: Lanes, s, y, write) -> Lanes:
        """Store the new (s, y) pair at the lane's ring position, if `write`: one row, in place.

        A non-finite pair (its attempt has diverged) is stored as zeros: stale slots stay in the buffer for the
        lane's later attempts and attacks, and the compact product multiplies them by 0, which a NaN survives.
        """
        slot = jnp.where(write, (lane.lbfgs_iter - 1) % self.history, self.history)  # out of range: dropped
        finite = lambda a: jnp.where(jnp.isfinite(a), a, 0.0)  # noqa: E731
        return lane._replace(s_history=lane.s_history.at[slot].set(finite(s), mode="drop"),
                             y_history=lane.y_history.at[slot].set(finite(y), mode="drop"))

    @staticmethod
    def _restart_attempts(x, key, attempt, init, again):
        """Fresh N(0, 1) starts for the lanes in `again` (under a `cond`: most trips have none)."""
        return _select(again, jax.vmap(_fresh_dummy)(key, attempt, init), x)

    def _start_line_search(self, lane: Lanes) -> Lanes:
        """The lane's next search direction (the compact L-BFGS product, which also brings its s.y / y.y tables
        up to date), the slope along it and the first trial step (jaxopt's "increase" rule)."""
        c, solver = self.ls, self.solver
        g, unravel = ravel_pytree(lane.grad)
        product, sy, yy = lbfgs_inverse_hessian_product(g, lane.s_history, lane.y_history, lane.sy, lane.yy,
                                                        lane.gamma, lane.lbfgs_iter)
        trial = _init_stepsize("increase", c["max_stepsize"], solver.min_stepsize, solver.increase_factor,
                               lane.stepsize)
        return lane._replace(direction=unravel(-product), slope=-product @ g, sy=sy, yy=yy,
                             trial=jnp.minimum(c["max_stepsize"], trial), ls_iter=jnp.zeros_like(lane.ls_iter))

    def _harvest(self, lanes: Lanes) -> dict:
        return self._outcome(lanes.best_dummy, lanes.known_labels, lanes.best_value, lanes.status, lanes.attempt,
                             lanes.iterations, lanes.earlier_evaluations + lanes.num_fun_eval, lanes.live,
                             lanes.occupied)


# ----------------------------------------------------------------------------------------------------------
# The naive engine: `vmap` of attack.advance + attack.retry. The baseline of experiments/bench_sweep.py, and
# the engine for configurations the flat one does not implement (another line search).


class NaiveLanes(NamedTuple):
    occupied: jax.Array
    problem: A.Problem  # params None: shared by all lanes
    state: A.AttackState


class NaiveEngine(_EngineBase):
    """`vmap(attack.advance)` then `vmap(attack.retry)`, `chunk_iterations` LBFGS iterations per `run` trip."""

    def __init__(self, *args, chunk_iterations: int = 20, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk_iterations = chunk_iterations
        if self.config.optimizer != "lbfgs":
            raise ValueError(f"NaiveEngine runs jaxopt LBFGS only, not {self.config.optimizer!r}")

    def _with_params(self, problem, params):
        return problem._replace(params=params, key=jax.random.wrap_key_data(problem.key))

    def _start(self, problem, params):
        return A.init_state(self.solver, self._with_params(problem, params), self.config.prior_weight(0))

    def _blank(self, batch: int) -> NaiveLanes:
        problems, _ = self._problems(jnp.zeros((batch, *self.image_shape), jnp.uint8),
                                     jnp.zeros((batch, self.batch_size), jnp.int32),
                                     jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32), self.params)
        states = jax.vmap(self._start, in_axes=(0, None))(problems, self.params)
        return jax.tree.map(jnp.zeros_like, NaiveLanes(jnp.zeros((batch,), bool), problems, states))

    def _fill(self, lanes: NaiveLanes, mask, images, labels, seeds, restarts, params) -> NaiveLanes:
        problems, _ = self._problems(images, labels, seeds, restarts, params)
        states = jax.vmap(self._start, in_axes=(0, None))(problems, params)
        return _select(mask, NaiveLanes(jnp.ones_like(mask), problems, states), lanes)

    def _run(self, lanes: NaiveLanes, params, max_trips, min_live):
        solver, config = self.solver, self.config

        def lane(state, problem, occupied):
            problem = self._with_params(problem, params)
            until = jnp.where(occupied, jnp.minimum(state.iterations + self.chunk_iterations, config.max_iterations), 0)
            state = A.retry(solver, config, A.advance(solver, config, state, problem, until), problem)
            return A.next_stage(solver, config, state, problem) if config.tv_weight > 0 else state

        def live(lanes):
            return lanes.occupied & (lanes.state.status == A.RUNNING)

        def going(carry):
            trips, lanes = carry
            return (trips < max_trips) & (jnp.sum(live(lanes)) >= jnp.maximum(min_live, 1))

        def trip(carry):
            trips, lanes = carry
            return trips + 1, lanes._replace(state=jax.vmap(lane)(lanes.state, lanes.problem, lanes.occupied))

        trips, lanes = jax.lax.while_loop(going, trip, (jnp.zeros((), jnp.int32), lanes))
        return lanes, trips[None]

    def _harvest(self, lanes: NaiveLanes) -> dict:
        s = lanes.state
        return self._outcome(s.best_dummy, lanes.problem.known_labels, s.best_value, s.status, s.attempt, s.iterations,
                             s.earlier_evaluations + s.solver_state.num_fun_eval,
                             lanes.occupied & (s.status == A.RUNNING), lanes.occupied)


ENGINES = {"flat": FlatEngine, "vmap": NaiveEngine}
