"""Judging a reconstruction against the private data: result.json's per-image keys, batches matched first."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def judge(truth: np.ndarray, reconstruction: np.ndarray, label_pred, label_true, indices: Sequence[int],
          names: Sequence[str]) -> tuple[dict, np.ndarray]:
    """Judge a reconstruction of private images (truth in [0, 1], NHWC): result.json's image keys, and the order
    that matches the reconstructions to the truth (`reconstruction[order]`).

    A batch comes back in any order: its reconstructions are matched to the private images first
    (minimum-cost assignment on MSE), then judged pair by pair; the result then has a row per image, the
    means and the label accuracy as multisets. One image gives its row alone.
    """
    from dlg_jax.results.metrics import image_metrics, match_to_truth

    order = match_to_truth(truth, reconstruction)
    metrics = image_metrics(truth, np.asarray(reconstruction)[order])
    label_pred, label_true = np.asarray(label_pred).reshape(-1), np.asarray(label_true).reshape(-1)
    name = lambda c: names[c] if 0 <= c < len(names) else str(c)  # noqa: E731
    per_image = [
        dict(index=int(i), label_true=int(t), label_pred=int(p), label_name_true=name(int(t)),
             label_name_pred=name(int(p)), mse=float(m), psnr=float(q), ssim=float(s))
        for i, t, p, m, q, s in zip(indices, label_true, label_pred[order], metrics["mse"], metrics["psnr"],
                                    metrics["ssim"])
    ]
    if len(per_image) == 1:
        return dict(per_image[0]), order
    return dict(indices=[int(i) for i in indices], batch_size=len(per_image),
                **{k: float(np.mean(metrics[k])) for k in ("mse", "psnr", "ssim")},
                label_accuracy=multiset_accuracy(label_pred, label_true), images=per_image), order


def multiset_accuracy(predicted: Sequence[int], true: Sequence[int]) -> float:
    """Fraction of the batch's labels recovered, as multisets (order-free, repeats counted)."""
    from collections import Counter

    hits = Counter(int(p) for p in predicted) & Counter(int(t) for t in true)
    return sum(hits.values()) / len(true)
