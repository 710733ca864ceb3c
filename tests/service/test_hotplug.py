"""Real kernel uevents reach the watcher, and re-discovery picks up a changed tree."""

from __future__ import annotations

import os
import select
import shutil
from pathlib import Path

import pytest

from ailfmd.platform.linux.platform import LinuxPlatform
from ailfmd.service.hotplug import HotplugWatcher

UEVENT = Path("/sys/devices/system/cpu/cpu0/uevent")


@pytest.mark.skipif(os.geteuid() != 0 or not UEVENT.exists(), reason="needs root to trigger a uevent")
def test_a_real_cpu_uevent_wakes_the_watcher() -> None:
    w = HotplugWatcher()
    try:
        w.drain()  # whatever was queued before this test
        UEVENT.write_text("change")  # the kernel emits a real "change" uevent for cpu0
        waiter = select.poll()  # not select(): descriptors may be numbered 1024 and up
        waiter.register(w.fileno(), select.POLLIN)
        assert waiter.poll(5000), "no uevent within 5 s"
        events = w.drain()
        assert any(e.subsystem == "cpu" and e.action == "change" and e.sys_path.endswith("cpu0") for e in events)
    finally:
        w.close()


def test_rediscover_sees_a_cpu_go_offline(machine_copy, tmp_path: Path) -> None:
    tree = machine_copy("xeon-2s-ht")
    plat = LinuxPlatform(sysfs_root=tree, run_dir=tmp_path / "run", use_perf=False)
    assert 5 in plat.topology().cpus and 5 in plat.observe().cpus
    # What the kernel does when cpu5 goes offline: online mask shrinks, its topology,
    # cache and throttle directories disappear, its policy has no affected CPUs.
    cpu = tree / "devices/system/cpu"
    (cpu / "online").write_text("0-4,6-31\n")
    (cpu / "offline").write_text("5\n")
    (cpu / "cpu5/online").write_text("0\n")
    for sub in ("topology", "cache", "thermal_throttle"):
        shutil.rmtree(cpu / "cpu5" / sub)
    (cpu / "cpufreq/policy5/affected_cpus").write_text("\n")
    assert 5 in plat.observe().cpus  # nothing changes until re-discovery
    plat.rediscover()
    obs = plat.observe()
    assert 5 not in obs.cpus and 5 not in plat.topology().cpus
    assert plat.topology().offline_cpus == (5,)
    assert all(p.policy_id != 5 for p in obs.policies)
    plat.close()
