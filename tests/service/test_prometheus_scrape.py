"""The exporter against Debian's real Prometheus tools: promtool's linter and a live server.

Both come from the `prometheus` package (tools/install-test-deps.sh installs it). Everything
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

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
from ailfmd.service.metrics import DaemonMetrics
from promserver import JOB, PrometheusServer

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus': run tools/install-test-deps.sh)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package 'prometheus': run tools/install-test-deps.sh)"
)

TOPO = Topology(cpus={c: CpuTopology(cpu=c, package_id=0, core_id=c) for c in range(3)})
CHIP = "platform_coretemp_0"


def sensor(cpu: int) -> TempSensor:
    return TempSensor("coretemp", CHIP, f"temp{cpu + 2}", f"Core {cpu}", "core", f"class/hwmon/hwmon1/temp{cpu + 2}_input")


def record(epoch: int, temps_c: dict[int, float | None]) -> TickRecord:
    """CPUs 0..2; a None temperature means the CPU has no reading."""
    cpus = {
        c: CpuState(c, CpuTemp(c, t, sensor(c) if t is not None else None, "per-core coretemp"),
                    2_000_000, 3_000_000, 800_000, 3_500_000)
        for c, t in temps_c.items()
    }
    ref = ThreadRef(pid=10, tid=11, start_ticks=1)
    obs = Observation(
        time_s=float(epoch),
        cpus=cpus,
        threads={11: ThreadSample(ref, "llama-server", 0, frozenset({0, 1, 2}))},
        sensors=tuple(TempReading(sensor(c), t) for c, t in temps_c.items() if t is not None),
    )
    shield = (Reason("cpu 0", "freq_cap", "shield", "within 3 C of the 85 C limit: cap cut", f"{CHIP}/temp2", 84.0, 82.0),)
    decision = Decision(Action(affinity={ref: frozenset({1})}, freq_cap_khz={0: 1_500_000}),
                        (Reason("thread 11", "placement", "policy:onnx", "cooler neighbour"), *shield))
    return TickRecord(
        epoch=epoch, time_s=float(epoch), wall_time_s=1_700_000_000.0 + epoch, mode="enforce", paused=False,
        policy_name="onnx", observation=obs, decision=decision, shield=shield,
        applied=ApplyResult((ApplyOutcome("policy0", "1500000 kHz", None, False, "Permission denied"),)),
        inference_s=4e-5, timings_s={"total": 8e-4}, limit_c=85.0,
        violations=tuple(c for c, t in temps_c.items() if t is not None and t >= 85.0),
    )


@pytest.fixture
def metrics() -> Iterator[tuple[CollectorRegistry, DaemonMetrics]]:
    registry = CollectorRegistry()
    m = DaemonMetrics(registry, TOPO)
    m.set_policy("thermal-v1", "onnx", "features/1", "/etc/ailfmd/policy.onnx")
    yield registry, m
    m.stop()


def promtool_check(exposition: bytes) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, "check", "metrics"], input=exposition.decode(), capture_output=True,
                          text=True, timeout=30)


# ---------------------------------------------------------------------------- promtool


@needs_promtool
def test_promtool_rejects_a_bad_exposition() -> None:
    # The linter is live: the checks below would catch a counter without _total.
    res = promtool_check(b"# HELP ailfm_epochs Epochs.\n# TYPE ailfm_epochs counter\nailfm_epochs 1\n")
    assert res.returncode != 0
    assert "_total" in res.stdout + res.stderr


@needs_promtool
def test_promtool_accepts_our_exposition(metrics: tuple[CollectorRegistry, DaemonMetrics]) -> None:
    registry, m = metrics
    res = promtool_check(generate_latest(registry))  # before the first epoch
    assert (res.returncode, res.stdout + res.stderr) == (0, "")
    m.update(record(0, {0: 84.0, 1: 86.5, 2: None}))
    m.update(record(1, {0: 84.5, 1: 87.0, 2: None}))
    m.set_telemetry(1, True)
    res = promtool_check(generate_latest(registry))
    assert (res.returncode, res.stdout + res.stderr) == (0, "")
    assert b"ailfm_telemetry_records_total 1.0" in generate_latest(registry)


@needs_promtool
def test_promtool_accepts_what_the_endpoint_serves(metrics: tuple[CollectorRegistry, DaemonMetrics]) -> None:
    _, m = metrics
    m.update(record(0, {0: 84.0, 1: 86.5, 2: None}))
    _, port = m.start_http(port=0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read()
    assert b"ailfm_cpu_temperature_celsius" in body
    res = promtool_check(body)
    assert (res.returncode, res.stdout + res.stderr) == (0, "")


# ---------------------------------------------------------------------------- a real server


@needs_prometheus
@pytest.mark.slow
def test_real_prometheus_scrapes_our_series(metrics: tuple[CollectorRegistry, DaemonMetrics], tmp_path: Path) -> None:
    _, m = metrics
    m.update(record(0, {0: 84.0, 1: 86.5, 2: None}))
    host, port = m.start_http(port=0)
    assert host == "127.0.0.1"
    server = PrometheusServer(tmp_path, f"127.0.0.1:{port}")
    try:
        result = server.wait_for("ailfm_cpu_temperature_celsius", {"0": 84.0, "1": 86.5})
        labels = next(r["metric"] for r in result if r["metric"]["cpu"] == "1")
        assert labels == {
            "__name__": "ailfm_cpu_temperature_celsius", "job": JOB, "instance": f"127.0.0.1:{port}",
            "cpu": "1", "package": "0", "core": "1", "source": "coretemp", "scope": "core",
            "chip": CHIP, "sensor": "temp3",
        }
        server.wait_for(f'up{{job="{JOB}"}}', {JOB: 1.0}, key="job")
        server.wait_for("ailfm_policy_info", {"thermal-v1": 1.0}, key="name")
        server.wait_for('ailfm_mode{mode="enforce"}', {"enforce": 1.0}, key="mode")
        server.wait_for("ailfm_apply_failures_total", {"freq_cap": 1.0}, key="kind")

        # Later epochs reach Prometheus on the next scrape; cpu 2 gains a reading, cpu 1 loses its.
        m.update(record(1, {0: 91.0, 1: None, 2: 70.0}))
        server.wait_for("ailfm_cpu_temperature_celsius", {"0": 91.0, "2": 70.0})
        server.wait_for("ailfm_epochs_total", {"": 2.0})
        server.wait_for("ailfm_thermal_violations_total", {"": 2.0})
        server.wait_for("ailfm_policy_inference_seconds_count", {"": 2.0})
    finally:
        server.stop()
    assert server.proc.returncode is not None
