"""Batched leakage on consecutive images of a local npz: N private images from one mean gradient.

    python experiments/batched_leakage.py --data ../shared/data/cifar100_train_0-49.npz --batch-size 4 \\
        --label-strategy idlg --pixel-range sigmoid --tv-weight 1e-5 --steps 600 --out runs/batched4

Batches are [0, N), [N, 2N), ... within --indices (a last partial batch is dropped). Each is attacked as
`python -m dlg_jax.run --batch-size N --seed S` does for every S of --seeds, its reconstructions matched to the
truth by a minimum-cost assignment, and one row per (batch, seed) goes to OUT/batches.jsonl as it finishes (a
rerun skips finished rows; more seeds extend it). OUT/summary.md has the table: per batch the start kept
(the lowest gradient distance over the seeds: what an attacker can see, not the truth), its mean matched
PSNR, label accuracy (as multisets), evaluations and seconds, and the means over batches, for the first
seed alone and for the best of all seeds. `--labels-only` measures the label recovery alone (no attack).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlg_jax.cli.common import ArgumentParser, fail, non_negative_float, positive_int  # noqa: E402
from dlg_jax.config import LABEL_STRATEGIES, get_config  # noqa: E402
from dlg_jax.data import load_npz  # noqa: E402
from dlg_jax.errors import UsageError  # noqa: E402
from dlg_jax.parts.dummies import DUMMIES  # noqa: E402
from dlg_jax.ranges import parse_range  # noqa: E402
from dlg_jax.results.judge import judge, multiset_accuracy  # noqa: E402


def recovered_labels(case, config, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The analytic labels of one batch: those `make_problem` reads off the shared gradient for `idlg`."""
    import jax.numpy as jnp

    from dlg_jax.engine.attack import make_attack, make_problem, precision_scope

    config = config.override(labels="idlg")
    with precision_scope(config):
        attack = make_attack(case, config, batch_size=len(images))
        problem = make_problem(attack, jnp.asarray(images, config.dtype) / 255.0, jnp.asarray(labels), seed=0)
        return np.asarray(jnp.argmax(problem.known_labels, axis=-1))


def gradient_dimension_bound(image_shape, num_classes: int, n: int, model_seed: int = 1234) -> tuple[int, int]:
    """(unknowns, an upper bound on the dimension of the set of shared gradients) for batches of n images.

    The conv layers' gradients are their parameter count of numbers; the last layer's is
    (1/n) sum_i h_i e_i^T (rank <= n: n (in + classes) - n^2 numbers, plus n for its bias gradient sum_i e_i).
    When the bound is below the unknowns n*H*W*C, batches with D = 0 form a set of that many dimensions at least.
    """
    import jax

    from dlg_jax.models import get_model

    leaves = jax.tree.leaves(get_model("lenet", num_classes, image_shape).init(model_seed))
    kernel = [x for x in leaves if x.ndim == 2][-1]
    conv = sum(x.size for x in leaves) - kernel.size - num_classes
    features = kernel.shape[0]
    return n * int(np.prod(image_shape)), conv + n * (features + num_classes) - n * n + n


def summarise(rows: list[dict], config: dict, seeds: list[int], bound: tuple[int, int]) -> str:
    lines = [f"Config: {json.dumps(config)}\n",
             f"Unknowns {bound[0]} vs dimension of the shared gradient <= {bound[1]}"
             f"{' (underdetermined: gradient matching alone cannot single out the batch)' if bound[1] < bound[0] else ''}.\n"]
    pools = [(f"seed {seeds[0]}", [seeds[0]])] + ([(f"best of seeds {seeds} by gradient distance", seeds)]
                                                  if len(seeds) > 1 else [])
    for label, pool in pools:
        kept = best_rows(rows, pool)
        if kept:
            lines += [f"## {label}\n", table(kept), ""]
    return "\n".join(lines)


def best_rows(rows: list[dict], seeds: list[int]) -> list[dict]:
    """Per batch, the row of the lowest gradient distance among `seeds` (batches with every seed done)."""
    by_batch: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["seed"] in seeds:
            by_batch.setdefault(tuple(r["indices"]), []).append(r)
    return [min(group, key=lambda r: r.get("grad_distance", 0.0)) for key, group in sorted(by_batch.items())
            if len(group) == len(seeds)]


