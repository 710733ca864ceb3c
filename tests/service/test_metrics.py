"""DaemonMetrics against hand-built TickRecords, read back through a private registry."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from ailfmd import __version__
from ailfmd.control.loop import validate_decision
from ailfmd.control.records import TickRecord
from ailfmd.platform.base import (
    Action,
    ApplyOutcome,
    ApplyResult,
    CpuState,
    CpuTemp,
    CpuTopology,
    Observation,
    TempReading,
    TempSensor,
    ThreadRef,
    ThreadSample,
    Topology,
)
from ailfmd.policy.base import Decision, Reason
from ailfmd.service.metrics import MAX_COMM_VALUES, DaemonMetrics, apply_kind, reason_label

# Two packages, sparse core ids (0, 4) as on Xeons; cpu3 has no temperature reading.
TOPO = Topology(
    cpus={
        0: CpuTopology(cpu=0, package_id=0, core_id=0),
        1: CpuTopology(cpu=1, package_id=0, core_id=4),
        2: CpuTopology(cpu=2, package_id=1, core_id=0),
        3: CpuTopology(cpu=3, package_id=1, core_id=4),
    }
)
CORE0 = TempSensor("coretemp", "platform_coretemp_0", "temp2", "Core 0", "core", "class/hwmon/hwmon1/temp2_input")
CORE4 = TempSensor("coretemp", "platform_coretemp_0", "temp3", "Core 4", "core", "class/hwmon/hwmon1/temp3_input")
TCTL = TempSensor("k10temp", "pci0000:00_0000:00:18_3", "temp1", "Tctl", "package", "class/hwmon/hwmon2/temp1_input")
ZONE = TempSensor("thermal_zone", "thermal_zone0", "thermal_zone0", "x86_pkg_temp", "zone", "class/thermal/thermal_zone0/temp")
BROKEN = TempSensor("hwmon", "platform_nct6775_656", "temp7", "AUXTIN3", "zone", "class/hwmon/hwmon3/temp7_input")

T101 = ThreadRef(pid=100, tid=101, start_ticks=5)
T102 = ThreadRef(pid=100, tid=102, start_ticks=5)
T103 = ThreadRef(pid=200, tid=103, start_ticks=9)

GUARD = "within 3 C of the 85 C limit: cap cut"
MOVED = "busiest thread on hot cpu 1 moved to the coolest cpu 0"


def cpu_state(cpu: int, temp_c: float | None, source: TempSensor | None, freq_khz: int | None = 2_400_000) -> CpuState:
    reason = "no sensor" if source is None else f"{source.scope} {source.kind}"
    return CpuState(cpu, CpuTemp(cpu, temp_c, source, reason), freq_khz, 3_000_000, 800_000, 3_500_000)


def make_record(epoch: int = 0, **changes: object) -> TickRecord:
    obs = Observation(
        time_s=10.0 + epoch,
        cpus={
            0: cpu_state(0, 80.5, CORE0),
            1: cpu_state(1, 88.0, CORE4, freq_khz=1_900_000),
            2: cpu_state(2, 70.25, TCTL),
            3: cpu_state(3, None, None, freq_khz=None),
        },
        threads={
            101: ThreadSample(T101, "llama-server", 1, frozenset({0, 1, 2, 3})),
            102: ThreadSample(T102, "llama-server", 1, frozenset({1})),
            103: ThreadSample(T103, "python3", 2, frozenset({2})),
        },
        sensors=(
            TempReading(CORE0, 80.5, crit_c=100.0, max_c=90.0),
            TempReading(CORE4, 88.0, crit_c=100.0, max_c=90.0),
            TempReading(TCTL, 70.25),
            TempReading(ZONE, 81.0),
            TempReading(BROKEN, None, error="read error: EIO"),
        ),
    )
    shield = (
        Reason("cpu 1", "freq_cap", "shield", GUARD, "platform_coretemp_0/temp3", 88.0, 82.0, "cap 1500 MHz"),
        Reason("thread 101", "placement", "shield", MOVED, None, 88.0, 82.0, "cpu 1 loses its busiest thread"),
    )
    decision = Decision(
        Action(
            # 101 moves (shield); 103 is restated on the CPU it already has: not a placement.
            affinity={T101: frozenset({0}), T103: frozenset({2})},
            freq_cap_khz={0: 3_000_000, 1: 1_500_000},
        ),
        (Reason("cpu 0", "freq_cap", "policy:linux", "governor default"), *shield),
    )
    applied = ApplyResult(
        (
            ApplyOutcome("thread 101", "0", "0", True),
            ApplyOutcome("policy0", "3000000 kHz", "3000000 kHz", True),
            ApplyOutcome("policy1", "1500000 kHz", None, False, "Permission denied"),
        )
    )
    fields: dict[str, object] = dict(
        epoch=epoch,
        time_s=obs.time_s,
        wall_time_s=1_700_000_000.0 + epoch,
        mode="enforce",
        paused=False,
        policy_name="linux",
        observation=obs,
        decision=decision,
        shield=shield,
        applied=applied,
        inference_s=0.0003,
        timings_s={"observe": 0.0004, "decide": 0.0003, "shield": 0.0001, "apply": 0.0004, "total": 0.0012},
        limit_c=85.0,
        violations=(1,),
        landing_fraction=0.5,
    )
    fields.update(changes)
    return TickRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> DaemonMetrics:
    return DaemonMetrics(registry, TOPO)


def samples(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    return [s.labels for fam in registry.collect() for s in fam.samples if s.name == name]


def temp_labels(cpu: str, package: str, core: str, s: TempSensor) -> dict[str, str]:
    return dict(cpu=cpu, package=package, core=core, source=s.kind, scope=s.scope, chip=s.chip, sensor=s.sensor)


def test_cpu_temperatures_carry_topology_and_sensor(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    metrics.update(make_record())
    get = registry.get_sample_value
    assert get("ailfm_cpu_temperature_celsius", temp_labels("0", "0", "0", CORE0)) == 80.5
    assert get("ailfm_cpu_temperature_celsius", temp_labels("1", "0", "4", CORE4)) == 88.0
    assert get("ailfm_cpu_temperature_celsius", temp_labels("2", "1", "0", TCTL)) == 70.25


def test_cpu_without_reading_has_no_temperature_series(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    metrics.update(make_record())
    temps = samples(registry, "ailfm_cpu_temperature_celsius")
    assert sorted(s["cpu"] for s in temps) == ["0", "1", "2"]
    # ... yet the CPU itself is still reported where values exist.
    assert registry.get_sample_value("ailfm_cpu_frequency_max_hertz", {"cpu": "3", "package": "1", "core": "4"}) == 3.5e9
    assert [s["cpu"] for s in samples(registry, "ailfm_cpu_frequency_hertz")] == ["0", "1", "2"]


def test_frequencies_in_hertz(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    metrics.update(make_record())
    cpu1 = {"cpu": "1", "package": "0", "core": "4"}
    get = registry.get_sample_value
    assert get("ailfm_cpu_frequency_hertz", cpu1) == 1.9e9
    assert get("ailfm_cpu_frequency_cap_hertz", cpu1) == 3.0e9
    assert get("ailfm_cpu_frequency_max_hertz", cpu1) == 3.5e9
    assert get("ailfm_cpu_frequency_min_hertz", cpu1) == 8.0e8


def test_every_readable_sensor_is_exported(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    metrics.update(make_record())

    def lab(s: TempSensor) -> dict[str, str]:
        return {"chip": s.chip, "sensor": s.sensor, "label": s.label, "kind": s.kind}

    get = registry.get_sample_value
    assert get("ailfm_sensor_temperature_celsius", lab(ZONE)) == 81.0
    assert get("ailfm_sensor_temperature_celsius", lab(TCTL)) == 70.25
    assert get("ailfm_sensor_temperature_crit_celsius", lab(CORE4)) == 100.0
    assert get("ailfm_sensor_temperature_max_celsius", lab(CORE4)) == 90.0
    chips = sorted(s["sensor"] for s in samples(registry, "ailfm_sensor_temperature_celsius"))
    assert chips == ["temp1", "temp2", "temp3", "thermal_zone0"]  # the EIO sensor is absent, not 0
    assert samples(registry, "ailfm_sensor_temperature_crit_celsius") == [lab(CORE0), lab(CORE4)]


def test_counters_accumulate_across_epochs(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    metrics.update(make_record(0))
    metrics.update(make_record(1))
    metrics.update(make_record(2, violations=(0, 1), applied=None, inference_s=None))
    get = registry.get_sample_value
    assert get("ailfm_epochs_total") == 3
    assert get("ailfm_thermal_violations_total") == 4
    assert get("ailfm_actions_total", {"kind": "freq_cap", "source": "policy:linux"}) == 3
    assert get("ailfm_actions_total", {"kind": "freq_cap", "source": "shield"}) == 3
    assert get("ailfm_actions_total", {"kind": "placement", "source": "shield"}) == 3
    assert get("ailfm_shield_interventions_total", {"reason": "within N C of the N C limit"}) == 3
    assert get("ailfm_shield_interventions_total", {"reason": reason_label(MOVED)}) == 3
    assert get("ailfm_placements_total", {"comm": "llama-server"}) == 3
    assert get("ailfm_placements_total", {"comm": "python3"}) is None  # restated, not moved
    assert get("ailfm_apply_failures_total", {"kind": "freq_cap"}) == 2  # epoch 2 applied nothing
    assert get("ailfm_apply_failures_total", {"kind": "placement"}) is None
    assert get("ailfm_policy_inference_seconds_count") == 2
    assert get("ailfm_policy_inference_seconds_sum") == pytest.approx(0.0006)
    assert get("ailfm_epoch_duration_seconds_count") == 3
    assert get("ailfm_epoch_duration_seconds_sum") == pytest.approx(0.0036)


def test_histogram_buckets_are_cumulative_and_inclusive(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    for i, took in enumerate((0.00002, 0.0003, 0.001, 0.5)):
        metrics.update(make_record(i, inference_s=took))

    def bucket(le: str) -> float | None:
        return registry.get_sample_value("ailfm_policy_inference_seconds_bucket", {"le": le})

    assert bucket("1e-05") == 0
    assert bucket("2.5e-05") == 1
    assert bucket("0.00025") == 1
    assert bucket("0.0005") == 2
    assert bucket("0.001") == 3  # le is "less than or equal"
    assert bucket("0.1") == 3
    assert bucket("+Inf") == 4


def test_fallback_is_counted_by_bounded_reason(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    why = "timeout: onnx took 61.2 ms > 50 ms"
    note = Reason("policy", "fallback", "fallback:linux", why)
    rec = make_record()
    rec = replace(rec, fallback=why, decision=Decision(rec.decision.action, (*rec.decision.reasons, note)))
    metrics.update(rec)
    metrics.update(replace(rec, fallback="ValueError: policy returned nan for cpu 3"))
    get = registry.get_sample_value
    assert get("ailfm_policy_fallbacks_total", {"reason": "timeout"}) == 1
    assert get("ailfm_policy_fallbacks_total", {"reason": "ValueError"}) == 1
    # The fallback note is not an actuation.
    assert all(s["kind"] != "fallback" for s in samples(registry, "ailfm_actions_total"))


def test_mode_is_a_state_set(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    def modes() -> dict[str, float | None]:
        return {m: registry.get_sample_value("ailfm_mode", {"mode": m}) for m in ("enforce", "observe", "paused")}

    metrics.update(make_record())
    assert modes() == {"enforce": 1, "observe": 0, "paused": 0}
    metrics.update(make_record(1, mode="observe"))
    assert modes() == {"enforce": 0, "observe": 1, "paused": 0}
    metrics.update(make_record(2, paused=True))
    assert modes() == {"enforce": 0, "observe": 0, "paused": 1}


def test_info_limit_and_thread_gauges(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    get = registry.get_sample_value
    assert get("ailfm_build_info", {"version": __version__}) == 1
    assert samples(registry, "ailfm_policy_info") == []  # nothing known yet
    metrics.update(make_record())
    assert get("ailfm_policy_info", {"name": "linux", "kind": "", "schema": "", "path": ""}) == 1
    metrics.set_policy("thermal-v3", "onnx", "features/2", "/etc/ailfmd/policy.onnx")
    assert samples(registry, "ailfm_policy_info") == [
        {"name": "thermal-v3", "kind": "onnx", "schema": "features/2", "path": "/etc/ailfmd/policy.onnx"}
    ]
    assert get("ailfm_thermal_limit_celsius") == 85.0
    assert get("ailfm_shield_landing_cap_ratio") == 0.5
    metrics.update(make_record(landing_fraction=None))  # landing caps off: no such series
    assert get("ailfm_shield_landing_cap_ratio") is None
    metrics.update(make_record())
    assert get("ailfm_managed_threads") == 3
    per_cpu = {s["cpu"]: get("ailfm_cpu_managed_threads", s) for s in samples(registry, "ailfm_cpu_managed_threads")}
    assert per_cpu == {"0": 0, "1": 2, "2": 1, "3": 0}
    assert get("ailfm_last_epoch_timestamp_seconds") == 1_700_000_000.0
    assert get("ailfm_epoch_phase_seconds", {"phase": "decide"}) == 0.0003


def test_topology_change_relabels_cpus(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    metrics.set_topology(Topology(cpus={c: CpuTopology(cpu=c, package_id=7, core_id=10 + c) for c in range(4)}))
    metrics.update(make_record())
    assert registry.get_sample_value("ailfm_cpu_temperature_celsius", temp_labels("0", "7", "10", CORE0)) == 80.5
    assert registry.get_sample_value("ailfm_cpu_temperature_celsius", temp_labels("0", "0", "0", CORE0)) is None


def test_comm_label_is_bounded(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    rec = make_record()
    n = MAX_COMM_VALUES + 36
    refs = [ThreadRef(pid=1, tid=1000 + i, start_ticks=1) for i in range(n)]
    obs = replace(rec.observation, threads={r.tid: ThreadSample(r, f"worker-{r.tid}", 0, frozenset({0})) for r in refs})
    decision = Decision(Action(affinity={r: frozenset({1}) for r in refs}))
    metrics.update(replace(rec, observation=obs, decision=decision))
    series = samples(registry, "ailfm_placements_total")
    assert len(series) == MAX_COMM_VALUES + 1
    assert registry.get_sample_value("ailfm_placements_total", {"comm": "other"}) == n - MAX_COMM_VALUES
    assert sum(registry.get_sample_value("ailfm_placements_total", s) or 0 for s in series) == n


def test_labels_helpers() -> None:
    assert reason_label("package at or above the critical temperature: hardware minimum") == (
        "package at or above the critical temperature"
    )
    assert reason_label("holding the shield cap until the core cools") == "holding the shield cap until the core cools"
    assert reason_label(MOVED) == "busiest thread on hot cpu N moved to the coolest cpu N"
    assert reason_label("") == "unspecified"
    assert [apply_kind(t) for t in ("thread 12", "policy0", "cpu 3", "/sys/x")] == [
        "placement", "freq_cap", "freq_cap", "other"
    ]


def test_private_registry_only() -> None:
    before = {m.name for m in REGISTRY.collect()}
    DaemonMetrics(CollectorRegistry(), TOPO).update(make_record())
    assert {m.name for m in REGISTRY.collect()} == before
    assert not any(n.startswith("ailfm") for n in before)


def test_scrape_during_updates_is_consistent(metrics: DaemonMetrics, registry: CollectorRegistry) -> None:
    done = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            for i in range(2000):
                metrics.update(make_record(i))
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=loop)
    t.start()
    while not done.is_set():
        generate_latest(registry)
    t.join()
    assert not errors
    assert registry.get_sample_value("ailfm_epochs_total") == 2000


def test_http_endpoint_serves_the_private_registry(metrics: DaemonMetrics) -> None:
    metrics.update(make_record())
    host, port = metrics.start_http(port=0)
    try:
        assert host == "127.0.0.1" and port > 0
        with pytest.raises(RuntimeError):
            metrics.start_http(port=0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        assert 'ailfm_epochs_total 1.0' in body
        assert 'ailfm_cpu_temperature_celsius{chip="platform_coretemp_0",core="4",cpu="1"' in body
    finally:
        metrics.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.stop()  # idempotent


def test_placements_outside_a_cpuset_are_counted_apart_not_as_actions(metrics: DaemonMetrics,
                                                                        registry: CollectorRegistry) -> None:
    """validate_decision's note for a placement it did not make is no actuation."""
    obs = make_record().observation
    confined = replace(obs, threads={**obs.threads, 102: replace(obs.threads[102], cpuset=frozenset({1}))})
    asked = Decision(Action(affinity={T102: frozenset({3})}),
                     (Reason("thread 102", "placement", "policy:onnx", "model moves thread to cpu 3"),))
    decision = validate_decision(asked, confined)
    for epoch in range(2):
        metrics.update(replace(make_record(epoch), observation=confined, decision=decision))
    get = registry.get_sample_value
    assert get("ailfm_placements_outside_cpuset_total") == 2
    assert get("ailfm_actions_total", {"kind": "placement", "source": "policy:onnx"}) is None
    assert all(s["source"] != "cpuset" for s in samples(registry, "ailfm_actions_total"))
