"""Every image, every seed: the default attack over the shared data, with the failures listed.

    python experiments/failure_modes.py --out runs/failure_modes        # runs the three sweeps, then the table
    python experiments/failure_modes.py --out runs/failure_modes --table-only

Sweeps (default flags, `--processes 2`): MNIST test 0-499 x seeds 0-1, CIFAR-10 train 0-199 x seeds 0-1,
CIFAR-100 train 0-49 x seeds 0-4 (`../shared/data`). Writes OUT/failure_modes.md: per dataset the attacks,
those at PSNR >= 30 dB, the attempts they took, their statuses, and every failure with its status, attempts,
evaluations, D and labels. Resumable: the sweeps are (rerun to continue).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SWEEPS = (("mnist_test_0-499", "0:500", "0:2"), ("cifar10_train_0-199", "0:200", "0:2"),
          ("cifar100_train_0-49", "0:50", "0:5"))


def rows(folder: Path) -> list[dict]:
    out = {}
    for file in sorted(folder.glob("results*.jsonl")):
        for line in file.read_text().splitlines():
            r = json.loads(line)
            out[(r["index"], r["seed"])] = r
    return list(out.values())


def table(out: Path) -> str:
    lines = ["# Failure modes: the default attack on every shared image and seed", "",
             "| data | attacks | PSNR >= 30 dB | median PSNR | attempts (1 / 2-4 / 5+) | statuses | attacks per hour |",
             "|---|---|---|---|---|---|---|"]
    failures = []
    for name, _, _ in SWEEPS:
        found = rows(out / name)
        if not found:
            continue
        ok = [r for r in found if r["psnr"] is not None and r["psnr"] >= 30]
        attempts = collections.Counter("1" if r["attempts"] == 1 else "2-4" if r["attempts"] <= 4 else "5+" for r in found)
        statuses = collections.Counter(r["status"] for r in found)
        psnr = sorted(r["psnr"] for r in found if r["psnr"] is not None)
        summary = json.loads((out / name / "summary.json").read_text())["summary"] if (out / name / "summary.json").exists() else {}
        lines.append(f"| {name} | {len(found)} | {len(ok)} ({100 * len(ok) / len(found):.1f}%) | {psnr[len(psnr) // 2]:.2f} | "
                     f"{attempts['1']} / {attempts['2-4']} / {attempts['5+']} | "
                     + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
                     + f" | {summary.get('attacks_per_hour', float('nan')):.0f} |")
        failures += [(name, r) for r in found if r not in ok]
    lines += ["", f"## Failures ({len(failures)})", "",
              "| data | index | seed | PSNR | status | attempts | evaluations | D | label true/pred |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(failures, key=lambda f: (f[0], f[1]["index"], f[1]["seed"])):
        lines.append(f"| {name} | {r['index']} | {r['seed']} | {r['psnr']:.2f} | {r['status']} | {r['attempts']} | "
                     f"{r['evaluations']} | {r['grad_distance']:.3g} | {r['label_true']}/{r['label_pred']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--table-only", action="store_true", help="only write the table from OUT's sweeps")
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.table_only:
        for name, indices, seeds in SWEEPS:
            subprocess.run([sys.executable, "-m", "dlg_jax.sweep", "--data", str(DATA / f"{name}.npz"), "--indices",
                            indices, "--seeds", seeds, "--processes", str(args.processes), "--out", str(out / name)],
                           check=True)
    out.mkdir(parents=True, exist_ok=True)
    text = table(out)
    (out / "failure_modes.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
