"""Cost of one loop trip of the sweep engine per lane, in steady state, and (--profile) where it goes, op by op.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 taskset -c 0 \\
        python experiments/bench_engine_trip.py [--lanes 32] [--warmup-trips 900] [--trips 128] [--repeats 6]
                                                [--all-lanes] [--devices 1] [--profile]

A lane's trip evaluates D and its gradient once and, when its line search accepts a step, computes the next
L-BFGS direction, so milliseconds per lane-trip = the engine's cost per evaluation. The lanes attack CIFAR-100
image n % 50 from seed n with the default attack settings; after --warmup-trips (past the long line searches
of the first iterations) --repeats engine calls of --trips trips per lane are timed (min and median). On CPU
each call copies every lane's state (2.5 MB of history) out and back once, so --trips sets how far that is
amortised; a sweep asks for at least 128 (`dlg_jax.engine.lanes.Engine.min_chunk_trips`). --all-lanes runs the
accelerator path instead (every lane's trip at once, vmapped: `Sweep(..., lane_by_lane=False)`). Pin the process
to one core with one CPU device (as above) so that the number is one core's; --devices 2 (with the device count
flag at 2, not pinned) measures both cores.

--profile traces --trips more trips with `jax.profiler` and prints the operations of the compiled loop that
take the most time per trip (with the JAX operation they come from, from the HLO metadata) and the time by
kind: the objective (ops under the model), the history reads and writes of the L-BFGS direction
(dynamic_slice / dynamic_update_slice), and the rest.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared/data/cifar100_train_0-49.npz"


def op_times(trace_dir: str, hlo_text: str, trips: int) -> list[tuple[float, str, str]]:
    """(microseconds per trip, op name, JAX op_name) of every XLA operation in the profiler trace."""
    origin = dict(re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]+)"', hlo_text))
    known = set(re.findall(r"%([\w.\-]+) = ", hlo_text))
    trace = json.load(gzip.open(next(Path(trace_dir).rglob("*.trace.json.gz"))))
    total = collections.Counter()
    for event in trace["traceEvents"]:
        if event.get("ph") == "X" and event["name"] in known and not event["name"].startswith("while"):
            total[event["name"]] += event["dur"] / trips
    return sorted(((us, name, origin.get(name, "")) for name, us in total.items()), reverse=True)


def kind(jax_op: str) -> str:
    if "LeNet" in jax_op or "jvp(" in jax_op:
        return "objective (D and its gradient)"
    if "dynamic_index_in_dim" in jax_op or "dynamic_update_index_in_dim" in jax_op:
        return "lane reads / writes (dynamic slices)"
    return "rest (direction products, line search, bookkeeping; unlabelled ops)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lanes", type=int, default=32)
    p.add_argument("--warmup-trips", type=int, default=900)
    p.add_argument("--trips", type=int, default=128)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--all-lanes", action="store_true",
                   help="every lane takes its trip at once, vmapped (the accelerator path) instead of lane by lane")
    p.add_argument("--devices", type=int, default=1, help="CPU devices to shard the lanes over (default 1)")
    p.add_argument("--data", default=str(DATA))
    args = p.parse_args(argv)
    if min(args.lanes, args.trips, args.repeats) <= 0 or args.warmup_trips < 0:
        p.error("--lanes, --trips and --repeats must be positive, --warmup-trips >= 0")

    import jax

    from dlg_jax.config import get_config
    from dlg_jax.engine.attack import make_case, precision_scope
    from dlg_jax.engine.scheduler import Sweep, Task

    with np.load(args.data) as npz:
        images, labels = npz["images"], npz["labels"].astype(np.int32)
    tasks = [Task((n % len(images),), n) for n in range(args.lanes)]
    config = get_config("dlg")
    with precision_scope(config):
        case = make_case("lenet", 100, (32, 32, 3), 1234, config.dtype)
    sweep = Sweep(case, config, devices=jax.devices()[:args.devices], lane_by_lane=False if args.all_lanes else None)
    programs = sweep.compile(sweep.lanes_for(len(tasks), args.lanes))
    engine = sweep.engine
    chosen = [t.positions[0] for t in tasks]
    with precision_scope(config):
        lanes = programs["blank"]()
        lanes = engine.fill(programs, lanes, np.ones(args.lanes, bool), images[chosen][:, None], labels[chosen][:, None],
                            np.arange(args.lanes, dtype=np.int32), np.zeros(args.lanes, np.int32))
        lanes, _ = jax.block_until_ready(engine.run(programs, lanes, args.warmup_trips, 1))
        per_lane_trip = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            lanes, _ = jax.block_until_ready(engine.run(programs, lanes, args.trips, 1))
            per_lane_trip.append((time.perf_counter() - start) / args.trips / args.lanes * 1e3)
        live = int(np.sum(engine.harvest(programs, lanes)["live"]))
        print(f"{jax.devices()[0].device_kind}: {args.lanes} lanes ({live} still running), ms per lane-trip "
              f"min {min(per_lane_trip):.3f} median {statistics.median(per_lane_trip):.3f}")
        if args.profile:
            with tempfile.TemporaryDirectory() as trace_dir:
                with jax.profiler.trace(trace_dir):
                    lanes, _ = jax.block_until_ready(engine.run(programs, lanes, args.trips, 1))
                ops = op_times(trace_dir, programs["run"].as_text(), args.trips)
            print("\n| us per trip | XLA op | from |\n|---|---|---|")
            for us, name, origin in ops[:25]:
                print(f"| {us:.0f} | {name} | {origin[-90:]} |")
            kinds = collections.Counter()
            for us, _, origin in ops:
                kinds[kind(origin)] += us
            print("\n| us per trip | kind |\n|---|---|")
            for name, us in kinds.most_common():
                print(f"| {us:.0f} | {name} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
