"""The host side of the engine: many tasks through a fixed number of lanes, refilled as attacks finish.

    sweep = Sweep(case, config, restarts=1)
    outcomes = sweep.run(images, labels, [Task((0,), 1234), Task((1,), 1234)], lanes=64)

A task is one attack: on the mean gradient of the images at `positions` (one image: one position), from `seed`.
With `restarts` K each task runs K random starts side by side and keeps the one with the lowest gradient
distance (what an attacker can see; the ground truth plays no part in the choice).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from dlg_jax.engine.attack import Case, make_attack, precision_scope
from dlg_jax.engine.lanes import NEVER, Engine
from dlg_jax.engine.memory import BatchTooLarge, check_memory, too_large_message
from dlg_jax.parts.attempts import STATUS_NAMES

CHUNK_SECONDS = 0.25  # device calls about this long: a device whose lanes finish idles at most this long


@dataclasses.dataclass(frozen=True)
class Task:
    positions: tuple[int, ...]  # indices into the images given to `Sweep.run`: a batch of len(positions)
    seed: int
    strengths: tuple[float, ...] | None = None  # the client's defense strengths (None: the case's)


# What an outcome adds to a result row (result.json, results.jsonl), beside the judged metrics
RESULT_KEYS = ("grad_distance", "steps", "iterations", "evaluations", "seconds", "compile_seconds", "status", "attempts",
               "precision")


@dataclasses.dataclass
class Outcome:
    """One task's result (the kept restart's)."""

    task: Task
    reconstruction: np.ndarray  # (N, ...) float64, in the order the attack returned them (unmatched)
    label_pred: list[int]
    label_true: list[int]
    grad_distance: float
    status: str
    attempts: int
    iterations: int
    steps: int
    evaluations: int
    seconds: float  # this task's share of the device time, all restarts
    compile_seconds: float
    restart: int = 0
    restart_distances: list[float] = dataclasses.field(default_factory=list)
    precision: str = "float32"  # of the attack kept: float64 when the float64 retry did better
    target: float = float("nan")  # the convergence target of D (the kept restart's)

    def result(self, *more: str) -> dict:
        """The row keys this outcome fills: `RESULT_KEYS`, then `more`."""
        return {k: getattr(self, k) for k in (*RESULT_KEYS, *more)}


class Sweep:
    """Many attacks of one case and config in one compiled program, `lanes` at a time over `devices`.

    Results equal each attack run alone (lane by lane: bit for bit; all lanes at once: to float rounding).
    """

    def __init__(self, case: Case, config, *, restarts: int = 1, batch_size: int = 1, devices=None,
                 lane_by_lane: bool | None = None):
        if restarts <= 0 or batch_size <= 0:
            raise ValueError(f"restarts and batch_size must be positive, got {restarts} and {batch_size}")
        self.config, self.restarts, self.batch_size = config, restarts, batch_size
        with precision_scope(config):
            self.engine = Engine(make_attack(case, config, batch_size), devices, lane_by_lane)
        self.compile_seconds = 0.0
        self._retry: Sweep | None = None  # the float64 twin, built when an attack first needs the retry

    def lanes_for(self, tasks: int, lanes: int) -> int:
        """Lanes of the program for `tasks` tasks: `lanes`, or fewer when there is less work, rounded up to a
        multiple of the device count."""
        return self.engine.lane_count(min(lanes, tasks * self.restarts))

    def compile(self, lanes: int) -> dict:
        """Compile for `lanes` lanes (timed, in `compile_seconds`); BatchTooLarge if they do not fit memory."""
        with precision_scope(self.config):
            start = time.perf_counter()
            programs = self.engine.compile(lanes)
            self.compile_seconds += time.perf_counter() - start
        check_memory(self.engine, lanes, programs)
        return programs

    def run(self, images: np.ndarray, labels: np.ndarray, tasks: Sequence[Task], *, lanes: int = 64,
            on_results: Callable[[list[Outcome]], None] | None = None,
            progress: Callable[[int, dict], None] | None = None) -> list[Outcome]:
        """Attack every task; `images` uint8 (M, ...) and `labels` (M,) are indexed by `Task.positions`.

        `on_results(outcomes)` gets the tasks finished in each chunk as soon as it ends (write them durably
        there); `progress(finished, harvest)` after every chunk.
        """
        tasks = list(tasks)
        if not tasks:
            return []
        wrong = [t for t in tasks if len(t.positions) != self.batch_size]
        if wrong:
            raise ValueError(f"task {wrong[0]}: {len(wrong[0].positions)} image(s), batch_size is {self.batch_size}")
        deferred: list[Outcome] = []  # unconverged in float32: retried in float64 before they are delivered

        def deliver(finished: list[Outcome]) -> None:
            retry = [wants_float64_retry(self.config, o) for o in finished]
            keep = [o for o, later in zip(finished, retry) if not later]
            deferred.extend(o for o, later in zip(finished, retry) if later)
            if keep and on_results:
                on_results(keep)

        lanes = self.lanes_for(len(tasks), lanes)
        programs = self.compile(lanes)
        with precision_scope(self.config):
            try:
                outcomes = self._solve(programs, lanes, np.asarray(images), np.asarray(labels), tasks, deliver, progress)
            except Exception as error:  # out of memory at run time: say what would fit
                if "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error):
                    raise BatchTooLarge(too_large_message(lanes, len(self.engine.devices), None, None)) from None
                raise
        if deferred:
            retried = self._float64().run(images, labels, [o.task for o in deferred], lanes=lanes)
            better = {id(o): keep_better(o, r) for o, r in zip(deferred, retried)}
            outcomes = [better.get(id(o), o) for o in outcomes]
            if on_results:
                on_results(list(better.values()))
        return outcomes

    def _float64(self) -> "Sweep":
        """The same case and attack in float64 (the weights cast, so the model is the same one)."""
        if self._retry is None:
            config = self.config.override(precision="float64")
            with precision_scope(config):
                self._retry = Sweep(float64_case(self.engine.attack.case), config, restarts=self.restarts,
                                    batch_size=self.batch_size, devices=self.engine.devices,
                                    lane_by_lane=self.engine.lane_by_lane)
        return self._retry

    def _solve(self, programs, lanes: int, images, labels, tasks: list[Task], on_results, progress) -> list[Outcome]:
        """The host loop: fill free lanes, run a chunk, harvest finished lanes, repeat."""
        engine, k = self.engine, self.restarts
        queue = collections.deque((t, r) for t in range(len(tasks)) for r in range(k))
        state = programs["blank"]()
        slot_job: list[tuple[int, int] | None] = [None] * lanes
        per_task: dict[int, dict[int, dict]] = collections.defaultdict(dict)
        seconds = np.zeros(len(tasks))
        outcomes: list[Outcome | None] = [None] * len(tasks)
        local = lanes // len(engine.devices)
        max_trips = engine.min_chunk_trips
        while queue or any(job is not None for job in slot_job):
            start = time.perf_counter()
            state = self._refill(programs, state, slot_job, queue, images, labels, tasks)
            busy = [i for i, job in enumerate(slot_job) if job is not None]
            min_live = local - max(1, local // 8) + 1 if queue else 1  # come back to refill 1/8 of the lanes
            run_start = time.perf_counter()
            state, trips = engine.run(programs, state, max_trips, min_live, NEVER)
            out = engine.harvest(programs, state)
            now = time.perf_counter()
            trips = int(np.max(trips))
            max_trips = int(np.clip(trips / max(now - run_start, 1e-3) * CHUNK_SECONDS, engine.min_chunk_trips, 1 << 20))
            for i in busy:  # this chunk's time, shared by the attacks that were in it
                seconds[slot_job[i][0]] += (now - start) / len(busy)
            finished = []
            for i in busy:
                if out["live"][i]:
                    continue
                t, r = slot_job[i]
                slot_job[i] = None
                per_task[t][r] = {key: value[i] for key, value in out.items()}
                if len(per_task[t]) == k:
                    outcomes[t] = self._outcome(tasks[t], labels, per_task.pop(t), seconds[t])
                    finished.append(outcomes[t])
            if finished and on_results:
                on_results(finished)
            if progress:
                progress(len(finished), out)
        return outcomes

    def _refill(self, programs, state, slot_job, queue, images, labels, tasks):
        free = [i for i, job in enumerate(slot_job) if job is None]
        if not free or not queue:
            return state
        lanes = len(slot_job)
        mask = np.zeros(lanes, bool)
        batch_inputs = np.zeros((lanes, *self.engine.input_shape), np.uint8)
        batch_labels = np.zeros((lanes, self.batch_size), np.int32)
        seeds, restarts = (np.zeros(lanes, np.int32) for _ in range(2))
        own = {}  # lane -> the strengths its task brings (a sweep over defense strengths)
        per_device = lanes // len(self.engine.devices)  # lane i runs on device i // per_device
        free_on = collections.defaultdict(collections.deque)
        for i in free:
            free_on[i // per_device].append(i)
        busy = collections.Counter(i // per_device for i, job in enumerate(slot_job) if job is not None)
        while free_on and queue:  # each job to the least busy device (fewer jobs than lanes: share them evenly)
            device = min(free_on, key=lambda d: (busy[d], d))
            i = free_on[device].popleft()
            if not free_on[device]:
                del free_on[device]
            busy[device] += 1
            t, r = queue.popleft()
            slot_job[i], mask[i] = (t, r), True
            positions = list(tasks[t].positions)
            batch_inputs[i] = images[positions]
            batch_labels[i], seeds[i], restarts[i] = labels[positions], tasks[t].seed, r
            if tasks[t].strengths is not None:
                own[i] = tasks[t].strengths
        strengths = None  # the case's, in every lane
        if own:
            strengths = np.tile(np.asarray(self.engine.attack.case.strengths, np.float32), (lanes, 1))
            for i, values in own.items():
                strengths[i] = values
        return self.engine.fill(programs, state, mask, batch_inputs, batch_labels, seeds, restarts, strengths)

    def _outcome(self, task: Task, labels, restarts: dict[int, dict], seconds: float) -> Outcome:
        """The kept restart (lowest finite gradient distance: the attacker's own criterion) and all distances."""
        distances = [float(restarts[r]["grad_distance"]) for r in range(self.restarts)]
        best = min(range(self.restarts), key=lambda r: distances[r] if np.isfinite(distances[r]) else np.inf)
        kept = restarts[best]
        iterations = int(kept["iterations"])
        return Outcome(task=task, reconstruction=np.asarray(kept["inputs"], np.float64),
                       label_pred=[int(c) for c in kept["label_pred"]],
                       label_true=[int(labels[p]) for p in task.positions], grad_distance=distances[best],
                       status=STATUS_NAMES[int(kept["status"])], attempts=int(kept["attempts"]), iterations=iterations,
                       steps=-(-iterations // self.config.rules.iterations_per_step),
                       evaluations=int(kept["evaluations"]), seconds=float(seconds),
                       compile_seconds=self.compile_seconds, restart=best, restart_distances=distances,
                       precision=self.config.precision, target=float(kept["target"]))


# ---- the float64 retry

UNCONVERGED = ("max_steps", "max_evaluations")


def wants_float64_retry(config, outcome: Outcome) -> bool:
    """An attack float32 left unconverged when its budget ended (not one that diverged) within `plateau_floor`
    (1e3) times its convergence target, where float32's rounding slows a converging attack (a stuck one, further
    off, gains nothing from float64), with a target to reach (tolerance > 0) and the retry on
    (`Rules.float64_retry`).

    Why: on CIFAR-10 the seeded LeNet predicts class 5 for every image (p ~ 0.84), so a class-5 image's
    gradient is ~50x weaker (squared norm 15 against 660-960) and its attack descends slowly to float32's
    floor: all 18 failures of 400 attacks ended at 24-30 dB on their budget, and in float64 all 18 reached
    31-39 dB within the same budget (experiments/results/cifar10_class5.md). float64 costs 1.55x an attack
    (CIFAR-100, median), so it is spent only where float32 fell short."""
    return (config.rules.float64_retry and config.precision == "float32" and config.rules.tolerance > 0
            and outcome.status in UNCONVERGED and outcome.grad_distance <= config.rules.plateau_floor * outcome.target)


def keep_better(first: Outcome, retry: Outcome) -> Outcome:
    """The attack with the lower gradient distance (the attacker's criterion; converged counts first), its own
    counts and status, and the time of both."""
    def rank(o):
        return (o.status != "converged", o.grad_distance if np.isfinite(o.grad_distance) else np.inf)

    kept = retry if rank(retry) < rank(first) else first
    return dataclasses.replace(kept, seconds=first.seconds + retry.seconds,
                               compile_seconds=first.compile_seconds + retry.compile_seconds)


def float64_case(case: Case) -> Case:
    """The case with its weights (and BatchNorm statistics) cast to float64: the same model, not one initialised
    anew in float64. Call under float64's precision_scope."""
    import jax
    import jax.numpy as jnp

    def cast(tree):
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                            else a, tree)

    return case._replace(params=cast(case.params), model=case.model._replace(state=cast(case.model.state)))
