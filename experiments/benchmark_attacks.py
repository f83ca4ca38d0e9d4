"""Attack every image of a local npz with dlg_jax and report success, labels, time and evaluations.

    python experiments/benchmark_attacks.py --data ../shared/data/cifar100_train_0-49.npz --indices 0:50 \\
        --out runs/bench [--label-strategy idlg] [--track]

Each image is attacked exactly as `python -m dlg_jax.run` does (same defaults; each attack compiles its program,
the persistent compilation cache serving all but the first).
Rows go to OUT/attacks.jsonl as each image finishes (a rerun skips finished indices); OUT/summary.md
has the table: success at PSNR >= 30 dB, label accuracy, min/median time per attack (compilation
excluded, reported apart), evaluations. With --track the attack is stopped after every step to record how many
evaluations it took until its current iterate first reached PSNR >= 30 dB (the stops slow it: take times from an
untracked run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlg_jax.cli.common import ArgumentParser, enable_compilation_cache, fail, positive_int  # noqa: E402
from dlg_jax.config import LABEL_STRATEGIES, PRECISIONS, get_config  # noqa: E402
from dlg_jax.data import load_npz  # noqa: E402
from dlg_jax.errors import UsageError  # noqa: E402
from dlg_jax.ranges import parse_range  # noqa: E402
from dlg_jax.results.metrics import image_metrics  # noqa: E402

DEFAULT = get_config("dlg")  # what `python -m dlg_jax.run` attacks one image with
MODEL_SEED = 1234  # dlg_jax.run's --model-seed

SUCCESS_DB = 30.0


def evaluations_to(threshold: float, truth: np.ndarray, trace) -> int | None:
    """Evaluations done when the attack's current iterate, looked at after every step, first reached
    `threshold` dB (None: never)."""
    for (_, images), (_, _, evaluations) in zip(trace.snapshots, trace.values):
        if image_metrics(truth, images)["psnr"][0] >= threshold:
            return evaluations
    return None


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
    p.add_argument("--label-strategy", default=DEFAULT.labels, choices=LABEL_STRATEGIES)
    p.add_argument("--steps", type=positive_int, default=DEFAULT.rules.steps)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--precision", default=DEFAULT.precision, choices=PRECISIONS)
    p.add_argument("--track", action="store_true", help="record evaluations to first reach 30 dB")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        dataset = load_npz(args.data)
        indices = parse_range(args.indices)
        dataset.check_indices(indices)
    except UsageError as error:
        return fail(p.prog, error)
    from dlg_jax.engine.attack import make_case, precision_scope
    from dlg_jax.engine.single import attack_one

    enable_compilation_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "attacks.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {r["index"] for r in rows}
    config = DEFAULT.override(steps=args.steps, labels=args.label_strategy, precision=args.precision)
    with precision_scope(config):
        case = make_case("lenet", dataset.num_classes, dataset.image_shape, MODEL_SEED, config.dtype)
    for index in tqdm([i for i in indices if i not in done], desc="attacks", unit="img"):
        truth = dataset.images[index : index + 1]
        outcome, trace = attack_one(case, config, truth, dataset.labels[index : index + 1], args.seed,
                                    snapshot_every=1 if args.track else 10)
        m = image_metrics(truth / 255.0, outcome.reconstruction)
        row = dict(index=index, label_true=int(dataset.labels[index]), label_pred=int(outcome.label_pred[0]),
                   psnr=float(m["psnr"][0]), ssim=float(m["ssim"][0]), mse=float(m["mse"][0]),
                   **{k: getattr(outcome, k) for k in ("grad_distance", "status", "attempts", "steps", "iterations",
                                                       "evaluations", "seconds", "compile_seconds")})
        if args.track:
            row["evaluations_to_30db"] = evaluations_to(SUCCESS_DB, truth / 255.0, trace)
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
