"""DLG, DLG with the image prior, and Inverting Gradients side by side on ReLU/BatchNorm models, untrained and trained.

    python experiments/inverting_gradients.py --out runs/ig                  # trains, attacks, writes the table
    python experiments/inverting_gradients.py --out runs/ig --table-only

Each cell is one `dlg_jax.sweep` (many attacks in one compiled program; resumable: rerun to continue) over the
first shared images of CIFAR-10 or CIFAR-100, seed 0, batch 1:

- attacks: `dlg` (the paper: L2 + L-BFGS, joint labels), `dlg+prior` (preset batch: iDLG labels, sigmoid pixels,
  staged colour TV, L-BFGS), `ig` (preset inverting-gradients: cosine + anisotropic TV + signed Adam in a box);
- models: lenet-relu, resnet20, resnet18 (BatchNorm in eval mode; resnet20-train: in train mode), from their
  seed ("untrained") or from a checkpoint `python -m dlg_jax.train` wrote ("trained": SGD on the shared images
  after the attacked ones, e.g. CIFAR-10 8-199: the attacked images are not in its training set);
- budgets: every attack gets `--iterations` solver iterations (DLG's steps x 20; IG's 4,800 by default), so the
  comparison is at equal iterations (L-BFGS may spend up to 1.25 evaluations per iteration).

Writes OUT/inverting_gradients.md, .csv and .png (truth and reconstructions of the ResNet cells): per cell the attacks, the median and best PSNR and SSIM, the share at
PSNR >= 20 dB (a recognisable image) and >= 30 dB, labels right, the statuses, seconds per attack and attacks
per hour of the sweep (its own wall clock, 2 processes on this machine's 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

from failure_modes import rows as read_rows  # noqa: E402  (a sibling script: experiments/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = {"cifar10": ("cifar10_train_0-199", 200), "cifar100": ("cifar100_train_0-49", 50)}
ATTACKS = {"dlg": ["--preset", "dlg"], "dlg+prior": ["--preset", "batch"],
           "ig": ["--preset", "inverting-gradients"],
           # inversefed's own TV weight, 1e-1 on CIFAR-normalised images: 0.5 on [0, 1] pixels (ours: IG_TV_WEIGHT)
           "ig-tv0.5": ["--preset", "inverting-gradients", "--tv-weight", "0.5"]}
MAIN = ("dlg", "dlg+prior", "ig")
# (model, dataset, images attacked, iterations, training steps, attacks), most telling first. The ResNet-18 cells
# are smaller (0.1 s an evaluation on this CPU, 8x ResNet-20's); 24,000 iterations (the paper's runs) on 1 image.
CELLS = [("resnet20", "cifar10", 4, 4800, 300, MAIN + ("ig-tv0.5",)),
         ("resnet18", "cifar10", 1, 1200, 100, MAIN),
         ("lenet-relu", "cifar10", 8, 4800, 300, MAIN), ("lenet-relu", "cifar100", 8, 4800, 300, MAIN),
         ("resnet20-train", "cifar10", 2, 4800, 300, MAIN),
         ("resnet20", "cifar100", 2, 4800, 300, MAIN),
         ("resnet20", "cifar10", 1, 24000, 300, ("ig",)),
         ("convnet", "cifar10", 1, 1200, 100, MAIN)]
TRAIN_BATCH = {"convnet": 8}  # its 2.9 M parameters at 32x32 cost ~8 s a step of 32 images on this CPU


def checkpoint_for(out: Path, model: str, dataset: str, images: int, steps: int) -> Path:
    """Train the model (its eval-mode weights: -train is the same weights) on the images after the attacked ones."""
    base = model.removesuffix("-train")
    path = out / "checkpoints" / f"{base}-{dataset}-{steps}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        name, size = DATASETS[dataset]
        subprocess.run([sys.executable, "-m", "dlg_jax.train", "--model", base, "--data", str(DATA / f"{name}.npz"),
                        "--indices", f"8:{size}", "--steps", str(steps), "--batch-size", str(TRAIN_BATCH.get(base, 32)),
                        "--out", str(path)], check=True)
    return path


def sweep(out: Path, model: str, dataset: str, images: int, iterations: int, attack: str, trained: Path | None,
          processes: int) -> Path:
    folder = out / cell_folder(dataset, model, "trained" if trained else "untrained", attack, iterations)
    name, _ = DATASETS[dataset]
    steps = ["--steps", str(iterations // 20)]
    cmd = [sys.executable, "-m", "dlg_jax.sweep", "--model", model, "--data", str(DATA / f"{name}.npz"),
           "--indices", f"0:{images}", "--seeds", "0", "--processes", str(processes), "--out", str(folder), "--quiet",
           *ATTACKS[attack], *steps]
    if trained is not None:
        cmd += ["--checkpoint", str(trained)]
    subprocess.run(cmd, check=True)
    return folder


def cell_folder(dataset: str, model: str, weights: str, attack: str, iterations: int) -> str:
    return f"{dataset}-{model}-{weights}-{attack}-{iterations}"


def summarise(folder: Path, **cell) -> dict | None:
    rows = read_rows(folder)  # failure_modes.rows: the rows of every process, the last of each (index, seed)
    if not rows:
        return None
    psnr = [r["psnr"] for r in rows]
    ssim = [r["ssim"] for r in rows]
    summary = json.loads((folder / "summary.json").read_text())["summary"] if (folder / "summary.json").exists() else {}
    statuses: dict = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return dict(**cell, attacks=len(rows), median_psnr=statistics.median(psnr), best_psnr=max(psnr),
                median_ssim=statistics.median(ssim), at_20db=sum(p >= 20 for p in psnr), at_30db=sum(p >= 30 for p in psnr),
                labels_right=sum(r["label_true"] == r["label_pred"] for r in rows),
                seconds_per_attack=statistics.median(r["seconds"] for r in rows),
                attacks_per_hour=summary.get("attacks_per_hour"),
                statuses=", ".join(f"{k} {v}" for k, v in sorted(statuses.items())),
                psnr_per_image=" ".join(f"{p:.1f}" for p in psnr))


def table(summaries: list[dict]) -> str:
    lines = ["# DLG, DLG + prior and Inverting Gradients on ReLU / BatchNorm models", "",
             "Produced by `python experiments/inverting_gradients.py --out runs/ig` (CPU, 2 cores; seed 0, batch 1, "
             "the first shared images of each dataset).", "",
             "| data | model | weights | attack | iterations | attacks | median PSNR | best | median SSIM | >= 20 dB | "
             ">= 30 dB | labels | s / attack | attacks / hour | statuses | PSNR per image |",
             "|" + "---|" * 16]
    for s in summaries:
        lines.append(f"| {s['dataset']} | {s['model']} | {s['weights']} | {s['attack']} | {s['iterations']} | "
                     f"{s['attacks']} | {s['median_psnr']:.2f} | {s['best_psnr']:.2f} | {s['median_ssim']:.3f} | "
                     f"{s['at_20db']} | {s['at_30db']} | {s['labels_right']}/{s['attacks']} | "
                     f"{s['seconds_per_attack']:.0f} | {s['attacks_per_hour'] or float('nan'):.0f} | {s['statuses']} | "
                     f"{s['psnr_per_image']} |")
    return "\n".join(lines) + "\n"


def figure(out: Path, path: Path) -> None:
    """Truth and each attack's reconstruction of the ResNet cells' images, one row per (model, weights, image)."""
    import numpy as np

    from dlg_jax.results.files import save_figure
    from dlg_jax.results.metrics import matched_psnr
    from dlg_jax.results.plots import grid, show_image

    rows = [(dataset, model, weights, images, iterations) for model, dataset, images, iterations, _, attacks in CELLS
            if model.startswith(("resnet", "convnet")) and set(MAIN) <= set(attacks) for weights in ("untrained", "trained")]
    lines = [(d, m, w, i, it) for d, m, w, n, it in rows for i in range(n)
             if (out / cell_folder(d, m, w, "ig", it) / "reconstructions" / f"{i}-0.npz").exists()]
    if not lines:
        return
    fig, axes = grid(len(lines), 1 + len(MAIN), (1.6 * (1 + len(MAIN)), 1.7 * len(lines)))
    for row, (dataset, model, weights, index, iterations) in enumerate(lines):
        for column, attack in enumerate(("truth",) + MAIN):
            file = out / cell_folder(dataset, model, weights, "ig" if attack == "truth" else attack, iterations)
            file = file / "reconstructions" / f"{index}-0.npz"
            ax = axes[row, column]
            if not file.exists():
                ax.axis("off")
                continue
            with np.load(file) as npz:
                image = npz["truth"] / 255.0 if attack == "truth" else npz["reconstruction"]
                truth = npz["truth"] / 255.0
            show_image(ax, image)
            psnr = matched_psnr(truth[None], image[None])
            title = f"{model} {weights[:2]} #{index}" if attack == "truth" else f"{attack} {psnr:.1f} dB"
            ax.set_title(title, fontsize=7)
    fig.tight_layout()
    save_figure(path, fig, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--cells", default=None, help="only these models (comma-separated)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for model, dataset, images, iterations, train_steps, attacks in CELLS:
        if args.cells and model not in args.cells.split(","):
            continue
        for weights in ("untrained", "trained"):
            for attack in attacks:
                folder = out / cell_folder(dataset, model, weights, attack, iterations)
                if not args.table_only:
                    trained = checkpoint_for(out, model, dataset, images, train_steps) if weights == "trained" else None
                    sweep(out, model, dataset, images, iterations, attack, trained, args.processes)
                s = summarise(folder, dataset=dataset, model=model, weights=weights, attack=attack, iterations=iterations)
                if s:
                    summaries.append(s)
                    (out / "inverting_gradients.md").write_text(table(summaries))
    text = table(summaries)
    (out / "inverting_gradients.md").write_text(text)
    buffer = io.StringIO()
    if summaries:
        writer = csv.DictWriter(buffer, fieldnames=list(summaries[0]))
        writer.writeheader()
        writer.writerows(summaries)
    (out / "inverting_gradients.csv").write_text(buffer.getvalue())
    figure(out, out / "inverting_gradients.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
