"""The attempt rules, written once: every driver (the engine's lanes, the jaxopt loop) calls `after_evaluation`.

An attack is a series of attempts from random starts. After each evaluation of the objective the rules decide:

- **best iterate**: the lowest finite D among the iterates (what is returned, whatever came after it);
- **divergence**: a non-finite D or iterate ends the attempt (DIVERGED);
- **convergence**: D <= target (tolerance x ||shared gradient||^2) in the last prior stage (CONVERGED);
- **stall probe**: an attempt that has not cut D by `probe_reduction` after `probe_steps` steps is STALLED
  (a step: `iterations_per_step` iterations or `evaluations_per_step` evaluations, whichever comes first);
- **plateau**: so is one that, later, has not cut D by `plateau_reduction` over the last `probe_steps` steps
  while D is still above `plateau_floor` x the target (an attempt stuck in a local minimum; near the float
  floor a converging attempt may slow down, and is left alone);
- **fresh starts**: a stalled or diverged attempt starts again from a new N(0, 1) dummy while retries and
  budget remain (`again`). By default as many retries as the budget has room for probes: the budget goes to
  fresh starts, not to a stuck attempt. Measured on MNIST test 0-39, seed 1: six images had four stalled starts
  and then sat at D ~ 30-60 (3 dB) until the budget ended; with more starts all six converged at their fifth;
- **budgets**: iterations (steps x iterations per step) over all attempts, checked as an iteration completes,
  and evaluations (steps x evaluations per step), checked at every evaluation (MAX_STEPS, MAX_EVALUATIONS: which
  budget ran out first);
- **prior stages**: with a TV prior, its weight is tv_weight / 10^stage over equal stages of an attempt's
  iterations, 0 in the last; at a stage's end the solver starts afresh from the current iterate (the
  objective changed), and the best iterate is tracked anew (D's at different weights are not comparable).

The solver reports what an evaluation was (`Step`): the first of an attempt or stage (`started`) and/or the end
of an iteration (`iterated`: the evaluated point is the new iterate). L-BFGS's first evaluation only starts;
a line-search trial that is refused is neither; Adam's every evaluation is an iteration.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dlg_jax.parts.dummies import fresh_start

RUNNING, CONVERGED, MAX_STEPS, DIVERGED, STALLED, MAX_EVALUATIONS = 0, 1, 2, 3, 4, 5
STATUS_NAMES = {RUNNING: "running", CONVERGED: "converged", MAX_STEPS: "max_steps", DIVERGED: "diverged",
                STALLED: "stalled", MAX_EVALUATIONS: "max_evaluations"}


class Step(NamedTuple):
    """What a solver's evaluation was."""

    started: jax.Array  # bool: the first evaluation from a (re)start: its point is where the attempt or stage begins
    iterated: jax.Array  # bool: an iteration completed; the evaluated point is the new iterate


class Rules(NamedTuple):
    """The numbers the rules need (Python scalars: they are compiled in)."""

    max_iterations: int
    max_evaluations: int
    probe_iteration: int
    probe_evaluations: int
    probe_reduction: float
    plateau_reduction: float
    plateau_floor: float
    retries: int
    stages: int
    stage_iterations: int
    tv_weight: float
    constant_prior: bool = False  # the weight stays tv_weight (no stages)

    @classmethod
    def from_config(cls, config) -> "Rules":
        r, o = config.rules, config.objective
        return cls(r.max_iterations, r.max_evaluations, r.probe_steps * r.iterations_per_step,
                   r.probe_steps * r.step_evaluations, r.probe_reduction,
                   r.plateau_reduction, r.plateau_floor, r.max_retries, o.stages, r.max_iterations // o.stages,
                   o.tv_weight, o.constant_prior)


class Attempt(NamedTuple):
    """An attack's progress over its attempts."""

    best: jax.Array  # the best iterate (flat dummy) so far
    best_value: jax.Array
    current: jax.Array  # the last iterate
    current_value: jax.Array  # D there
    iterations: jax.Array  # over all attempts
    evaluations: jax.Array  # over all attempts
    status: jax.Array
    attempt: jax.Array  # 0 for the first
    attempt_start: jax.Array  # iterations when the current attempt began
    attempt_value: jax.Array  # D at the current attempt's start
    checkpoint_value: jax.Array  # D at the attempt's (or stage's) start or its last checkpoint
    checkpoint_iterations: jax.Array  # iterations then
    checkpoint_evaluations: jax.Array  # evaluations then
    checkpoints: jax.Array  # checkpoints this attempt has passed (the first is the probe)
    stage_start: jax.Array  # bool: the pending start is a prior stage's (not a new attempt's)


def begin(z0: jax.Array) -> Attempt:
    zero = jnp.zeros((), jnp.int32)
    inf = jnp.asarray(jnp.inf, z0.dtype)
    return Attempt(z0, inf, z0, inf, zero, zero, jnp.asarray(RUNNING, jnp.int32), zero, zero, inf, inf, zero, zero,
                   zero, jnp.zeros((), bool))


def stage(rules: Rules, a: Attempt) -> jax.Array:
    return (a.iterations - a.attempt_start) // rules.stage_iterations


def prior_weight(rules: Rules, a: Attempt) -> jax.Array:
    """The TV weight of the attempt's current stage: tv_weight / 10^stage, 0 in the last stage (or tv_weight
    throughout: a constant prior)."""
    s = stage(rules, a)
    dtype = a.best_value.dtype
    if rules.constant_prior:
        return jnp.asarray(rules.tv_weight, dtype)
    decayed = jnp.asarray(rules.tv_weight, dtype) * jnp.asarray(10.0, dtype) ** (-s.astype(dtype))
    return jnp.where(s >= rules.stages - 1, jnp.zeros((), dtype), decayed)


