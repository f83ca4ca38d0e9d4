"""A sweep's results directory: its configuration, durable rows, and resume.

DIR gets, as attacks finish:
  results.jsonl      one row per (index, seed); appended and fsynced chunk by chunk (results.pK.jsonl per host)
  reconstructions/   INDEX-SEED.npz: the private image (truth, uint8) and the reconstruction (float32)
  config.json        what the rows depend on (data, attack settings, model, restarts)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from dlg_jax.errors import UsageError
from dlg_jax.results import report


class ResultsDir:
    """DIR of a sweep: refuses another configuration, hands out pending tasks, appends rows durably.

    Durability: each chunk's rows are appended with one write, then flushed and fsynced; reconstructions are
    written (atomically) before their rows. A row is the sole record that an attack is done, so a crash at any
    moment loses at most the attacks in flight, and on resume a truncated last line (a write cut short) is
    dropped. An exclusive lock (flock on DIR/.lock, released by the OS even on kill -9) keeps two sweeps from
    appending to the same DIR at once.
    """

    def __init__(self, path: Path, identity: dict, host: int = 0, hosts: int = 1):
        self.path, self.identity = Path(path), identity
        self.rows_path = self.path / ("results.jsonl" if hosts == 1 else f"results.p{host}.jsonl")
        self._lock = None
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path}: exists and is not a directory")
        self.check_config()

    def check_config(self) -> None:
        file = self.path / "config.json"
        if not file.exists():
            return
        try:
            stored = json.loads(file.read_text())
        except (OSError, ValueError):
            raise UsageError(f"--out {self.path}: config.json is unreadable; use another --out") from None
        if stored != self.identity:
            changes = [f"{key} {old!r} -> {new!r}" for key, old, new in _differences(stored, self.identity)]
            raise UsageError(f"--out {self.path} holds a sweep with another configuration ({'; '.join(changes[:4])}"
                             f"{'; ...' if len(changes) > 4 else ''}): use another --out, or the same settings")

    def open(self, exclusive: bool = True) -> None:
        """Create DIR, take the lock, store config.json and repair a row file cut short by a crash."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "reconstructions").mkdir(exist_ok=True)
        if exclusive:
            import fcntl

            self._lock = open(self.path / (".lock" if self.rows_path.name == "results.jsonl"
                                           else f".lock.{self.rows_path.stem}"), "w")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"--out {self.path}: another sweep is writing there") from None
        self.check_config()
        if not (self.path / "config.json").exists():
            _atomic_write(self.path / "config.json", json.dumps(self.identity, indent=2) + "\n")
        if self.rows_path.exists():
            data = self.rows_path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                print(f"dlg_jax.sweep: dropping a truncated last line of {self.rows_path}", file=sys.stderr)
                with open(self.rows_path, "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())

    def _files(self):
        """Each row file in DIR (every host's or worker's) with its readable rows; a line that is not a JSON
        object (empty, or cut short by a crash) is skipped."""
        for file in sorted(self.path.glob("results*.jsonl")):
            rows = []
            for line in file.read_bytes().split(b"\n"):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
            yield file, rows

    def seconds_by_file(self) -> dict[str, float]:
        """The attack time in each row file (each host's or worker's): the sum of its rows' `seconds`."""
        return {file.name: sum(float(row.get("seconds", 0.0)) for row in rows) for file, rows in self._files()}

    def rows(self) -> list[dict]:
        """All rows in DIR (every host's file), each (index, seed) once; an unreadable line is skipped."""
        out, seen = [], set()
        for _, rows in self._files():
            for row in rows:
                try:
                    key = (row["index"], row["seed"])
                except KeyError:
                    continue
                if key not in seen:
                    seen.add(key)
                    out.append(row)
        return out

    def append(self, rows: list[dict], images: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]) -> None:
        """Save the rows' reconstructions, then append the rows: one write, flush, fsync."""
        for (index, seed), (truth, reconstruction) in images.items():
            file = self.path / "reconstructions" / report.image_name(index, seed)
            tmp = file.with_name(file.name + ".tmp.npz")
            np.savez(tmp, truth=truth, reconstruction=reconstruction.astype(np.float32))
            os.replace(tmp, file)
        text = "".join(json.dumps(row) + "\n" for row in rows).encode()
        with open(self.rows_path, "ab") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _differences(old, new, prefix=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip("."), old, new


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # workers of one sweep may write the same file at once
    tmp.write_text(text)
    os.replace(tmp, path)
