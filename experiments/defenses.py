"""The DLG paper's defense study (section 5) on the 50 shared CIFAR-100 images: PSNR against the strength of
each defense, for the paper's attack (naive) and an adaptive one.

    python experiments/defenses.py                    # the full study: 50 images (resumable)
    python experiments/defenses.py --images 10        # what was run for the committed table (2-core CPU)
    python experiments/defenses.py --report-only      # rewrite the table and plots from the runs on disk
    python experiments/defenses.py --images 5 --only fedavg --name defenses_fedavg   # FedAvg alone (its own files)

Each defense kind is one `python -m dlg_jax.sweep --defense KIND:S1,S2,...` command: one compiled program in
which every strength is a per-lane value, each strength's rows in RUNS/<attack>/<kind>/<kind>=S (resumable
like every sweep; rerunning this script continues). Two attacks:
- naive: the paper's (preset dlg: joint labels, L2, L-BFGS, 300 steps), blind to the defense;
- adaptive: iDLG labels (read off the gradient) and `--adaptive`: against pruning only the shared (nonzero)
  entries are matched, against casts and int8 the dummy's gradient is rounded alike, against DP-SGD the dummy's
  gradient is clipped to the same C, and against noise the attack stops at the expected noise floor (less
  the part a dummy of d numbers fits: floor (1 - d/P)).
Outputs: experiments/results/defenses.md (the table, with the command and the measured attack rate),
defenses.csv, defenses.png (median PSNR against strength, one curve per defense, quartiles shaded) and
defenses_grid.png (image 0's reconstruction at every strength).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "cifar100_train_0-49.npz"
RESULTS = ROOT / "experiments" / "results"
SUCCESS_DB = 30.0

# (kind, strengths): the paper's grid (noise variance 1e-4 .. 1e-1, pruning 1% .. 70%) widened at both ends.
# The gradient of the CIFAR LeNet has ||g|| ~ 25 over 85,036 entries (rms entry 0.089, variance ~8e-3).
STUDY = [
    ("prune", "0.01,0.1,0.2,0.3,0.5,0.7,0.9"),
    ("gauss", "1e-5,1e-4,1e-3,1e-2,1e-1"),
    ("fp16", ""), ("bf16", ""), ("int8", ""),
    ("dp", "1e-4,1e-3,1e-2,0.1,1"),  # noise multiplier z; C = DP_CLIP below
    ("laplace", "1e-5,1e-4,1e-3,1e-2,1e-1"),
    ("fedavg", "1,2,5,10"),  # local SGD steps k at learning rate FEDAVG_LR, the weight difference shared
]
DP_CLIP = 10.0  # below every image's gradient norm (23-30): every example is clipped
DP_RUN = ("--dp-steps", "1000", "--dp-rate", "0.01", "--dp-delta", "1e-5")  # 10 epochs of 50,000 at batch 500
# At 0.01 ten local steps turn the shared update away from the gradient (cosine 0.86, norm 0.40x on image 0);
# at 0.1 the first step already fits the one image (the update is g / k, cosine 1.000).
FEDAVG_LR = 0.01
ATTACKS = {"naive": [], "adaptive": ["--preset", "idlg", "--adaptive"]}


def command(kind: str, strengths: str, attack: str, images: int, runs: Path) -> list[str]:
    spec = f"{kind}:{strengths}" if strengths else kind
    extra = {"dp": ["--dp-clip", str(DP_CLIP), *DP_RUN], "fedavg": ["--fedavg-lr", str(FEDAVG_LR)]}.get(kind, [])
    return [sys.executable, "-m", "dlg_jax.sweep", "--data", str(DATA), "--indices", f"0:{images}", "--defense", spec,
            *extra, *ATTACKS[attack], "--single-device", "--lanes", "8", "--quiet", "--out", str(runs / attack / kind)]


def baseline(attack: str, images: int, runs: Path) -> list[str]:
    return [sys.executable, "-m", "dlg_jax.sweep", "--data", str(DATA), "--indices", f"0:{images}", *ATTACKS[attack],
            "--single-device", "--lanes", "8", "--quiet", "--out", str(runs / attack / "none")]


# The study in one command (`--study`): five defenses with a strength, five strengths each, the paper's attack.
STUDY_GRID = [
    ("prune", "0.01,0.1,0.2,0.5,0.7"),  # the paper's 1% .. 70%
    ("gauss", "1e-5,1e-4,1e-3,1e-2,1e-1"),
    ("laplace", "1e-5,1e-4,1e-3,1e-2,1e-1"),
    ("dp", "1e-4,1e-3,1e-2,0.1,1"),
    ("fedavg", "1,2,5,10,20"),
]


def study_command(images: int, runs: Path, processes: int) -> list[str]:
    specs = [arg for kind, strengths in STUDY_GRID for arg in ("--defense-study", f"{kind}:{strengths}")]
    return [sys.executable, "-m", "dlg_jax.sweep", "--data", str(DATA), "--indices", f"0:{images}", *specs,
            "--dp-clip", str(DP_CLIP), *DP_RUN, "--fedavg-lr", str(FEDAVG_LR), "--processes", str(processes),
            "--lanes", "8", "--quiet", "--out", str(runs / "naive")]


def run_study(images: int, runs: Path, processes: int) -> float:
    """The one command; returns its wall-clock seconds (compilation included)."""
    cmd = study_command(images, runs, processes)
    print(" ".join(cmd[1:]), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    return time.time() - start


def run_all(images: int, runs: Path, only: set | None) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for kind, strengths in [("none", "")] + STUDY:
        if only and kind not in only:
            continue
        for attack in ATTACKS:
            cmd = baseline(attack, images, runs) if kind == "none" else command(kind, strengths, attack, images, runs)
            print(" ".join(cmd[1:]), flush=True)
            start = time.time()
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            print(f"  {time.time() - start:.0f} s", flush=True)


def collect(runs: Path) -> list[dict]:
    """One entry per (attack, setting): rows of every results.jsonl under RUNS."""
    out = []
    folders = sorted({file.parent for file in runs.glob("*/**/results*.jsonl")})  # results.pK.jsonl: one per worker
    for folder in folders:
        rows = [json.loads(line) for file in sorted(folder.glob("results*.jsonl"))
                for line in file.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        file = folder / "results.jsonl"
        attack = file.relative_to(runs).parts[0]
        first = rows[0]
        defenses = first.get("defenses", [])
        kind = defenses[0]["name"] if defenses else "none"
        strength = defenses[0]["strength"] if defenses else 0.0
        psnr = np.array([r["psnr"] for r in rows], float)
        out.append(dict(attack=attack, kind=kind, strength=strength, setting=first.get("defense") or "none",
                        epsilon=first.get("epsilon"), n=len(rows), success=float(np.mean(psnr >= SUCCESS_DB)),
                        median=float(np.median(psnr)), q1=float(np.percentile(psnr, 25)),
                        q3=float(np.percentile(psnr, 75)), mean=float(np.mean(psnr)),
                        seconds=float(sum(r["seconds"] for r in rows)), dir=file.parent))
    order = {k: i for i, (k, _) in enumerate([("none", "")] + STUDY)}
    return sorted(out, key=lambda e: (order.get(e["kind"], 99), e["strength"], e["attack"] != "naive"))


def table(entries: list[dict], images: int, argv: str) -> str:
    seconds = sum(e["seconds"] for e in entries)
    attacks = sum(e["n"] for e in entries)
    lines = ["# Defenses against DLG: the paper's study on the shared CIFAR-100 images", "",
             f"Command: `python experiments/defenses.py {argv}` ({images} images: indices 0..{images - 1} of "
             "`../shared/data/cifar100_train_0-49.npz`; `--images 50` is the full study).",
             f"{attacks} attacks in {seconds / 3600:.2f} h of attack time summed over CPU cores (compilation excluded): "
             f"{attacks / max(seconds, 1e-9) * 3600:.0f} attacks/hour per core.", "",
             "naive: the paper's attack (joint labels, L2, L-BFGS, 300 steps); adaptive: iDLG labels and `--adaptive` "
             f"(pruning: only shared entries matched; casts/int8: the dummy rounded alike; dp: dummy clipped to C = "
             f"{DP_CLIP:g}; noise and dp: stop at the noise floor less what the dummy can fit, floor (1 - d/P); fedavg: the "
             f"dummy through the same k local steps at lr {FEDAVG_LR:g}, differentiated through). Success: PSNR >= {SUCCESS_DB:.0f} dB. DP-SGD's epsilon "
             "(RDP, dp-accounting) is for 1000 steps at sampling rate 0.01, delta 1e-5.", "",
             "| defense | strength | epsilon | attack | images | success | median PSNR | quartiles | mean PSNR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        eps = "" if e["epsilon"] is None else f"{e['epsilon']:.3g}"
        strength = "" if e["kind"] in ("none", "fp16", "bf16", "int8") else f"{e['strength']:g}"
        lines.append(f"| {e['kind']} | {strength} | {eps} | {e['attack']} | {e['n']} | {100 * e['success']:.0f}% | "
                     f"{e['median']:.1f} | {e['q1']:.1f} .. {e['q3']:.1f} | {e['mean']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("noise variance", ("gauss", "laplace"), "log"), ("pruned fraction", ("prune",), "linear"),
              ("DP-SGD noise multiplier z (C = %g)" % DP_CLIP, ("dp",), "log"), ("precision", ("fp16", "bf16", "int8"), None),
              ("FedAvg local steps (lr %g)" % FEDAVG_LR, ("fedavg",), "log")]
    present = {e["kind"] for e in entries}
    panels = [panel for panel in panels if present & set(panel[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    axes = axes[0]
    base = {e["attack"]: e["median"] for e in entries if e["kind"] == "none"}
    for ax, (title, kinds, scale) in zip(axes, panels):
        for attack, style in (("naive", "-"), ("adaptive", "--")):
            if scale is None:
                xs = np.arange(len(kinds)) + (0.15 if attack == "adaptive" else -0.15)
                med = [next((e["median"] for e in entries if e["kind"] == k and e["attack"] == attack), np.nan) for k in kinds]
                ax.bar(xs, med, width=0.3, label=attack, alpha=0.7)
                ax.set_xticks(range(len(kinds)), kinds)
                continue
            for kind in kinds:
                pts = [e for e in entries if e["kind"] == kind and e["attack"] == attack]
                if not pts:
                    continue
                x = [e["strength"] for e in pts]
                line, = ax.plot(x, [e["median"] for e in pts], style, marker="o", label=f"{kind} {attack}")
                ax.fill_between(x, [e["q1"] for e in pts], [e["q3"] for e in pts], color=line.get_color(), alpha=0.12)
            ax.set_xscale(scale)
        for attack, value in base.items():
            ax.axhline(value, color="grey", lw=0.8, ls="-" if attack == "naive" else "--")
        ax.axhline(SUCCESS_DB, color="red", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_ylabel("PSNR (dB), median and quartiles")
        ax.legend(fontsize=7)
    fig.suptitle("DLG against defenses (grey: no defense; red: 30 dB success line)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid(entries: list[dict], path: Path, index: int = 0) -> None:
    """Image `index`'s reconstruction for every (defense, strength), naive above adaptive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [e for e in entries if (e["dir"] / "reconstructions" / f"{index}-1234.npz").exists()]
    if not shown:
        return
    cols = 8
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, e in zip(np.ravel(axes), shown):
        with np.load(e["dir"] / "reconstructions" / f"{index}-1234.npz") as f:
            ax.imshow(np.clip(f["reconstruction"], 0, 1))
        ax.set_title(f"{e['setting']}\n{e['attack']}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=50, help="the first N of the 50 shared images (default 50)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "defenses"), help="sweep directories (default runs/defenses)")
    p.add_argument("--only", default=None, help="comma-separated kinds to run (default all; 'none' is the baseline)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the table and plots")
    p.add_argument("--name", default=None, help="the result files' name in experiments/results (default defenses, "
                                                "defense_study with --study)")
    p.add_argument("--study", action="store_true", help="the 5 x 5 study (STUDY_GRID) as one sweep command, naive")
    p.add_argument("--processes", type=int, default=2, help="--study: worker processes (default 2)")
    args = p.parse_args()
    name = args.name or ("defense_study" if args.study else "defenses")
    runs = Path(args.runs if args.runs != p.get_default("runs") or not args.study else ROOT / "runs" / "defense_study")
    wall = None
    if not args.report_only:
        if args.study:
            wall = run_study(args.images, runs, args.processes)
        else:
            run_all(args.images, runs, set(args.only.split(",")) if args.only else None)
    entries = collect(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    argv = f"--images {args.images}" + (" --study" if args.study else "") + (
        f" --only {args.only}" if args.only else "") + (f" --name {args.name}" if args.name else "")
    text = table(entries, args.images, argv)
    if args.study:
        attacks = sum(e["n"] for e in entries)
        command = " ".join(["python", *study_command(args.images, Path("runs/defense_study"), args.processes)[1:]])
        measured = (f"Wall clock of the command: {wall / 3600:.2f} h for {attacks} attacks, {attacks / wall * 3600:.0f} "
                    "attacks/hour (compilation of one program per defense included)." if wall else
                    "(Report rewritten from the runs on disk: the wall clock is in the commit that ran it.)")
        text = text.replace("\n\n", f"\n\nThe sweep command:\n\n    {command.replace(str(ROOT) + '/', '')}\n\n{measured}\n\n", 1)
    (RESULTS / f"{name}.md").write_text(text)
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [k for k in entries[0] if k != "dir"] if entries else ["kind"])
        writer.writeheader()
        for e in entries:
            writer.writerow({k: v for k, v in e.items() if k != "dir"})
    plot(entries, RESULTS / f"{name}.png")
    grid(entries, RESULTS / f"{name}_grid.png")
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
