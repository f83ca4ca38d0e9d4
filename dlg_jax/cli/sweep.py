"""Sweeps: thousands of DLG reconstructions per compiled program, sharded over every device, resumable.

    python -m dlg_jax.sweep --data FILE.npz --indices 0:50 --seeds 0:4 --restarts 1 --lanes 64 --out DIR

Every (index, seed) is one attack on one image, set up exactly as `python -m dlg_jax.run --index I --seed S`
sets it up. `--restarts K` runs K random starts of it side by side and keeps the one with the lowest gradient
distance (what an attacker can see; the ground truth plays no part in the choice). The attacks run `--lanes`
at a time in one compiled program (dlg_jax/engine: why and how it is fast), its lanes sharded over all local
devices; lanes whose attack has finished are refilled at once, so stragglers do not hold a batch.

DIR gets, as attacks finish, results.jsonl (one row per (index, seed): the keys of dlg_jax.run's result.json plus
seed, restarts, restart and restart_distances), reconstructions/INDEX-SEED.npz and config.json; at the end
summary.json, summary.md, psnr_histogram.png and worst.png (the lowest-PSNR reconstructions).

Rerunning the same command continues where it stopped, after a crash or `kill -9` too: rows already in DIR are
skipped, a truncated last line is dropped. New indices or seeds extend the sweep; different attack settings
are refused (use another DIR). With --distributed, every host of a multi-host job (jax.distributed) takes its
share of the attacks and appends its own rows to results.pN.jsonl in the shared DIR.
On CPU, --processes N runs N such workers on this machine, one pinned to each core (faster than one process
with a device per core: experiments/results/bench_sweep.md).

`--defense prune:0.01,0.1,0.2` (repeatable, applied in order; dlg_jax/defenses.py) attacks a defended client:
each strength (each combination, for several defenses) is a setting with its own DIR/<setting>, e.g.
DIR/prune=0.1, and all run in one compiled program, a task's strengths a per-lane value. Rows carry
defense, defenses (name, strength) and epsilon (DP-SGD: RDP accountant, the run of --dp-steps/--dp-rate/
--dp-delta); DIR/summary.md has one line per setting.

With a text model (`--model bert`, gpt, ...) the sweep runs text attacks over sentences x seeds instead
(dlg_jax/cli/text_sweep.py): `--indices` picks pydoc_data samples of `--length` tokens or the lines of
`--data FILE.txt`; rows carry token accuracy and ROUGE.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from pathlib import Path
from typing import Sequence

from dlg_jax import data as data_lib
from dlg_jax.cli.common import (ArgumentParser, add_attack_flags, add_defense_flags, attack_config, case_from_args,
                                defense_record, defenses_from_args, enable_compilation_cache, fail, positive_int)
from dlg_jax.cli.report import summarise_dir as _summarise
from dlg_jax.errors import UsageError
from dlg_jax.ranges import parse_range
from dlg_jax.results import report
from dlg_jax.results.files import dumps, write_atomic
from dlg_jax.results.store import ResultsDir

MAX_SEED = 2**31 - 1
MAX_TASKS = 10_000_000


def build_parser() -> ArgumentParser:
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
    sw.add_argument("--lanes", "--batch", dest="lanes", type=positive_int, default=64,
                    help="attacks (lanes) per compiled program, over all local devices (default 64; --batch: the old name)")
    sw.add_argument("--out", required=True, help="results directory; rerun the same command to resume")
    sw.add_argument("--batch-size", type=positive_int, default=1,
                    help="attack the mean gradient of N images: --indices taken N at a time, consecutive (default 1)")
    sw.add_argument("--engine", default="auto", choices=("auto", "flat", "lane-by-lane", "vmap"),
                    help="how lanes take their trips: lane-by-lane (CPU default) or vmap (all at once: accelerators' "
                         "default); auto/flat: the platform's default")
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
    sw.add_argument("--length", type=positive_int, default=16,
                    help="text models: tokens per pydoc_data sample when there is no --data FILE.txt (default 16)")
    add_attack_flags(p, text=True)
    add_defense_flags(p, axis=True)
    return p


def _config(args):
    config, note = attack_config(args, batch_size=args.batch_size)
    if config.solver.optimizer == "jaxopt-lbfgs":
        raise UsageError("--optimizer jaxopt-lbfgs runs one attack at a time: use dlg_jax.run, or lbfgs (the same "
                         "algorithm in the engine)")
    return config, note


def _load(args, indices: list[int]) -> tuple[data_lib.Dataset, dict[int, int]]:
    """The dataset and, for each requested index, its position in the dataset's arrays."""
    if args.data:
        dataset = data_lib.load_npz(args.data)
        dataset.check_indices(indices)
        return dataset, {i: i for i in indices}
    dataset = data_lib.load_tfds(args.dataset, args.split, indices, args.tfds_dir)
    return dataset, {i: n for n, i in enumerate(indices)}


