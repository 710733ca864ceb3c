"""``ailfmd`` as a real process: notify socket, control socket, metrics, signals, restore."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from promserver import PROMETHEUS, PROMTOOL, PrometheusServer, free_port

DAEMON = [sys.executable, "-m", "ailfmd.service.daemon"]
CTL = [sys.executable, "-m", "ailfmd.ctl.cli"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="ailfmd-t", dir="/tmp"))
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
    d.rmdir()


class NotifyListener:
    """A real NOTIFY_SOCKET, read continuously as systemd does (a full socket buffer would
    block the daemon's sd_notify)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

    def wait_for(self, needle: str, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for m in self.messages:
                    if needle in m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {needle!r} on the notify socket; got {self.messages[-10:]}")
                self._cond.wait(left)

    def close(self) -> None:
        self._closed = True
        self._reader.join(2)
        self.sock.close()


def write_config(d: Path, **sections: dict[str, object]) -> Path:
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name.replace('__', '.')}]")
        for k, v in table.items():
            lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    path = d / "ailfmd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, *args, "--socket", str(sock)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "NO_COLOR": "1"})


def start(config: Path, env_extra: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, **(env_extra or {})}
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen([*DAEMON, "--config", str(config)], env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)


@pytest.mark.slow
def test_sim_daemon_under_systemd_protocols(short_dir: Path) -> None:
    port = free_port()
    sock = short_dir / "control.sock"
    config = write_config(
        short_dir,
        daemon={"mode": "enforce", "epoch_ms": 100, "run_dir": str(short_dir / "run")},
        platform={"kind": "sim"},
        platform__sim={"chip": "3d-64", "workload": "decode-heavy", "seed": 1},
        policy={"kind": "baseline", "baseline": "stepwise", "fallback": "linux"},
        metrics={"port": port},
        control={"socket": str(sock)},
    )
    notify = NotifyListener(short_dir / "notify.sock")
    log = short_dir / "daemon.log"
    proc = start(config, {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}, log)
    try:
        assert "READY=1" in notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", timeout_s=5)

        st = ctl(sock, "status", "--json")
        assert st.returncode == 0, st.stderr
        doc = json.loads(st.stdout)
        assert doc["daemon"]["mode"] == "enforce" and doc["policy"]["name"] == "stepwise"
        assert len(doc["cpus"]) == 64 and doc["heatmap"]["kind"] == "layers" and len(doc["heatmap"]["grids"]) == 4
        human = ctl(sock, "status")
        assert "layer 3" in human.stdout and human.returncode == 0

        # Garbage on the control socket: refused, and the daemon keeps serving.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(sock))
            c.sendall(b"\x00\xffnot json\n")
            reply = json.loads(c.makefile().readline())
            assert reply["ok"] is False
        assert ctl(sock, "status", "--json").returncode == 0

        # Operator pause: applied at the next epoch, visible in status; resume undoes it.
        assert ctl(sock, "pause", "--json").returncode == 0
        deadline = time.monotonic() + 10
        while not json.loads(ctl(sock, "status", "--json").stdout)["daemon"]["paused"]:
            assert time.monotonic() < deadline, "pause never took effect"
            time.sleep(0.1)
        assert ctl(sock, "resume", "--json").returncode == 0

        # Metrics: real HTTP, clean under promtool, scraped by a real Prometheus.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read()
        assert body.count(b"ailfm_cpu_temperature_celsius{") == 64
        if PROMTOOL:
            chk = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
            assert chk.returncode == 0, chk.stdout + chk.stderr
        if PROMETHEUS:
            (short_dir / "prom").mkdir()
            prom = PrometheusServer(short_dir / "prom", f"127.0.0.1:{port}")
            try:
                assert proc.poll() is None, log.read_text()[-3000:]
                prom.wait_for("up", {"ailfmd-test": 1.0}, key="job")
                prom.wait_for('ailfm_mode{mode="enforce"}', {"enforce": 1.0}, key="mode")
                prom.wait_for("count(ailfm_cpu_temperature_celsius)", {"": 64.0}, key="cpu")
            finally:
                prom.stop()

        # SIGHUP with a broken config: refused, old config kept, still serving.
        good = config.read_text()
        config.write_text(good + "\n[safety]\nlimit_c = 'hot'\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", timeout_s=10)
        notify.wait_for("reload refused", timeout_s=10)
        assert proc.poll() is None
        assert ctl(sock, "status", "--json").returncode == 0
        config.write_text(good)
    finally:
        rc = stop(proc)
    try:
        assert rc == 0, log.read_text()[-3000:]
        notify.wait_for("STOPPING=1", timeout_s=5)
        assert "safety.limit_c" in log.read_text()  # the refused reload named the key
    finally:
        notify.close()


