"""Devices and compilation: one CPU device per core, and the XLA options the attack's programs compile with."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp


def use_all_cpu_cores() -> int:
    """Give JAX one CPU device per core this process may use, so that sharding the lanes over the CPU devices
    runs them on every core. Returns the number of CPU devices JAX will have.

    XLA's CPU backend runs the small operations of an attack on one thread; separate devices run their shards
    of the lanes concurrently (measured on 2 cores: 1.9x the throughput of one device). Must run before JAX
    initialises its backends (the first computation); an explicit
    XLA_FLAGS=--xla_force_host_platform_device_count wins. Accelerators are not affected.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return int(flags.split("xla_force_host_platform_device_count=")[1].split()[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # too late: the backends are up; keep what they have
        return len(jax.devices("cpu"))
    return cores


# XLA:CPU hands matrix products and reductions to YNNPACK. jaxlib 0.10's default runs each product on its own;
# as fusions with the elementwise work around them, one evaluation of D and its gradient takes 0.83x the time
# in float32, 0.86x in float64 (`experiments/bench_objective.py --compiler-options dlg_jax default`).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_accepts(options: tuple) -> bool:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    probe = jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((), jnp.float32, sharding=cpu))
    try:
        probe.compile(compiler_options=dict(options))
    except Exception:  # an experimental option this jaxlib does not know (or no longer parses)
        return False
    return True


def compiler_options(platform: str | None = None) -> dict[str, str]:
    """XLA options to compile an attack's programs with, for `platform` (default: JAX's default backend).

    On CPU `CPU_COMPILER_OPTIONS` where this jaxlib accepts them (they are experimental: without them the
    attack is the same, only slower); elsewhere none.
    """
    if (platform or jax.default_backend()) != "cpu" or not _cpu_accepts(tuple(CPU_COMPILER_OPTIONS.items())):
        return {}
    return dict(CPU_COMPILER_OPTIONS)
