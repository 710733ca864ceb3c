"""The restore journal: the original value of everything ailfmd changes, written first.

One JSON object per line in ``<run_dir>/journal.jsonl``, appended and fsync'ed
*before* the change it protects, so a process killed at any instant leaves a journal
that can put the machine back. Only the first change of a setting is recorded: its
original value is what must come back, however often ailfmd changes it afterwards.

A line cut short by a crash mid-write is the last line and is ignored (its change was
never made, since the write happens only after the fsync). A corrupt line elsewhere is
reported by line number and skipped; every other entry is still restored.

Entry kinds:
- ``{"kind": "sysfs", "root": "/sys", "path": "devices/.../scaling_max_freq", "original": "3700000"}``
- ``{"kind": "affinity", "pid": 10, "tid": 12, "start_ticks": 4711, "original": [0, 1, 2]}``
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ailfmd.errors import JournalError

JOURNAL_NAME = "journal.jsonl"


@dataclass
class LoadedJournal:
    entries: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _validate(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "not an object"
    kind = entry.get("kind")
    if kind == "sysfs":
        if not all(isinstance(entry.get(k), str) for k in ("root", "path", "original")):
            return "sysfs entry needs string root, path, original"
    elif kind == "affinity":
        if not all(isinstance(entry.get(k), int) for k in ("pid", "tid", "start_ticks")):
            return "affinity entry needs integer pid, tid, start_ticks"
        orig = entry.get("original")
        if not isinstance(orig, list) or not orig or not all(isinstance(c, int) and c >= 0 for c in orig):
            return "affinity entry needs a non-empty list of CPUs"
    else:
        return f"unknown kind {kind!r}"
    return None


def entry_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    if entry["kind"] == "sysfs":
        return ("sysfs", entry["root"], entry["path"])
    return ("affinity", entry["tid"], entry["start_ticks"])


class Journal:
    """Append-only journal of original values under a run directory."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / JOURNAL_NAME
        self._keys: set[tuple[Any, ...]] = set()
        self._fd: int | None = None

    # ------------------------------------------------------------------ writing
    def _open(self) -> int:
        if self._fd is None:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            for e in self.load().entries:
                self._keys.add(entry_key(e))
        return self._fd

    def record(self, entry: dict[str, Any]) -> bool:
        """Persist ``entry`` unless its setting is already journaled. True if written."""
        problem = _validate(entry)
        if problem:
            raise JournalError(f"refusing to journal {entry!r}: {problem}")
        fd = self._open()
        key = entry_key(entry)
        if key in self._keys:
            return False
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        # One write() of a whole line with O_APPEND: concurrent or torn writes can only
        # damage the tail, which load() tolerates.
        os.write(fd, line)
        os.fsync(fd)
        self._keys.add(key)
        return True

    # ------------------------------------------------------------------ reading
    def load(self) -> LoadedJournal:
        out = LoadedJournal()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return out
        lines = raw.split(b"\n")
        complete = raw.endswith(b"\n")
        for no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            last = no == len(lines) or (no == len(lines) - 1 and complete)
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if last and not complete:
                    out.problems.append(f"{self.path}:{no}: incomplete last line ignored (interrupted write)")
                else:
                    out.problems.append(f"{self.path}:{no}: not JSON, skipped")
                continue
            problem = _validate(entry)
            if problem:
                out.problems.append(f"{self.path}:{no}: {problem}, skipped")
                continue
            out.entries.append(entry)
        return out

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def discard(self) -> None:
        """Forget the journal after everything in it was restored."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._keys.clear()

    def rewrite(self, entries: list[dict[str, Any]]) -> None:
        """Keep only ``entries`` (those that could not be restored yet), atomically."""
        self.close()
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for e in entries:
                f.write(json.dumps(e, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._keys = {entry_key(e) for e in entries}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