def _caps(tree: Path) -> dict[int, str]:
    base = tree / "devices/system/cpu/cpufreq"
    return {int(p.name[6:]): (p / "scaling_max_freq").read_text().strip() for p in base.glob("policy*")}


def _make_hot(tree: Path) -> None:
    """Every coretemp core input at 84 C: above stepwise's trip, inside the shield's band."""
    for inp in tree.glob("devices/platform/coretemp.*/hwmon/hwmon*/temp*_input"):
        inp.write_text("84000\n")


@pytest.mark.slow
def test_sigkill_then_restore_from_the_journal(machine_copy, short_dir: Path) -> None:
    tree = machine_copy("xeon-2s-ht")
    before = _caps(tree)
    _make_hot(tree)
    run_dir = short_dir / "run"
    config = write_config(
        short_dir,
        daemon={"mode": "enforce", "epoch_ms": 100, "run_dir": str(run_dir)},
        platform={"kind": "linux", "sysfs_root": str(tree)},
        policy={"kind": "baseline", "baseline": "stepwise", "fallback": "linux"},
        metrics={"enabled": False},
        control={"socket": str(short_dir / "c.sock")},
    )
    log = short_dir / "daemon.log"
    proc = start(config, log=log)
    try:
        deadline = time.monotonic() + 30
        while _caps(tree) == before:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the daemon never capped the hot cores"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert _caps(tree) != before
    assert (run_dir / "journal.jsonl").exists()
    # The next start restores first; --restore-only does just that and exits.
    res = subprocess.run([*DAEMON, "--config", str(config), "--restore-only"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _caps(tree) == before
    assert not (run_dir / "journal.jsonl").exists()


@pytest.mark.slow
def test_sigterm_restores_and_exits_zero(machine_copy, short_dir: Path) -> None:
    tree = machine_copy("xeon-2s-ht")
    before = _caps(tree)
    _make_hot(tree)
    config = write_config(
        short_dir,
        daemon={"mode": "enforce", "epoch_ms": 100, "run_dir": str(short_dir / "run")},
        platform={"kind": "linux", "sysfs_root": str(tree)},
        policy={"kind": "baseline", "baseline": "stepwise", "fallback": "linux"},
        metrics={"enabled": False},
        control={"socket": str(short_dir / "c.sock")},
    )
    proc = start(config)
    deadline = time.monotonic() + 30
    while _caps(tree) == before:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    assert stop(proc, signal.SIGTERM) == 0
    assert _caps(tree) == before


def test_bad_config_is_refused_with_key_and_value(short_dir: Path) -> None:
    config = short_dir / "bad.toml"
    config.write_text("[daemon]\nepoch_ms = -5\n")
    res = subprocess.run([*DAEMON, "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "daemon.epoch_ms" in res.stderr and "-5" in res.stderr and "Traceback" not in res.stderr


def test_thread_sample_every_reaches_the_platform(machine_copy, short_dir: Path) -> None:
    from ailfmd.service.config import parse_config
    from ailfmd.service.daemon import build_platform

    tree = machine_copy("xeon-2s-ht")
    cfg = parse_config(
        f'[daemon]\nrun_dir = "{short_dir / "run"}"\n[platform]\nsysfs_root = "{tree}"\nthread_sample_every = 4\n',
        "test.toml",
    )
    plat, name = build_platform(cfg)
    try:
        assert name == "linux"
        assert plat.threads.sample_every == 4  # type: ignore[attr-defined]
    finally:
        plat.close()
