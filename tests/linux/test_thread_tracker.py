"""The tracker follows a real process whose threads come and go."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from ailfmd.platform.linux.sysfs import Root
from ailfmd.platform.linux.targets import TargetSelector
from ailfmd.platform.linux.threads import ThreadTracker

CHILD = textwrap.dedent(
    """
    import threading, sys, time
    stop = {}
    def work(name):
        ev = threading.Event(); stop[name] = ev
        while not ev.is_set():
            sum(range(20000)); time.sleep(0.0005)
    def start(name):
        threading.Thread(target=work, args=(name,), daemon=True).start()
    start("a"); start("b")
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, name = line.split()
        if cmd == "start": start(name)
        else: stop[name].set()
        time.sleep(0.2)
        print("ok", flush=True)
    """
)


def _tasks(pid: int) -> set[int]:
    import os

    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def test_threads_come_and_go_without_errors() -> None:
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "ready"
        tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)), discover_every=3)
        first = tr.sample()
        assert set(first) == _tasks(p.pid)
        time.sleep(0.05)
        second = tr.sample()
        busy = [s for s in second.values() if s.counters.get("run_ns", 0) > 0]
        assert busy, "worker threads ran, schedstat deltas must show it"
        # A worker exits: it is dropped at the next sample, silently.
        p.stdin.write("stop a\n"); p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
        third = tr.sample()
        assert set(third) == _tasks(p.pid) and len(third) == len(first) - 1
        # A new worker starts: it appears after at most discover_every samples.
        p.stdin.write("start c\n"); p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"
        seen = [set(tr.sample()) for _ in range(3)]
        assert seen[-1] == _tasks(p.pid) and len(seen[-1]) == len(first)
        tr.close()
    finally:
        p.kill()
        p.wait()


def test_whole_process_exit_empties_the_sample() -> None:
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    tr = ThreadTracker(Root("/proc"), Root("/sys/fs/cgroup"), TargetSelector(pids=(p.pid,)))
    assert tr.sample()
    p.kill()
    p.wait()
    assert tr.sample() == {}
    tr.close()
