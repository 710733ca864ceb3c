"""``ailfmctl`` against a running control socket, as an operator runs it: real processes.

The daemon side is a real ControlServer in this process answering with documents from
ailfmd.service.status built on hand-made TickRecords.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from ailfmd.control.records import TickRecord
from ailfmd.ctl import render
from ailfmd.ctl.sensors_report import build_report
from ailfmd.platform.base import (
    Action,
    ApplyResult,
    Capabilities,
    Capability,
    CpuState,
    CpuTemp,
    CpuTopology,
    Observation,
    TempSensor,
    ThreadRef,
    ThreadSample,
    Topology,
)
from ailfmd.policy.base import Decision, Reason
from ailfmd.service.control import CommandError, ControlServer, Peer
from ailfmd.service.status import (
    DaemonInfo,
    History,
    PolicyInfo,
    explain_document,
    mode_document,
    policy_document,
    status_document,
)

REPO = Path(__file__).resolve().parents[2]
LIMIT_C = 80.0
TEMPS = {0: 45.0, 1: 52.3, 2: 58.0, 3: 61.7, 4: 66.4, 5: 70.1, 6: 74.9, 7: 81.5}

CAP = Reason("cpu 7", "freq_cap", "shield", "cap cpu 7 to 2400 MHz", sensor="coretemp/temp9", value_c=81.5,
             threshold_c=78.0, predicted="cpu 7 below 78 C within 2 s")
MOVE = Reason("thread 501", "placement", "policy:onnx", "move to the cooler package 0", predicted="-2 C on cpu 7")


def topology(kind: str) -> Topology:
    if kind == "layers":  # 2 layers of 2x2 tiles
        return Topology({c: CpuTopology(c, 0, c, position=(c // 4, (c % 4) // 2, c % 2)) for c in range(8)})
    return Topology({c: CpuTopology(c, c // 4, c % 4) for c in range(8)})  # 2 packages, 4 CPUs each


def tick(epoch: int) -> TickRecord:
    src = TempSensor("coretemp", "platform_coretemp_0", "temp9", "Core 7", "core", "")
    cpus = {
        c: CpuState(c, CpuTemp(c, t, src if c == 7 else None, "per-core coretemp" if c == 7 else "no sensor"),
                    2_900_000, 2_400_000 if c == 7 else 3_500_000, 800_000, 3_500_000)
        for c, t in TEMPS.items()
    }
    threads = {501: ThreadSample(ThreadRef(500, 501, 9), "llama-server", 7, frozenset({4, 5, 6, 7}), {},
                                 frozenset(range(8)))}
    return TickRecord(
        epoch=epoch, time_s=float(epoch), wall_time_s=1_700_000_000.0 + epoch, mode="enforce", paused=False,
        policy_name="onnx", observation=Observation(float(epoch), cpus, threads),
        decision=Decision(Action(), (MOVE, CAP)), shield=(CAP,), applied=ApplyResult(()),
        timings_s={"total": 0.0015}, limit_c=LIMIT_C, violations=(7,), landing_fraction=0.25,
        cpu_limits_c={c: (LIMIT_C, 95.0) for c in TEMPS},
    )


class Daemon:
    def __init__(self, kind: str) -> None:
        self.topology = topology(kind)
        self.history = History()
        self.paused = False
        for e in range(4):
            self.latest = tick(e)
            self.history.add(self.latest)

    def info(self) -> DaemonInfo:
        return DaemonInfo("0.1.0", 4321, "linux", "enforce", self.paused, 100.0, 61.0,
                          PolicyInfo("onnx", "onnx", "/var/lib/ailfmd/p.onnx", "ailfm.features/1", "stepwise"),
                          limit_c=LIMIT_C, ambient_c=45.0)

    def handle(self, cmd: str, args: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        if cmd == "status":
            return status_document(self.latest, self.topology, self.info(), self.history)
        if cmd == "explain":
            return explain_document(self.history, args.get("epochs", 10))
        if cmd == "policy":
            return policy_document(self.info(), self.latest, self.history)
        if cmd == "sensors":
            caps = Capabilities({"affinity": Capability(True, "sched_setaffinity")})
            return build_report(self.topology, caps, self.latest.observation, {"sysfs": "daemon", "procfs": "daemon"})
        if cmd in ("pause", "resume"):
            was, self.paused = self.paused, cmd == "pause"
            return mode_document(self.info(), changed=was != self.paused, detail=f"{cmd}d")
        raise CommandError("reload failed: /etc/ailfmd/ailfmd.toml: epoch_ms = -5: must be > 0")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short: AF_UNIX paths are limited to 108 bytes, tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="ailfm-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["layers", "packages"])
def running(request: pytest.FixtureRequest, sock_dir: Path) -> Iterator[tuple[Daemon, Path]]:
    d = Daemon(request.param)
    srv = ControlServer(sock_dir / "control.sock", d.handle, None)
    srv.start()
    yield d, srv.path
    srv.stop()


@pytest.fixture
def layered(sock_dir: Path) -> Iterator[tuple[Daemon, Path]]:
    d = Daemon("layers")
    srv = ControlServer(sock_dir / "control.sock", d.handle, None)
    srv.start()
    yield d, srv.path
    srv.stop()


def ctl(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "ailfmd.ctl.cli", *args], capture_output=True, text=True,
                          timeout=60, env=e)


def ok_json(*args: str) -> dict[str, Any]:
    p = ctl(*args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


# --------------------------------------------------------------------------- JSON


def test_status_json(running: tuple[Daemon, Path]) -> None:
    d, sock = running
    doc = ok_json("status", "--socket", str(sock))
    assert doc["schema"] == "ailfmd.status/1"
    assert [c["temp_c"] for c in doc["cpus"]] == list(TEMPS.values())
    assert doc["cpus"][7]["source"] == "platform_coretemp_0/temp9" and doc["cpus"][7]["violation"] is True
    assert doc["heatmap"]["kind"] == ("layers" if d.topology.cpus[0].position else "packages")
    assert doc["threads"] == [{"tid": 501, "pid": 500, "comm": "llama-server", "cpus": [4, 5, 6, 7],
                               "cpu_list": "4-7", "cpuset": "0-7", "last_cpu": 7}]
    assert doc["last_epoch"]["landing_cap_fraction"] == 0.25


def test_explain_json_gives_each_action_its_reason(layered: tuple[Daemon, Path]) -> None:
    _, sock = layered
    doc = ok_json("explain", "-n", "2", "--socket", str(sock))
    assert [e["epoch"] for e in doc["epochs"]] == [3, 2]
    cap = doc["epochs"][0]["actions"][1]
    assert cap == {"target": "cpu 7", "kind": "freq_cap", "source": "shield", "detail": "cap cpu 7 to 2400 MHz",
                   "sensor": "coretemp/temp9", "value_c": 81.5, "threshold_c": 78.0,
                   "predicted": "cpu 7 below 78 C within 2 s", "shield": True}


def test_pause_and_resume_json(layered: tuple[Daemon, Path]) -> None:
    d, sock = layered
    doc = ok_json("pause", "--socket", str(sock))
    assert doc["paused"] is True and doc["changed"] is True and d.paused
    assert ok_json("status", "--socket", str(sock))["daemon"]["paused"] is True
    doc = ok_json("resume", "--socket", str(sock))
    assert doc["paused"] is False and not d.paused


def test_sensors_asks_the_daemon_only_when_given_a_socket(layered: tuple[Daemon, Path]) -> None:
    _, sock = layered
    rep = ok_json("sensors", "--socket", str(sock))
    assert rep["schema"] == "ailfmd.sensors/1" and rep["roots"] == {"sysfs": "daemon", "procfs": "daemon"}
    p = ctl("sensors", "--socket", str(sock), "--sysfs-root", "/sys")
    assert p.returncode == 1 and "cannot be combined" in p.stderr


# --------------------------------------------------------------------------- human output


def test_status_draws_the_heat_map_in_plain_text(running: tuple[Daemon, Path]) -> None:
    d, sock = running
    p = ctl("status", "--socket", str(sock), env={"NO_COLOR": "1"})
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "\x1b[" not in out
    lines = out.splitlines()
    if d.topology.cpus[0].position is not None:
        # One grid per layer, cells at (row, col): cpus 0,1 in row 0 of layer 0, ...
        assert "layer 0 (cpus 0-3)" in out and "layer 1 (cpus 4-7)" in out
        assert "      0-1 |  45.0   52.3" in lines
        assert "      6-7 |  74.9   81.5!" in lines
    else:
        assert "package 0 (cpus 0-3)" in out and "package 1 (cpus 4-7)" in out
        assert "      0-3 |  45.0   52.3   58.0   61.7" in lines
        assert "      4-7 |  66.4   70.1   74.9   81.5!" in lines
    assert "scale: 45 C .. 80 C" in out
    assert "mode enforce" in out and "violations: CPUs 7 at/above the limit" in out
    assert "cpu 7: freq_cap by shield" in out  # recent shield interventions, with reasons
    assert "landing caps: idle CPUs held at 25% of their frequency range" in out
    cpu7 = next(line for line in lines if line.split()[:1] == ["7"] and "coretemp" in line)
    assert "81.5 C !" in cpu7 and cpu7.rstrip().endswith("80.0 C")  # the LIMIT column
    thread = next(line for line in lines if line.split()[:1] == ["501"])
    assert thread.split() == ["501", "500", "llama-server", "4-7", "0-7", "7"]  # CPUS, CPUSET, LAST CPU
    assert "CPUSET" in out


def _run_on_tty(args: list[str], env: Mapping[str, str]) -> str:
    master, slave = pty.openpty()
    e = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    proc = subprocess.Popen([sys.executable, "-m", "ailfmd.ctl.cli", *args], stdout=slave, stderr=subprocess.PIPE,
                            env={**e, "PYTHONPATH": str(REPO), **env})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    return b"".join(chunks).decode()


def test_status_colours_the_heat_map_on_a_terminal_unless_no_color(layered: tuple[Daemon, Path]) -> None:
    _, sock = layered
    out = _run_on_tty(["status", "--socket", str(sock)], {})
    assert "\x1b[48;5;21m" in out  # 45 C = ambient: blue
    assert f"\x1b[48;5;{render.AT_LIMIT_BG}m" in out and "81.5" in out  # cpu 7 over the limit
    plain = _run_on_tty(["status", "--socket", str(sock)], {"NO_COLOR": "1"})
    assert "\x1b[" not in plain and "81.5!" in plain


def test_explain_policy_and_modes_read_well(layered: tuple[Daemon, Path]) -> None:
    _, sock = layered
    p = ctl("explain", "-n", "1", "--socket", str(sock))
    assert p.returncode == 0, p.stderr
    assert "epoch 3 at " in p.stdout and "onnx, applied" in p.stdout
    assert ("cpu 7: freq_cap by shield [shield] - cap cpu 7 to 2400 MHz (sensor coretemp/temp9, 81.5 C, "
            "threshold 78.0 C); expect: cpu 7 below 78 C within 2 s") in p.stdout
    assert "thread 501: placement by policy:onnx - move to the cooler package 0; expect: -2 C on cpu 7" in p.stdout
    p = ctl("policy", "--socket", str(sock))
    assert p.returncode == 0 and "configured: onnx (onnx, /var/lib/ailfmd/p.onnx" in p.stdout
    p = ctl("pause", "--socket", str(sock))
    assert p.returncode == 0 and "paused (observing only, nothing applied)" in p.stdout


# --------------------------------------------------------------------------- errors and exit codes


def test_a_daemon_error_exits_1_with_its_message(layered: tuple[Daemon, Path]) -> None:
    _, sock = layered
    p = ctl("reload", "--socket", str(sock))
    assert p.returncode == 1
    assert p.stderr == "ailfmctl: reload failed: /etc/ailfmd/ailfmd.toml: epoch_ms = -5: must be > 0\n"


@pytest.mark.parametrize("cmd", ["status", "policy", "explain", "pause", "resume", "reload", "sensors"])
def test_no_daemon_exits_3(cmd: str, sock_dir: Path) -> None:
    missing = sock_dir / "control.sock"
    p = ctl(cmd, "--socket", str(missing))
    assert p.returncode == 3
    assert p.stderr == f"ailfmctl: ailfmd is not running (no socket at {missing})\n"
    assert p.stdout == ""


@pytest.mark.skipif(os.path.exists("/run/ailfmd/control.sock"), reason="a daemon runs on this machine")
def test_the_default_socket_is_the_run_dir() -> None:
    p = ctl("status")
    assert p.returncode == 3 and "no socket at /run/ailfmd/control.sock" in p.stderr


def test_usage_errors_exit_2(layered: tuple[Daemon, Path]) -> None:
    _, sock = layered
    p = ctl("explain", "-n", "0", "--socket", str(sock))
    assert p.returncode == 2 and "must be >= 1" in p.stderr


# --------------------------------------------------------------------------- rendering


def test_colour_scale_runs_blue_to_red_between_ambient_and_limit() -> None:
    assert render.temp_bg(45.0, 45.0, 80.0) == 21  # blue
    assert render.temp_bg(20.0, 45.0, 80.0) == 21  # below ambient stays blue
    assert render.temp_bg(79.9, 45.0, 80.0) == 196  # red
    assert render.temp_bg(80.0, 45.0, 80.0) == render.AT_LIMIT_BG
    assert render.temp_bg(None, 45.0, 80.0) == render.NO_READING_BG
    steps = [render.temp_bg(45.0 + i * 35.0 / 100, 45.0, 80.0) for i in range(100)]
    idx = [render.RAMP.index(s) for s in steps]
    assert idx == sorted(idx) and idx[0] == 0 and idx[-1] == len(render.RAMP) - 1


def test_use_color_needs_a_tty_and_no_no_color(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        assert render.use_color(f, {}) is False
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty:
        assert render.use_color(tty, {}) is True
        assert render.use_color(tty, {"NO_COLOR": "1"}) is False
        assert render.use_color(tty, {"NO_COLOR": ""}) is True  # empty means unset (no-color.org)
    os.close(master)


def test_heat_map_without_readings_and_with_gaps() -> None:
    hm = {"kind": "packages", "min_c": 25.0, "max_c": 90.0,
          "grids": [{"name": "package 0", "cpus": "0-2", "cells": [[{"cpu": 0, "temp_c": None},
                                                                    {"cpu": 2, "temp_c": 30.0}, None]]}]}
    lines = render.render_heatmap(hm, color=False)
    assert lines[:2] == ["package 0 (cpus 0-2)", "      0-2 |    --   30.0"]
