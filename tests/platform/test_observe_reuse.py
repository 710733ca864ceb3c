"""What each epoch reuses instead of re-reading or rebuilding, and that it never hides a change.

Real fixture trees written in place (as sysfs attributes change) and real /proc files.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ailfmd.platform.base import Action
from ailfmd.platform.linux import cpufreq
from ailfmd.platform.linux.hotfiles import HotFiles, IntBank
from ailfmd.platform.linux.platform import LinuxPlatform
from ailfmd.platform.linux.sysfs import Root

POLICY0 = "devices/system/cpu/cpufreq/policy0"


def _core_input(tree: Path, label_text: str) -> Path:
    hwmon = tree / "devices/platform/coretemp.0/hwmon/hwmon2"
    label = next(p for p in hwmon.glob("temp*_label") if p.read_text().strip() == label_text)
    return hwmon / label.name.replace("_label", "_input")


@pytest.fixture
def xeon(tmp_path: Path, machine_copy):  # type: ignore[no-untyped-def]
    tree = machine_copy("xeon-2s-ht")
    plat = LinuxPlatform(sysfs_root=tree, run_dir=tmp_path / "run", use_perf=False, slow_every=4)
    yield tree, plat
    plat.close()


# --------------------------------------------------------------------------- IntBank


def test_int_bank_reparses_only_what_changed_and_names_every_failure(tmp_path: Path) -> None:
    for i, v in enumerate((45000, 46000, 47000)):
        (tmp_path / f"t{i}").write_text(f"{v}\n")
    hot = HotFiles(Root(tmp_path))
    try:
        bank = IntBank(hot, ["t0", "t1", "t2"])
        first, errors = bank.read()
        assert first == [45000, 46000, 47000] and errors == {}
        first.append(1)  # a caller's list is its own
        assert bank.read() == ([45000, 46000, 47000], {})
        (tmp_path / "t1").write_text("46500\n")  # same length, other digits
        assert bank.read() == ([45000, 46500, 47000], {})
        (tmp_path / "t2").write_text("garbage\n")
        values, errors = bank.read()
        assert values == [45000, 46500, None] and "not an integer" in errors[2]
        (tmp_path / "t2").write_text("")
        assert bank.read()[1] == {2: "empty"}
        (tmp_path / "t2").write_text("48000\n")
        assert bank.read() == ([45000, 46500, 48000], {})
    finally:
        hot.close()


def test_int_bank_survives_a_file_whose_owner_went_away(tmp_path: Path) -> None:
    """A procfs file of a process that exits reads ESRCH (as a sysfs attribute of a
    removed device reads ENODEV): that value is missing with the reason, the others stay."""
    (tmp_path / "t0").write_text("45000\n")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    hot, proc_hot = HotFiles(Root(tmp_path)), HotFiles(Root("/proc"))
    try:
        bank = IntBank(hot, ["t0"])
        proc_bank = IntBank(proc_hot, [f"{child.pid}/oom_score_adj"])
        assert bank.read() == ([45000], {}) and proc_bank.read() == ([0], {})
        assert proc_bank.read() == ([0], {})  # the unchanged fast path
        child.kill()
        child.wait()
        values, errors = proc_bank.read()
        assert values == [None] and errors[0] in ("missing", "read failed: ESRCH")
        assert bank.read() == ([45000], {})
    finally:
        child.kill()
        child.wait()
        hot.close()
        proc_hot.close()


# --------------------------------------------------------------------------- temperatures and CPU states


def test_unchanged_epochs_reuse_records_and_any_change_shows_at_once(xeon) -> None:  # type: ignore[no-untyped-def]
    tree, plat = xeon
    first = plat.observe()
    second = plat.observe()
    assert second.cpus == first.cpus and second.cpus is not first.cpus  # each observation owns its mapping
    assert all(second.cpus[c] is first.cpus[c] for c in first.cpus)
    assert second.sensors is first.sensors
    core1 = _core_input(tree, "Core 1")
    core1.write_text("garbage\n")
    bad = plat.observe()
    assert bad.cpus[1].temp.source is not None and bad.cpus[1].temp.source.scope == "package"
    assert "fallback because" in bad.cpus[1].temp.reason and "not an integer" in bad.cpus[1].temp.reason
    assert bad.cpus[0] is first.cpus[0]
    assert plat.observe().cpus[1].temp.reason == bad.cpus[1].temp.reason  # still failing, still said
    core1.write_text("61000\n")
    good = plat.observe()
    assert good.cpus[1].temp.temp_c == 61.0 and good.cpus[1].temp.source.scope == "core"  # type: ignore[union-attr]
    (tree / POLICY0 / "scaling_cur_freq").write_text("0\n")  # implausible: no frequency, never 0
    assert plat.observe().cpus[0].freq_khz is None
    (tree / POLICY0 / "scaling_cur_freq").write_text("2300000\n")
    assert plat.observe().cpus[0].freq_khz == 2_300_000


def test_slow_state_sees_outside_changes_within_slow_every(xeon) -> None:  # type: ignore[no-untyped-def]
    tree, plat = xeon
    first = plat.observe()
    for _ in range(plat.slow_every):
        obs = plat.observe()
    assert obs.policies is first.policies  # nothing changed: the very same records
    (tree / POLICY0 / "scaling_max_freq").write_text("2000000\n")
    (tree / POLICY0 / "scaling_governor").write_text("performance\n")
    (tree / "devices/system/cpu/cpu0/thermal_throttle/core_throttle_count").write_text("9\n")
    seen = [plat.observe() for _ in range(plat.slow_every)]
    last = seen[-1]
    assert last.policies[0].max_khz == 2_000_000 and last.cpus[0].cap_khz == 2_000_000
    assert last.policies[0].governor == "performance"
    assert last.cpus[0].throttle is not None and last.cpus[0].throttle.core_throttle_count == 9
    assert last.policies[1] is first.policies[1]
    (tree / POLICY0 / "scaling_min_freq").write_text("garbage\n")
    last = [plat.observe() for _ in range(plat.slow_every)][-1]
    assert last.policies[0].min_khz is None
    assert any("scaling_min_freq" in e and "not an integer" in e for e in last.policies[0].errors)


def test_policy_current_frequency_follows_the_sweep(xeon) -> None:  # type: ignore[no-untyped-def]
    tree, plat = xeon
    plat.observe()
    (tree / POLICY0 / "scaling_cur_freq").write_text("2100000\n")
    seen = [plat.observe() for _ in range(plat.slow_every)]
    assert seen[0].cpus[0].freq_khz == 2_100_000  # every epoch
    assert seen[-1].policies[0].cur_khz == 2_100_000  # within slow_every epochs
    assert seen[-1].policies[0] == dataclasses.replace(seen[0].policies[0], cur_khz=2_100_000)


def test_policy_reader_with_cur_is_replace() -> None:
    st = cpufreq.PolicyStatic(cpufreq.PolicyPaths(3, "p", (3,)), "acpi-cpufreq", (800000, 1600000), ("ondemand",),
                              800000, 1600000, False, ("a note",))

    class _Stub(cpufreq.PolicyReader):
        def _resolve(self) -> None:
            self._fds, self._cur_fd = [], -1

    r = _Stub(HotFiles(Root("/nonexistent")), st)
    base = cpufreq.FreqPolicy(3, (3,), "acpi-cpufreq", "ondemand", 800000, 1600000, 1000000, 800000, 1600000,
                              (800000, 1600000), ("ondemand",), False, "balance", ("a note",))
    r.adopt(base)
    assert r.with_cur(1_000_000) is base
    assert r.with_cur(1_200_000) == dataclasses.replace(base, cur_khz=1_200_000)


def test_offlined_cpu_drops_out_of_every_cache(xeon) -> None:  # type: ignore[no-untyped-def]
    tree, plat = xeon
    caps = {c: 3_000_000 for c in plat.observe().cpus}
    plat.apply(Action(freq_cap_khz=caps))
    again = plat.apply(Action(freq_cap_khz=caps))  # the cached "nothing to do"
    assert len(again.outcomes) == 32 and all(o.detail == "unchanged" for o in again.outcomes)
    (tree / "devices/system/cpu/online").write_text("0-30\n")
    (tree / "devices/system/cpu/cpu31/online").write_text("0\n")
    plat.rediscover()
    obs = plat.observe()
    assert 31 not in obs.cpus and all(31 not in p.cpus for p in obs.policies)
    res = plat.apply(Action(freq_cap_khz=caps))  # a request made before the CPU went
    assert len(res.outcomes) == 31 and "policy31" not in {o.target for o in res.outcomes}


# --------------------------------------------------------------------------- actuation


def test_a_repeated_cap_is_written_again_after_an_outside_change(xeon) -> None:  # type: ignore[no-untyped-def]
    tree, plat = xeon
    max_file = tree / POLICY0 / "scaling_max_freq"
    plat.observe()
    caps = {0: 2_500_000}
    assert plat.apply(Action(freq_cap_khz=caps)).outcomes[0].applied == "2500000 kHz"
    assert max_file.read_text().strip() == "2500000"
    assert plat.apply(Action(freq_cap_khz=caps)).outcomes[0].detail == "unchanged"
    max_file.write_text("3700000\n")  # another agent lifts the cap
    for _ in range(plat.slow_every):
        plat.observe()
    out = plat.apply(Action(freq_cap_khz=caps)).outcomes[0]
    assert out.ok and out.applied == "2500000 kHz" and out.detail != "unchanged"
    assert max_file.read_text().strip() == "2500000"


def test_a_repeated_cap_is_written_again_after_restore(xeon) -> None:  # type: ignore[no-untyped-def]
    tree, plat = xeon
    max_file = tree / POLICY0 / "scaling_max_freq"
    plat.observe()
    caps = {0: 2_500_000}
    plat.apply(Action(freq_cap_khz=caps))
    assert plat.apply(Action(freq_cap_khz=caps)).outcomes[0].detail == "unchanged"
    plat.restore()  # pause: every original value is put back behind the cached records
    assert max_file.read_text().strip() == "3700000"
    assert plat.observe().policies[0].max_khz == 3_700_000  # re-read at once, not slow_every later
    out = plat.apply(Action(freq_cap_khz=caps)).outcomes[0]
    assert out.ok and out.detail != "unchanged" and max_file.read_text().strip() == "2500000"


def test_a_cap_that_failed_is_tried_again(xeon) -> None:  # type: ignore[no-untyped-def]
    tree, plat = xeon
    max_file = tree / POLICY0 / "scaling_max_freq"
    plat.observe()
    caps = {0: 2_500_000}
    # Writes fail (EISDIR stands in for the kernel refusing one) while the open descriptor
    # still reads the old value.
    max_file.rename(max_file.with_name("old_max"))
    max_file.mkdir()
    first = plat.apply(Action(freq_cap_khz=caps)).outcomes[0]
    assert not first.ok and "scaling_max_freq" in first.detail
    assert not plat.apply(Action(freq_cap_khz=caps)).outcomes[0].ok  # not remembered as "unchanged"
    max_file.rmdir()
    max_file.write_text("3700000\n")
    out = plat.apply(Action(freq_cap_khz=caps)).outcomes[0]
    assert out.ok and out.applied == "2500000 kHz" and max_file.read_text().strip() == "2500000"


def test_a_new_current_frequency_alone_is_not_a_change_of_limits(xeon) -> None:  # type: ignore[no-untyped-def]
    tree, plat = xeon
    plat.observe()
    slow = plat._slow
    version, limits = slow.version, slow.limits_version
    (tree / POLICY0 / "scaling_cur_freq").write_text("2100000\n")
    for _ in range(plat.slow_every):
        obs = plat.observe()
    assert obs.policies[0].cur_khz == 2_100_000
    assert slow.version > version and slow.limits_version == limits  # CPU states keep their limits
    (tree / POLICY0 / "scaling_max_freq").write_text("2000000\n")
    for _ in range(plat.slow_every):
        obs = plat.observe()
    assert slow.limits_version > limits and obs.cpus[0].cap_khz == 2_000_000
