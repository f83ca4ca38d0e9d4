"""Figures of an attack: the optimisation history (as the original DLG shows it) and the final result."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dlg_jax.results.files import save_figure  # noqa: E402


def _show(ax, image: np.ndarray) -> None:
    image = np.clip(image, 0.0, 1.0)
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
              vmin=0.0, vmax=1.0)
    ax.axis("off")


def save_history(path: Path, snapshots: Sequence[tuple[int, np.ndarray]], columns: int = 10) -> None:
    """A grid of dummy images every few steps, titled `iter=k`; one block of rows per image of the batch.

    `snapshots` is [(step, images (N, H, W, C))]; 300 steps snapshotted every 10 give the original's 3x10.
    """
    num_images = snapshots[0][1].shape[0]
    rows_per_image = -(-len(snapshots) // columns)
    fig, axes = plt.subplots(rows_per_image * num_images, columns, squeeze=False,
                             figsize=(1.2 * columns, 1.35 * rows_per_image * num_images))
    for ax in axes.flat:
        ax.axis("off")
    for n in range(num_images):
        for i, (step, images) in enumerate(snapshots):
            ax = axes[n * rows_per_image + i // columns, i % columns]
            _show(ax, images[n])
            ax.set_title(f"iter={step}", fontsize=7)
    fig.tight_layout()
    save_figure(path, fig, dpi=100)
    plt.close(fig)


def save_reconstruction(path: Path, truths: np.ndarray, reconstructions: np.ndarray,
                        captions: Sequence[tuple[str, str]]) -> None:
    """Ground truth beside reconstruction for each image; `captions` = [(truth caption, recon caption)]."""
    num_images = len(truths)
    fig, axes = plt.subplots(num_images, 2, squeeze=False, figsize=(4.6, 2.4 * num_images))
    for n in range(num_images):
        for ax, image, caption in zip(axes[n], (truths[n], reconstructions[n]), captions[n]):
            _show(ax, image)
            ax.set_title(caption, fontsize=8)
    fig.tight_layout()
    save_figure(path, fig, dpi=100)
    plt.close(fig)
