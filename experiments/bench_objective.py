"""Cost of one evaluation of the DLG objective and its gradient: FLOPs (XLA cost analysis) and time.

    python experiments/bench_objective.py [--batch 1 8] [--repeats 7] [--compiler-options dlg_jax default]

The objective is the engine's (`make_attack(case, config).objective` of the flat dummy: the default attack,
joint labels, squared L2 distance), on CIFAR-100 image 0's gradient. Compares the convolution as written in
dlg_jax (`dlg_jax.models.lenet.conv2d`: im2col by one gather + einsum) with `lax.conv` and with im2col by 25
strided slices, in float32 and float64, unbatched and under `vmap`, all in one process so the ratios are side
by side. Each is compiled with the XLA options dlg_jax uses (`dlg_jax.engine.devices.compiler_options()`: on
CPU YNNPACK fusions of products and reductions) and/or with XLA's defaults. Prints min and median
milliseconds per evaluation over repeats, and GFLOP/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlg_jax.config import get_config  # noqa: E402
from dlg_jax.engine.attack import make_attack, make_case, make_problem, precision_scope  # noqa: E402
from dlg_jax.engine.devices import compiler_options  # noqa: E402
from dlg_jax.models import lenet  # noqa: E402


def lax_conv(images, kernel, stride):
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(images, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def sliced_conv(images, kernel, stride):
    kh, kw, c, features = kernel.shape
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    patches = jnp.stack([padded[:, a:a + stride * (out_h - 1) + 1:stride, b:b + stride * (out_w - 1) + 1:stride, :]
                         for a in range(kh) for b in range(kw)], axis=3)
    return jnp.einsum("nhwpc,pco->nhwo", patches, kernel.reshape(kh * kw, c, features))


IMPLEMENTATIONS = {"gather (dlg_jax)": lenet.conv2d, "lax.conv": lax_conv, "25 slices": sliced_conv}


def time_objective(conv, precision: str, batch: int, repeats: int, data: np.ndarray,
                   options: dict) -> tuple[float, float, float]:
    original = lenet.conv2d
    lenet.conv2d = conv  # what LeNet's Conv calls, looked up when the objective is traced
    try:
        config = get_config("dlg").override(precision=precision)
        with precision_scope(config):
            dtype = config.dtype
            case = make_case("lenet", 100, (32, 32, 3), 1234, dtype)
            attack = make_attack(case, config, batch_size=1)
            problem = make_problem(attack, jnp.asarray(data[:1] / 255.0, dtype), jnp.array([3]), seed=0)
            starts = jnp.asarray(data[1 + np.arange(batch) % (len(data) - 1)] / 255.0, dtype)  # other images
            dummies = jax.vmap(lambda x: attack.layout.ravel({"inputs": x[None],
                                                              "label_logits": jnp.zeros((1, 100), dtype)}))(starts)
            objective = jax.value_and_grad(attack.objective)
            prior = jnp.zeros((), dtype)
            fn = jax.jit(jax.vmap(objective, in_axes=(0, None, None, None)))
            args = (dummies, prior, problem, case.params)
            compiled = fn.lower(*args).compile(compiler_options=options)
            flops = compiled.cost_analysis().get("flops", float("nan"))
            jax.block_until_ready(compiled(*args))
            times = []
            for _ in range(repeats):
                n = max(5, 200 // batch)
                start = time.perf_counter()
                for _ in range(n):
                    out = compiled(*args)
                jax.block_until_ready(out)
                times.append((time.perf_counter() - start) / n * 1e3)
            return min(times), float(np.median(times)), flops
    finally:
        lenet.conv2d = original


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compiler-options", nargs="+", default=["dlg_jax"], choices=["dlg_jax", "default"],
                        help="XLA options to compile with: dlg_jax's (dlg_jax.engine.devices.compiler_options()) "
                             "and/or XLA's defaults")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar100_train_0-49.npz"))
    args = parser.parse_args(argv)
    data = np.load(args.data)["images"]
    print(f"devices: {jax.devices()}")
    option_sets = {"dlg_jax": compiler_options(), "default": {}}
    print("| conv | XLA options | precision | batch | ms/eval min | ms/eval median | per attack (min/B) | MFLOP/eval | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for precision in ("float64", "float32"):
        for batch in args.batch:
            for name, conv in IMPLEMENTATIONS.items():
                for which in args.compiler_options:
                    best, median, flops = time_objective(conv, precision, batch, args.repeats, data, option_sets[which])
                    print(f"| {name} | {which} | {precision} | {batch} | {best:.3f} | {median:.3f} | {best / batch:.3f} | "
                          f"{flops / batch / 1e6:.2f} | {flops / best / 1e6:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