def restart_point(a: Attempt, again: jax.Array, point: jax.Array, key_data: jax.Array, layout) -> jax.Array:
    """Where the solver starts afresh after `after_evaluation` asked for it: a new N(0, 1) dummy, drawn from
    fold_in(key, attempt), for a new attempt (`again`); the current iterate `point` for a new prior stage."""
    fresh = fresh_start(jax.random.wrap_key_data(key_data), a.attempt, layout)
    return jnp.where(again, fresh, point)


def after_evaluation(rules: Rules, a: Attempt, step: Step, point: jax.Array, value: jax.Array,
                     evaluations: jax.Array, target: jax.Array, floor=0.0) -> tuple[Attempt, jax.Array, jax.Array]:
    """The rules after an evaluation of D at `point` (`evaluations`: the attack's total, this one included).

    `floor`: the least D the attacker expects (an adaptive attack on a noised gradient: the noise a dummy cannot
    fit; 0 otherwise). The probe and the plateau rule measure progress as D - floor, since D itself cannot fall
    below the floor. Compared raw, every adaptive attack under gauss 1e-4 and 1e-3 spent all 12 starts (CIFAR-100
    images 0-3); measured above the floor they took 1-2, the median PSNR went 11.3 -> 12.1 dB at 1e-4 (7.8 -> 7.0
    at 1e-3, where both fail) and the attacks per hour 660 -> 946.

    Returns the new progress, `again` (start a new attempt from a fresh dummy) and `restart` (the solver must
    start afresh: `again`, or a new prior stage from `point`).
    """
    finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(point))
    attempt_begins = step.started & ~a.stage_start
    iterations = a.iterations + step.iterated
    done = iterations - a.attempt_start  # iterations of this attempt
    last_stage = stage(rules, a) >= rules.stages - 1  # the stage this evaluation belongs to
    attempt_value = jnp.where(attempt_begins, value, a.attempt_value)

    improved = step.iterated & finite & (value < a.best_value)
    reset = step.started & (a.stage_start | (a.attempt == 0))  # a first start, or a stage's: track anew
    take = improved | reset
    # a checkpoint every probe_steps steps of the attempt: probe_steps x iterations_per_step iterations or
    # probe_steps x evaluations_per_step evaluations, whichever comes first (as a torch step ends at max_iter or
    # max_eval), so that an attempt whose line searches fail is checked as often as one that iterates
    checkpoint = step.iterated & ~step.started & (rules.probe_iteration > 0) & (
        (iterations - a.checkpoint_iterations >= rules.probe_iteration)
        | (evaluations - a.checkpoint_evaluations >= rules.probe_evaluations))
    excess = value - floor
    probe = (a.checkpoints == 0) & (excess > rules.probe_reduction * (attempt_value - floor))
    plateau = ((a.checkpoints > 0) & (rules.plateau_reduction > 0)
               & (excess > rules.plateau_reduction * (a.checkpoint_value - floor))
               & (excess > rules.plateau_floor * (target - floor)))
    stalled = checkpoint & (probe | plateau) & (a.attempt < rules.retries)
    spent_iterations = iterations >= rules.max_iterations
    iterate_status = jnp.select([~finite, (value <= target) & last_stage, stalled, spent_iterations],
                                [DIVERGED, CONVERGED, STALLED, MAX_STEPS], RUNNING)
    start_status = jnp.where(finite, RUNNING, DIVERGED)
    status = jnp.where(step.iterated, iterate_status, jnp.where(step.started, start_status, a.status))
    spent_evaluations = evaluations >= rules.max_evaluations
    status = jnp.where((status == RUNNING) & spent_evaluations, MAX_EVALUATIONS, status)

    failed = (status == STALLED) | (status == DIVERGED)
    again = failed & (a.attempt < rules.retries) & ~spent_iterations & ~spent_evaluations
    out_of_budget = jnp.where(spent_evaluations, MAX_EVALUATIONS, MAX_STEPS)
    status = jnp.where(again, RUNNING, jnp.where(status == STALLED, out_of_budget, status))
    next_stage = (status == RUNNING) & step.iterated & ~again & (done % rules.stage_iterations == 0)
    if rules.stages == 1:  # no prior: one stage, and the iteration budget ends it
        next_stage = jnp.zeros((), bool)
    moved = step.iterated | step.started
    a = Attempt(best=jnp.where(take, point, a.best), best_value=jnp.where(take, value, a.best_value),
                current=jnp.where(moved, point, a.current), current_value=jnp.where(moved, value, a.current_value),
                iterations=iterations,
                evaluations=evaluations, status=status, attempt=a.attempt + again,
                attempt_start=jnp.where(again, iterations, a.attempt_start), attempt_value=attempt_value,
                checkpoint_value=jnp.where(step.started | checkpoint, value, a.checkpoint_value),
                checkpoint_iterations=jnp.where(step.started | checkpoint, iterations, a.checkpoint_iterations),
                checkpoint_evaluations=jnp.where(step.started | checkpoint, evaluations, a.checkpoint_evaluations),
                checkpoints=jnp.where(attempt_begins, 0, a.checkpoints + checkpoint),
                stage_start=next_stage | (a.stage_start & ~step.started))
    return a, again, again | next_stage
