"""Attack every image of a local npz with dlg_jax and report success, labels, time and evaluations.

    python experiments/benchmark_attacks.py --data ../shared/data/cifar100_train_0-49.npz --indices 0:50 \\
        --out runs/bench [--label-strategy idlg] [--track]

Each image is attacked exactly as `python -m dlg_jax.run` does (same defaults, one compilation reused).
Rows go to OUT/attacks.jsonl as each image finishes (a rerun skips finished indices); OUT/summary.md
has the table: success at PSNR >= 30 dB, label accuracy, min/median time per attack (compilation
excluded, reported apart), evaluations. With --track the attack is checked every step to record how many
evaluations it took to first reach PSNR >= 30 dB (the checks slow it: take times from an untracked run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlg_jax.attack import AttackConfig  # noqa: E402
from dlg_jax.cli import ArgumentParser, fail, positive_int  # noqa: E402
from dlg_jax.data import load_npz  # noqa: E402
from dlg_jax.errors import UsageError  # noqa: E402
from dlg_jax.ranges import parse_range  # noqa: E402
from dlg_jax.metrics import image_metrics  # noqa: E402
from dlg_jax.run import attack_images  # noqa: E402

SUCCESS_DB = 30.0


def summarise(rows: list[dict]) -> str:
    psnr = np.array([r["psnr"] for r in rows])
    seconds = np.array([r["seconds"] for r in rows])
    evals = np.array([r["evaluations"] for r in rows])
    lines = [
        f"| images | PSNR >= {SUCCESS_DB:.0f} dB | labels right | median PSNR | time per attack min / median / mean (s) "
        "| median evaluations | compile (s, first / rest) |",
        "|---|---|---|---|---|---|---|",
        f"| {len(rows)} | {int((psnr >= SUCCESS_DB).sum())}/{len(rows)} | "
        f"{sum(r['label_pred'] == r['label_true'] for r in rows)}/{len(rows)} | {np.median(psnr):.1f} | "
        f"{seconds.min():.2f} / {np.median(seconds):.2f} / {seconds.mean():.2f} | {int(np.median(evals))} | "
        f"{rows[0]['compile_seconds']:.2f} / {np.median([r['compile_seconds'] for r in rows[1:]] or [0]):.2f} |",
    ]
    tracked = [r["evaluations_to_30db"] for r in rows if r.get("evaluations_to_30db")]
    if tracked:
        lines.append(f"\nEvaluations to first reach {SUCCESS_DB:.0f} dB: median {int(np.median(tracked))}, "
                     f"min {min(tracked)}, max {max(tracked)} ({len(tracked)} images).")
    lines.append("\n| index | label true/pred | PSNR | SSIM | status | attempts | evaluations | seconds |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(f"| {r['index']} | {r['label_true']}/{r['label_pred']} | {r['psnr']:.1f} | {r['ssim']:.3f} | "
                     f"{r['status']} | {r['attempts']} | {r['evaluations']} | {r['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = ArgumentParser(prog="benchmark_attacks", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--indices", default="0:50")
    p.add_argument("--label-strategy", default="joint", choices=("joint", "idlg"))
    p.add_argument("--steps", type=positive_int, default=AttackConfig.steps)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--precision", default=AttackConfig.precision, choices=("float64", "float32"))
    p.add_argument("--track", action="store_true", help="record evaluations to first reach 30 dB")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        dataset = load_npz(args.data)
        indices = parse_range(args.indices)
        dataset.check_indices(indices)
    except UsageError as error:
        return fail(p.prog, error)
    from dlg_jax.cli import enable_compilation_cache

    enable_compilation_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "attacks.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {r["index"] for r in rows}
    config = AttackConfig(steps=args.steps, label_strategy=args.label_strategy, precision=args.precision)
    for index in tqdm([i for i in indices if i not in done], desc="attacks", unit="img"):
        truth = dataset.images[index : index + 1]
        first_hit = {}

        def track(progress):
            if "evals" not in first_hit and image_metrics(truth / 255.0, progress["best_images"])["psnr"][0] >= SUCCESS_DB:
                first_hit["evals"] = progress["evaluations"]

        outcome = attack_images(truth, dataset.labels[index : index + 1], dataset.num_classes, config, args.seed,
                                on_step=track if args.track else None, snapshot_every=1 if args.track else 10)
        m = image_metrics(truth / 255.0, outcome["reconstruction"])
        row = dict(index=index, label_true=int(dataset.labels[index]), label_pred=int(outcome["label_pred"][0]),
                   psnr=float(m["psnr"][0]), ssim=float(m["ssim"][0]), mse=float(m["mse"][0]),
                   **{k: outcome[k] for k in ("grad_distance", "status", "attempts", "steps", "iterations",
                                              "evaluations", "seconds", "compile_seconds")})
        if args.track:
            row["evaluations_to_30db"] = first_hit.get("evals")
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        rows.append(row)
    rows = sorted((r for r in rows if r["index"] in set(indices)), key=lambda r: r["index"])
    (out / "summary.md").write_text(summarise(rows))
    print(summarise(rows).split("\n\n| index")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
