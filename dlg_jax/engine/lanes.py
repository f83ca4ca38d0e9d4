"""Many attacks in one compiled program, on every local device: the engine.

Independent attacks live in *lanes*: arrays with a leading lane axis, sharded over a 1-D device mesh, each
device running its own lanes with `shard_map` (no communication). One *trip* of a lane is one evaluation of
the objective:

    point = solver.ask(state)
    value, grad = value_and_grad(objective)(point, prior weight, problem, params)
    state, step = solver.tell(state, point, value, grad)
    progress, again, restart = attempts.after_evaluation(rules, progress, step, point, value, ...)
    if restart: state = solver.init(fresh dummy if again else point)        # rarely taken

Whatever the solver, no lane waits for another: `vmap` of a `while_loop` whose trip count differs per lane would
run every lane until the last is done and `select` every carried array each iteration (measured: 4-7x slower
than attacks alone when a lane's iteration held a line search). The host refills lanes whose attack has finished
between calls (`scheduler.py`).

The same trip runs two ways. On accelerators every lane takes a trip at once (`vmap`). On CPU, where a device
runs one operation at a time anyway, each lane takes its trips alone, lane after lane: the unbatched programs,
in a loop whose state is that one lane, so its history (2.5 MB for L-BFGS's 100 pairs) is read and written in
place rather than copied out of the batch at every direction. Lane by lane the arithmetic does not depend on
the number of lanes, so neither do the results (bit for bit).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dlg_jax.engine.attack import Attack, make_problem
from dlg_jax.engine.devices import compiler_options
from dlg_jax.parts import attempts as rules_lib
from dlg_jax.parts.objectives import Problem

AXIS = "lanes"  # the mesh axis the lane axis is sharded over
RESTART_STREAM = 0x5EED  # restarts draw their seeds from fold_in(key(seed), RESTART_STREAM)
NEVER = np.iinfo(np.int32).max  # `until` for lanes that run to the end


def restart_seed(seed: jax.Array, restart: jax.Array) -> jax.Array:
    """The seed of restart `restart` of the attack from `seed`: `seed` itself for restart 0 (so a one-restart
    sweep repeats `dlg_jax.run --seed`), else a 31-bit seed from fold_in(key(seed), RESTART_STREAM), a stream
    apart from the retries' fold_in(key(seed), attempt)."""
    stream = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), RESTART_STREAM), restart)
    derived = (jax.random.bits(stream, dtype=jnp.uint32) >> 1).astype(jnp.int32)
    return jnp.where(restart == 0, seed, derived)


class Lanes(NamedTuple):
    """Everything about a batch of attacks, lane axis first."""

    occupied: jax.Array  # bool: the lane holds an attack
    problem: Problem
    solver: Any  # the solver's state
    progress: rules_lib.Attempt

    def live(self, until=NEVER) -> jax.Array:
        return self.occupied & (self.progress.status == rules_lib.RUNNING) & (self.progress.iterations < until)