def _identity(args, dataset: data_lib.Dataset, config, devices: int) -> tuple[dict, dict]:
    source = "npz" if args.data else f"tfds {args.dataset}[{args.split}]"
    identity = sweep_identity(source, dataset, config, args.model, args.model_seed, args.restarts, args.batch_size,
                              devices, args.checkpoint)
    return identity, dict(data=args.data if args.data else source, out=args.out)


def sweep_identity(source: str, dataset: data_lib.Dataset, config, model: str, model_seed: int, restarts: int,
                   batch_size: int, devices: int, checkpoint: str | None = None) -> dict:
    """What the rows depend on (a rerun in the same DIR must match it; the work list may grow); provenance is
    stored beside it but not compared. The data is identified by content (a copy elsewhere is the same data;
    other content at the same path is not); `devices`: JAX devices per process, since XLA rounds a program
    sharded over 2 devices differently from one on 1 (results differ in the last bits, then chaotically)."""
    data = dict(source=source, sha256=dataset.content_hash(), image_shape=list(dataset.image_shape),
                num_classes=dataset.num_classes)
    identity = dict(data=data, attack=config.to_dict(), model=model, model_seed=model_seed, restarts=restarts,
                    batch_size=batch_size, devices_per_process=devices)
    if checkpoint is not None:  # the weights, by content (only when given: older sweeps resume unchanged)
        import hashlib

        try:
            identity["checkpoint_sha256"] = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
        except OSError as error:
            raise UsageError(f"--checkpoint {checkpoint}: cannot read it ({error.strerror or error})") from None
    return identity


def batches(indices: list[int], size: int) -> dict[int, list[int]]:
    """The indices taken `size` at a time, consecutive, each batch named by its first index (a remainder that
    does not fill a batch is left out)."""
    return {indices[k]: indices[k:k + size] for k in range(0, len(indices) - size + 1, size)}


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
        from dlg_jax.engine.devices import use_all_cpu_cores

        use_all_cpu_cores()
    try:
        return _main(args, argv, prog)
    except UsageError as error:
        return fail(prog, error)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted: {_saved(args)} rows saved in {args.out}; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 130
    except OSError as error:  # a full disk, a vanished directory: one line, not a traceback
        print(f"{prog}: error: {error.strerror or error}: {error.filename or args.out}", file=sys.stderr)
        return 2


def _saved(args) -> int:
    try:
        return sum(1 for f in Path(args.out).glob("results*.jsonl") for line in f.read_bytes().split(b"\n")[:-1])
    except OSError:
        return 0


