"""Will the lanes fit? XLA's memory estimate of a program against what the device has free."""

from __future__ import annotations

import os

from dlg_jax.errors import UsageError


class BatchTooLarge(UsageError):
    """The requested number of lanes does not fit the device memory; the message says what would."""


def available_bytes(device) -> int | None:
    """Free memory for one device: the accelerator's own, or on CPU the host's available memory shared by the
    local CPU devices."""
    if device.platform == "cpu":
        import jax

        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            free = int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError):
                return None
        return free // max(1, len([d for d in jax.local_devices() if d.platform == "cpu"]))
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports memory
        return None
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def check_memory(engine, lanes: int, programs: dict, headroom: float = 0.85) -> None:
    """Refuse a lane count whose program would not fit, naming one that would (XLA's own estimate)."""
    need = programs.get("bytes")
    devices = len(engine.devices)
    free = available_bytes(engine.devices[0])
    if need is None or free is None or need <= headroom * free:
        return
    raise BatchTooLarge(too_large_message(lanes, devices, need, free, headroom))


def too_large_message(lanes: int, devices: int, need: int | None, free: int | None, headroom: float = 0.85) -> str:
    gib = 2.0**30
    if need is None or free is None:
        return f"--lanes {lanes}: ran out of device memory; try a smaller --lanes (e.g. {max(devices, lanes // 4)})"
    per_lane = need / (lanes // devices)
    fits = int(headroom * free // per_lane) * devices
    advice = f"use --lanes {fits} or less" if fits >= devices else "not even one attack per device fits"
    return (f"--lanes {lanes}: needs ~{need / gib:.1f} GiB per device ({per_lane / 2**20:.1f} MiB per attack) but "
            f"{free / gib:.1f} GiB is free: {advice}")
