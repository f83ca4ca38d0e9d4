"""The results table of a sweep: summary.json, summary.md, results.csv, a PSNR histogram and the worst
reconstructions.

Everything here is computed from the rows (`results*.jsonl`) and the saved reconstructions alone, so a
summary can be rewritten at any time, by any host, from what is on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dlg_jax.results.files import dumps, save_figure, write_atomic

SUCCESS_DB = 30.0  # a reconstruction at PSNR >= 30 dB counts as recovered (as experiments/benchmark_attacks.py)


def image_rows(rows: Sequence[dict]) -> list[dict]:
    """One entry per private image: a row of one image as it is; a batch row's per-image rows, each with the
    batch's keys (`batch_index`: the row's index; `slot`: its place in the saved reconstruction)."""
    out = []
    for r in rows:
        if "images" not in r:
            out.append(dict(r, batch_index=r["index"], slot=None))
            continue
        for k, image in enumerate(r["images"]):
            out.append(dict({key: v for key, v in r.items() if key != "images"}, **image, batch_index=r["index"], slot=k))
    return out


def summarise(rows: Sequence[dict], attack_seconds: float | None = None) -> dict:
    """Success rate, PSNR statistics, label accuracy and throughput of a list of result rows.

    `attacks_per_hour` is rows per hour of attack time: each row's `seconds` is its share of the batched
    program's wall time (compilation excluded), so their sum is the time the devices spent on the sweep,
    however many runs (resumes) it took. Processes that ran side by side pass `attack_seconds` instead: the
    slowest one's time.
    """
    if not rows:
        return dict(rows=0)
    images = image_rows(rows)
    psnr = np.array([r["psnr"] for r in images], np.float64)
    seconds = float(sum(r["seconds"] for r in rows)) if attack_seconds is None else float(attack_seconds)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    finite = psnr[np.isfinite(psnr)]
    return dict(
        rows=len(rows),
        images=len({r["index"] for r in images}),
        batch_size=len(images) // len(rows),
        seeds=len({r["seed"] for r in rows}),
        restarts=int(rows[0].get("restarts", 1)),
        success_db=SUCCESS_DB,
        successes=int((psnr >= SUCCESS_DB).sum()),
        success_rate=float((psnr >= SUCCESS_DB).mean()),
        median_psnr=float(np.median(finite)) if len(finite) else float("nan"),
        mean_psnr=float(np.mean(finite)) if len(finite) else float("nan"),
        label_accuracy=float(np.mean([r["label_accuracy"] if "label_accuracy" in r else r["label_pred"] == r["label_true"]
                                      for r in rows])),
        median_evaluations=float(np.median([r["evaluations"] for r in rows])),
        attack_seconds=seconds,
        attacks_per_hour=len(rows) / seconds * 3600.0 if seconds > 0 else float("nan"),
        statuses=dict(sorted(statuses.items())),
    )


def markdown(summary: dict, rows: Sequence[dict], config: dict, worst: int = 10) -> str:
    if not rows:
        return "# Sweep summary\n\nNo finished attacks yet.\n"
    s = summary
    images = image_rows(rows)
    lines = [
        "# Sweep summary",
        "",
        f"{s['rows']} attacks: {s['images']} images x {s['seeds']} seeds, best of {s['restarts']} restart(s) each"
        + (f", on batches of {s['batch_size']} images (PSNR per image, matched)." if s["batch_size"] > 1 else "."),
        "",
        f"| attacks | images at PSNR >= {SUCCESS_DB:.0f} dB | median PSNR | mean PSNR | labels right | median evaluations "
        "| attacks per hour |",
        "|---|---|---|---|---|---|---|",
        f"| {s['rows']} | {s['successes']}/{len(images)} ({100 * s['success_rate']:.1f}%) | {s['median_psnr']:.2f} | "
        f"{s['mean_psnr']:.2f} | {100 * s['label_accuracy']:.1f}% | {s['median_evaluations']:.0f} | "
        f"{s['attacks_per_hour']:.0f} |",
        "",
        "Status: " + ", ".join(f"{k} {v}" for k, v in s["statuses"].items()) + ".",
        "",
        f"## Worst {min(worst, len(images))} images by PSNR",
        "",
        "| index | seed | PSNR | SSIM | label true/pred | grad distance | status | attempts | evaluations |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(images, key=_psnr_key)[:worst]:
        lines.append(f"| {r['index']} | {r['seed']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['label_true']}/"
                     f"{r['label_pred']} | {r['grad_distance']:.3g} | {r['status']} | {r['attempts']} | "
                     f"{r['evaluations']} |")
    attack = config.get("attack", {})
    lines += ["", "Configuration: " + ", ".join(f"{k}={v}" for k, v in attack.items()) +
              f", model_seed={config.get('model_seed')}, restarts={config.get('restarts')}; "
              f"data {config.get('data', {}).get('source')}.", ""]
    return "\n".join(lines)


def _psnr_key(row: dict) -> float:
    psnr = row["psnr"]
    return psnr if psnr is not None and np.isfinite(psnr) else -np.inf


def save_histogram(path: Path, rows: Sequence[dict]) -> None:
    from dlg_jax.results.plots import grid

    psnr = np.array([r["psnr"] for r in image_rows(rows)], np.float64)
    psnr = psnr[np.isfinite(psnr)]
    fig, axes = grid(1, 1, (6, 3.5))
    ax = axes[0, 0]
    ax.hist(psnr, bins=max(10, min(60, len(psnr) // 3 or 1)), color="tab:blue", alpha=0.8)
    ax.axvline(SUCCESS_DB, color="tab:red", linestyle="--", label=f"{SUCCESS_DB:.0f} dB")
    ax.set_xlabel("PSNR (dB)")
    ax.set_ylabel("images")
    ax.set_title(f"{len(psnr)} images, {int((psnr >= SUCCESS_DB).sum())} at >= {SUCCESS_DB:.0f} dB")
    ax.legend()
    fig.tight_layout()
    save_figure(path, fig, dpi=100)


def save_worst(path: Path, rows: Sequence[dict], images_dir: Path, count: int = 16, pairs_per_row: int = 4) -> None:
    """A grid of the `count` lowest-PSNR rows (those whose images are on disk): truth, then reconstruction."""
    from dlg_jax.results.plots import grid, show_image

    chosen = []
    images = image_rows(rows)
    for r in sorted(images, key=_psnr_key):
        file = images_dir / image_name(r["batch_index"], r["seed"])
        if file.exists():
            with np.load(file) as saved:
                truth, recon = saved["truth"] / 255.0, saved["reconstruction"].astype(np.float64)
            if r["slot"] is not None:
                truth, recon = truth[r["slot"]], recon[r["slot"]]
            chosen.append((r, truth, recon))
        if len(chosen) == count:
            break
    if not chosen:
        return
    cols = min(pairs_per_row, len(chosen))
    grid_rows = -(-len(chosen) // cols)
    fig, axes = grid(grid_rows, 2 * cols, (2.4 * cols, 1.45 * grid_rows))
    for ax in axes.flat:
        ax.axis("off")
    for n, (r, truth, recon) in enumerate(chosen):
        for j, (image, title) in enumerate(((truth, f"#{r['index']} s{r['seed']} label {r['label_true']}"),
                                            (recon, f"{_psnr_key(r):.1f} dB, label {r['label_pred']}"))):
            ax = axes[n // cols, 2 * (n % cols) + j]
            show_image(ax, image)
            ax.set_title(title, fontsize=6)
    fig.suptitle(f"worst {len(chosen)} of {len(images)} images by PSNR: truth | reconstruction", fontsize=8)
    fig.tight_layout()
    save_figure(path, fig, dpi=110)


def image_name(index: int, seed: int) -> str:
    return f"{index}-{seed}.npz"


CSV_FIRST = ("index", "seed", "batch_index", "slot", "label_true", "label_pred", "label_name_true", "label_name_pred",
             "psnr", "ssim", "mse", "grad_distance", "status", "attempts", "steps", "iterations", "evaluations",
             "seconds", "compile_seconds", "restart", "restarts", "restart_distances")


def csv_text(rows: Sequence[dict]) -> str:
    """One line per private image (`image_rows`), flat: lists joined by ';', the batch's own nested rows
    dropped. Columns: CSV_FIRST, then any other key in sorted order (pandas.read_csv reads it as is)."""
    import csv
    import io

    flat = [{k: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in r.items()
             if not isinstance(v, dict) and k != "images"} for r in image_rows(rows)]
    keys = set().union(*flat) if flat else set()
    columns = [k for k in CSV_FIRST if k in keys] + sorted(keys - set(CSV_FIRST))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def write(out: Path, rows: Sequence[dict], config: dict, worst: int = 16, attack_seconds: float | None = None) -> dict:
    """Write summary.json, summary.md, results.csv, psnr_histogram.png and worst.png into `out` (atomically)."""
    rows = sorted(rows, key=lambda r: (r["index"], r["seed"]))
    summary = summarise(rows, attack_seconds)
    write_atomic(out / "summary.json", dumps(dict(summary=summary, config=config), indent=2) + "\n")
    write_atomic(out / "summary.md", markdown(summary, rows, config))
    write_atomic(out / "results.csv", csv_text(rows))
    if rows:
        save_histogram(out / "psnr_histogram.png", rows)
        save_worst(out / "worst.png", rows, out / "reconstructions", worst)
    return summary
