"""Why the vision models convolve by im2col on CPU: XLA:CPU's `lax.conv` inside a while loop (the engine's lanes).

    python experiments/bench_conv_in_loop.py

Times one gradient evaluation of  sum(relu(conv(...relu(conv(x))...))^2)  (4 3x3 convolutions of 32 channels on
32x32, batch 1) and of ResNet-20's DLG objective, called alone (jit) and as 20 iterations of a `fori_loop`
(per evaluation), for `lax.conv_general_dilated` and the im2col convolution (`dlg_jax.models.lenet.conv2d`).
Min and median of 5 calls, the two side by side in one run.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def timed(fn, x, per: int) -> tuple[float, float]:
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append((time.perf_counter() - start) / per * 1e3)
    return min(times), statistics.median(times)


def main() -> None:
    from dlg_jax.models.lenet import conv2d

    kernel = jax.random.normal(jax.random.key(0), (3, 3, 32, 32)) * 0.1
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 32))
    convolutions = {
        "lax.conv": lambda v: jax.lax.conv_general_dilated(v, kernel, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")),
        "im2col": lambda v: conv2d(v, kernel, 1),
    }
    print("| convolution | alone (ms, min / median) | in a while loop (ms per evaluation) |\n|---|---|---|")
    for name, conv in convolutions.items():
        def loss(v, conv=conv):
            for _ in range(4):
                v = jax.nn.relu(conv(v))
            return jnp.sum(v**2)

        grad = jax.grad(loss)
        alone = timed(jax.jit(grad), x, 1)
        looped = timed(jax.jit(lambda v: jax.lax.fori_loop(0, 20, lambda i, v: v - 1e-3 * grad(v), v)), x, 20)
        print(f"| {name} | {alone[0]:.2f} / {alone[1]:.2f} | {looped[0]:.2f} / {looped[1]:.2f} |")


if __name__ == "__main__":
    main()