def table(rows: list[dict]) -> str:
    lines = ["| batch | seed | labels true | label accuracy | matched PSNR per image | mean PSNR | mean SSIM | D | evaluations | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = r.get("psnr", [])
        lines.append(f"| {r['indices'][0]}-{r['indices'][-1]} | {r['seed']} | {r['label_true']} | {r['label_accuracy']:.2f} | "
                     f"{' '.join(f'{p:.1f}' for p in psnr)} | {np.mean(psnr) if psnr else float('nan'):.2f} | "
                     f"{np.mean(r['ssim']) if psnr else float('nan'):.3f} | {r.get('grad_distance', float('nan')):.2e} | "
                     f"{r.get('evaluations', '-')} | {r.get('seconds', float('nan')):.1f} |")
    accuracy = np.mean([r["label_accuracy"] for r in rows])
    lines.append(f"\nLabel accuracy over {len(rows)} batches: {100 * accuracy:.1f}%.")
    if rows and "psnr" in rows[0]:
        means = [np.mean(r["psnr"]) for r in rows]
        lines.append(f"Mean matched PSNR over batches: {np.mean(means):.2f} dB (batch means min {min(means):.2f}, "
                     f"median {np.median(means):.2f}, max {max(means):.2f}); images >= 30 dB: "
                     f"{sum(p >= 30 for r in rows for p in r['psnr'])}/{sum(len(r['psnr']) for r in rows)}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = ArgumentParser(prog="batched_leakage", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--indices", default="0:50")
    p.add_argument("--batch-size", type=positive_int, required=True)
    p.add_argument("--labels-only", action="store_true", help="measure analytic label recovery only")
    p.add_argument("--label-strategy", default="idlg", choices=LABEL_STRATEGIES)
    p.add_argument("--pixel-range", default="sigmoid", choices=sorted(DUMMIES))
    p.add_argument("--tv-weight", type=non_negative_float, default=1e-5)
    p.add_argument("--tv-stages", type=positive_int, default=4)
    p.add_argument("--steps", type=positive_int, default=600)
    p.add_argument("--precision", default="float32", choices=("float32", "float64"))
    p.add_argument("--seeds", default="1234", help="starts per batch, e.g. 1234,1 (the lowest D is kept)")
    p.add_argument("--model-seed", type=int, default=1234)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        dataset = load_npz(args.data)
        indices = parse_range(args.indices, "--indices")
        dataset.check_indices(indices)
        batches = [indices[i:i + args.batch_size] for i in range(0, len(indices) - args.batch_size + 1, args.batch_size)]
        if not batches:
            raise UsageError(f"--indices: {len(indices)} image(s), fewer than --batch-size {args.batch_size}")
        seeds = parse_range(args.seeds, "--seeds")
        config = get_config("dlg").override(steps=args.steps, labels=args.label_strategy, precision=args.precision,
                                            dummy=args.pixel_range, tv_weight=args.tv_weight, tv_stages=args.tv_stages)
    except (UsageError, ValueError) as error:
        return fail(p.prog, error)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    identity = dict(data=str(Path(args.data).resolve()), batch_size=args.batch_size, labels_only=args.labels_only,
                    model_seed=args.model_seed, **config.to_dict())
    config_path = out / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != identity:
        return fail(p.prog, UsageError(f"{out} holds rows of another configuration; use a new --out"))
    config_path.write_text(json.dumps(identity, indent=1))
    rows_path = out / "batches.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()] if rows_path.exists() else []
    done = {(tuple(r["indices"]), r["seed"]) for r in rows}
    todo = [(b, s) for s in seeds for b in batches if (tuple(b), s) not in done]
    from dlg_jax.engine.attack import make_case, precision_scope
    from dlg_jax.engine.single import attack_one

    with precision_scope(config):  # the attacked model, once: LeNet with --model-seed weights (dlg_jax.run's)
        case = make_case("lenet", dataset.num_classes, dataset.image_shape, args.model_seed, config.dtype)
    with open(rows_path, "a") as sink:
        for batch, seed in tqdm(todo, desc=f"batches of {args.batch_size}"):
            images, labels = dataset.images[batch], dataset.labels[batch]
            row = dict(indices=batch, seed=seed, label_true=[int(x) for x in labels])
            if args.labels_only:
                predicted = recovered_labels(case, config, images, labels)
            else:
                outcome, _ = attack_one(case, config, images, labels, seed)
                judged, _ = judge(images / 255.0, outcome.reconstruction, outcome.label_pred, labels, batch,
                                  dataset.label_names)
                per_image = judged.get("images", [judged])
                predicted = outcome.label_pred
                row.update(psnr=[round(r["psnr"], 3) for r in per_image], ssim=[round(r["ssim"], 4) for r in per_image],
                           **{k: getattr(outcome, k) for k in ("grad_distance", "status", "attempts", "iterations",
                                                               "evaluations", "seconds")})
            row.update(label_pred=sorted(int(x) for x in predicted),
                       label_accuracy=multiset_accuracy(predicted, labels))
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            rows.append(row)
    bound = gradient_dimension_bound(dataset.image_shape, dataset.num_classes, args.batch_size, args.model_seed)
    (out / "summary.md").write_text(summarise(sorted(rows, key=lambda r: r["indices"]), identity, seeds, bound))
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
