"""Figures of an attack: the optimisation history (as the original DLG shows it) and the final result.

Figures are drawn on `matplotlib.figure.Figure` objects, not through pyplot: saving one needs no backend, and
the library never switches the backend of the process it runs in (a notebook's inline display keeps working
after an attack or a sweep has saved its figures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from dlg_jax.results.files import save_figure


def grid(rows: int, columns: int, figsize: tuple[float, float]):
    """A figure and its (rows, columns) array of axes."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, columns, squeeze=False)


def show_image(ax, image: np.ndarray) -> None:
    """An image in [0, 1] (H, W, C), clipped; one channel in grey."""
    image = np.clip(image, 0.0, 1.0)
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
              vmin=0.0, vmax=1.0)
    ax.axis("off")


def save_history(path: Path, snapshots: Sequence[tuple[int, np.ndarray]], columns: int = 10,
                 stop: str | None = None) -> None:
    """A grid of dummy images every few steps, titled `iter=k`; one block of rows per image of the batch.

    `snapshots` is [(step, images (N, H, W, C))]; 300 steps snapshotted every 10 give the original's 3x10.
    `stop` (e.g. "converged"): the last snapshot is where the attack stopped, titled so in red.
    """
    num_images = snapshots[0][1].shape[0]
    rows_per_image = -(-len(snapshots) // columns)
    fig, axes = grid(rows_per_image * num_images, columns, (1.2 * columns, 1.35 * rows_per_image * num_images))
    for ax in axes.flat:
        ax.axis("off")
    for n in range(num_images):
        for i, (step, images) in enumerate(snapshots):
            ax = axes[n * rows_per_image + i // columns, i % columns]
            show_image(ax, images[n])
            last = stop is not None and i == len(snapshots) - 1
            ax.set_title(f"{stop} {step}" if last else f"iter={step}", fontsize=7, color="tab:red" if last else "black")
    fig.tight_layout()
    save_figure(path, fig, dpi=100)


def save_reconstruction(path: Path, truths: np.ndarray, reconstructions: np.ndarray,
                        captions: Sequence[tuple[str, str]]) -> None:
    """Ground truth beside reconstruction for each image; `captions` = [(truth caption, recon caption)]."""
    num_images = len(truths)
    fig, axes = grid(num_images, 2, (4.6, 2.4 * num_images))
    for n in range(num_images):
        for ax, image, caption in zip(axes[n], (truths[n], reconstructions[n]), captions[n]):
            show_image(ax, image)
            ax.set_title(caption, fontsize=8)
    fig.tight_layout()
    save_figure(path, fig, dpi=100)


def save_trace(path: Path, values: Sequence[tuple[int, float, int]], scores: Sequence[tuple[int, float]],
               stop: str | None = None) -> None:
    """The gradient distance D (log scale) and the PSNR of the current dummy against the truth, per step."""
    steps = [v[0] for v in values]
    fig, axes = grid(1, 1, (6, 3.2))
    ax = axes[0, 0]
    ax.semilogy(steps, [max(v[1], 1e-30) for v in values], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient distance D", color="tab:blue")
    if scores:
        twin = ax.twinx()
        twin.plot([s[0] for s in scores], [s[1] for s in scores], color="tab:orange")
        twin.set_ylabel("PSNR (dB)", color="tab:orange")
    if stop is not None and steps:
        ax.axvline(steps[-1], color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(f"{stop} at step {steps[-1]}", fontsize=9)
    fig.tight_layout()
    save_figure(path, fig, dpi=100)


def save_gif(path: Path, snapshots: Sequence[tuple[int, np.ndarray]], scale: int = 4, frame_ms: int = 150) -> None:
    """The dummy over the steps as an animated GIF, like the original's demo: one frame per snapshot, the batch
    side by side, the step written above; the last frame held longer."""
    import io

    from PIL import Image, ImageDraw

    from dlg_jax.results.files import write_atomic

    frames = []
    for step, images in snapshots:
        tiles = np.clip(np.asarray(images, np.float64), 0.0, 1.0)
        row = np.concatenate(list(tiles), axis=1)  # (H, N*W, C)
        row = np.repeat(np.repeat((row * 255.0).round().astype(np.uint8), scale, 0), scale, 1)
        if row.shape[-1] == 1:
            row = np.repeat(row, 3, axis=-1)
        canvas = np.full((row.shape[0] + 14, row.shape[1], 3), 255, np.uint8)
        canvas[14:] = row
        frame = Image.fromarray(canvas)
        ImageDraw.Draw(frame).text((2, 1), f"iter={step}", fill=(0, 0, 0))
        frames.append(frame)
    buffer = io.BytesIO()
    durations = [frame_ms] * (len(frames) - 1) + [frame_ms * 10]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    write_atomic(path, buffer.getvalue())


def save_text_table(path: Path, header: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]],
                    wrap: int = 56) -> None:
    """The decoded text at chosen iterations or stages, as the DLG paper's Table 2: a row per snapshot (its
    label on the left), a column per sentence, long text wrapped at `wrap` characters."""
    import textwrap

    wrapped = [[textwrap.fill(label, 22)] + [textwrap.fill(t, wrap) for t in texts] for label, texts in rows]
    lines = [max(cell.count("\n") + 1 for cell in row) + 0.6 for row in wrapped]
    units = [2.0] + [4.2] * (len(header) - 1)  # inches per column
    heights = [1.6] + lines
    fig = Figure(figsize=(sum(units), 0.17 * sum(heights) + 0.1))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    table = ax.table(cellText=wrapped, colLabels=list(header), loc="upper center", cellLoc="left",
                     colWidths=[u / sum(units) for u in units])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (r, c), cell in table.get_celld().items():
        cell.set_height(heights[r] / sum(heights))
        if r == 0 or c == 0:
            cell.set_text_props(weight="bold")
    save_figure(path, fig, dpi=150)
