"""Real multi-threaded child processes for tests that need threads of another process."""

from __future__ import annotations

import select
import textwrap
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

# argv[1]: comm to set ("" keeps the one exec gave). Three extra threads sleep until
# stdin closes; prints every tid of the process, main first.
THREADS_CHILD = textwrap.dedent(
    """
    import sys, threading
    if sys.argv[1]:
        with open("/proc/self/comm", "w") as f:
            f.write(sys.argv[1])
    stop = threading.Event()
    tids = []
    ready = threading.Barrier(4)
    def work():
        tids.append(threading.get_native_id()); ready.wait(); stop.wait()
    for _ in range(3):
        threading.Thread(target=work, daemon=True).start()
    ready.wait()
    print(threading.get_native_id(), *tids, flush=True)
    sys.stdin.read()
    stop.set()
    """
)


def start_child(script: str, *args: str, timeout_s: float = 20.0) -> tuple[subprocess.Popen[str], list[str]]:
    """Run ``python -c script args``; wait for its first line of output (its "ready").

    Returns the process and the words of that line. The child must exit when its stdin
    closes; :func:`stop_child` (or the context manager) makes sure it is gone.
    """
    return start_child_with(sys.executable, script, *args, timeout_s=timeout_s)


def start_child_with(
    executable: str, script: str, *args: str, timeout_s: float = 20.0
) -> tuple[subprocess.Popen[str], list[str]]:
    """:func:`start_child` with another Python executable (e.g. a renamed copy)."""
    proc = subprocess.Popen(
        [executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        # poll, not select: select() cannot watch descriptors numbered 1024 and up.
        waiter = select.poll()
        waiter.register(proc.stdout, select.POLLIN)
        assert waiter.poll(timeout_s * 1000), "child did not start"
        words = proc.stdout.readline().split()
    except BaseException:
        stop_child(proc)
        raise
    return proc, words


def stop_child(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(10)


@contextmanager
def child_process(script: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    proc, words = start_child(script, *args)
    try:
        yield proc, words
    finally:
        stop_child(proc)
