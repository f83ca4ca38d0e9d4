"""A sweep's results directory: its configuration, durable rows, and resume.

DIR gets, as attacks finish:
  results.jsonl      one row per (index, seed); appended and fsynced chunk by chunk (results.pK.jsonl per host)
  reconstructions/   INDEX-SEED.npz: the private image (truth, uint8) and the reconstruction (float32)
  config.json        what the rows depend on (data, attack settings, model, restarts)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from dlg_jax.errors import UsageError
from dlg_jax.results import report
from dlg_jax.results.files import append, check_writable, dumps, open_lock, refuse_links, save_npz, write_atomic


REQUIRED = {"index": int, "seed": int, "psnr": (int, float, type(None)), "status": str, "seconds": (int, float),
            "grad_distance": (int, float, type(None)), "iterations": int, "evaluations": int}


def valid_row(row) -> bool:
    """A row counts as a finished attack only with every key the summary reads, of the right type."""
    return isinstance(row, dict) and all(k in row and isinstance(row[k], t) and not isinstance(row[k], bool)
                                         for k, t in REQUIRED.items())


def config_id(identity: dict) -> str:
    """A short hash of what the rows depend on; every row carries it, so rows of two settings never mix."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class ResultsDir:
    """DIR of a sweep: refuses another configuration, hands out pending tasks, appends rows durably.

    Guarantees (tests/test_reliability.py):
    - Durability: each chunk's rows are appended with one write, then flushed and fsynced; reconstructions are
      written (atomically) before their rows. A row is the sole record that an attack is done, so a crash at any
      moment loses at most the attacks in flight; a last line without its newline (a write cut short) never
      counts as done and is dropped on resume.
    - Identity: config.json holds what the rows depend on (the data by content hash, the attack, the model, the
      restarts, the devices per process); a rerun with anything else is refused. Every row carries the
      configuration's hash (`config_id`): with config.json deleted, rows of another configuration still refuse
      the rerun. A row lacking a key the summary needs is not counted (its attack runs again).
    - Locking: a sweep holds DIR/.lock exclusively (flock, released by the OS even on kill -9); the `--processes`
      launcher holds it for its workers, which lock their own row files; `--distributed` hosts share it.
    - No link is followed: a symlink among DIR's entries refuses the run, before any work; temporary files have
      unpredictable names (files.write_atomic).
    """

    def __init__(self, path: Path, identity: dict, host: int = 0, hosts: int = 1, provenance: dict | None = None):
        self.path, self.identity = Path(path), identity
        self.provenance = provenance or {}
        self.config_id = config_id(identity)
        self.rows_path = self.path / ("results.jsonl" if hosts == 1 else f"results.p{host}.jsonl")
        self._locks = []
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path}: exists and is not a directory")
        refuse_links(self.path)
        self.check_config()

    def check_config(self) -> None:
        file = self.path / "config.json"
        if not file.exists():
            foreign = {r.get("config_id") for _, rows in self._files() for r in rows} - {self.config_id}
            if foreign:
                raise UsageError(f"--out {self.path} holds rows of another configuration (config.json is missing): "
                                 "use another --out")
            return
        try:
            stored = json.loads(file.read_text())
        except (OSError, ValueError):
            raise UsageError(f"--out {self.path}: config.json is unreadable; use another --out") from None
        stored = {k: v for k, v in stored.items() if k != "provenance"} if isinstance(stored, dict) else stored
        if stored != self.identity:
            changes = [f"{key} {old!r} -> {new!r}" for key, old, new in _differences(stored, self.identity)]
            raise UsageError(f"--out {self.path} holds a sweep with another configuration ({'; '.join(changes[:4])}"
                             f"{'; ...' if len(changes) > 4 else ''}): use another --out, or the same settings")

    def check_writable(self) -> None:
        """Create DIR and write a probe into it now, so that a read-only or full file system, or a path under a
        file, is one line before the work rather than a traceback after it."""
        check_writable(self.path)

    def lock(self, mode: str = "exclusive") -> None:
        """Take DIR's lock: `exclusive` (a sweep alone, or the --processes launcher), `shared` (a --distributed
        host) or `own` (a --processes worker, under its launcher's lock); hosts and workers also lock their row
        file's own lock."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        wanted = []
        if mode in ("exclusive", "shared"):
            wanted.append((self.path / ".lock", fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH))
        if self.rows_path.name != "results.jsonl":
            wanted.append((self.path / f".lock.{self.rows_path.stem}", fcntl.LOCK_EX))
        for file, kind in wanted:
            handle = open_lock(file)
            try:
                fcntl.flock(handle, kind | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise UsageError(f"--out {self.path}: another sweep is writing there") from None
            self._locks.append(handle)

    def close(self) -> None:
        """Release DIR's locks (the OS releases them at exit anyway)."""
        for handle in self._locks:
            handle.close()
        self._locks = []

    def open(self, lock: str | None = "exclusive") -> None:
        """Create DIR, take the lock, store config.json and repair a row file cut short by a crash."""
        self.check_writable()
        refuse_links(self.path)
        (self.path / "reconstructions").mkdir(exist_ok=True)
        if lock:
            self.lock(lock)
        self.check_config()
        if not (self.path / "config.json").exists():
            write_atomic(self.path / "config.json", dumps(dict(self.identity, provenance=self.provenance), indent=2) + "\n")
        if self.rows_path.exists():
            data = self.rows_path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                print(f"dlg_jax.sweep: dropping a truncated last line of {self.rows_path}", file=sys.stderr)
                fd = os.open(self.rows_path, os.O_RDWR | os.O_NOFOLLOW)
                try:
                    os.ftruncate(fd, keep)
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def _files(self):
        """Each row file in DIR (every host's or worker's) with its rows: complete lines (newline-terminated)
        that are JSON objects; a last line without its newline is a write cut short and does not count."""
        if not self.path.is_dir():
            return
        for file in sorted(self.path.glob("results*.jsonl")):
            rows = []
            for line in file.read_bytes().split(b"\n")[:-1]:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
            yield file, rows

    def seconds_by_file(self) -> dict[str, float]:
        """The attack time in each row file (each host's or worker's): the sum of its rows' `seconds`."""
        return {file.name: sum(float(row["seconds"]) for row in rows if self._counts(row))
                for file, rows in self._files()}

    def _counts(self, row) -> bool:
        return valid_row(row) and row.get("config_id", self.config_id) == self.config_id

    def rows(self) -> list[dict]:
        """All valid rows of this configuration in DIR (every host's file), each (index, seed) once."""
        out, seen = [], set()
        for _, rows in self._files():
            for row in rows:
                if not self._counts(row):
                    continue
                key = (row["index"], row["seed"])
                if key not in seen:
                    seen.add(key)
                    out.append(row)
        return out

    def append(self, rows: list[dict], images: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]) -> None:
        """Save the rows' reconstructions, then append the rows: one write, flush, fsync."""
        for (index, seed), (truth, reconstruction) in images.items():
            save_npz(self.path / "reconstructions" / report.image_name(index, seed), truth=truth,
                     reconstruction=reconstruction.astype(np.float32))
        text = "".join(dumps(dict(row, config_id=self.config_id)) + "\n" for row in rows).encode()
        append(self.rows_path, text)


def _differences(old, new, prefix=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip("."), old, new
