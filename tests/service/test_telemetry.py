"""Telemetry: the daemon records what it saw and did, and never stops protecting for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ailfmd.control.records import TickRecord
from ailfmd.policy.feature_schema import CORE_COLUMNS, FEATURE_SCHEMA, TEMP_SCALE_C, THREAD_COLUMNS
from ailfmd.policy.features import FeatureExtractor
from ailfmd.service.config import TelemetrySettings
from ailfmd.service.daemon import Daemon
from ailfmd.service.telemetry import FORMAT, summarize_telemetry
from ailfmd.train.recording import RecordWriter, read_header, read_records, summarize
from simdaemon import sim_config

TEMP = CORE_COLUMNS.index("temp")


def sim_daemon(tmp_path: Path, telemetry: TelemetrySettings) -> Daemon:
    return Daemon(sim_config(tmp_path, "pcgov", telemetry=telemetry), env={})


def run(d: Daemon, epochs: int) -> list[TickRecord]:
    seen: list[TickRecord] = []
    d.loop.sinks.append(seen.append)
    try:
        for _ in range(epochs):
            d.loop.tick()
    finally:
        d.shutdown()
    return seen


def test_every_nth_epoch_is_recorded_with_features_and_what_was_decided(tmp_path: Path) -> None:
    path = tmp_path / "state" / "telemetry.rec"  # the directory is created
    d = sim_daemon(tmp_path, TelemetrySettings(path=path, every_epochs=3))
    ticks = run(d, 10)
    header = read_header(path)
    assert header["telemetry"] == FORMAT and header["feature_schema"] == FEATURE_SCHEMA
    assert header["platform"] == d.platform_name and header["every_epochs"] == 3
    assert header["core_columns"] == list(CORE_COLUMNS) and header["thread_columns"] == list(THREAD_COLUMNS)
    steps = [r for r in read_records(path, strict=True) if r.kind == "step"]
    assert [s.meta["epoch"] for s in steps] == [0, 3, 6, 9]
    topology = d.platform.topology()
    for step in steps:
        tick = ticks[step.meta["epoch"]]
        obs = tick.observation
        prev = ticks[tick.epoch - 1].observation if tick.epoch else None
        want = FeatureExtractor(topology, limit_c=d.cfg.safety.limit_c).extract(obs, prev)
        a = step.arrays
        np.testing.assert_array_equal(a["core"], want.core_features)
        np.testing.assert_array_equal(a["thread"], want.thread_features)
        assert a["tids"].tolist() == list(want.tids) and a["cpus"].tolist() == list(want.cpus)
        temps = [obs.cpus[c].temp.temp_c for c in want.cpus]
        np.testing.assert_allclose(a["temp_c"], temps, rtol=1e-6)
        # The raw temperature is the feature read back from the CPU's limit.
        np.testing.assert_allclose(a["core"][:, TEMP] * TEMP_SCALE_C + a["limit_c"] - TEMP_SCALE_C, temps, atol=1e-3)
        caps = {c: k for c, k in zip(a["cpus"].tolist(), a["cap_set_khz"].tolist()) if k >= 0}
        assert caps == dict(tick.decision.action.freq_cap_khz)
        assert step.meta["policy"] == tick.policy_name and step.meta["shield_actions"] == len(tick.shield)
    summary = summarize(path)  # what `ailfm inspect` shows
    assert summary.by_kind == {"step": 4} and summary.torn_tail_bytes == 0
    # ... and what it says about the machine.
    t = summarize_telemetry(path)
    recorded = [ticks[e] for e in (0, 3, 6, 9)]
    temps = [(st.temp.temp_c, c) for tk in recorded for c, st in tk.observation.cpus.items()]
    assert (t["steps"], t["policies"], t["fallbacks"]) == (4, {"pcgov": 4}, {})
    # (float32 in the file: among CPUs equally hot to 1e-3 °C any may be named.)
    assert t["hottest_c"] == pytest.approx(max(temps)[0], abs=1e-3)
    assert max(tc for tc, c in temps if c == t["hottest_cpu"]) == pytest.approx(t["hottest_c"], abs=1e-3)
    assert t["steps_applied"] == sum(tk.applied is not None for tk in recorded)
    assert t["shield_actions"] == sum(len(tk.shield) for tk in recorded)
    assert t["span_s"] == pytest.approx(recorded[-1].wall_time_s - recorded[0].wall_time_s)


def test_ailfm_inspect_summarises_telemetry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from ailfmd.lab.cli import main

    path = tmp_path / "telemetry.rec"
    run(sim_daemon(tmp_path, TelemetrySettings(path=path, every_epochs=2)), 5)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "telemetry       3 step(s)" in out and "decided by      pcgov 3" in out
    assert main(["inspect", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["telemetry"]["steps"] == 3 and doc["by_kind"] == {"step": 3}


def test_a_path_it_cannot_write_switches_telemetry_off_and_the_loop_runs_on(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the telemetry directory should be\n")
    d = sim_daemon(tmp_path, TelemetrySettings(path=blocker / "telemetry.rec", every_epochs=1))
    assert d.telemetry is not None and d.telemetry.error is not None and "not-a-dir" in d.telemetry.error
    ticks = run(d, 5)
    assert len(ticks) == 5 and d.telemetry.records == 0


def test_another_recording_is_kept_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.rec"
    with RecordWriter(path, {"source": "someone else"}) as w:
        w.append("step", {"x": 1})
    d = sim_daemon(tmp_path, TelemetrySettings(path=path, every_epochs=1))
    run(d, 2)
    assert read_header(path.with_name("telemetry.rec.1"))["source"] == "someone else"
    assert read_header(path)["telemetry"] == FORMAT
    assert [r.meta["epoch"] for r in read_records(path) if r.kind == "step"] == [0, 1]
    # The daemon restarted with the same header appends to its own recording.
    d = sim_daemon(tmp_path, TelemetrySettings(path=path, every_epochs=1))
    run(d, 2)
    assert [r.meta["epoch"] for r in read_records(path) if r.kind == "step"] == [0, 1, 0, 1]


def test_the_file_is_rotated_when_it_outgrows_max_mib(tmp_path: Path) -> None:
    max_mib = 1
    path = tmp_path / "telemetry.rec"
    d = sim_daemon(tmp_path, TelemetrySettings(path=path, every_epochs=1, max_mib=max_mib))
    sizes = []
    try:
        for _ in range(2000):
            d.loop.tick()
            sizes.append(path.stat().st_size)
            if path.with_name("telemetry.rec.1").exists():
                break
    finally:
        d.shutdown()
    old = path.with_name("telemetry.rec.1")
    assert old.exists(), f"no rotation after {len(sizes)} epochs, file at {sizes[-1]} bytes"
    assert old.stat().st_size >= max_mib << 20 and path.stat().st_size < old.stat().st_size
    # Both are whole recordings; together they hold every epoch once.
    epochs = [r.meta["epoch"] for p in (old, path) for r in read_records(p, strict=True) if r.kind == "step"]
    assert epochs == list(range(len(epochs)))


def test_a_reload_turns_telemetry_on_again_at_a_good_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x\n")
    d = sim_daemon(tmp_path, TelemetrySettings(path=blocker / "telemetry.rec", every_epochs=1))
    assert d.telemetry is not None and d.telemetry.error is not None
    good = tmp_path / "telemetry.rec"
    conf = tmp_path / "ailfmd.toml"
    conf.write_text(f'[daemon]\nrun_dir = "{tmp_path / "run"}"\n[platform]\nkind = "sim"\n'
                    f'[policy]\nkind = "baseline"\nbaseline = "pcgov"\n[metrics]\nenabled = false\n'
                    f'[control]\nsocket = "{tmp_path / "c.sock"}"\n'
                    f'[telemetry]\npath = "{good}"\nevery_epochs = 1\n')
    d.reload(str(conf))
    assert d.telemetry is not None and d.telemetry.error is None
    run(d, 3)
    assert [r.meta["epoch"] for r in read_records(good) if r.kind == "step"] == [0, 1, 2]


def test_status_says_where_telemetry_goes_and_why_it_stopped(tmp_path: Path) -> None:
    from ailfmd.ctl.render import render_status
    from ailfmd.service import status as st

    good = tmp_path / "telemetry.rec"
    d = sim_daemon(tmp_path, TelemetrySettings(path=good, every_epochs=1))
    try:
        for _ in range(3):
            d.loop.tick()
        doc = st.status_document(d.loop.last, d.platform.topology(), d.info(), d.history)
        assert doc["daemon"]["telemetry"] == {"path": str(good), "records": 3, "error": None}
        assert d.registry.get_sample_value("ailfm_telemetry_records_total") == 3
        assert d.registry.get_sample_value("ailfm_telemetry_up") == 1
        assert f"telemetry: 3 record(s) to {good}" in render_status(doc, color=False)
    finally:
        d.shutdown()
    blocker = tmp_path / "a-file"
    blocker.write_text("x\n")
    d = sim_daemon(tmp_path, TelemetrySettings(path=blocker / "t.rec"))
    try:
        doc = st.status_document(None, d.platform.topology(), d.info(), d.history)
        assert doc["daemon"]["telemetry"]["error"] and "OFF after an error" in render_status(doc, color=False)
        d.loop.tick()
        assert d.registry.get_sample_value("ailfm_telemetry_up") == 0
    finally:
        d.shutdown()
    d = sim_daemon(tmp_path, TelemetrySettings())
    try:
        assert st.status_document(None, d.platform.topology(), d.info(), d.history)["daemon"]["telemetry"] is None
        d.loop.tick()
        assert d.registry.get_sample_value("ailfm_telemetry_up") is None
    finally:
        d.shutdown()


def test_on_a_linux_machine_tree_it_records_the_managed_threads(machine_sys, tmp_path: Path) -> None:
    """A real process's threads on the fixture Xeon: one row each, with the CPU it ran on."""
    import dataclasses

    from ailfmd.platform.linux.sysfs import parse_cpu_list
    from ailfmd.platform.linux.targets import TargetSelector
    from childproc import THREADS_CHILD, child_process

    path = tmp_path / "telemetry.rec"
    with child_process(THREADS_CHILD, "") as (proc, words):
        base = sim_config(tmp_path, "stepwise", telemetry=TelemetrySettings(path=path, every_epochs=1))
        cfg = dataclasses.replace(
            base, daemon=dataclasses.replace(base.daemon, mode="observe"),
            platform=dataclasses.replace(base.platform, kind="linux", sysfs_root=machine_sys("xeon-2s-ht")),
            targets=TargetSelector(pids=(proc.pid,)))
        d = Daemon(cfg, env={})
        ticks = run(d, 3)
    steps = [r for r in read_records(path, strict=True) if r.kind == "step"]
    assert read_header(path)["platform"] == "linux" and len(steps) == 3
    tids = sorted(int(w) for w in words)
    for step, tick in zip(steps, ticks):
        a = step.arrays
        assert a["tids"].tolist() == tids and set(a["pids"].tolist()) == {proc.pid}
        assert a["last_cpu"].tolist() == [tick.observation.threads[t].last_cpu for t in tids]
        # The cpusets this machine's cgroups give the process (None where it has none).
        sets = step.meta["cpusets"]
        recorded = [None if k < 0 else frozenset(parse_cpu_list(sets[k])) for k in a["cpuset_index"].tolist()]
        assert recorded == [tick.observation.threads[t].cpuset for t in tids]
        assert len(sets) == len(set(sets)) <= 1  # one process: one cpuset at most
        assert a["thread"].shape == (4, len(THREAD_COLUMNS)) and a["core"].shape[0] == len(a["cpus"])
        # The fixture's coretemp sensors report 86 °C; the configured 85 °C is lower.
        assert set(a["limit_c"].tolist()) == {85.0}
        assert step.meta["mode"] == "observe" and step.meta["applied"] is False


def test_anything_going_wrong_in_a_record_switches_telemetry_off_once(tmp_path: Path) -> None:
    """Not only write errors: whatever breaks while building a record stops telemetry with
    its reason, and the epochs after it are not touched again."""
    from ailfmd.service.telemetry import TelemetryRecorder

    d = sim_daemon(tmp_path, TelemetrySettings())
    calls = []

    def broken_topology():  # type: ignore[no-untyped-def]
        calls.append(1)
        raise RuntimeError("topology went away")

    try:
        ticks = [d.loop.tick() for _ in range(3)]
    finally:
        d.shutdown()
    rec = TelemetryRecorder(TelemetrySettings(path=tmp_path / "t.rec", every_epochs=1), broken_topology,
                            platform="sim:test", epoch_ms=100)
    for tick in ticks:
        rec.add(tick)  # never raises
    assert rec.error == f"{tmp_path / 't.rec'}: topology went away" and rec.records == 0 and calls == [1]
