"""Cost per attack of a sweep at batch B = 1, 4, 16, 64 for a fixed iteration budget, by engine.

    python experiments/bench_sweep.py [--batches 1 4 16 64] [--iterations 40] [--attacks-per-lane 2]
                                      [--engines sequential flat flat-1dev lane-by-lane vmap] [--precision float32]
                                      [--repeats 2]
    python experiments/bench_sweep.py --sweep [--indices 0:50] [--seed 1234] [--batches 64] [--engines flat]

Every attack runs exactly --iterations LBFGS iterations (tolerance 0 and no retries, so none stops early;
one that diverges stops, as it would in a sweep; the evaluation budget is lifted to --max-linesearch-steps + 1
per iteration so that it never ends an attack first) on CIFAR-100 image n % 50 from seed n. Engines:

  sequential    `dlg_jax.engine.single.attack_one`, one attack after another (what `dlg_jax.run` does): the
                reference (each call compiles its one-lane program; the persistent compilation cache serves all
                but the first, and the times exclude it)
  flat          dlg_jax.sweep's engine (`dlg_jax.engine.scheduler.Sweep`), lanes sharded over one CPU device
                per core, each lane's trips the platform's way (lane by lane on CPU, all at once elsewhere)
  flat-1dev     the same on a single CPU device: what batching alone gives, without the second core
  lane-by-lane  the engine with `lane_by_lane=True`: each lane takes its trips alone, lane after lane
  vmap          the engine with `lane_by_lane=False`: every lane's trip at once, vmapped (the accelerator path)

B lanes attack B x --attacks-per-lane tasks, so lanes are refilled as in a real sweep (1 is the worst case:
the slowest attack of the batch sets the time). B below the device count uses B devices. The sequential
reference attacks the whole task list one by one and each B is compared with the same tasks run alone
(their mean seconds). Printed per (engine, B): seconds per attack (min and median over repeats; compilation
excluded; for sequential the mean over tasks), its ratio to sequential, milliseconds per
evaluation (time / evaluations the attacks needed; normalises for the tasks' different line-search costs)
and its ratio, evaluations per iteration, lane use (evaluations needed / lane-trips of the vmapped
trip: idle lanes are skipped, so this is occupancy, not waste; "-" lane by lane, where lanes take their trips
one after another and a finished lane takes none), MFLOP per evaluation (XLA cost analysis of the objective and
its gradient: `jit(value_and_grad(attack.objective)).lower(...).compile().cost_analysis()['flops']`) and
achieved GFLOP/s (evaluations x FLOPs / time).

--sweep times the 50-image sweep instead, `python -m dlg_jax.sweep --indices 0:50 --lanes B` with the default
attack (preset dlg: 300 steps, convergence, retries), every image of --indices from --seed once, to the end;
each B of --batches is a lane count. Printed per (engine, B): attacks, >= 30 dB, median PSNR, attack seconds
(min and median over repeats; compilation excluded), attacks per hour (from the min), the ratio to sequential,
ms per evaluation, evaluations per iteration and GFLOP/s.
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


ENGINES = ("sequential", "flat", "flat-1dev", "lane-by-lane", "vmap")
LANE_BY_LANE = {"flat": None, "flat-1dev": None, "lane-by-lane": True, "vmap": False}  # None: the platform's way
SUCCESS_DB = 30.0


def make_lenet(config):
    """The attacked case of every benchmark: LeNet for CIFAR-100 with dlg_jax.run's weights (model seed 1234)."""
    from dlg_jax.engine.attack import make_case, precision_scope

    with precision_scope(config):
        return make_case("lenet", 100, (32, 32, 3), 1234, config.dtype)


def flops_per_evaluation(case, config) -> float:
    """XLA's FLOP count of one evaluation of D and its gradient (the unbatched program every engine runs)."""
    import jax
    import jax.numpy as jnp

    from dlg_jax.engine.attack import make_attack, make_problem, precision_scope

    with precision_scope(config):
        attack = make_attack(case, config, batch_size=1)
        problem = jax.eval_shape(lambda: make_problem(attack, jnp.zeros((1, 32, 32, 3), config.dtype),
                                                      jnp.zeros((1,), jnp.int32), 0))
        prior = jax.ShapeDtypeStruct((), config.dtype)
        compiled = jax.jit(jax.value_and_grad(attack.objective)).lower(problem.init, prior, problem,
                                                                       case.params).compile()
        return float(compiled.cost_analysis()["flops"])


def time_sequential(case, config, images, labels, tasks) -> tuple[list[float], list[int], list]:
    """Seconds and evaluations of each of `tasks`, attacked one after another with `attack_one`; and the outcomes."""
    from dlg_jax.engine.single import attack_one

    seconds, evaluations, outcomes = [], [], []
    for t in tasks:
        positions = list(t.positions)
        outcome, _ = attack_one(case, config, images[positions], labels[positions], t.seed,
                                snapshot_every=config.rules.steps)  # no stops along the way
        seconds.append(outcome.seconds)
        evaluations.append(outcome.evaluations)
        outcomes.append(outcome)
    return seconds, evaluations, outcomes


