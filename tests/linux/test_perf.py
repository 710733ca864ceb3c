"""perf_event_open through ctypes, against the running kernel.

Written to pass both on machines with a hardware PMU (events must count) and on
VMs without one (events must be reported missing with a reason, never as 0).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ailfmd.errors import NoSuchThread
from ailfmd.platform.linux import perf

REASON = re.compile(r"^E[A-Z0-9]+: .+")

# A child with one spinning and one sleeping thread; prints "<spin tid> <sleep tid>",
# and exits when its stdin closes.
_CHILD = textwrap.dedent(
    """
    import sys, threading, time
    stop = threading.Event()
    tids = {}
    ready = threading.Barrier(3)
    def spin():
        tids["spin"] = threading.get_native_id(); ready.wait()
        x = 0
        while not stop.is_set():
            x += 1
    def nap():
        tids["nap"] = threading.get_native_id(); ready.wait()
        while not stop.is_set():
            time.sleep(0.001)
    for fn in (spin, nap):
        threading.Thread(target=fn, daemon=True).start()
    ready.wait()
    print(tids["spin"], tids["nap"], flush=True)
    sys.stdin.read()
    stop.set()
    """
)


@dataclass
class Child:
    proc: subprocess.Popen[str]
    spin_tid: int
    nap_tid: int


def _spawn() -> Child:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "child did not start"
        assert proc.stdout is not None
        spin_tid, nap_tid = (int(x) for x in proc.stdout.readline().split())
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Child(proc, spin_tid, nap_tid)


@pytest.fixture
def child():
    c = _spawn()
    try:
        yield c
    finally:
        c.proc.kill()
        c.proc.wait(10)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- struct


def test_attr_size_is_latest_uapi_version() -> None:
    # include/uapi/linux/perf_event.h: PERF_ATTR_SIZE_VER8 136 /* add: config3 */
    assert perf.PERF_ATTR_SIZE == perf.PERF_ATTR_SIZE_VER8 == 136
    assert perf.make_attr(perf.PERF_TYPE_SOFTWARE, 0, 0, 0).size == 136


@pytest.mark.parametrize(
    "field, width, version_size",
    [
        ("config1", 8, perf.PERF_ATTR_SIZE_VER0),
        ("config2", 8, perf.PERF_ATTR_SIZE_VER1),
        ("branch_sample_type", 8, perf.PERF_ATTR_SIZE_VER2),
        ("clockid", 4, perf.PERF_ATTR_SIZE_VER3),
        ("sample_regs_intr", 8, perf.PERF_ATTR_SIZE_VER4),
        ("_reserved_2", 2, perf.PERF_ATTR_SIZE_VER5),
        ("aux_action", 4, perf.PERF_ATTR_SIZE_VER6),
        ("sig_data", 8, perf.PERF_ATTR_SIZE_VER7),
        ("config3", 8, perf.PERF_ATTR_SIZE_VER8),
    ],
)
def test_each_attr_version_ends_where_the_uapi_says(
    field: str, width: int, version_size: int
) -> None:
    assert getattr(perf.PerfEventAttr, field).offset + width == version_size


def test_union_aliases_share_storage() -> None:
    attr = perf.PerfEventAttr()
    attr.config1 = 0x1234
    attr.config2 = 0x5678
    attr.sample_freq = 99
    assert (attr.bp_addr, attr.kprobe_func, attr.uprobe_path) == (0x1234,) * 3
    assert (attr.bp_len, attr.probe_offset) == (0x5678,) * 2
    assert attr.sample_period == 99


_C_LAYOUT = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <linux/perf_event.h>
#define OFF(f) printf("off %s %zu\n", #f, offsetof(struct perf_event_attr, f))
#define BIT(f, v) do { struct perf_event_attr a; uint64_t w; memset(&a, 0, sizeof a); \
    a.f = v; memcpy(&w, (char *)&a + offsetof(struct perf_event_attr, read_format) + 8, 8); \
    printf("bit %s %llu\n", #f, (unsigned long long)w); } while (0)
int main(void) {
    printf("size %zu\n", sizeof(struct perf_event_attr));
    OFF(config); OFF(sample_period); OFF(sample_type); OFF(read_format);
    OFF(wakeup_events); OFF(bp_type); OFF(config1); OFF(config2);
    OFF(branch_sample_type); OFF(sample_regs_user); OFF(sample_stack_user);
    OFF(clockid); OFF(sample_regs_intr); OFF(aux_watermark); OFF(sample_max_stack);
    OFF(aux_sample_size); OFF(sig_data);
#ifdef PERF_ATTR_SIZE_VER8
    OFF(config3);
#endif
    BIT(disabled, 1); BIT(inherit, 1); BIT(exclude_user, 1); BIT(exclude_kernel, 1);
    BIT(exclude_hv, 1); BIT(watermark, 1); BIT(precise_ip, 3); BIT(mmap_data, 1);
    BIT(exclude_guest, 1); BIT(aux_output, 1); BIT(cgroup, 1); BIT(build_id, 1);
    BIT(inherit_thread, 1); BIT(remove_on_exec, 1); BIT(sigtrap, 1);
    return 0;
}
"""

