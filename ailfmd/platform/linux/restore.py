"""Put back everything the journal says was changed, in this or an earlier process."""

from __future__ import annotations

import os
from typing import Any

from ailfmd.errors import NoSuchThread, SysfsError
from ailfmd.platform.base import ApplyOutcome, ApplyResult
from ailfmd.platform.linux import procfs as pfs
from ailfmd.platform.linux.journal import Journal
from ailfmd.platform.linux.sysfs import Root, format_cpu_list


def _restore_sysfs(e: dict[str, Any]) -> tuple[ApplyOutcome, bool]:
    """(outcome, keep-in-journal)."""
    root = Root(e["root"])
    target = f"{e['root'].rstrip('/')}/{e['path']}"
    try:
        root.write_str(e["path"], e["original"])
        now = root.read_str(e["path"])
    except SysfsError as err:
        if err.reason == "missing":
            # The policy went away (CPU offlined, driver unloaded): nothing to put back.
            return ApplyOutcome(target, e["original"], None, True, "file gone; nothing to restore"), False
        return ApplyOutcome(target, e["original"], None, False, err.reason), True
    except OSError as err:
        return ApplyOutcome(target, e["original"], None, False, os.strerror(err.errno or 0)), True
    ok = now == e["original"]
    return ApplyOutcome(target, e["original"], now, ok, "" if ok else "kernel kept another value"), not ok


def _restore_affinity(e: dict[str, Any], procfs: Root) -> tuple[ApplyOutcome, bool]:
    target = f"thread {e['tid']}"
    want = frozenset(e["original"])
    try:
        if pfs.read_start_ticks(procfs, e["pid"], e["tid"]) != e["start_ticks"]:
            return ApplyOutcome(target, format_cpu_list(want), None, True, "tid reused by another thread; left alone"), False
        os.sched_setaffinity(e["tid"], want)
        got = frozenset(os.sched_getaffinity(e["tid"]))
    except (NoSuchThread, ProcessLookupError):
        return ApplyOutcome(target, format_cpu_list(want), None, True, "thread exited; nothing to restore"), False
    except OSError as err:
        # EINVAL: none of the original CPUs is online any more.
        return ApplyOutcome(target, format_cpu_list(want), None, False, os.strerror(err.errno or 0)), True
    ok = got == want
    return ApplyOutcome(target, format_cpu_list(want), format_cpu_list(got), ok, ""), not ok


def restore_journal(journal: Journal, procfs: Root) -> ApplyResult:
    """Restore every entry; drop the journal if all went back, else keep the failures."""
    loaded = journal.load()
    outcomes = [
        ApplyOutcome(str(journal.path), "readable journal", None, "interrupted write" in p, p) for p in loaded.problems
    ]
    keep: list[dict[str, Any]] = []
    # Newest first: if a setting were journaled twice the oldest original wins.
    for e in reversed(loaded.entries):
        if e["kind"] == "sysfs":
            outcome, keep_it = _restore_sysfs(e)
        else:
            outcome, keep_it = _restore_affinity(e, procfs)
        outcomes.append(outcome)
        if keep_it:
            keep.append(e)
    if keep:
        journal.rewrite(list(reversed(keep)))
    else:
        journal.discard()
    return ApplyResult(tuple(outcomes))