def _select(mask: jax.Array, new, old):
    """Per-lane `where` over pytrees: lanes where `mask` take `new`. `mask` is (lanes,)."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (b.ndim - 1)), a, b), new, old)


def _take(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _put(tree, new, i):
    return jax.tree.map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0), tree, new)


class Engine:
    """The lanes of one attack (model, config, batch size) on `devices` (default: all local devices).

    `compile(lanes)` gives the programs; `blank`, `fill(lanes, mask, inputs, labels, seeds, restarts)`,
    `run(lanes, max_trips, min_live, until)` and `harvest(lanes)` drive them. `run` advances every lane by up to
    `max_trips` trips (lane by lane: that many lane-trips per lane, shared by the running lanes), stopping a
    lane at `until` iterations; all at once it returns early when fewer than `min_live` lanes of a device run.
    """

    min_chunk_trips = 8  # the fewest trips a `run` call is asked for

    def __init__(self, attack: Attack, devices: Sequence[jax.Device] | None = None, lane_by_lane: bool | None = None):
        self.attack = attack
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.lane_sharding = NamedSharding(self.mesh, P(AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(attack.case.params, self.replicated)  # every device holds the model
        self.input_shape = tuple(attack.layout.shapes["inputs"])  # one lane's private batch (N, ...)
        self.defenses = len(attack.case.defenses)  # strengths per lane
        self.lane_by_lane = self.devices[0].platform == "cpu" if lane_by_lane is None else lane_by_lane
        if self.lane_by_lane:  # a lane's state is copied out and back once per run call: give each lane many trips
            self.min_chunk_trips = 128
        self._value_and_grad = jax.value_and_grad(attack.objective)
        self._compiled: dict[int, dict] = {}

    # ---- one lane
    def _problem(self, params, inputs, labels, seed, restart, strengths) -> Problem:
        """The attack on uint8-coded inputs (N, ...) / 255 with labels (N,), from `seed`'s restart `restart`,
        the client's defenses at `strengths` (one per defense: a lane's own, so a sweep over strengths is one
        program)."""
        attack = self.attack._replace(case=self.attack.case._replace(params=params))
        pixels = jnp.asarray(inputs, self.attack.config.dtype) / 255.0
        return make_problem(attack, pixels, labels, restart_seed(seed, restart), strengths)

    def _start(self, problem: Problem, reuse) -> tuple[Any, rules_lib.Attempt]:
        return self.attack.solver.init(problem.init, reuse), rules_lib.begin(problem.init)

    def _trip(self, lane: Lanes, params, until):
        """One evaluation and the decisions after it; a lane that is not live keeps its progress (its solver state
        is not used again before the lane is refilled). Returns the lane, `again` and `restart`, and the point."""
        attack = self.attack
        live = lane.live(until)
        point = attack.solver.ask(lane.solver)
        value, grad = self._value_and_grad(point, rules_lib.prior_weight(attack.rules, lane.progress), lane.problem,
                                           params)
        solver, step = attack.solver.tell(lane.solver, point, value, grad)
        progress, again, restart = rules_lib.after_evaluation(attack.rules, lane.progress, step, point, value,
                                                              lane.progress.evaluations + 1, lane.problem.target,
                                                              lane.problem.floor)
        progress = jax.tree.map(lambda new, old: jnp.where(live, new, old), progress, lane.progress)
        return lane._replace(solver=solver, progress=progress), again & live, restart & live, point

    def _restart(self, lane: Lanes, again, point) -> Lanes:
        """The solver started afresh: at a new N(0, 1) dummy for a new attempt, at `point` for a new prior stage."""
        x = rules_lib.restart_point(lane.progress, again, point, lane.problem.key, self.attack.layout)
        return lane._replace(solver=self.attack.solver.init(x, lane.solver))

    # ---- the programs (per device shard)
    def _problems(self, params, inputs, labels, seeds, restarts, strengths):
        build = functools.partial(self._problem, params)
        if self.lane_by_lane:  # the unbatched program: the same arithmetic whatever the number of lanes
            return jax.lax.map(lambda job: build(*job), (inputs, labels, seeds, restarts, strengths))
        return jax.vmap(build)(inputs, labels, seeds, restarts, strengths)

    def _blank(self, batch: int) -> Lanes:
        shapes = jax.eval_shape(lambda: self._problems(
            self.params, jnp.zeros((1, *self.input_shape), jnp.uint8), jnp.zeros((1, self.input_shape[0]), jnp.int32),
            jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.zeros((1, self.defenses), jnp.float32)))
        problem = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), shapes)
        solver, progress = self._start(problem, None)
        lane = Lanes(jnp.zeros((), bool), problem, solver, progress)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), lane)

    def _fill(self, lanes: Lanes, mask, inputs, labels, seeds, restarts, strengths, params) -> Lanes:
        """New attacks in the masked lanes. The solvers' buffers are reused (`init(x, reuse)`), so the select
        leaves them as they are."""
        problems = self._problems(params, inputs, labels, seeds, restarts, strengths)
        solver, progress = jax.vmap(self._start)(problems, lanes.solver)
        return _select(mask, Lanes(jnp.ones_like(mask), problems, solver, progress), lanes)

    def _run(self, lanes: Lanes, params, max_trips, min_live, until):
        if self.lane_by_lane:
            return self._run_lane_by_lane(lanes, params, max_trips, until)

        def going(carry):
            trips, lanes = carry
            paused = jnp.any(lanes.live() & (lanes.progress.iterations >= until))  # a lane at `until` waits for the host
            return (trips < max_trips) & (jnp.sum(lanes.live(until)) >= jnp.maximum(min_live, 1)) & ~paused

        def trip(carry):  # every lane at once
            trips, lanes = carry
            lanes, again, restart, point = jax.vmap(self._trip, in_axes=(0, None, None))(lanes, params, until)
            lanes = jax.lax.cond(jnp.any(restart), lambda: _select(restart, jax.vmap(self._restart)(lanes, again, point),
                                                                   lanes), lambda: lanes)  # most trips restart none
            return trips + 1, lanes

        trips, lanes = jax.lax.while_loop(going, trip, (jnp.zeros((), jnp.int32), lanes))
        return lanes, trips[None]

    def _run_lane_by_lane(self, lanes: Lanes, params, max_trips, until):
        """Each running lane takes its trips alone, lane after lane. The call does `max_trips` x lanes lane-trips,
        shared evenly by the running lanes (what a lane that finishes early leaves goes to the lanes after it), so
        every device works as long as the others however many of its lanes still run."""
        live = lanes.live(until)
        batch, running = live.shape[0], jnp.sum(live)
        order = jnp.nonzero(live, size=batch, fill_value=0)[0]
        budget = jnp.minimum(max_trips, jnp.iinfo(jnp.int32).max // batch) * batch

        def lane_trips(j, carry):
            lanes, used = carry
            share = (budget - used) // (running - j)

            def going(carry):
                trips, lane = carry
                return (trips < share) & lane.live(until)

            def trip(carry):
                trips, lane = carry
                lane, again, restart, point = self._trip(lane, params, until)
                return trips + 1, jax.lax.cond(restart, lambda: self._restart(lane, again, point), lambda: lane)

            i = order[j]
            trips, lane = jax.lax.while_loop(going, trip, (jnp.zeros((), jnp.int32), _take(lanes, i)))
            return _put(lanes, lane, i), used + trips

        lanes, used = jax.lax.fori_loop(0, running, lane_trips, (lanes, jnp.zeros((), jnp.int32)))
        return lanes, (-(-used // batch))[None]

    def _harvest(self, lanes: Lanes) -> dict:
        return dict(jax.vmap(self.attack.report)(lanes.progress, lanes.problem), live=lanes.live(),
                    occupied=lanes.occupied)

    # ---- host-facing
    def lane_count(self, wanted: int) -> int:
        """`wanted` rounded up to a multiple of the device count (every device gets the same number of lanes)."""
        n = len(self.devices)
        return max(n, -(-wanted // n) * n)

    def compile(self, batch: int) -> dict:
        """Compile (or fetch) the programs for `batch` lanes; abstractly, so nothing of that size is allocated.

        `bytes` is XLA's estimate of the memory one `run` needs per device (arguments + temporaries; the lanes are
        donated, so outputs reuse them); `flops`: XLA's count for the `run` program (its loop body counted once).
        """
        if batch in self._compiled:
            return self._compiled[batch]
        shard = lambda f, ins, outs: jax.shard_map(f, mesh=self.mesh, in_specs=ins, out_specs=outs,  # noqa: E731
                                                   check_vma=False)
        lanes_shape = jax.eval_shape(functools.partial(self._blank, batch))
        lane_spec = jax.tree.map(lambda _: P(AXIS), lanes_shape)
        param_spec = jax.tree.map(lambda _: P(), self.params)
        jit = functools.partial(jax.jit, compiler_options=compiler_options(self.devices[0].platform))
        blank = jit(functools.partial(self._blank, batch),
                    out_shardings=jax.tree.map(lambda _: self.lane_sharding, lanes_shape))
        fill = jit(shard(self._fill, (lane_spec, P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS), param_spec),
                         lane_spec),
                   donate_argnums=0)
        run = jit(shard(self._run, (lane_spec, param_spec, P(), P(), P()), (lane_spec, P(AXIS))), donate_argnums=0)
        harvest = jit(shard(self._harvest, (lane_spec,), P(AXIS)))
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
        lanes_abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.lane_sharding),
                                      lanes_shape)
        params_abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=self.replicated),
                                       self.params)
        per_lane = lambda shape, dtype: jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=self.lane_sharding)  # noqa: E731
        jobs = (per_lane((), bool), per_lane(self.input_shape, jnp.uint8), per_lane((self.input_shape[0],), jnp.int32),
                per_lane((), jnp.int32), per_lane((), jnp.int32), per_lane((self.defenses,), jnp.float32))
        run = run.lower(lanes_abstract, params_abstract, scalar, scalar, scalar).compile()
        memory = run.memory_analysis()
        cost = run.cost_analysis() or {}
        self._compiled[batch] = dict(
            blank=blank.lower().compile(), fill=fill.lower(lanes_abstract, *jobs, params_abstract).compile(), run=run,
            harvest=harvest.lower(lanes_abstract).compile(),
            bytes=None if memory is None else memory.argument_size_in_bytes + memory.temp_size_in_bytes,
            state_bytes=sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(lanes_shape)),
            flops=cost.get("flops"))
        return self._compiled[batch]

    def fill(self, programs: dict, lanes, mask, inputs, labels, seeds, restarts, strengths=None):
        """New attacks in the masked lanes; `strengths` (lanes, defenses): each lane's defense strengths
        (default: the case's)."""
        put = lambda a: jax.device_put(np.asarray(a), self.lane_sharding)  # noqa: E731
        if strengths is None:
            strengths = np.broadcast_to(np.asarray(self.attack.case.strengths, np.float32), (len(mask), self.defenses))
        return programs["fill"](lanes, put(mask), put(inputs), put(labels), put(seeds), put(restarts),
                                put(np.asarray(strengths, np.float32)), self.params)

    def run(self, programs: dict, lanes, max_trips: int, min_live: int, until: int = NEVER):
        """Advance the lanes by at most `max_trips` trips; returns (lanes, trips done per device)."""
        put = lambda v: jax.device_put(np.int32(v), self.replicated)  # noqa: E731
        return programs["run"](lanes, self.params, put(max_trips), put(min_live), put(until))

    def harvest(self, programs: dict, lanes) -> dict:
        return jax.device_get(programs["harvest"](lanes))
