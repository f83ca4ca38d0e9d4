"""Sweeps: thousands of DLG reconstructions per compiled program, sharded over every device, resumable.

    python -m dlg_jax.sweep --data FILE.npz --indices 0:50 --seeds 0:4 --restarts 1 --batch 64 --out DIR

Every (index, seed) is one attack on one image, set up exactly as `python -m dlg_jax.run --index I --seed S`
sets it up. `--restarts K` runs K random starts of it side by side and keeps the one with the lowest gradient
distance (what an attacker can see; the ground truth plays no part in the choice). The attacks run `--batch`
at a time in one compiled program (dlg_jax/batched.py: why and how it is fast), its lanes sharded over all
local devices; lanes whose attack has finished are refilled at once, so stragglers do not hold a batch.

DIR gets, as attacks finish:
  results.jsonl      one row per (index, seed): the keys of dlg_jax.run's result.json plus seed, restarts,
                     restart (the one kept) and restart_distances (all K); appended and fsynced chunk by chunk
  reconstructions/   INDEX-SEED.npz: the private image (truth, uint8) and the reconstruction (float32)
  config.json        what the rows depend on (data, attack settings, model seed, restarts)
and at the end summary.json, summary.md, psnr_histogram.png and worst.png (the lowest-PSNR reconstructions).

Rerunning the same command continues where it stopped, after a crash or `kill -9` too: rows already in DIR are
skipped, a truncated last line is dropped. New indices or seeds extend the sweep; different attack settings
are refused (use another DIR). With --distributed, every host of a multi-host job (jax.distributed) takes its
share of the attacks and appends its own rows to results.pN.jsonl in the shared DIR.
On CPU, --processes N runs N such workers on this machine, one pinned to each core (faster than one process
with a device per core: experiments/results/bench_sweep.md).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from dlg_jax import data as data_lib
from dlg_jax import report
from dlg_jax import run as run_lib
from dlg_jax.attack import LABEL_STRATEGIES, OPTIMIZERS, PIXEL_RANGES, STATUS_NAMES, AttackConfig
from dlg_jax.cli import ArgumentParser, enable_compilation_cache, fail, non_negative_float, positive_int
from dlg_jax.errors import UsageError
from dlg_jax.ranges import parse_range

MAX_SEED = 2**31 - 1
CHUNK_SECONDS = 0.25  # device calls about this long: a device whose lanes finish idles at most this long


class BatchTooLarge(UsageError):
    """The requested number of lanes does not fit the device memory; the message says what would."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One row of a sweep: the attack on image `image` (a position in the images passed to `Sweep.run`), or
    on the mean gradient of a batch of images (a tuple of positions), from `seed`."""

    image: int | tuple[int, ...]
    seed: int

    @property
    def positions(self) -> list[int]:
        return list(self.image) if isinstance(self.image, tuple) else [self.image]


# ----------------------------------------------------------------------------------------------------------
# Python API


class Sweep:
    """Many attacks for one model, image shape and attack configuration, in one compiled program.

    `run(images, labels, tasks)` solves every task (`restarts` lanes each) `batch` lanes at a time and
    returns one outcome per task, in order. Results equal running each attack alone with `attack.Attack` (to
    float rounding: a batched matrix product may add in another order). Pass `devices` to choose the devices
    the lanes are sharded over (default: all local devices).
    """

    def __init__(self, num_classes: int, image_shape: Sequence[int], config: AttackConfig = AttackConfig(), *,
                 restarts: int = 1, model_seed: int = 1234, devices=None, engine: str = "auto", batch_size: int = 1):
        from dlg_jax.attack import precision_scope
        from dlg_jax.batched import ENGINES
        from dlg_jax.models import LeNet, init_params

        if restarts <= 0 or batch_size <= 0:
            raise ValueError(f"restarts and batch_size must be positive, got {restarts} and {batch_size}")
        if engine == "auto":  # the flat engine is the fast one; the vmap one also runs the staged TV prior
            engine = "vmap" if config.tv_weight > 0 else "flat"
        self.config, self.restarts, self.num_classes, self.batch_size = config, restarts, num_classes, batch_size
        self.image_shape = tuple(image_shape)
        with precision_scope(config):
            import jax
            import jax.numpy as jnp

            model = LeNet(num_classes=num_classes)
            params = jax.tree.map(lambda p: jnp.asarray(p, config.dtype), init_params(model, model_seed, image_shape))
            apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
            self.engine = ENGINES[engine](apply_fn, params, config, num_classes, self.image_shape, devices,
                                          batch_size=batch_size)
        self.compile_seconds = 0.0

    def scope(self):
        from dlg_jax.attack import precision_scope

        return precision_scope(self.config)

    def lanes_for(self, tasks: int, batch: int) -> int:
        """Lanes of the program for `tasks` tasks: `batch`, or fewer when there is less work, rounded up to a
        multiple of the device count."""
        return self.engine.lane_count(min(batch, tasks * self.restarts))

    def compile(self, lanes: int) -> dict:
        """Compile for `lanes` lanes (timed, in `compile_seconds`); BatchTooLarge if they do not fit memory."""
        with self.scope():
            start = time.perf_counter()
            programs = self.engine.compile(lanes)
            self.compile_seconds += time.perf_counter() - start
        check_memory(self.engine, lanes, programs)
        return programs

    def run(self, images: np.ndarray, labels: np.ndarray, tasks: Sequence[Task], *, batch: int = 64,
            on_results: Callable[[list[dict]], None] | None = None,
            progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """Attack every task; `images` uint8 (N, H, W, C) and `labels` (N,) are indexed by `Task.image`
        (a tuple of `batch_size` positions when batch_size > 1).

        `on_results(outcomes)` gets the tasks finished in each chunk as soon as it ends (write them durably
        there), `progress(finished, live lanes)` after every chunk. Each outcome holds `task`,
        `reconstruction` (H, W, C float64; (N, H, W, C) for a batch), `label_pred`, `label_true` (ints; lists in
        the batch's order for a batch, unmatched), `grad_distance` (of the kept restart),
        `restart`, `restart_distances`, `status`, `attempts`, `iterations`, `steps`, `evaluations` (all of the
        kept restart), `seconds` (this task's share of the device time, all restarts) and `compile_seconds`.
        """
        tasks = list(tasks)
        if not tasks:
            return []
        wrong = [t for t in tasks if len(t.positions) != self.batch_size]
        if wrong:
            raise ValueError(f"task {wrong[0]}: {len(wrong[0].positions)} image(s), batch_size is {self.batch_size}")
        lanes = self.lanes_for(len(tasks), batch)
        programs = self.compile(lanes)
        with self.scope():
            try:
                return self._solve(programs, lanes, np.asarray(images), np.asarray(labels), tasks, on_results, progress)
            except Exception as error:  # out of memory at run time: say what would fit
                if "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error):
                    raise BatchTooLarge(too_large_message(lanes, len(self.engine.devices), None, None)) from None
                raise

    def _solve(self, programs, lanes: int, images, labels, tasks: list[Task], on_results, progress) -> list[dict]:
        """The host loop: fill free lanes, run a chunk, harvest finished lanes, repeat."""
        engine, k = self.engine, self.restarts
        queue = collections.deque((t, r) for t in range(len(tasks)) for r in range(k))
        state = programs["blank"]()
        slot_job: list[tuple[int, int] | None] = [None] * lanes
        per_task: dict[int, dict[int, dict]] = collections.defaultdict(dict)
        seconds = np.zeros(len(tasks))
        outcomes: list[dict | None] = [None] * len(tasks)
        local = lanes // len(engine.devices)
        max_trips = engine.min_chunk_trips
        while queue or any(job is not None for job in slot_job):
            start = time.perf_counter()
            state = self._refill(programs, state, slot_job, queue, images, labels, tasks)
            busy = [i for i, job in enumerate(slot_job) if job is not None]
            min_live = local - max(1, local // 8) + 1 if queue else 1  # come back to refill 1/8 of the lanes
            run_start = time.perf_counter()
            state, trips = engine.run(programs, state, max_trips, min_live)
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
                progress(len(finished), int(np.sum(out["live"])))
        return outcomes

    def _refill(self, programs, state, slot_job, queue, images, labels, tasks):
        free = [i for i, job in enumerate(slot_job) if job is None]
        if not free or not queue:
            return state
        lanes = len(slot_job)
        mask = np.zeros(lanes, bool)
        batch_images = np.zeros((lanes, self.batch_size, *self.image_shape), np.uint8)
        batch_labels = np.zeros((lanes, self.batch_size), np.int32)
        seeds, restarts = (np.zeros(lanes, np.int32) for _ in range(2))
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
            batch_images[i] = images[tasks[t].positions]
            batch_labels[i], seeds[i], restarts[i] = labels[tasks[t].positions], tasks[t].seed, r
        return self.engine.fill(programs, state, mask, batch_images, batch_labels, seeds, restarts)

    def _outcome(self, task: Task, labels, restarts: dict[int, dict], seconds: float) -> dict:
        """The kept restart (lowest finite gradient distance: the attacker's own criterion) and all distances."""
        distances = [float(restarts[r]["grad_distance"]) for r in range(self.restarts)]
        best = min(range(self.restarts), key=lambda r: distances[r] if np.isfinite(distances[r]) else np.inf)
        kept = restarts[best]
        iterations = int(kept["iterations"])
        images, predicted = np.asarray(kept["images"], np.float64), [int(c) for c in kept["label_pred"]]
        true = [int(labels[p]) for p in task.positions]
        if not isinstance(task.image, tuple):  # one image: as dlg_jax.run reports it
            images, predicted, true = images[0], predicted[0], true[0]
        return dict(task=task, reconstruction=images, label_pred=predicted, label_true=true,
                    grad_distance=distances[best], restart=best, restart_distances=distances,
                    status=STATUS_NAMES[int(kept["status"])], attempts=int(kept["attempts"]), iterations=iterations,
                    steps=-(-iterations // self.config.iterations_per_step), evaluations=int(kept["evaluations"]),
                    seconds=float(seconds), compile_seconds=self.compile_seconds)


def sweep(images: np.ndarray, labels: np.ndarray, num_classes: int, config: AttackConfig = AttackConfig(),
          seeds: Iterable[int] = (1234,), *, restarts: int = 1, batch: int = 64, model_seed: int = 1234,
          devices=None, engine: str = "auto", batch_size: int = 1, **run_options) -> list[dict]:
    """Attack every image (uint8 NHWC) from every seed; outcomes in image-major order (see `Sweep.run`).

    With `batch_size` N > 1 the attacks are on batches of N consecutive images (a last partial batch is left out).
    """
    images = np.asarray(images)
    runner = Sweep(num_classes, images.shape[1:], config, restarts=restarts, model_seed=model_seed, devices=devices,
                   engine=engine, batch_size=batch_size)
    groups = [n if batch_size == 1 else tuple(range(n, n + batch_size))
              for n in range(0, len(images) - batch_size + 1, batch_size)]
    tasks = [Task(g, int(s)) for g in groups for s in seeds]
    return runner.run(images, labels, tasks, batch=batch, **run_options)


# ----------------------------------------------------------------------------------------------------------
# Memory


def available_bytes(device) -> int | None:
    """Free memory for one device: the accelerator's own, or on CPU the host's available memory shared by the
    local CPU devices."""
    if device.platform == "cpu":
        import jax

        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            free = int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError):
                return None
        return free // max(1, len([d for d in jax.local_devices() if d.platform == "cpu"]))
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports memory
        return None
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def check_memory(engine, lanes: int, programs: dict, headroom: float = 0.85) -> None:
    """Refuse a lane count whose program would not fit, naming one that would (XLA's own estimate)."""
    need = programs.get("bytes")
    devices = len(engine.devices)
    free = available_bytes(engine.devices[0])
    if need is None or free is None or need <= headroom * free:
        return
    raise BatchTooLarge(too_large_message(lanes, devices, need, free, headroom))


def too_large_message(lanes: int, devices: int, need: int | None, free: int | None, headroom: float = 0.85) -> str:
    gib = 2.0**30
    if need is None or free is None:
        return f"--batch {lanes}: ran out of device memory; try a smaller --batch (e.g. {max(devices, lanes // 4)})"
    per_lane = need / (lanes // devices)
    fits = int(headroom * free // per_lane) * devices
    advice = f"use --batch {fits} or less" if fits >= devices else "not even one attack per device fits"
    return (f"--batch {lanes}: needs ~{need / gib:.1f} GiB per device ({per_lane / 2**20:.1f} MiB per attack) but "
            f"{free / gib:.1f} GiB is free: {advice}")


# ----------------------------------------------------------------------------------------------------------
# The results directory: config, durable rows, resume


class ResultsDir:
    """DIR of a sweep: refuses another configuration, hands out pending tasks, appends rows durably.

    Durability: each chunk's rows are appended with one write, then flushed and fsynced; reconstructions are
    written (atomically) before their rows. A row is the sole record that an attack is done, so a crash at any
    moment loses at most the attacks in flight, and on resume a truncated last line (a write cut short) is
    dropped. An exclusive lock (flock on DIR/.lock, released by the OS even on kill -9) keeps two sweeps from
    appending to the same DIR at once.
    """

    def __init__(self, path: Path, identity: dict, host: int = 0, hosts: int = 1):
        self.path, self.identity = Path(path), identity
        self.rows_path = self.path / ("results.jsonl" if hosts == 1 else f"results.p{host}.jsonl")
        self._lock = None
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path}: exists and is not a directory")
        self.check_config()

    def check_config(self) -> None:
        file = self.path / "config.json"
        if not file.exists():
            return
        try:
            stored = json.loads(file.read_text())
        except (OSError, ValueError):
            raise UsageError(f"--out {self.path}: config.json is unreadable; use another --out") from None
        if stored != self.identity:
            changes = [f"{key} {old!r} -> {new!r}" for key, old, new in _differences(stored, self.identity)]
            raise UsageError(f"--out {self.path} holds a sweep with another configuration ({'; '.join(changes[:4])}"
                             f"{'; ...' if len(changes) > 4 else ''}): use another --out, or the same settings")

    def open(self, exclusive: bool = True) -> None:
        """Create DIR, take the lock, store config.json and repair a row file cut short by a crash."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "reconstructions").mkdir(exist_ok=True)
        if exclusive:
            import fcntl

            self._lock = open(self.path / (".lock" if self.rows_path.name == "results.jsonl"
                                           else f".lock.{self.rows_path.stem}"), "w")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"--out {self.path}: another sweep is writing there") from None
        self.check_config()
        if not (self.path / "config.json").exists():
            _atomic_write(self.path / "config.json", json.dumps(self.identity, indent=2) + "\n")
        if self.rows_path.exists():
            data = self.rows_path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                print(f"dlg_jax.sweep: dropping a truncated last line of {self.rows_path}", file=sys.stderr)
                with open(self.rows_path, "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())

    def _files(self):
        """Each row file in DIR (every host's or worker's) with its readable rows; a line that is not a JSON
        object (empty, or cut short by a crash) is skipped."""
        for file in sorted(self.path.glob("results*.jsonl")):
            rows = []
            for line in file.read_bytes().split(b"\n"):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
            yield file, rows

    def seconds_by_file(self) -> dict[str, float]:
        """The attack time in each row file (each host's or worker's): the sum of its rows' `seconds`."""
        return {file.name: sum(float(row.get("seconds", 0.0)) for row in rows) for file, rows in self._files()}

    def rows(self) -> list[dict]:
        """All rows in DIR (every host's file), each (index, seed) once; an unreadable line is skipped."""
        out, seen = [], set()
        for _, rows in self._files():
            for row in rows:
                try:
                    key = (row["index"], row["seed"])
                except KeyError:
                    continue
                if key not in seen:
                    seen.add(key)
                    out.append(row)
        return out

    def append(self, rows: list[dict], images: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]) -> None:
        """Save the rows' reconstructions, then append the rows: one write, flush, fsync."""
        for (index, seed), (truth, reconstruction) in images.items():
            file = self.path / "reconstructions" / report.image_name(index, seed)
            tmp = file.with_name(file.name + ".tmp.npz")
            np.savez(tmp, truth=truth, reconstruction=reconstruction.astype(np.float32))
            os.replace(tmp, file)
        text = "".join(json.dumps(row) + "\n" for row in rows).encode()
        with open(self.rows_path, "ab") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _differences(old, new, prefix=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip("."), old, new


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # workers of one sweep may write the same file at once
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> ArgumentParser:
    defaults = AttackConfig()
    p = ArgumentParser(prog="dlg_jax.sweep", description=__doc__.splitlines()[0])
    src = p.add_argument_group("private data (default: tfds cifar100 train)")
    src.add_argument("--indices", default="0:50", help="images to attack: START:STOP[:STEP], I,J,K or a mix (default 0:50)")
    src.add_argument("--data", default=None, help="local npz with images (uint8 NHWC/NHW), labels[, label_names]; replaces tfds")
    src.add_argument("--dataset", default="cifar100", choices=sorted(data_lib.TFDS_DATASETS),
                     help="tensorflow-datasets dataset (default cifar100)")
    src.add_argument("--split", default="train", help="tfds split (default train)")
    src.add_argument("--tfds-dir", default=None, help="tfds data_dir (default: tfds's, ~/tensorflow_datasets)")
    sw = p.add_argument_group("sweep")
    sw.add_argument("--seeds", default="1234", help="seeds of the dummy, as --indices (default 1234, dlg_jax.run's)")
    sw.add_argument("--restarts", type=positive_int, default=1,
                    help="random starts per (image, seed), run side by side; the lowest gradient distance is kept (default 1)")
    sw.add_argument("--batch", type=positive_int, default=64,
                    help="attacks (lanes) per compiled program, over all local devices (default 64)")
    sw.add_argument("--out", required=True, help="results directory; rerun the same command to resume")
    sw.add_argument("--batch-size", type=positive_int, default=1,
                    help="attack the mean gradient of N images: --indices taken N at a time, consecutive (default 1)")
    sw.add_argument("--engine", default="auto", choices=("auto", "flat", "vmap"),
                    help="flat: one evaluation per lane per loop trip; vmap: vmap of attack.advance (slower; the one that "
                         "runs --tv-weight); auto (default): flat unless --tv-weight asks for vmap")
    sw.add_argument("--distributed", action="store_true",
                    help="multi-host: jax.distributed.initialize() (auto-detected on TPU pods, SLURM; or the next flags)")
    sw.add_argument("--coordinator", default=None, help="with --distributed: coordinator address host:port")
    sw.add_argument("--num-processes", type=positive_int, default=None, help="with --distributed: number of hosts")
    sw.add_argument("--process-id", type=int, default=None, help="with --distributed: this host's id")
    sw.add_argument("--processes", type=positive_int, default=1,
                    help="CPU: run N processes, one per core, each with one device and its share of the attacks, "
                         "instead of one process with a device per core")
    sw.add_argument("--worker", default=None, type=lambda v: tuple(map(int, v.split("/"))),
                    help=argparse.SUPPRESS)  # K/N: worker K of --processes N, parsed to (K, N)
    sw.add_argument("--single-device", action="store_true",
                    help="on CPU, one JAX device for all cores (default: one device per core, lanes sharded over them)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    att = p.add_argument_group("attack (as dlg_jax.run)")
    att.add_argument("--label-strategy", default=defaults.label_strategy, choices=LABEL_STRATEGIES,
                     help="joint: optimise softmax(dummy logits) with the image; idlg: read the label off the gradient")
    att.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS,
                     help="lbfgs (default); torch-lbfgs is dlg_jax.run's only")
    att.add_argument("--steps", type=positive_int, default=defaults.steps, help=f"steps (default {defaults.steps})")
    att.add_argument("--iterations-per-step", type=positive_int, default=defaults.iterations_per_step,
                     help=f"LBFGS iterations per step (default {defaults.iterations_per_step})")
    att.add_argument("--precision", default=defaults.precision, choices=("float64", "float32"),
                     help=f"arithmetic of the attack (default {defaults.precision})")
    att.add_argument("--pixel-range", default=defaults.pixel_range, choices=PIXEL_RANGES,
                     help="free (default) or sigmoid: images = sigmoid(dummy), in (0, 1); an image prior for batches")
    att.add_argument("--tv-weight", type=non_negative_float, default=defaults.tv_weight,
                     help="total-variation prior weight, /10 per stage, 0 in the last (default 0; 1e-5 for batches)")
    att.add_argument("--tv-stages", type=positive_int, default=defaults.tv_stages,
                     help=f"stages of the TV weight (default {defaults.tv_stages})")
    att.add_argument("--model-seed", type=int, default=1234, help="seed of the U(-0.5,0.5) model weights (default 1234)")
    return p


def _config(args) -> AttackConfig:
    if args.optimizer != "lbfgs":
        raise UsageError(f"--optimizer {args.optimizer}: sweeps run jaxopt LBFGS; use dlg_jax.run for {args.optimizer}")
    if args.engine == "flat" and args.tv_weight > 0:
        raise UsageError("--tv-weight runs on --engine vmap (or auto), not flat")
    return run_lib.attack_config(args)


def _load(args, indices: list[int]) -> tuple[data_lib.Dataset, dict[int, int]]:
    """The dataset and, for each requested index, its position in the dataset's arrays."""
    if args.data:
        dataset = data_lib.load_npz(args.data)
        dataset.check_indices(indices)
        return dataset, {i: i for i in indices}
    dataset = data_lib.load_tfds(args.dataset, args.split, indices, args.tfds_dir)
    return dataset, {i: n for n, i in enumerate(indices)}


def _identity(args, dataset: data_lib.Dataset, config: AttackConfig) -> dict:
    """What the rows depend on: a rerun in the same DIR must match it (the work list may grow)."""
    source = str(Path(args.data).resolve()) if args.data else f"tfds {args.dataset}[{args.split}]"
    return dict(data=dict(source=source, image_shape=list(dataset.image_shape), num_classes=dataset.num_classes),
                attack=dataclasses.asdict(config), model_seed=args.model_seed, restarts=args.restarts,
                batch_size=args.batch_size)


def _hosts(args) -> tuple[int, int]:
    """(this host, hosts): jax.distributed when asked for, one of --processes for a worker, else (0, 1)."""
    if args.worker is not None:
        return args.worker
    if not args.distributed:
        if args.coordinator or args.num_processes or args.process_id is not None:
            raise UsageError("--coordinator/--num-processes/--process-id need --distributed")
        return 0, 1
    import jax

    options = {k: v for k, v in dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                      process_id=args.process_id).items() if v is not None}
    jax.distributed.initialize(**options)
    return jax.process_index(), jax.process_count()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if not args.single_device:
        from dlg_jax.batched import use_all_cpu_cores

        use_all_cpu_cores()
    try:
        config = _config(args)
        indices = parse_range(args.indices, "--indices")
        seeds = parse_range(args.seeds, "--seeds")
        bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
        if bad:
            raise UsageError(f"--seeds: {bad[0]} is out of range (0..{MAX_SEED})")
        if len(indices) < args.batch_size:
            raise UsageError(f"--indices: {len(indices)} image(s), fewer than --batch-size {args.batch_size}")
        dataset, position = _load(args, indices)
        if args.processes > 1 and args.worker is None:
            if args.distributed:
                raise UsageError("--processes and --distributed: choose one")
            results = ResultsDir(Path(args.out), _identity(args, dataset, config))  # refuses another configuration
            total = len(indices) // args.batch_size * len(seeds)
            return _launch(args, list(sys.argv[1:] if argv is None else argv), prog, results, total)
        host, hosts = _hosts(args)
        results = ResultsDir(Path(args.out), _identity(args, dataset, config), host, hosts)
        n = args.batch_size  # a batch is named by its first index
        members = {indices[k]: indices[k:k + n] for k in range(0, len(indices) - n + 1, n)}
        share = [(i, s) for i in members for s in seeds][host::hosts]  # fixed before looking at DIR: hosts agree
        done = {(r["index"], r["seed"]) for r in results.rows()}
        pending = [task for task in share if task not in done]
        enable_compilation_cache()
        runner = Sweep(dataset.num_classes, dataset.image_shape, config, restarts=args.restarts,
                       model_seed=args.model_seed, engine=args.engine, batch_size=n)
        if pending:
            runner.compile(runner.lanes_for(len(pending), args.batch))  # refuses a batch too large, before DIR
        results.open()
        done = {(r["index"], r["seed"]) for r in results.rows()}  # another sweep may have finished some meanwhile
        pending = [(i, s) for i, s in pending if (i, s) not in done]
        _run(args, runner, dataset, position, members, pending, results)
    except UsageError as error:
        return fail(prog, error)
    with contextlib.suppress(Exception):
        if hosts > 1 and args.distributed:  # let every host finish its rows before host 0 writes the summary
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dlg_jax.sweep done")
    if host == 0 and args.worker is None:  # --processes: the launcher summarises
        _summarise(results)
    return 0


def _summarise(results: "ResultsDir") -> None:
    rows = results.rows()
    # one file per host or worker, side by side: the slowest sets the pace (one file: its rows' sum)
    summary = report.write(results.path, rows, results.identity,
                           attack_seconds=max(results.seconds_by_file().values(), default=None))
    if rows:
        print(f"{summary['rows']} attacks in {results.path}: {summary['successes']} at PSNR >= "
              f"{report.SUCCESS_DB:.0f} dB ({100 * summary['success_rate']:.1f}%), median PSNR "
              f"{summary['median_psnr']:.2f} dB, labels {100 * summary['label_accuracy']:.1f}% right, "
              f"{summary['attacks_per_hour']:.0f} attacks/hour")


def _launch(args, argv: list[str], prog: str, results: "ResultsDir", total: int) -> int:
    """--processes N: this command N times as workers, each pinned to one core with one CPU device and taking every
    N-th attack (the host partition of --distributed, without jax.distributed), then one summary of all rows.

    Why: XLA runs the small operations of an attack on one thread, so a core needs a device (or a process) of its
    own. Two devices in one process now get 1.9x from the second core, two processes 2x
    (experiments/results/bench_sweep.md); the processes share nothing at run time. Bad input was refused before
    this (`main`); resuming, refusals and row files (results.pK.jsonl) are the workers' as for --distributed.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1".strip()}
    workers, logs = [], []
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [w.kill() for w in workers if w.poll() is None])  # on any exit, no orphans
        for k in range(args.processes):
            logs.append(stack.enter_context(tempfile.TemporaryFile("w+")))
            core = cores[k % len(cores)]
            pin = (lambda: os.sched_setaffinity(0, {core})) if hasattr(os, "sched_setaffinity") else None
            command = [sys.executable, "-m", "dlg_jax.sweep", *argv, "--worker", f"{k}/{args.processes}", "--quiet"]
            workers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=logs[-1], preexec_fn=pin))
        from tqdm import tqdm

        with tqdm(total=total, unit="attack", desc="sweep", disable=args.quiet, dynamic_ncols=True) as bar:
            while any(w.poll() is None for w in workers):
                time.sleep(1.0)
                if results.path.exists():
                    bar.update(len(results.rows()) - bar.n)
            bar.update(len(results.rows()) - bar.n)
        for w, log in zip(workers, logs):
            if w.returncode != 0:
                log.seek(0)
                lines = [line for line in log.read().splitlines() if line.strip()]
                print(lines[-1] if lines else f"{prog}: a worker failed (exit {w.returncode})", file=sys.stderr)
                return 2 if w.returncode == 2 else 1
    _summarise(results)
    return 0


def _run(args, runner: Sweep, dataset: data_lib.Dataset, position: dict[int, int], members: dict[int, list[int]],
         pending, results: ResultsDir):
    """Attack the pending (index, seed) pairs (index: a batch's first), appending each chunk's rows as it finishes.

    A row has the keys of `dlg_jax.run`'s result.json (a batch's: per-image rows, means, label accuracy) plus
    seed, restarts, restart and restart_distances; the saved truth and reconstruction are in matched order.
    """
    if not pending:
        return
    from tqdm import tqdm

    batched = runner.batch_size > 1
    tasks = [Task(tuple(position[m] for m in members[i]) if batched else position[i], s) for i, s in pending]
    key_of = dict(zip(tasks, pending))
    keys = ("grad_distance", "steps", "iterations", "evaluations", "seconds", "compile_seconds", "status", "attempts",
            "restart", "restart_distances")

    def save(outcomes: list[dict]) -> None:
        rows, images = [], {}
        for o, (index, seed) in ((o, key_of[o["task"]]) for o in outcomes):
            truth = dataset.images[o["task"].positions]
            reconstruction = o["reconstruction"] if batched else o["reconstruction"][None]
            row, order = run_lib.judge(truth / 255.0, reconstruction, o["label_pred"], o["label_true"], members[index],
                                       dataset.label_names)
            rows.append(dict(row, index=index, seed=seed, restarts=runner.restarts, **{k: o[k] for k in keys}))
            images[(index, seed)] = (truth if batched else truth[0], reconstruction[order] if batched else o["reconstruction"])
        results.append(rows, images)

    with tqdm(total=len(tasks), unit="attack", desc="sweep", disable=args.quiet, dynamic_ncols=True,
              smoothing=0.05) as bar:
        def progress(finished: int, live: int) -> None:
            bar.set_postfix(lanes=live, refresh=False)
            bar.update(finished)

        runner.run(dataset.images, dataset.labels, tasks, batch=args.batch, on_results=save, progress=progress)


if __name__ == "__main__":
    sys.exit(main())