def _main(args, argv, prog: str) -> int:
    if args.out == "":
        raise UsageError("--out: an empty path")
    from dlg_jax.models import TEXT_MODELS
    from dlg_jax.text.attacks import PRESETS as TEXT_PRESETS

    if args.model in TEXT_MODELS or args.preset in TEXT_PRESETS:  # text attacks: a path of their own
        from dlg_jax.cli.text_sweep import text_sweep

        return text_sweep(args, prog)
    config, note = _config(args)
    families = defense_families(args)
    indices = parse_range(args.indices, "--indices")
    seeds = parse_range(args.seeds, "--seeds")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise UsageError(f"--seeds: {bad[0]} is out of range (0..{MAX_SEED})")
    if len(indices) < args.batch_size:
        raise UsageError(f"--indices: {len(indices)} image(s), fewer than --batch-size {args.batch_size}")
    if len(indices) // args.batch_size * len(seeds) > MAX_TASKS:
        raise UsageError(f"--indices x --seeds: more than {MAX_TASKS:,} attacks; split the sweep")
    dataset, position = _load(args, indices)
    if note and args.worker is None:
        print(f"{prog}: {note}", file=sys.stderr, flush=True)
    import jax

    devices = 1 if args.processes > 1 or args.worker is not None else len(jax.local_devices())
    identity, provenance = _identity(args, dataset, config, devices)
    if args.processes > 1 and args.worker is None:
        if args.distributed:
            raise UsageError("--processes and --distributed: choose one")
        from dlg_jax.cli.launcher import launch

        argv = list(sys.argv[1:] if argv is None else argv)
        if families:
            plans = _plans(args, families, identity, provenance, 0, 1)
            dirs = [results for _, route in plans for results, _ in route.values()]
            for results in dirs:
                results.check_writable()
                results.lock("exclusive")  # held while the workers run: no other sweep in DIR meanwhile
            total = len(batches(indices, args.batch_size)) * len(seeds) * len(dirs)
            return launch(args, argv, prog, dirs, total,
                          lambda _: _defended_summaries(args, plans, len(batches(indices, args.batch_size)),
                                                        len(seeds), config.adaptive))
        results = ResultsDir(Path(args.out), identity, provenance=provenance)  # refuses another configuration
        results.check_writable()
        results.lock("exclusive")  # held while the workers run: no other sweep in DIR meanwhile
        total = len(indices) // args.batch_size * len(seeds)
        return launch(args, argv, prog, [results], total, lambda dirs: _summarise(dirs[0]))
    host, hosts = _hosts(args)
    if families:
        return _defended(args, prog, dataset, position, config, identity, provenance, indices, seeds, families,
                         host, hosts)
    results = ResultsDir(Path(args.out), identity, host, hosts, provenance=provenance)
    members = batches(indices, args.batch_size)
    share = [(i, s) for i in members for s in seeds][host::hosts]  # fixed before looking at DIR: hosts agree
    done = {(r["index"], r["seed"]) for r in results.rows()}
    pending = [task for task in share if task not in done]
    enable_compilation_cache()
    runner = _runner(args, dataset, config)
    if pending:
        lanes = runner.lanes_for(len(pending), args.lanes)
        if not args.quiet and args.worker is None:
            print(f"{prog}: compiling the attack for {lanes} lanes on {devices} device(s) ...", flush=True)
        runner.compile(lanes)  # refuses too many lanes, before DIR
    results.open(lock="own" if args.worker is not None else "shared" if args.distributed else "exclusive")
    done = {(r["index"], r["seed"]) for r in results.rows()}  # another sweep may have finished some meanwhile
    pending = [(i, s) for i, s in pending if (i, s) not in done]
    if done and args.worker is None:
        print(f"{prog}: resuming: {len(done)} done, {len(pending)} to go", file=sys.stderr, flush=True)
    _run(args, runner, dataset, position, members, [(i, s, None) for i, s in pending], {None: (results, {})})
    with contextlib.suppress(Exception):
        if hosts > 1 and args.distributed:  # let every host finish its rows before host 0 writes the summary
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dlg_jax.sweep done")
    if host == 0 and args.worker is None:  # --processes: the launcher summarises
        _summarise(results)
    return 0


def defense_families(args) -> list[list]:
    """The defended clients a sweep attacks, each a chain of `dlg_jax.defenses.Defense` (one compiled program
    each): `--defense` (one chain, its strengths' product an axis), or with `--defense-study` the undefended
    client and every study spec alone (a union: `--defense-study prune:0.1,0.5 --defense-study fp16` is three
    settings and the baseline). [] for an undefended sweep."""
    if not args.defense_study:
        return [defenses_from_args(args, args.batch_size, axis=True)] if args.defense else []
    if args.defense:
        raise UsageError("--defense-study: each study setting is one defense alone; leave out --defense")
    families = [[]]
    for spec in args.defense_study:
        args.defense = [spec]
        try:
            families.append(defenses_from_args(args, args.batch_size, axis=True))
        except UsageError as error:
            raise UsageError(str(error).replace("--defense ", "--defense-study ", 1)) from None
    args.defense = []
    names = [family[0].name for family in families[1:]]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--defense-study {repeated[0]}: once (give all its strengths in one list)")
    args.defenses = []
    return families


def _plans(args, families, identity: dict, provenance: dict, host: int, hosts: int) -> list:
    """(family, route) for each defended client: route maps its strengths to (the setting's ResultsDir
    DIR/<setting>, DIR/none for the undefended client, the record its rows carry)."""
    plans = []
    for family in families:
        args.defenses = family

        def results_for(record):
            return ResultsDir(Path(args.out) / (record["defense"] or "none"), dict(identity, defense=record), host,
                              hosts, provenance=provenance)

        plans.append((family, defended_route(args, results_for)))
    return plans


