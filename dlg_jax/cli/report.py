"""Redo a sweep's summary from what is on disk: `python -m dlg_jax.report DIR`.

Rewrites summary.json, summary.md, results.csv, psnr_histogram.png and worst.png from DIR's rows and saved
reconstructions (of DIR's configuration only), e.g. after a sweep was interrupted, or to see a running one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from dlg_jax.cli.common import ArgumentParser, fail
from dlg_jax.errors import UsageError
from dlg_jax.results import report
from dlg_jax.results.store import ResultsDir


def summarise_dir(results: ResultsDir) -> dict:
    """Write the summary files of a results directory and print its one-line summary."""
    rows = results.rows()
    # one file per host or worker, side by side: the slowest sets the pace (one file: its rows' sum)
    summary = report.write(results.path, rows, results.identity,
                           attack_seconds=max(results.seconds_by_file().values(), default=None))
    if rows:
        print(f"{summary['rows']} attacks in {results.path}: {summary['successes']} at PSNR >= "
              f"{report.SUCCESS_DB:.0f} dB ({100 * summary['success_rate']:.1f}%), median PSNR "
              f"{summary['median_psnr']:.2f} dB, labels {100 * summary['label_accuracy']:.1f}% right, "
              f"{summary['attacks_per_hour']:.0f} attacks/hour")
    else:
        print(f"no finished attacks in {results.path} yet")
    return summary


def open_existing(path: str) -> ResultsDir:
    """The results directory of a sweep, configured as its config.json says."""
    folder = Path(path)
    try:
        stored = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise UsageError(f"{folder}: not a sweep's results directory (no config.json)") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{folder}/config.json: unreadable ({error})") from None
    if not isinstance(stored, dict):
        raise UsageError(f"{folder}/config.json: not a sweep configuration")
    return ResultsDir(folder, {k: v for k, v in stored.items() if k != "provenance"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="dlg_jax.report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a dlg_jax.sweep --out directory")
    args = parser.parse_args(argv)
    try:
        summarise_dir(open_existing(args.dir))
    except UsageError as error:
        return fail(parser.prog, error)
    except OSError as error:
        print(f"{parser.prog}: error: {error.strerror or error}: {error.filename or args.dir}", file=sys.stderr)
        return 2
    return 0
