"""One attack, with snapshots along the way: the engine with one lane (or jaxopt's own LBFGS, on request).

Why one lane of the engine and not a direct loop: it is the same code as every sweep (one path to test), and
it is faster than the direct jaxopt path (`--optimizer jaxopt-lbfgs`), whose two-loop recursion costs as much
as an evaluation: median 1.89 s against 2.22 s per attack on the 50 shared images (experiments/results/
bench_redesign.md).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlg_jax.engine.attack import Case, make_attack, make_problem, precision_scope
from dlg_jax.engine.devices import compiler_options
from dlg_jax.engine.lanes import NEVER, Engine
from dlg_jax.engine.scheduler import Outcome, Task, float64_case, keep_better, wants_float64_retry
from dlg_jax.parts.attempts import RUNNING, STATUS_NAMES
from dlg_jax.results.metrics import matched_psnr


@dataclasses.dataclass
class Trace:
    """What happened along the way: D after every step, the dummy every `every` steps and at the last one."""

    every: int
    snapshots: list  # [(step, inputs (N, ...) of the current iterate)], the last at `stopped_at`
    values: list  # [(step, D of the current iterate, evaluations so far)], one per step taken
    stopped_at: int | None = None  # the last step taken (0-based, as `step` above)
    scores: list = dataclasses.field(default_factory=list)  # [(step, score(current inputs))] when a score is given

    def result(self) -> dict:
        """What result.json keeps of it: the step it stopped at, and D, evaluations and the score (PSNR) per step."""
        return dict(stopped_at_step=self.stopped_at,
                    trace=dict(step=[v[0] for v in self.values], grad_distance=[v[1] for v in self.values],
                               evaluations=[v[2] for v in self.values], psnr=[v[1] for v in self.scores]))


def predict_missing_labels(case: Case, images: np.ndarray, labels: np.ndarray, dtype) -> np.ndarray:
    """Labels -1 replaced by the model's prediction on the uint8 images / 255 (a client labels an unlabelled input
    as its model does)."""
    labels = np.asarray(labels)
    unknown = labels < 0
    if not unknown.any():
        return labels
    predicted = np.asarray(jnp.argmax(case.model.apply(case.params, jnp.asarray(images, dtype) / 255.0), -1))
    return np.where(unknown, predicted, labels)


def attack_one(case: Case, config, images: np.ndarray, labels: np.ndarray, seed: int = 1234,
               on_step: Callable[[dict], None] | None = None, snapshot_every: int = 10,
               on_compile: Callable[[], None] | None = None,
               on_retry: Callable[[Outcome], None] | None = None) -> tuple[Outcome, Trace]:
    """Attack the shared gradient of a batch of private images (uint8 (N, H, W, C); labels -1: the model's
    prediction). `on_step` gets {step, value, evaluations, status, stopped} every `snapshot_every` steps and at
    the last; `on_compile` is called before compiling. The trace has D per step and the PSNR of the current
    dummy against the private images (matched, as `judge` does) per step. An attack float32 leaves unconverged
    runs again in float64 (`scheduler.wants_float64_retry`; `on_retry(first outcome)` is called before it): the
    one with the lower D is returned with its trace, with the time of both."""
    outcome, trace = _attack_once(case, config, images, labels, seed, on_step, snapshot_every, on_compile)
    if not wants_float64_retry(config, outcome):
        return outcome, trace
    if on_retry:
        on_retry(outcome)
    config64 = config.override(precision="float64")
    with precision_scope(config64):
        case64 = float64_case(case)
    retried, retried_trace = _attack_once(case64, config64, images, labels, seed, on_step, snapshot_every, None)
    kept = keep_better(outcome, retried)
    return kept, (retried_trace if kept.precision == "float64" else trace)


def _attack_once(case: Case, config, images, labels, seed, on_step, snapshot_every, on_compile):
    with precision_scope(config):
        labels = predict_missing_labels(case, images, labels, config.dtype)
        score = functools.partial(matched_psnr, np.asarray(images) / 255.0)
        if on_compile:
            on_compile()
        if config.solver.optimizer == "jaxopt-lbfgs":
            return _jaxopt(case, config, images, labels, seed, on_step, snapshot_every, score)
        engine = Engine(make_attack(case, config, len(images)), jax.local_devices()[:1])
        start = time.perf_counter()
        programs = engine.compile(1)
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        lanes = engine.fill(programs, programs["blank"](), np.ones(1, bool), np.asarray(images)[None],
                            np.asarray(labels, np.int32)[None], np.array([seed], np.int32), np.zeros(1, np.int32))

        def advance(until):
            nonlocal lanes
            lanes, _ = engine.run(programs, lanes, NEVER, 1, until)
            out = engine.harvest(programs, lanes)
            return {k: v[0] for k, v in out.items()}, float(lanes.progress.current_value[0])

        out = _trace(config, advance, on_step, snapshot_every, score)
        seconds = time.perf_counter() - start
        return _outcome(config, labels, out[0], seconds, compile_seconds, seed), out[1]


def _trace(config, advance, on_step, every: int, score=None):
    """Advance step by step until the attack stops: D after each step (and `score` of the current inputs, e.g.
    PSNR against the truth), the dummy every `every` steps and at the step it stopped; `on_step` at those."""
    trace = Trace(every, [], [])
    per_step = config.rules.iterations_per_step
    out = None
    for step in range(config.rules.steps):
        out, value = advance((step + 1) * per_step)
        stopped = int(out["status"]) != RUNNING
        if stopped:  # it stopped within this step (or before it, at a budget): the step it was in
            step = max(0, -(-int(out["iterations"]) // per_step) - 1)
        trace.values.append((step, value, int(out["evaluations"])))
        if score is not None:
            trace.scores.append((step, score(np.asarray(out["current"]))))
        if step % every == 0 or stopped:
            trace.snapshots.append((step, np.asarray(out["current"])))
            if on_step:
                on_step(dict(step=step, value=value, evaluations=int(out["evaluations"]), status=int(out["status"]),
                             stopped=stopped))
        if stopped:
            break
    if out is None or int(out["status"]) == RUNNING:
        out, _ = advance(NEVER)
    trace.stopped_at = trace.values[-1][0] if trace.values else None
    return out, trace


def _outcome(config, labels, out: dict, seconds: float, compile_seconds: float, seed: int) -> Outcome:
    iterations = int(out["iterations"])
    return Outcome(task=Task(tuple(range(len(labels))), seed), reconstruction=np.asarray(out["inputs"], np.float64),
                   label_pred=[int(c) for c in out["label_pred"]], label_true=[int(c) for c in labels],
                   grad_distance=float(out["grad_distance"]), status=STATUS_NAMES[int(out["status"])],
                   attempts=int(out["attempts"]), iterations=iterations,
                   steps=-(-iterations // config.rules.iterations_per_step), evaluations=int(out["evaluations"]),
                   seconds=seconds, compile_seconds=compile_seconds, restart_distances=[float(out["grad_distance"])],
                   precision=config.precision, target=float(out["target"]))


def _jaxopt(case: Case, config, images, labels, seed, on_step, every, score):
    """The direct path: jaxopt.LBFGS iteration by iteration, under the same attempt rules."""
    from dlg_jax.solvers import jaxopt_lbfgs as J

    attack = make_attack(case, config, len(images))
    s = config.solver
    solver = J.make_jaxopt_lbfgs(attack.objective, s.history_size, s.linesearch_condition, s.linesearch_decrease,
                                 s.max_linesearch_steps, config.rules.max_iterations)
    problem = make_problem(attack, jnp.asarray(images, config.dtype) / 255.0, jnp.asarray(labels), seed)
    params = case.params
    options = compiler_options()
    start = time.perf_counter()
    begin = jax.jit(lambda p: J.start(solver, p, params), compiler_options=options).lower(problem).compile()
    carry = begin(problem)
    step_fn = jax.jit(lambda c, p, until: J.advance(solver, attack.rules, p, params, attack.layout, c, until),
                      compiler_options=options).lower(carry, problem, jnp.int32(0)).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()

    def advance(until):
        nonlocal carry
        carry = step_fn(carry, problem, jnp.int32(min(until, NEVER)))
        return jax.device_get(attack.report(carry.attempt, problem)), float(carry.attempt.current_value)

    out, trace = _trace(config, advance, on_step, every, score)
    return _outcome(config, labels, out, time.perf_counter() - start, compile_seconds, seed), trace
