"""Writing into an output folder that someone else may have prepared: no symlink is followed, no name is
guessable, nothing is half-written, and no non-finite number reaches a JSON file.

- `write_atomic`: into a fresh temporary file (mkstemp: O_EXCL, an unpredictable name, never a link) in the
  same folder, flushed and fsynced, then renamed over the target; `os.replace` replaces a symlink at the target
  itself rather than writing where it points.
- `append`: opened with O_NOFOLLOW, so a planted symlink is refused instead of appended to.
- `refuse_links`: what a run will write into, checked before any work.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import tempfile
from pathlib import Path

from dlg_jax.errors import UsageError


def refuse_links(directory: Path, names=None) -> None:
    """A usage error if `directory` holds a symbolic link among `names` (default: every entry, and every entry of
    its reconstructions/ folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    entries = [directory / n for n in names] if names is not None else list(directory.iterdir())
    sub = directory / "reconstructions"
    if names is None and sub.is_dir() and not sub.is_symlink():
        entries += list(sub.iterdir())
    for entry in entries:
        if entry.is_symlink():
            raise UsageError(f"--out {directory}: {entry.relative_to(directory)} is a symbolic link; refusing to write "
                             "through it (use another --out)")


def check_writable(directory: Path) -> None:
    """Create `directory` and write a probe file (of a name of its own) there now, so that a read-only or full
    file system, or a path under a file, is one line before the work rather than a traceback after it."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe.")
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        raise UsageError(f"--out {directory}: cannot write there ({error.strerror or error})") from None


@functools.cache
def _umask() -> int:
    """The process's umask, read once: reading it means setting it, which must not happen on every write (another
    thread creating a file in that window would get no umask at all)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path` (unpredictable name), fsync, then rename it over `path`.
    The file gets the permissions of an ordinary new file (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append(path: Path, data: bytes) -> None:
    """Append with one write, flush and fsync; a symlink at `path` is an error (O_NOFOLLOW), not followed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def open_lock(path: Path):
    """A lock file opened without following links (flock it)."""
    return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")


def save_figure(path: Path, fig, **options) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **options)
    write_atomic(path, buffer.getvalue())


def save_npz(path: Path, **arrays) -> None:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


def finite(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, recursively: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **options) -> str:
    """JSON of `value`, non-finite numbers written as null (never the invalid `NaN` / `Infinity`)."""
    return json.dumps(finite(value), allow_nan=False, **options)
