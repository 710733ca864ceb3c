"""Work between and around epochs that costs nothing until someone asks for it."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from ailfmd.service.daemon import Daemon
from ailfmd.service.status import History, summarize
from simdaemon import sim_config
from test_metrics import make_record


def test_history_summarizes_on_demand_and_keeps_no_observation() -> None:
    h = History(epochs=3)
    records = [make_record(epoch=e) for e in range(5)]
    for r in records:
        h.add(r)
    assert h.epochs(10) == [summarize(r) for r in reversed(records[-3:])]
    assert h.epochs(1) == [summarize(records[-1])]
    # What it holds refers to no observation: a record's observation is freed with it.
    kept = [r.observation for r in records]
    assert not any(o in gc.get_referents(*h._epochs) for o in kept)


def _sim_daemon(tmp_path: Path) -> Daemon:
    return Daemon(sim_config(tmp_path), env={})


def test_the_wait_between_epochs_reuses_its_poll_set_and_still_wakes(tmp_path: Path) -> None:
    d = _sim_daemon(tmp_path)
    try:
        assert d._waiter() is d._waiter()
        t0 = time.monotonic()
        d._wait(t0 + 0.05)
        assert time.monotonic() - t0 >= 0.05
        d._wake()
        t0 = time.monotonic()
        d._wait(t0 + 5.0)  # a signal or command wakes it at once
        assert time.monotonic() - t0 < 1.0
        d._run_commands()  # nothing queued: nothing happens
        assert not d.loop.paused
        d.commands.put(("pause", None))  # type: ignore[arg-type]
        d._run_commands()
        assert d.loop.paused
    finally:
        d.platform.close()
