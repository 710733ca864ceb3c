"""perf_event_open through ctypes, against the running kernel.

Written to pass both on machines with a hardware PMU (events must count) and on
VMs without one (events must be reported missing with a reason, never as 0).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from childproc import child_process

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


@pytest.fixture
def child():
    with child_process(_CHILD) as (proc, words):
        spin_tid, nap_tid = (int(x) for x in words)
        yield Child(proc, spin_tid, nap_tid)


@pytest.fixture(params=[True, False], ids=["grouped", "per-event"])
def group(request: pytest.FixtureRequest) -> bool:
    """ThreadCounters(group=...): perf event groups, or one fd read per event."""
    return request.param


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
    printf("ioc PERF_EVENT_IOC_ID %lu\n", (unsigned long)PERF_EVENT_IOC_ID);
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
        elif kind == "ioc":
            name, value = rest
            assert getattr(perf, name) == int(value), name
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


def test_software_counters_of_a_real_thread(child: Child, group: bool) -> None:
    with perf.ThreadCounters(child.spin_tid, group=group) as spin, perf.ThreadCounters(
        child.nap_tid, group=group
    ) as nap:
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


def test_hardware_counters_count_or_say_why_not(child: Child, group: bool) -> None:
    with perf.ThreadCounters(child.spin_tid, group=group) as tc:
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


def test_counters_of_a_gone_thread_raise_no_such_thread(child: Child) -> None:
    c = child
    c.proc.kill()
    c.proc.wait(10)
    with pytest.raises(NoSuchThread) as info:
        perf.ThreadCounters(c.spin_tid)
    assert info.value.tid == c.spin_tid


def test_close_releases_every_fd(child: Child, group: bool) -> None:
    # Objects of earlier tests waiting for the cycle collector may still hold fds; one
    # closed while the counters open would have its number reused and go uncounted.
    gc.collect()
    before = _open_fds()
    tc = perf.ThreadCounters(child.nap_tid, group=group)
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


def test_a_counter_that_fails_to_read_is_retired_not_raised(child: Child, group: bool) -> None:
    with perf.ThreadCounters(child.nap_tid, ("task_clock_ns", "page_faults"), group=group) as tc:
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


# --------------------------------------------------------------------------- groups


def _hw_available(tc: perf.ThreadCounters) -> list[str]:
    return [n for n in perf.HARDWARE_EVENT_NAMES if n in tc.available]


def test_group_read_format_and_id_ioctl() -> None:
    assert perf.GROUP_READ_FORMAT == 0b1111  # GROUP | ID | TOTAL_TIME_RUNNING | ENABLED
    assert perf.group_read_struct(2).size == 8 * (3 + 2 * 2)
    if perf._machine_family(os.uname().machine) in ("x86", "arm64", "riscv", "s390", "loongarch"):
        pointer = struct.calcsize("P")
        assert perf.PERF_EVENT_IOC_ID == (0x80042407 if pointer == 4 else 0x80082407)


def test_events_are_grouped_by_kind(child: Child) -> None:
    with perf.ThreadCounters(child.spin_tid) as tc:
        groups = tc.groups
        hw = _hw_available(tc)
    sw = [n for n in perf.SOFTWARE_EVENT_NAMES if n in tc.available]
    # Every available event in exactly one group; missing ones in none.
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(tc.available)
    assert len(set(flat)) == len(flat)
    assert sw and tuple(sw) in groups
    if hw:
        assert tuple(hw) in groups  # five events at most: one group on this PMU
        assert len(groups) == 2


def test_one_read_per_group(child: Child, group: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    with perf.ThreadCounters(child.spin_tid, group=group) as tc:
        fds = set(tc._fds.values())
        reads: list[int] = []
        real_read = os.read

        def counting_read(fd: int, n: int) -> bytes:
            if fd in fds:
                reads.append(fd)
            return real_read(fd, n)

        monkeypatch.setattr(perf.os, "read", counting_read)
        time.sleep(0.05)
        deltas = tc.read_deltas()
        monkeypatch.undo()
        groups = tc.groups
    assert set(deltas) == set(tc.available)
    assert len(reads) == len(set(reads)) == len(groups)
    if group:
        assert len(reads) <= 2 < len(tc.available)
    else:
        assert len(reads) == len(tc.available)
        assert all(len(g) == 1 for g in groups)


def test_a_group_read_returns_every_member(child: Child) -> None:
    with perf.ThreadCounters(child.spin_tid) as tc:
        time.sleep(0.1)
        for names in tc.groups:
            fds = [tc._fds[n] for n in names]
            ids = [perf.event_id(fd) for fd in fds]
            assert len(set(ids)) == len(ids)
            # Through the leader or any sibling: the whole group, leader first.
            for fd in fds:
                enabled, running, values = perf.read_group(fd)
                assert list(values) == ids
                assert enabled > 0 and running > 0
        raw = tc.read_raw()
    assert set(raw) == set(tc.available)
    for names in tc.groups:
        times = {(raw[n].enabled_ns, raw[n].running_ns) for n in names}
        assert len(times) == 1, names  # one group, one pair of times


def test_grouped_reads_equal_single_reads(child: Child) -> None:
    """The same events, read as a group and one by one over the same intervals."""
    # Two hardware events per set: both sets together fit on any PMU, so neither is
    # multiplexed and the comparison is exact up to the few microseconds between reads.
    names = ("instructions", "cycles", "task_clock_ns", "context_switches", "page_faults")
    with perf.ThreadCounters(child.spin_tid, names, group=True) as grouped, perf.ThreadCounters(
        child.spin_tid, names, group=False
    ) as single:
        assert grouped.available == single.available
        assert grouped.missing == single.missing
        assert grouped.scopes == single.scopes
        pairs = []
        for _ in range(2):
            time.sleep(0.25)
            pairs.append((grouped.read_deltas(), single.read_deltas()))
        raw = single.read_raw()
    multiplexed = {n for n, r in raw.items() if r.running_ns < r.enabled_ns}
    for dg, ds in pairs:
        assert set(dg) == set(ds) == set(grouped.available)
        for name in grouped.available:
            if name in multiplexed:
                continue
            g, s = dg[name], ds[name]
            assert g is not None and s is not None, name
            if name in ("context_switches", "page_faults"):
                assert g == pytest.approx(s, abs=5), name
            else:
                assert g > 1_000_000, name
                assert g == pytest.approx(s, rel=0.03), name


def test_missing_reasons_do_not_depend_on_grouping(child: Child) -> None:
    with perf.ThreadCounters(child.nap_tid) as g, perf.ThreadCounters(
        child.nap_tid, group=False
    ) as s:
        assert g.missing == s.missing
        assert list(g.missing) == [n for n in perf.EVENT_NAMES if n in g.missing]
        assert g.available == s.available
        assert g.scopes == s.scopes


def test_a_member_refused_by_its_group_leads_the_next(
    child: Child, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group the PMU cannot hold is refused at open time: the event that does not
    fit starts the next group, and everything still counts."""
    with perf.ThreadCounters(child.spin_tid) as probe:
        hw = _hw_available(probe)
    if len(hw) < 3 or hw[2] != "llc_references":
        pytest.skip(f"needs instructions, cycles and LLC references; have {hw}")
    real_open = perf.perf_event_open

    def refusing_open(
        attr: perf.PerfEventAttr, pid: int, cpu: int = -1, group_fd: int = -1, flags: int = 8
    ) -> int:
        if group_fd != -1 and (attr.type, attr.config) == (
            perf.PERF_TYPE_HARDWARE,
            perf.PERF_COUNT_HW_CACHE_REFERENCES,
        ):
            raise OSError(errno.EINVAL, "group does not fit")
        return real_open(attr, pid, cpu, group_fd, flags)

    monkeypatch.setattr(perf, "perf_event_open", refusing_open)
    with perf.ThreadCounters(child.spin_tid) as tc:
        monkeypatch.undo()
        assert tc.groups[0] == ("instructions", "cycles")
        assert tc.groups[1] == tuple(hw[2:])
        assert tc.missing == probe.missing
        time.sleep(0.2)
        deltas = tc.read_deltas()
    for name in hw:
        assert deltas[name] is not None and deltas[name] > 0, name