def _defended(args, prog, dataset, position, config, identity: dict, provenance: dict, indices, seeds, families,
              host: int = 0, hosts: int = 1) -> int:
    """A sweep of defended clients: every combination of a chain's --defense strengths (their product, in order)
    is a setting with its own directory DIR/<setting> (e.g. DIR/prune=0.1: rows, reconstructions, summary; its
    identity includes the defense, so each resumes alone). A chain's settings run in one compiled program, each
    task's strengths a per-lane array; a study (`--defense-study`) is one program per defense kind, run in
    turn. With --processes / --distributed every host takes every hosts-th task of the whole list (fixed before
    DIR is read, so hosts agree). DIR/summary.md: one line per setting."""
    members = batches(indices, args.batch_size)
    plans = _plans(args, families, identity, provenance, host, hosts)
    everything = [(k, strengths, i, s) for k, (_, route) in enumerate(plans) for strengths in route
                  for i in members for s in seeds]
    share = set(everything[host::hosts])

    def pending_tasks(k):
        out = []
        for strengths, (results, _) in plans[k][1].items():
            done = {(r["index"], r["seed"]) for r in results.rows()}
            out += [(i, s, strengths) for i in members for s in seeds
                    if (k, strengths, i, s) in share and (i, s) not in done]
        return out

    worker = args.worker is not None
    for _, route in plans:
        for results, _ in route.values():
            results.open(lock="own" if worker else "shared" if args.distributed else "exclusive")
    waiting = sum(len(pending_tasks(k)) for k in range(len(plans)))
    if waiting < len(share) and not worker:
        print(f"{prog}: resuming: {len(share) - waiting} done, {waiting} to go", file=sys.stderr, flush=True)
    enable_compilation_cache()
    for k, (family, route) in enumerate(plans):
        pending = pending_tasks(k)
        if not pending:
            continue
        args.defenses = family
        runner = _runner(args, dataset, config)
        runner.compile(runner.lanes_for(len(pending), args.lanes))
        _run(args, runner, dataset, position, members, pending, route)
    if hosts > 1:
        if args.distributed:
            with contextlib.suppress(Exception):
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("dlg_jax.sweep done")
        if host != 0 or worker:  # --processes: the launcher summarises
            return 0
    _defended_summaries(args, plans, len(members), len(seeds), config.adaptive)
    return 0


def _defended_summaries(args, plans, images: int, seeds: int, adaptive: bool) -> None:
    """Each setting's summary files, DIR/summary.md (one line per setting) and DIR/settings.json."""
    route = {(k, strengths): entry for k, (_, r) in enumerate(plans) for strengths, entry in r.items()}
    summaries = {}
    for results, record in route.values():
        pace = max(results.seconds_by_file().values(), default=None)  # one file per worker: the slowest's
        summaries[record["defense"]] = report.write(results.path, results.rows(), results.identity,
                                                    attack_seconds=pace)
    names = sorted({d.name for family, _ in plans for d in family}, key=[d.name for f, _ in plans for d in f].index)
    lines = defended_summary(route, summaries, names, images, seeds, adaptive, study=bool(args.defense_study))
    write_atomic(Path(args.out) / "summary.md", "\n".join(lines) + "\n")
    write_atomic(Path(args.out) / "settings.json", dumps([record for _, record in route.values()], indent=2) + "\n")
    print("\n".join(lines[4:]))


def defended_route(args, results_for) -> dict:
    """Every combination of the --defense strengths (`args.defenses`, their product, in order) -> (where its rows
    go: `results_for(record)`, the record every row of it gets: dlg_jax.cli.common.defense_record)."""
    names = [d.name for d in args.defenses]
    route = {}
    for strengths in itertools.product(*(d.strengths for d in args.defenses)):
        record = defense_record(args, names, strengths)
        route[tuple(strengths)] = (results_for(record), record)
    return route


