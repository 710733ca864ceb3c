"""Everything ailfmd changes comes back: on restore(), and after a SIGKILL from the journal."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ailfmd.platform.base import Action
from ailfmd.platform.linux.journal import Journal
from ailfmd.platform.linux.platform import LinuxPlatform
from ailfmd.platform.linux.targets import TargetSelector

ALL_CPUS = frozenset(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALL_CPUS) < 2, reason="needs at least 2 CPUs to change affinity")

CHILD = textwrap.dedent(
    """
    import threading, time, sys
    def work():
        while True:
            time.sleep(0.01)
    for _ in range(4):
        threading.Thread(target=work, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    yield p
    p.kill()
    p.wait()


@pytest.fixture
def tree(node_exporter_sys: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "sys"
    shutil.copytree(node_exporter_sys, dest, symlinks=True)
    return dest


def _tids(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def _max_freqs(tree: Path) -> dict[int, str]:
    return {c: (tree / f"devices/system/cpu/cpu{c}/cpufreq/scaling_max_freq").read_text().strip() for c in range(4)}


def test_restore_puts_caps_and_affinity_back(tree: Path, tmp_path: Path, child: subprocess.Popen) -> None:
    before = _max_freqs(tree)
    plat = LinuxPlatform(sysfs_root=tree, run_dir=tmp_path / "run", targets=TargetSelector(pids=(child.pid,)))
    obs = plat.observe()
    assert set(obs.threads) == set(_tids(child.pid))
    pin = frozenset({min(ALL_CPUS)})
    res = plat.apply(
        Action(
            affinity={t.ref: pin for t in obs.threads.values()},
            freq_cap_khz={0: 2_000_000, 1: 1_500_000, 2: 2_500_000, 3: 100},
        )
    )
    assert res.ok, res.outcomes
    after = _max_freqs(tree)
    assert after[0] == "2000000" and after[1] == "1500000" and after[2] == "2500000"
    # 100 kHz is below scaling_min_freq (1000 kHz on cpu3): clamped, never below min.
    assert after[3] == "1000"
    for tid in _tids(child.pid):
        assert os.sched_getaffinity(tid) == pin
    assert plat.journal.exists()

    res = plat.restore()
    assert res.ok, res.outcomes
    assert _max_freqs(tree) == before
    for tid in _tids(child.pid):
        assert frozenset(os.sched_getaffinity(tid)) == ALL_CPUS
    assert not plat.journal.exists()
    plat.close()


WORKER = textwrap.dedent(
    """
    import sys, time
    from ailfmd.platform.base import Action
    from ailfmd.platform.linux.platform import LinuxPlatform
    from ailfmd.platform.linux.targets import TargetSelector
    tree, run, pid, cpu = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    plat = LinuxPlatform(sysfs_root=tree, run_dir=run, targets=TargetSelector(pids=(pid,)))
    obs = plat.observe()
    res = plat.apply(Action(affinity={t.ref: frozenset({cpu}) for t in obs.threads.values()},
                            freq_cap_khz={c: 1_200_000 for c in obs.cpus}))
    assert res.ok, res.outcomes
    print("applied", flush=True)
    time.sleep(3600)
    """
)


def test_sigkill_then_restore_from_journal(tree: Path, tmp_path: Path, child: subprocess.Popen) -> None:
    before = _max_freqs(tree)
    run = tmp_path / "run"
    pin = max(ALL_CPUS)
    w = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tree), str(run), str(child.pid), str(pin)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert w.stdout is not None and w.stdout.readline().strip() == "applied"
        assert set(_max_freqs(tree).values()) == {"1200000"}
        assert all(os.sched_getaffinity(t) == {pin} for t in _tids(child.pid))
    finally:
        w.send_signal(signal.SIGKILL)
        w.wait()
    assert w.returncode == -signal.SIGKILL

    # A new process (as ailfmd at its next start) restores from the journal it left.
    plat = LinuxPlatform(sysfs_root=tree, run_dir=run, use_perf=False)
    res = plat.restore()
    assert res.ok, res.outcomes
    assert _max_freqs(tree) == before
    assert all(frozenset(os.sched_getaffinity(t)) == ALL_CPUS for t in _tids(child.pid))
    assert not Journal(run).exists()
    plat.close()


def test_torn_last_line_and_exited_thread(tree: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    j = Journal(run)
    rel = "devices/system/cpu/cpu0/cpufreq/scaling_max_freq"
    j.record({"kind": "sysfs", "root": str(tree), "path": rel, "original": "3700000"})
    # A thread that no longer exists (pid far beyond pid_max) has nothing to restore.
    j.record({"kind": "affinity", "pid": 2**30, "tid": 2**30, "start_ticks": 1, "original": [0]})
    j.close()
    (tree / rel).write_text("900000\n")
    with open(j.path, "ab") as f:
        f.write(b'{"kind": "sysfs", "root": "/sy')  # killed mid-write
    res = LinuxPlatform(sysfs_root=tree, run_dir=run, use_perf=False).restore()
    assert res.ok, res.outcomes
    assert (tree / rel).read_text().strip() == "3700000"
    details = " | ".join(o.detail for o in res.outcomes)
    assert "interrupted write" in details and "thread exited" in details


def test_first_original_is_kept(tree: Path, tmp_path: Path) -> None:
    """Changing a value twice must restore the value from before the first change."""
    plat = LinuxPlatform(sysfs_root=tree, run_dir=tmp_path / "run", use_perf=False)
    assert plat.apply(Action(freq_cap_khz={0: 2_000_000})).ok
    assert plat.apply(Action(freq_cap_khz={0: 1_000_000})).ok
    assert len(plat.journal.load().entries) == 1
    assert plat.restore().ok
    assert _max_freqs(tree)[0] == "3700000"


def test_corrupt_middle_line_named_others_restored(tree: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rel0 = "devices/system/cpu/cpu0/cpufreq/scaling_max_freq"
    rel1 = "devices/system/cpu/cpu1/cpufreq/scaling_max_freq"
    (tree / rel0).write_text("1\n")
    (tree / rel1).write_text("1\n")
    lines = [
        f'{{"kind": "sysfs", "root": "{tree}", "path": "{rel0}", "original": "3700000"}}',
        "#### not json",
        f'{{"kind": "sysfs", "root": "{tree}", "path": "{rel1}", "original": "3600000"}}',
    ]
    (run / "journal.jsonl").write_text("\n".join(lines) + "\n")
    res = LinuxPlatform(sysfs_root=tree, run_dir=run, use_perf=False).restore()
    bad = [o for o in res.outcomes if not o.ok]
    assert len(bad) == 1 and "journal.jsonl:2" in bad[0].detail
    assert (tree / rel0).read_text().strip() == "3700000"
    assert (tree / rel1).read_text().strip() == "3600000"
