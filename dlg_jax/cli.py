"""Shared pieces of the command-line tools: one-line errors with exit code 2, and the compilation cache."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dlg_jax.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def enable_compilation_cache() -> Path:
    """Persist compiled XLA programs so a second run of the same attack skips compilation.

    The cache lives in $DLG_JAX_CACHE_DIR, else ~/.cache/dlg_jax/xla.
    """
    import jax

    path = Path(os.environ.get("DLG_JAX_CACHE_DIR", Path.home() / ".cache" / "dlg_jax" / "xla"))
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


__all__ = ["ArgumentParser", "UsageError", "enable_compilation_cache", "fail", "non_negative_float", "positive_int"]
