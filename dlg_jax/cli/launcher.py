"""`dlg_jax.sweep --processes N`: the same sweep as N worker processes, one pinned to each CPU core."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time


def _worker_setup(core: int) -> None:
    """In the worker, before it runs: pin it to its core, and have the kernel end it when the launcher dies (even
    by kill -9), so that no orphan goes on writing rows."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def launch(args, argv: list[str], prog: str, dirs: list, total: int, summarise) -> int:
    """This command N times as workers, each pinned to one core with one CPU device and taking every N-th attack
    (the host partition of --distributed, without jax.distributed), then `summarise(dirs)` of all rows (`dirs`:
    the sweep's ResultsDirs, one per defense setting of a defended sweep, which the bar counts rows in).

    Why: XLA runs the small operations of an attack on one thread, so a core needs a device (or a process) of its
    own. Two devices in one process get 1.9x from the second core, two processes 2x
    (experiments/results/bench_sweep.md); the processes share nothing at run time. Bad input was refused before
    this; resuming, refusals and row files (results.pK.jsonl) are the workers' as for --distributed.
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
            pin = functools.partial(_worker_setup, core)
            command = [sys.executable, "-m", "dlg_jax.sweep", *argv, "--worker", f"{k}/{args.processes}", "--quiet"]
            workers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=logs[-1], preexec_fn=pin))
        from tqdm import tqdm

        if not args.quiet:
            print(f"{prog}: {args.processes} workers compiling, then attacking (the bar counts finished attacks) ...",
                  file=sys.stderr, flush=True)
        with tqdm(total=total, unit="attack", desc="sweep", disable=args.quiet, dynamic_ncols=True) as bar:
            def count() -> int:
                return sum(len(results.rows()) for results in dirs if results.path.exists())

            while any(w.poll() is None for w in workers):
                time.sleep(1.0)
                bar.update(count() - bar.n)
            bar.update(count() - bar.n)
        for w, log in zip(workers, logs):
            if w.returncode != 0:
                log.seek(0)
                lines = [line for line in log.read().splitlines() if line.strip()]
                print(lines[-1] if lines else f"{prog}: a worker failed (exit {w.returncode})", file=sys.stderr)
                return 2 if w.returncode == 2 else 1
    summarise(dirs)
    return 0
