"""Cost per attack of a sweep at batch B = 1, 4, 16, 64 for a fixed iteration budget, by engine.

    python experiments/bench_sweep.py [--batches 1 4 16 64] [--iterations 40] [--attacks-per-lane 2]
                                      [--engines sequential flat flat-1dev vmap] [--precision float32] [--repeats 2]

Every attack runs exactly --iterations LBFGS iterations (tolerance 0 and no retries, so none stops early;
one that diverges stops, as it would in a sweep) on CIFAR-100 image n % 50 from seed n. Engines:

  sequential  attack.Attack, one attack after another (what `dlg_jax.run` does): the reference
  flat        dlg_jax.sweep's engine (dlg_jax/batched.py), lanes sharded over one CPU device per core
  flat-1dev   the same on a single CPU device: what batching alone gives, without the second core
  vmap        jax.vmap of attack.advance/retry (the first prototype), one device per core

B lanes attack B x --attacks-per-lane tasks, so lanes are refilled as in a real sweep (1 is the worst case:
the slowest attack of the batch sets the time). B below the device count uses B devices. The sequential
reference attacks the whole task list one by one and each B is compared with the same tasks run alone
(their mean seconds). Printed per (engine, B): seconds per attack (min and median over repeats; compilation
excluded; for sequential the mean over tasks), its ratio to sequential, milliseconds per
evaluation (time / evaluations the attacks needed; normalises for the tasks' different line-search costs)
and its ratio, evaluations per iteration, lane use (evaluations needed / lane-trips of the vmapped
trip: idle lanes are skipped, so this is occupancy, not waste; "-" on CPU, where lanes take their trips one
after another and a finished lane takes none), MFLOP per evaluation (XLA cost analysis of the objective and its gradient:
`jit(value_and_grad).lower(...).compile().cost_analysis()['flops']`) and achieved GFLOP/s (evaluations x
FLOPs / time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared/data/cifar100_train_0-49.npz"


def flops_per_evaluation(config) -> float:
    """XLA's FLOP count of one evaluation of D and its gradient (the unbatched program every engine runs)."""
    import jax

    from dlg_jax.sweep import Sweep

    sweep = Sweep(100, (32, 32, 3), config, devices=jax.devices()[:1])
    engine = sweep.engine
    with sweep.scope():
        lane = jax.eval_shape(lambda: jax.tree.map(lambda a: a[0], engine._blank(1)))
        compiled = jax.jit(jax.value_and_grad(engine.solver.fun)).lower(
            lane.init, engine.params, lane.shared_grads, lane.known_labels).compile()
        return float(compiled.cost_analysis()["flops"])


def time_sequential(config, images, labels, tasks) -> tuple[list[float], list[int]]:
    """Seconds and evaluations of each of `tasks`, attacked one after another with attack.Attack."""
    import jax
    import jax.numpy as jnp

    from dlg_jax.attack import Attack, make_problem, precision_scope
    from dlg_jax.models import LeNet, init_params

    model = LeNet(100)
    with precision_scope(config):
        params = jax.tree.map(lambda p: jnp.asarray(p, config.dtype), init_params(model, 1234, (32, 32, 3)))
        apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
        problems = [make_problem(apply_fn, params, jnp.asarray(images[t.image:t.image + 1], config.dtype) / 255.0,
                                 jnp.asarray(labels[t.image:t.image + 1]), 100, config, t.seed) for t in tasks]
        attack = Attack(apply_fn, config)
        attack.compile(problems[0])
        seconds, evaluations = [], []
        for problem in problems:
            start = time.perf_counter()
            state = jax.block_until_ready(attack.advance(attack.init(problem), problem, config.steps))
            seconds.append(time.perf_counter() - start)
            evaluations.append(int(state.evaluations))
        return seconds, evaluations


