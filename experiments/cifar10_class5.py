"""Why the default attack fails on CIFAR-10 class 5 (issue 19's open mode), measured.

    python experiments/cifar10_class5.py          # ~10 min on one CPU core

1. The seeded LeNet (model seed 1234, 10 outputs): its predictions on the 200 shared CIFAR-10 images and the
   squared norm of the shared gradient per class (the true label's residual p - y is small for the class the
   model is confident in).
2. The 18 failures of experiments/results/failure_modes.md (all class 5, label right), attacked again with the
   default flags in float32 and in float64, side by side: PSNR, status, D / target, seconds.
3. The cost of float64 where nothing fails: CIFAR-100 images 0-9 (seed 1234) in float32 and float64,
   alternating, seconds per attack (ratio of medians).
Writes experiments/results/cifar10_class5.md.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / ".." / "shared" / "data"
FAILURES = [(51, 0), (51, 1), (56, 1), (83, 0), (83, 1), (107, 0), (128, 0), (128, 1), (156, 0), (156, 1),
            (157, 0), (167, 1), (177, 0), (177, 1), (182, 0), (182, 1), (195, 0), (195, 1)]


def main() -> None:
    import jax
    import jax.numpy as jnp

    import dlg_jax
    from dlg_jax.client import client_gradient
    from dlg_jax.models import lenet_model

    cifar10 = dlg_jax.load_npz(str(DATA / "cifar10_train_0-199.npz"))
    model = lenet_model(10, (32, 32, 3))
    params = model.init(1234)
    pixels = jnp.asarray(cifar10.images, jnp.float32) / 255.0
    probs = np.asarray(jax.nn.softmax(model.apply(params, pixels)))
    labels = np.asarray(cifar10.labels)

    def energy(i):
        g = client_gradient(model, params, pixels[i:i + 1], jax.nn.one_hot(labels[i:i + 1], 10))
        return float(sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(g)))

    energies = np.array([energy(i) for i in range(len(labels))])
    lines = ["# CIFAR-10 class 5: why the default attack fails there", "",
             f"`python experiments/cifar10_class5.py` on {platform.machine()} CPU, one core.", "",
             "## The seeded model is confident in class 5", "",
             f"Argmax of the seeded LeNet on the 200 images: {np.bincount(probs.argmax(1), minlength=10).tolist()} "
             f"(per class); mean p(class 5) = {probs[:, 5].mean():.3f}.", "",
             "| true class | images | mean p(true class) | median squared norm of the shared gradient |", "|---|---|---|---|"]
    for c in range(10):
        idx = labels == c
        lines.append(f"| {c} | {idx.sum()} | {probs[idx, c].mean():.3f} | {np.median(energies[idx]):.1f} |")
    fail_images = sorted({i for i, _ in FAILURES})
    lines += ["", f"Failed images (class 5): p(5) {np.round(probs[fail_images, 5], 3).tolist()}, squared norms "
              f"{np.round(energies[fail_images], 1).tolist()}.", "",
              "## The failures again, float32 and float64 side by side (default flags otherwise)", "",
              "| index | seed | float32 PSNR | status | D / target | s | float64 PSNR | status | D / target | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    passed = {"float32": 0, "float64": 0}
    seconds = {"float32": [], "float64": []}
    for index, seed in FAILURES:
        cells = []
        for precision in ("float32", "float64"):
            start = time.perf_counter()
            r = dlg_jax.attack(cifar10, index=index, seed=seed, precision=precision, snapshot_every=1000)
            wall = time.perf_counter() - start
            target = 1e-7 * energies[index]
            passed[precision] += r.psnr >= 30
            seconds[precision].append(r.metrics["seconds"])
            cells += [f"{r.psnr:.2f}", r.status, f"{r.metrics['grad_distance'] / target:.1f}", f"{wall:.1f}"]
            print(index, seed, precision, round(r.psnr, 2), r.status, flush=True)
        lines.append(f"| {index} | {seed} | " + " | ".join(cells) + " |")
    lines += ["", f"At >= 30 dB: float32 {passed['float32']}/{len(FAILURES)}, float64 {passed['float64']}/{len(FAILURES)}. "
              f"Attack seconds (compile excluded), median: float32 {np.median(seconds['float32']):.2f}, float64 "
              f"{np.median(seconds['float64']):.2f} (ratio {np.median(seconds['float64']) / np.median(seconds['float32']):.2f}).", ""]
    cifar100 = dlg_jax.load_npz(str(DATA / "cifar100_train_0-49.npz"))
    times = {"float32": [], "float64": []}
    psnrs = {"float32": [], "float64": []}
    for index in range(10):
        for precision in ("float32", "float64"):
            r = dlg_jax.attack(cifar100, index=index, seed=1234, precision=precision, snapshot_every=1000)
            times[precision].append(r.metrics["seconds"])
            psnrs[precision].append(r.psnr)
    ratio = np.array(times["float64"]) / np.array(times["float32"])
    lines += ["## The cost of float64 where float32 succeeds: CIFAR-100 0-9, seed 1234, alternating", "",
              f"Seconds per attack: float32 median {np.median(times['float32']):.2f} (min {min(times['float32']):.2f}), "
              f"float64 median {np.median(times['float64']):.2f} (min {min(times['float64']):.2f}); per image float64 / "
              f"float32: min {ratio.min():.2f}, median {np.median(ratio):.2f}. At >= 30 dB: float32 "
              f"{sum(p >= 30 for p in psnrs['float32'])}/10, float64 {sum(p >= 30 for p in psnrs['float64'])}/10.", ""]
    out = ROOT / "experiments" / "results" / "cifar10_class5.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
