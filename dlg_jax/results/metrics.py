"""How close a reconstruction is to the private image: MSE, PSNR and SSIM on images in [0, 1].

PSNR and SSIM come from dm-pix. Reconstructions are clipped to [0, 1] first: the dummy is unconstrained
while optimised, but an image is only ever shown or judged within the valid pixel range.
"""

from __future__ import annotations

import dm_pix
import jax.numpy as jnp
import numpy as np


def image_metrics(truth: np.ndarray, reconstruction: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image `mse`, `psnr` (dB, 10 log10(1/mse)) and `ssim` for NHWC batches in [0, 1]."""
    truth = jnp.asarray(truth, jnp.float32)
    reconstruction = jnp.clip(jnp.asarray(reconstruction, jnp.float32), 0.0, 1.0)
    mse = jnp.mean((truth - reconstruction) ** 2, axis=(1, 2, 3))
    psnr = dm_pix.psnr(truth, reconstruction)
    ssim = dm_pix.ssim(truth, reconstruction)
    return {"mse": np.asarray(mse), "psnr": np.asarray(psnr), "ssim": np.asarray(ssim)}


def match_to_truth(truth: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """The order of `reconstruction` that best lines it up with `truth`: `reconstruction[order]` matches.

    A batched attack returns its images in any order. We pair them by a minimum-cost assignment on the
    pairwise MSE (scipy's `linear_sum_assignment`, Hungarian method), which minimises the total error over
    all one-to-one pairings, before judging each pair.
    """
    from scipy.optimize import linear_sum_assignment

    truth = np.asarray(truth, np.float64).reshape(len(truth), -1)
    recon = np.clip(np.asarray(reconstruction, np.float64), 0.0, 1.0).reshape(len(reconstruction), -1)
    cost = ((truth[:, None, :] - recon[None, :, :]) ** 2).mean(-1)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def matched_psnr(truth: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean PSNR (dB) over a batch after matching it to the truth (`match_to_truth`); numpy only, for traces."""
    recon = np.clip(np.asarray(reconstruction, np.float64), 0.0, 1.0)[match_to_truth(truth, reconstruction)]
    mse = np.mean((np.asarray(truth, np.float64) - recon) ** 2, axis=tuple(range(1, recon.ndim)))
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-30))))