def time_sweep(config, engine: str, batch: int, images, labels, tasks, repeats: int):
    """Seconds per attack over repeats, evaluations and lane-trips of a Sweep."""
    import jax

    from dlg_jax.sweep import Sweep

    devices = jax.devices()[:1] if engine == "flat-1dev" else jax.devices()[:batch]
    sweep = Sweep(100, (32, 32, 3), config, engine="vmap" if engine == "vmap" else "flat", devices=devices)
    lanes = sweep.lanes_for(len(tasks), batch)
    sweep.compile(lanes)
    run, trips = sweep.engine.run, []

    def counting_run(*args, **kwargs):  # count the loop trips of the flat engine (lane-trips = trips x lanes)
        state, done = run(*args, **kwargs)
        trips.append(int(np.max(done)))
        return state, done

    sweep.engine.run = counting_run
    times = []
    for _ in range(repeats):
        trips.clear()
        start = time.perf_counter()
        outcomes = sweep.run(images, labels, tasks, batch=batch)
        times.append((time.perf_counter() - start) / len(tasks))
    evaluations = sum(o["evaluations"] for o in outcomes)
    lane_trips = None if sweep.engine.lane_by_lane else sum(trips) * lanes  # lanes never idle
    return times, evaluations, lane_trips, len(devices)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--iterations", type=int, default=40, help="LBFGS iterations of every attack (default 40)")
    p.add_argument("--attacks-per-lane", type=int, default=2, help="attacks = B x this (default 2)")
    p.add_argument("--sequential-repeats", type=int, default=1, help="repeats of the sequential reference (default 1)")
    p.add_argument("--sequential-tasks", type=int, default=None,
                   help="run the sequential reference on the first N tasks only (default: all; for accelerators, "
                        "where one attack at a time is slow); ratios then use their mean")
    p.add_argument("--engines", nargs="+", default=["sequential", "flat"],
                   choices=["sequential", "flat", "flat-1dev", "vmap"])
    p.add_argument("--vmap-max-batch", type=int, default=4, help="skip the (slow) vmap engine above this B")
    p.add_argument("--precision", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data", default=str(DATA))
    args = p.parse_args(argv)

    from dlg_jax.batched import use_all_cpu_cores

    use_all_cpu_cores()  # one CPU device per core (the sequential reference uses one)
    import jax

    from dlg_jax.attack import AttackConfig
    from dlg_jax.sweep import Task

    with np.load(args.data) as npz:
        images, labels = npz["images"], npz["labels"].astype(np.int32)
    config = AttackConfig(steps=args.iterations, iterations_per_step=1, tolerance=0.0, retries=0,
                          precision=args.precision)
    task_list = [Task(n % len(images), n) for n in range(max(args.batches) * args.attacks_per_lane)]
    flops = flops_per_evaluation(config)
    print(f"{len(jax.devices())} x {jax.devices()[0].device_kind}; {args.precision}; {args.iterations} iterations per attack; "
          f"{args.attacks_per_lane} attacks per lane; {flops / 1e6:.2f} MFLOP per evaluation", flush=True)
    print("| engine | B | devices | attacks | s/attack min | s/attack median | vs sequential | ms/eval "
          "| vs sequential (per eval) | evals/iter | lane use | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    sequential = None
    if "sequential" in args.engines:  # the same tasks, one by one: per-task seconds (min over repeats)
        runs = [time_sequential(config, images, labels, task_list[:args.sequential_tasks])
                for _ in range(args.sequential_repeats)]
        sequential = (np.min([r[0] for r in runs], axis=0), np.asarray(runs[-1][1]))
        seconds, evaluations = sequential
        print(f"| sequential | 1 | 1 | {len(seconds)} | {seconds.mean():.3f} | - | 1.00 | "
              f"{seconds.sum() / evaluations.sum() * 1e3:.3f} | 1.00 | "
              f"{evaluations.mean() / args.iterations:.2f} | 1.00 | {flops * evaluations.sum() / seconds.sum() / 1e9:.1f} |",
              flush=True)
    for engine in [e for e in args.engines if e != "sequential"]:
        for batch in args.batches:
            if engine == "vmap" and batch > args.vmap_max_batch:
                continue
            tasks = task_list[:batch * args.attacks_per_lane]
            times, evaluations, lane_trips, devices = time_sweep(config, engine, batch, images, labels, tasks,
                                                                 args.repeats)
            per_eval = min(times) * len(tasks) / evaluations
            ratio = ratio_eval = "-"
            if sequential is not None:  # against the same attacks run one by one
                ref_seconds, ref_evaluations = sequential[0][:len(tasks)], sequential[1][:len(tasks)]
                ratio = f"{min(times) / ref_seconds.mean():.2f}"
                ratio_eval = f"{per_eval / (ref_seconds.sum() / ref_evaluations.sum()):.2f}"
            use = f"{evaluations / lane_trips:.2f}" if engine != "vmap" and lane_trips else "-"
            print(f"| {engine} | {batch} | {devices} | {len(tasks)} | {min(times):.3f} | {statistics.median(times):.3f} "
                  f"| {ratio} | {per_eval * 1e3:.3f} | {ratio_eval} | {evaluations / len(tasks) / args.iterations:.2f} "
                  f"| {use} | {flops / per_eval / 1e9:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