def defended_summary(route: dict, summaries: dict, names, images: int, seeds: int, adaptive: bool,
                     study: bool = False) -> list[str]:
    """summary.md of a defended sweep: one line per setting (`summaries`: setting -> report.summarise's), and the
    whole sweep's attacks per hour (its rows over the attack time of its slowest worker, summed over settings)."""
    described = (f"a study of {', '.join(names)}, each alone, and the undefended client" if study
                 else f"{' then '.join(names)}")
    lines = ["# Defended sweep", "", f"{len(route)} settings ({described}), {images} image(s) x {seeds} seed(s) "
             f"each; attack {'adaptive' if adaptive else 'naive'}.", "",
             f"| setting | epsilon | attacks | PSNR >= {report.SUCCESS_DB:.0f} dB | median PSNR | mean PSNR | attacks/hour |",
             "|---|---|---|---|---|---|---|"]
    rows, pace = 0, {}
    for results, record in route.values():
        summary = summaries[record["defense"]]
        if summary["rows"]:
            eps = "" if record["epsilon"] is None else f"{record['epsilon']:.3g}"
            lines.append(f"| {record['defense'] or 'none'} | {eps} | {summary['rows']} | "
                         f"{100 * summary['success_rate']:.0f}% | {summary['median_psnr']:.2f} | "
                         f"{summary['mean_psnr']:.2f} | {summary['attacks_per_hour']:.0f} |")
            rows += summary["rows"]
            for name, seconds in results.seconds_by_file().items():
                pace[name] = pace.get(name, 0.0) + seconds
    if rows and pace:
        hours = max(pace.values()) / 3600
        lines += ["", f"All settings: {rows} attacks in {hours:.2f} h of attack time (the slowest of {len(pace)} "
                  f"worker(s)): {rows / max(hours, 1e-12):.0f} attacks/hour."]
    return lines


def _runner(args, dataset: data_lib.Dataset, config):
    from dlg_jax.engine.scheduler import Sweep

    lane_by_lane = {"lane-by-lane": True, "vmap": False}.get(args.engine)
    return Sweep(case_from_args(args, dataset, config), config, restarts=args.restarts, batch_size=args.batch_size,
                 lane_by_lane=lane_by_lane)


def _run(args, runner, dataset: data_lib.Dataset, position: dict[int, int], members: dict[int, list[int]],
         pending, route: dict):
    """Attack the pending (index, seed, strengths) (index: a batch's first; strengths: the client's defense
    strengths, None for the case's), appending each chunk's rows as it finishes to `route[strengths]`'s
    (ResultsDir, fields every row of it gets).

    A row has the keys of `dlg_jax.run`'s result.json (a batch's: per-image rows, means, label accuracy) plus
    seed, restarts, restart and restart_distances; the saved truth and reconstruction are in matched order.
    """
    if not pending:
        return
    import numpy as np
    from tqdm import tqdm

    from dlg_jax.engine.scheduler import Task
    from dlg_jax.results.judge import judge

    batched = runner.batch_size > 1
    tasks = [Task(tuple(position[m] for m in members[i]), s, strengths) for i, s, strengths in pending]
    key_of = dict(zip(tasks, pending))

    def save(outcomes) -> None:
        by_dir: dict = {}
        for o in outcomes:
            index, seed, strengths = key_of[o.task]
            results, fields = route[strengths]
            rows, images = by_dir.setdefault(strengths, ([], {}))
            truth = dataset.images[list(o.task.positions)]
            row, order = judge(truth / 255.0, o.reconstruction, o.label_pred, o.label_true, members[index],
                               dataset.label_names)
            rows.append(dict(row, index=index, seed=seed, restarts=runner.restarts,
                             **o.result("restart", "restart_distances"), **fields))
            images[(index, seed)] = ((truth, o.reconstruction[order]) if batched else (truth[0], o.reconstruction[0]))
        for strengths, (rows, images) in by_dir.items():
            route[strengths][0].append(rows, images)

    budget = runner.config.rules.max_evaluations
    with tqdm(total=len(tasks), unit="attack", desc="sweep", disable=args.quiet, dynamic_ncols=True, smoothing=0.05,
              bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]") as bar:
        finished_so_far = 0

        def progress(finished: int, out: dict) -> None:
            """Finished attacks, plus each running lane's share of its evaluation budget: the bar moves (and
            its ETA with it) while lanes run, not only when they end; it never goes back, since a lane's share
            (< 1 / restarts) is replaced by a whole attack when it finishes."""
            nonlocal finished_so_far
            finished_so_far += finished
            running = np.asarray(out["live"], bool)
            spent = float(np.minimum(np.asarray(out["evaluations"])[running] / budget, 1.0).sum()) / runner.restarts
            bar.set_postfix(lanes=int(running.sum()), refresh=False)
            bar.update(max(0.0, min(len(tasks), finished_so_far + spent) - bar.n))

        runner.run(dataset.images, dataset.labels, tasks, lanes=args.lanes, on_results=save, progress=progress)


if __name__ == "__main__":
    sys.exit(main())