_C_BITS = {
    "disabled": perf.ATTR_FLAG_DISABLED,
    "inherit": perf.ATTR_FLAG_INHERIT,
    "exclude_user": perf.ATTR_FLAG_EXCLUDE_USER,
    "exclude_kernel": perf.ATTR_FLAG_EXCLUDE_KERNEL,
    "exclude_hv": perf.ATTR_FLAG_EXCLUDE_HV,
    "watermark": perf.ATTR_FLAG_WATERMARK,
    "precise_ip": perf.ATTR_PRECISE_IP_MASK,
    "mmap_data": perf.ATTR_FLAG_MMAP_DATA,
    "exclude_guest": perf.ATTR_FLAG_EXCLUDE_GUEST,
    "aux_output": perf.ATTR_FLAG_AUX_OUTPUT,
    "cgroup": perf.ATTR_FLAG_CGROUP,
    "build_id": perf.ATTR_FLAG_BUILD_ID,
    "inherit_thread": perf.ATTR_FLAG_INHERIT_THREAD,
    "remove_on_exec": perf.ATTR_FLAG_REMOVE_ON_EXEC,
    "sigtrap": perf.ATTR_FLAG_SIGTRAP,
}


def test_layout_matches_the_installed_uapi_header(tmp_path: Path) -> None:
    """Offsets and bitfield positions as the C compiler lays out the system header."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/perf_event.h").exists():
        pytest.skip("needs a C compiler and linux/perf_event.h")
    src = tmp_path / "layout.c"
    src.write_text(_C_LAYOUT)
    exe = tmp_path / "layout"
    build = subprocess.run([cc, "-o", str(exe), str(src)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"header too old for this check: {build.stderr[:200]}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    seen_offsets = 0
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            c_size = int(rest[0])
            # An older header is a prefix of ours; the same version is equal.
            assert c_size <= perf.PERF_ATTR_SIZE
            assert c_size in {getattr(perf, f"PERF_ATTR_SIZE_VER{i}") for i in range(9)}
        elif kind == "off":
            name, value = rest
            assert getattr(perf.PerfEventAttr, name).offset == int(value), name
            seen_offsets += 1
        else:
            name, value = rest
            assert _C_BITS[name] == int(value), name
    assert seen_offsets >= 17


def test_syscall_numbers_per_architecture() -> None:
    assert perf.perf_syscall_number("x86_64", 64) == 298
    assert perf.perf_syscall_number("x86_64", 32) == 336  # 32-bit userland, compat entry
    assert perf.perf_syscall_number("i686", 32) == 336
    assert perf.perf_syscall_number("aarch64", 64) == 241
    assert perf.perf_syscall_number("aarch64", 32) == 364
    assert perf.perf_syscall_number("armv7l", 32) == 364
    assert perf.perf_syscall_number("riscv64", 64) == 241
    assert perf.perf_syscall_number("ppc64le", 64) == 319
    assert perf.perf_syscall_number("s390x", 64) == 331
    with pytest.raises(perf.PerfUnsupported, match="'vax'"):
        perf.perf_syscall_number("vax", 32)


def test_scale_count_for_multiplexing() -> None:
    assert perf.scale_count(100, 400, 100) == pytest.approx(400.0)
    assert perf.scale_count(100, 400, 400) == 100.0
    # Enabled but never on the PMU: unknown, not zero.
    assert perf.scale_count(0, 1_000_000, 0) is None
    # Never enabled: a per-thread event is enabled only while its thread runs.
    assert perf.scale_count(0, 0, 0) == 0.0


# --------------------------------------------------------------------------- kernel


def _spin_s(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_flag_bits_are_honoured_by_the_kernel() -> None:
    tid = threading.get_native_id()
    fmt = perf.PERF_FORMAT_TOTAL_TIME_ENABLED | perf.PERF_FORMAT_TOTAL_TIME_RUNNING
    clock = (perf.PERF_TYPE_SOFTWARE, perf.PERF_COUNT_SW_TASK_CLOCK)
    # exclude_kernel too, so this runs unprivileged at perf_event_paranoid = 2.
    user = perf.ATTR_FLAG_EXCLUDE_KERNEL | perf.ATTR_FLAG_EXCLUDE_HV
    attr_on = perf.make_attr(*clock, user, fmt)
    attr_off = perf.make_attr(*clock, user | perf.ATTR_FLAG_DISABLED, fmt)
    try:
        fd_on = perf.perf_event_open(attr_on, tid)
    except OSError as e:
        pytest.skip(f"perf_event_open not permitted here: {perf.describe_errno(e.errno or 0)}")
    fd_off = perf.perf_event_open(attr_off, tid)
    try:
        _spin_s(0.05)
        on, off = perf.read_count(fd_on), perf.read_count(fd_off)
    finally:
        os.close(fd_on)
        os.close(fd_off)
    assert on.value > 10_000_000  # >= 10 ms of the 50 ms spin, in ns
    assert on.running_ns > 0
    assert off == perf.RawCount(0, 0, 0)


def test_probe_pmu_reports_every_event() -> None:
    found = perf.probe_pmu()
    assert tuple(found) == perf.EVENT_NAMES
    assert found["task_clock_ns"] is None
    for name, reason in found.items():
        assert reason is None or REASON.match(reason), (name, reason)


def test_software_counters_of_a_real_thread(child: Child) -> None:
    with perf.ThreadCounters(child.spin_tid) as spin, perf.ThreadCounters(child.nap_tid) as nap:
        assert "task_clock_ns" in spin.available
        t0 = time.monotonic()
        time.sleep(0.3)
        spin_d1 = spin.read_deltas()
        nap_d1 = nap.read_deltas()
        elapsed_ns = (time.monotonic() - t0) * 1e9
        time.sleep(0.2)
        spin_d2 = spin.read_deltas()
        totals = spin.read_totals()

    # A spinning thread runs for much of the interval, and never longer than it.
    assert spin_d1["task_clock_ns"] is not None
    assert 0.05 * elapsed_ns < spin_d1["task_clock_ns"] <= 1.05 * elapsed_ns + 5e6
    assert spin_d2["task_clock_ns"] is not None and spin_d2["task_clock_ns"] > 0
    assert totals["task_clock_ns"] >= spin_d1["task_clock_ns"] + spin_d2["task_clock_ns"] - 1

    # A thread sleeping 1 ms at a time switches out hundreds of times in 0.3 s.
    if "context_switches" in nap.missing:
        assert nap.missing["context_switches"].startswith(("EACCES", "EPERM"))
    else:
        assert nap_d1["context_switches"] is not None and nap_d1["context_switches"] >= 20
    for name in ("page_faults", "cpu_migrations"):
        if name in nap.available:
            assert nap_d1[name] is not None and nap_d1[name] >= 0


def test_hardware_counters_count_or_say_why_not(child: Child) -> None:
    with perf.ThreadCounters(child.spin_tid) as tc:
        time.sleep(0.3)
        deltas = tc.read_deltas()
    assert set(tc.available) | set(tc.missing) == set(perf.EVENT_NAMES)
    assert not set(tc.available) & set(tc.missing)
    for name in perf.HARDWARE_EVENT_NAMES:
        if name in tc.missing:
            # Missing means absent from the readings, never a made-up 0.
            assert name not in deltas
            assert REASON.match(tc.missing[name]), tc.missing[name]
        else:
            assert tc.scopes[name] == perf.SCOPE_USER
            assert name in deltas
    for name in ("instructions", "cycles"):
        if name in tc.available:
            assert deltas[name] is not None and deltas[name] > 1_000_000, name
    if "instructions" in tc.available and "cycles" in tc.available:
        ipc = deltas["instructions"] / deltas["cycles"]
        assert 0.05 < ipc < 10


def test_counters_of_a_gone_thread_raise_no_such_thread() -> None:
    c = _spawn()
    c.proc.kill()
    c.proc.wait(10)
    with pytest.raises(NoSuchThread) as info:
        perf.ThreadCounters(c.spin_tid)
    assert info.value.tid == c.spin_tid


def test_close_releases_every_fd(child: Child) -> None:
    before = _open_fds()
    tc = perf.ThreadCounters(child.nap_tid)
    assert len(_open_fds() - before) == len(tc.available) > 0
    tc.close()
    tc.close()
    assert _open_fds() - before == set()
    assert tc.closed


def test_user_only_context_switch_counts_read_zero(child: Child) -> None:
    """Why context switches are not given a user-only fallback: it would count 0."""
    fmt = perf.PERF_FORMAT_TOTAL_TIME_ENABLED | perf.PERF_FORMAT_TOTAL_TIME_RUNNING
    cs = (perf.PERF_TYPE_SOFTWARE, perf.PERF_COUNT_SW_CONTEXT_SWITCHES)
    user_only = perf.make_attr(*cs, perf.ATTR_FLAG_EXCLUDE_KERNEL | perf.ATTR_FLAG_EXCLUDE_HV, fmt)
    with_kernel = perf.make_attr(*cs, perf.ATTR_FLAG_EXCLUDE_HV, fmt)
    fd_user = perf.perf_event_open(user_only, child.nap_tid)
    try:
        try:
            fd_all = perf.perf_event_open(with_kernel, child.nap_tid)
        except OSError as e:
            pytest.skip(f"kernel counting not permitted: {perf.describe_errno(e.errno or 0)}")
        try:
            time.sleep(0.2)
            user, everything = perf.read_count(fd_user), perf.read_count(fd_all)
        finally:
            os.close(fd_all)
    finally:
        os.close(fd_user)
    assert everything.value >= 20
    assert user.value == 0 and user.running_ns > 0


_UNPRIVILEGED = textwrap.dedent(
    """
    import json, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    from ailfmd.platform.linux import perf
    with perf.ThreadCounters(threading.get_native_id()) as tc:
        end = time.monotonic() + 0.1
        while time.monotonic() < end:
            pass
        print(json.dumps({"missing": tc.missing, "deltas": tc.read_deltas()}))
    """
)


def test_counts_without_privileges_at_paranoid_2(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: the other tests cover this case")
    paranoid = int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())
    if paranoid > 2:
        pytest.skip(f"perf_event_paranoid = {paranoid} forbids unprivileged perf entirely")
    repo = str(Path(perf.__file__).resolve().parents[3])
    result = None
    # The test's interpreter may live where uid 65534 cannot read it (a venv under /root).
    candidates = [sys.executable, shutil.which("python3") or "", "/usr/bin/python3"]
    for python in dict.fromkeys(candidates):
        if not python or not os.path.exists(python):
            continue
        try:
            result = subprocess.run(
                [python, "-c", _UNPRIVILEGED, repo],
                user=65534,
                group=65534,
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path.anchor,
            )
        except PermissionError:
            continue
        if result.returncode == 0:
            break
    if result is None or result.returncode != 0:
        pytest.skip(f"no interpreter runs as uid 65534: {result and result.stderr[-300:]}")
    got = json.loads(result.stdout)
    assert got["deltas"]["task_clock_ns"] > 10_000_000
    for name in ("context_switches", "cpu_migrations"):
        assert got["missing"][name].startswith(("EACCES", "EPERM")), got["missing"]
    for name in perf.HARDWARE_EVENT_NAMES:
        assert (name in got["missing"]) != (name in got["deltas"])


def test_a_counter_that_fails_to_read_is_retired_not_raised(child: Child) -> None:
    with perf.ThreadCounters(child.nap_tid, ("task_clock_ns", "page_faults")) as tc:
        if tc.missing:
            pytest.skip(f"software events unavailable: {tc.missing}")
        # Simulate a counter whose fd went bad (as a pinned event in error state does).
        r, w = os.pipe()
        os.dup2(w, tc._fds["page_faults"])  # now write-only: read() fails with EBADF
        os.close(r)
        os.close(w)
        deltas = tc.read_deltas()
    assert set(deltas) == {"task_clock_ns"}
    assert tc.available == ("task_clock_ns",)
    assert tc.missing["page_faults"].startswith("EBADF")