def _pmu_group_capacity(tid: int) -> int:
    """How many cycles events the kernel accepts in one group (it checks a group
    against the whole PMU when a member joins)."""
    user = perf.ATTR_FLAG_EXCLUDE_KERNEL | perf.ATTR_FLAG_EXCLUDE_HV
    attr = perf.make_attr(
        perf.PERF_TYPE_HARDWARE, perf.PERF_COUNT_HW_CPU_CYCLES, user, perf.GROUP_READ_FORMAT
    )
    fds = [perf.perf_event_open(attr, tid)]
    try:
        while len(fds) < 64:
            fds.append(perf.perf_event_open(attr, tid, -1, fds[0]))
    except OSError:
        pass
    finally:
        for fd in reversed(fds):
            os.close(fd)
    return len(fds)


def test_a_group_that_never_runs_is_split(child: Child) -> None:
    """A group that fits the PMU on paper but not next to pinned events already on
    the thread is never scheduled: its first read shows no time running, so it is
    split, and the halves count (multiplexed, scaled per group)."""
    with perf.ThreadCounters(child.spin_tid) as probe:
        hw = _hw_available(probe)
    if len(hw) < 4:
        pytest.skip(f"needs a hardware group of four or more; have {hw}")
    capacity = _pmu_group_capacity(child.spin_tid)
    user = perf.ATTR_FLAG_EXCLUDE_KERNEL | perf.ATTR_FLAG_EXCLUDE_HV
    pinned = perf.make_attr(
        perf.PERF_TYPE_HARDWARE,
        perf.PERF_COUNT_HW_CPU_CYCLES,
        user | perf.ATTR_FLAG_PINNED,
        perf.PERF_FORMAT_TOTAL_TIME_ENABLED | perf.PERF_FORMAT_TOTAL_TIME_RUNNING,
    )
    # Leave one counter fewer than the group needs.
    pins = [perf.perf_event_open(pinned, child.spin_tid) for _ in range(capacity - len(hw) + 1)]
    try:
        with perf.ThreadCounters(child.spin_tid) as tc:
            assert tuple(hw) in tc.groups
            time.sleep(0.2)
            first = tc.read_deltas()
            if first[hw[0]] is not None:
                pytest.skip(f"the PMU ran a group of {len(hw)} next to {len(pins)} pinned events")
            assert all(first[n] is None for n in hw)
            assert tc.groups[0] == tuple(hw[: len(hw) // 2])
            assert tc.groups[1] == tuple(hw[len(hw) // 2 :])
            assert first["task_clock_ns"] is not None and first["task_clock_ns"] > 0
            for _ in range(10):
                time.sleep(0.2)
                deltas = tc.read_deltas()
                if all(deltas[n] is not None for n in hw):
                    break
            assert set(deltas) == set(tc.available)
            assert sorted(n for g in tc.groups for n in g) == sorted(tc.available)
        for name in hw:
            assert deltas[name] is not None and deltas[name] > 0, name
        assert 0.05 < deltas["instructions"] / deltas["cycles"] < 10
        # The pinned events kept their counters all along.
        for fd in pins:
            r = perf.read_count(fd)
            assert r.running_ns == r.enabled_ns > 0
    finally:
        for fd in pins:
            os.close(fd)


def test_counters_of_an_exited_thread_read_zero(group: bool, child: Child) -> None:
    c = child
    try:
        with perf.ThreadCounters(c.spin_tid, group=group) as tc:
            time.sleep(0.1)
            before = tc.read_deltas()
            c.proc.kill()
            c.proc.wait(10)
            tc.read_deltas()  # the last moments of the thread
            after = tc.read_deltas()
            groups = tc.groups
            totals = tc.read_totals()
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait(10)
    assert before["task_clock_ns"] is not None and before["task_clock_ns"] > 0
    assert set(after) == set(before) == set(tc.available)
    assert all(v == 0.0 for v in after.values()), after
    assert sum(len(g) for g in groups) == len(tc.available)
    assert totals["task_clock_ns"] >= before["task_clock_ns"]


def test_a_group_leader_that_fails_to_read_retires_only_itself(child: Child) -> None:
    names = ("task_clock_ns", "context_switches", "page_faults")
    with perf.ThreadCounters(child.nap_tid, names) as tc:
        if tc.available != names:
            pytest.skip(f"software events unavailable: {tc.missing}")
        time.sleep(0.05)
        tc.read_deltas()
        # The leader's fd goes bad: its event is released and the kernel promotes the
        # siblings to groups of their own.
        r, w = os.pipe()
        os.dup2(w, tc._fds["task_clock_ns"])
        os.close(r)
        os.close(w)
        time.sleep(0.1)
        deltas = tc.read_deltas()
        assert set(deltas) == {"context_switches", "page_faults"}
        assert deltas["context_switches"] is not None and deltas["context_switches"] >= 10
        assert tc.available == ("context_switches", "page_faults")
        assert tc.missing["task_clock_ns"].startswith("EBADF")
        assert sorted(tc.groups) == [("context_switches",), ("page_faults",)]
        time.sleep(0.1)
        again = tc.read_deltas()
    assert set(again) == {"context_switches", "page_faults"}
    assert again["context_switches"] is not None and again["context_switches"] >= 10


def test_add_deltas_is_read_deltas_scaled_leaving_out_the_uncounted() -> None:
    names = ("task_clock_ns", "context_switches", "page_faults")
    tid = threading.get_native_id()
    with perf.ThreadCounters(tid, names) as a, perf.ThreadCounters(tid, names) as b:
        if a.available != names or len(a.groups) != 1:
            pytest.skip(f"software events unavailable as one group: {a.missing}")
        # Cumulative (enabled, running, values) of the group: an interval on the PMU
        # throughout, one multiplexed half of the time, one never on the PMU.
        reads = [(1000, 1000, (10, 20, 30)), (3000, 2000, (30, 60, 90)), (4000, 2000, (50, 70, 95))]
        for tc in (a, b):
            feed = iter(reads)
            g = tc._groups[0]
            tc._read_groups = lambda g=g, feed=feed: [(g, *next(feed))]  # type: ignore[method-assign]
        for scale in (1.0, 0.5, 0.25):
            want = b.read_deltas()
            got: dict[str, float] = {}
            a.add_deltas(got, scale)
            assert set(got) == {n for n, v in want.items() if v is not None}
            for n, v in got.items():
                assert isinstance(v, float)
                assert v == pytest.approx(want[n] * scale)
        assert got == {}  # the last interval was never counted: nothing, not zeros