def time_sweep(case, config, engine: str, batch: int, images, labels, tasks, repeats: int):
    """Seconds per attack over repeats, evaluations and lane-trips of a Sweep; and the last repeat's outcomes."""
    import jax

    from dlg_jax.engine.scheduler import Sweep

    devices = jax.devices()[:1] if engine == "flat-1dev" else jax.devices()[:batch]
    sweep = Sweep(case, config, devices=devices, lane_by_lane=LANE_BY_LANE[engine])
    lanes = sweep.lanes_for(len(tasks), batch)
    sweep.compile(lanes)
    run, trips = sweep.engine.run, []

    def counting_run(*args, **kwargs):  # count the loop trips of the engine (lane-trips = trips x lanes)
        state, done = run(*args, **kwargs)
        trips.append(int(np.max(done)))
        return state, done

    sweep.engine.run = counting_run
    times = []
    for _ in range(repeats):
        trips.clear()
        start = time.perf_counter()
        outcomes = sweep.run(images, labels, tasks, lanes=batch)
        times.append((time.perf_counter() - start) / len(tasks))
    evaluations = sum(o.evaluations for o in outcomes)
    lane_trips = None if sweep.engine.lane_by_lane else sum(trips) * lanes  # lanes never idle
    return times, evaluations, lane_trips, len(devices), outcomes


def judged(images, tasks, outcomes) -> tuple[int, float]:
    """(attacks at >= 30 dB, median PSNR) of the one-image outcomes of `tasks` (an outcome of `attack_one` numbers
    its images from 0, so the task list says which they were)."""
    from dlg_jax.results.metrics import image_metrics

    psnr = [float(image_metrics(images[list(t.positions)] / 255.0, o.reconstruction)["psnr"][0])
            for t, o in zip(tasks, outcomes)]
    return sum(p >= SUCCESS_DB for p in psnr), float(np.median(psnr))


def iterations_of(outcomes) -> int:
    return sum(o.iterations for o in outcomes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="lanes B (default 1 4 16 64; with --sweep 64)")
    p.add_argument("--iterations", type=int, default=40, help="LBFGS iterations of every attack (default 40)")
    p.add_argument("--attacks-per-lane", type=int, default=2, help="attacks = B x this (default 2)")
    p.add_argument("--sequential-repeats", type=int, default=1, help="repeats of the sequential reference (default 1)")
    p.add_argument("--sequential-tasks", type=int, default=None,
                   help="run the sequential reference on the first N tasks only (default: all; for accelerators, "
                        "where one attack at a time is slow); ratios then use their mean")
    p.add_argument("--engines", nargs="+", default=["sequential", "flat"], choices=ENGINES)
    p.add_argument("--vmap-max-batch", type=int, default=4,
                   help="skip the vmap engine (every lane's trip at once: slow on CPU) above this B")
    p.add_argument("--precision", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sweep", action="store_true",
                   help="time the 50-image sweep (default attack, to the end) instead of a fixed iteration budget")
    p.add_argument("--indices", default="0:50", help="with --sweep: the images (default 0:50)")
    p.add_argument("--seed", type=int, default=1234, help="with --sweep: the seed of every attack (default 1234)")
    p.add_argument("--data", default=str(DATA))
    args = p.parse_args(argv)
    batches = args.batches or ([64] if args.sweep else [1, 4, 16, 64])
    if min(batches) <= 0 or args.iterations <= 0 or args.attacks_per_lane <= 0 or args.repeats <= 0:
        p.error("--batches, --iterations, --attacks-per-lane and --repeats must be positive")

    from dlg_jax.engine.devices import use_all_cpu_cores

    use_all_cpu_cores()  # one CPU device per core (the sequential reference uses one)
    import jax

    from dlg_jax.cli.common import enable_compilation_cache
    from dlg_jax.config import get_config
    from dlg_jax.engine.scheduler import Task
    from dlg_jax.ranges import parse_range

    enable_compilation_cache()  # attack_one compiles per attack: the sequential reference's second one on is a hit
    with np.load(args.data) as npz:
        images, labels = npz["images"], npz["labels"].astype(np.int32)
    if args.sweep:
        config = get_config("dlg").override(precision=args.precision)
        task_list = [Task((i,), args.seed) for i in parse_range(args.indices, "--indices")]
        if max(t.positions[0] for t in task_list) >= len(images):
            p.error(f"--indices: {args.data} holds {len(images)} images")
    else:
        config = get_config("dlg").override(
            steps=args.iterations, iterations_per_step=1, tolerance=0.0, retries=0, precision=args.precision)
        config = config.override(evaluations_per_step=config.solver.max_linesearch_steps + 1)  # never the limit
        task_list = [Task((n % len(images),), n) for n in range(max(batches) * args.attacks_per_lane)]
    case = make_lenet(config)
    flops = flops_per_evaluation(case, config)
    if args.sweep:
        return sweep_table(args, case, config, batches, images, labels, task_list, flops)
    print(f"{len(jax.devices())} x {jax.devices()[0].device_kind}; {args.precision}; {args.iterations} iterations per attack; "
          f"{args.attacks_per_lane} attacks per lane; {flops / 1e6:.2f} MFLOP per evaluation", flush=True)
    print("| engine | B | devices | attacks | s/attack min | s/attack median | vs sequential | ms/eval "
          "| vs sequential (per eval) | evals/iter | lane use | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    sequential = None
    if "sequential" in args.engines:  # the same tasks, one by one: per-task seconds (min over repeats)
        runs = [time_sequential(case, config, images, labels, task_list[:args.sequential_tasks])
                for _ in range(args.sequential_repeats)]
        sequential = (np.min([r[0] for r in runs], axis=0), np.asarray(runs[-1][1]))
        seconds, evaluations = sequential
        print(f"| sequential | 1 | 1 | {len(seconds)} | {seconds.mean():.3f} | - | 1.00 | "
              f"{seconds.sum() / evaluations.sum() * 1e3:.3f} | 1.00 | "
              f"{evaluations.mean() / args.iterations:.2f} | 1.00 | {flops * evaluations.sum() / seconds.sum() / 1e9:.1f} |",
              flush=True)
    for engine in [e for e in args.engines if e != "sequential"]:
        for batch in batches:
            if engine == "vmap" and batch > args.vmap_max_batch:
                continue
            tasks = task_list[:batch * args.attacks_per_lane]
            times, evaluations, lane_trips, devices, _ = time_sweep(case, config, engine, batch, images, labels, tasks,
                                                                    args.repeats)
            per_eval = min(times) * len(tasks) / evaluations
            ratio = ratio_eval = "-"
            if sequential is not None:  # against the same attacks run one by one
                ref_seconds, ref_evaluations = sequential[0][:len(tasks)], sequential[1][:len(tasks)]
                ratio = f"{min(times) / ref_seconds.mean():.2f}"
                ratio_eval = f"{per_eval / (ref_seconds.sum() / ref_evaluations.sum()):.2f}"
            use = f"{evaluations / lane_trips:.2f}" if lane_trips else "-"
            print(f"| {engine} | {batch} | {devices} | {len(tasks)} | {min(times):.3f} | {statistics.median(times):.3f} "
                  f"| {ratio} | {per_eval * 1e3:.3f} | {ratio_eval} | {evaluations / len(tasks) / args.iterations:.2f} "
                  f"| {use} | {flops / per_eval / 1e9:.1f} |", flush=True)
    return 0


def sweep_table(args, case, config, batches, images, labels, tasks, flops) -> int:
    """--sweep: every task to the end, per (engine, lanes); seconds are the whole sweep's (compilation excluded)."""
    import jax

    print(f"{len(jax.devices())} x {jax.devices()[0].device_kind}; {args.precision}; {len(tasks)} attacks (preset dlg, "
          f"{config.rules.steps} steps, seed {args.seed}); {flops / 1e6:.2f} MFLOP per evaluation", flush=True)
    print(f"| engine | lanes | devices | attacks | >= {SUCCESS_DB:.0f} dB | median PSNR | attack s min "
          "| attack s median | attacks/hour | vs sequential | ms/eval | evals/iter | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    reference = None
    if "sequential" in args.engines:
        runs = [time_sequential(case, config, images, labels, tasks) for _ in range(args.sequential_repeats)]
        totals = [sum(r[0]) for r in runs]
        outcomes = runs[-1][2]
        reference = min(totals)
        evaluations = sum(o.evaluations for o in outcomes)
        hits, median = judged(images, tasks, outcomes)
        print(f"| sequential | 1 | 1 | {len(tasks)} | {hits}/{len(tasks)} | {median:.2f} | {min(totals):.1f} | "
              f"{statistics.median(totals):.1f} | {len(tasks) / min(totals) * 3600:,.0f} | 1.00 | "
              f"{min(totals) / evaluations * 1e3:.3f} | {evaluations / iterations_of(outcomes):.2f} | "
              f"{flops * evaluations / min(totals) / 1e9:.1f} |", flush=True)
    for engine in [e for e in args.engines if e != "sequential"]:
        for batch in batches:
            if engine == "vmap" and batch > args.vmap_max_batch:
                continue
            times, evaluations, _, devices, outcomes = time_sweep(case, config, engine, batch, images, labels, tasks,
                                                                  args.repeats)
            totals = [t * len(tasks) for t in times]
            hits, median = judged(images, tasks, outcomes)
            ratio = f"{min(totals) / reference:.2f}" if reference else "-"
            print(f"| {engine} | {batch} | {devices} | {len(tasks)} | {hits}/{len(tasks)} | {median:.2f} | "
                  f"{min(totals):.1f} | {statistics.median(totals):.1f} | {len(tasks) / min(totals) * 3600:,.0f} | "
                  f"{ratio} | {min(totals) / evaluations * 1e3:.3f} | {evaluations / iterations_of(outcomes):.2f} | "
                  f"{flops * evaluations / min(totals) / 1e9:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
