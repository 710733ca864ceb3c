"""sd_notify through a real NOTIFY_SOCKET listener, with systemd-python and without."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ailfmd.service.notify import BACKEND_PLAIN, BACKEND_SYSTEMD, Notifier

try:
    import systemd.daemon  # noqa: F401

    HAVE_SYSTEMD_PYTHON = True
except ImportError:
    HAVE_SYSTEMD_PYTHON = False

SUN_PATH_MAX = 107


class Listener:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)

    def receive(self, timeout_s: float = 5.0) -> bytes:
        self.sock.settimeout(timeout_s)
        return self.sock.recv(65536)

    def assert_nothing(self) -> None:
        self.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            self.sock.recv(65536)

    def close(self) -> None:
        self.sock.close()


def _path_listener(tmp_path: Path) -> tuple[Listener, str | None]:
    path = tmp_path / "notify.sock"
    if len(str(path)) <= SUN_PATH_MAX:
        return Listener(str(path)), None
    # pytest's tmp_path can exceed sun_path for long test names.
    short = tempfile.mkdtemp(prefix="ailfmd-notify-")
    return Listener(os.path.join(short, "n.sock")), short


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    cleanup = None
    if request.param == "path":
        lst, cleanup = _path_listener(tmp_path)
    else:
        lst = Listener(f"@ailfmd-test-{uuid.uuid4().hex}")
    yield lst
    lst.close()
    if cleanup:
        os.unlink(lst.address)
        os.rmdir(cleanup)


BACKENDS = [
    pytest.param(True, id="plain"),
    pytest.param(
        False,
        id="systemd-python",
        marks=pytest.mark.skipif(not HAVE_SYSTEMD_PYTHON, reason="systemd-python not installed"),
    ),
]


def _notifier(listener: Listener, plain: bool, monkeypatch: pytest.MonkeyPatch) -> Notifier:
    # libsystemd reads NOTIFY_SOCKET from the process environment; keep both in step.
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    n = Notifier(dict(os.environ), plain=plain)
    assert n.backend == (BACKEND_PLAIN if plain else BACKEND_SYSTEMD)
    assert n.enabled
    return n


@pytest.mark.parametrize("plain", BACKENDS)
def test_messages_arrive_exactly(listener: Listener, plain: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    n = _notifier(listener, plain, monkeypatch)

    assert n.ready()
    assert listener.receive() == b"READY=1"
    assert n.ready(status="protecting 64 CPUs, 12 threads")
    assert listener.receive() == b"READY=1\nSTATUS=protecting 64 CPUs, 12 threads"
    assert n.status("epoch 17: max 71.5 °C")
    assert listener.receive() == "STATUS=epoch 17: max 71.5 °C".encode()
    assert n.watchdog()
    assert listener.receive() == b"WATCHDOG=1"
    assert n.stopping("restoring 8 values")
    assert listener.receive() == b"STOPPING=1\nSTATUS=restoring 8 values"


@pytest.mark.parametrize("plain", BACKENDS)
def test_reloading_carries_monotonic_timestamp(
    listener: Listener, plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = _notifier(listener, plain, monkeypatch)
    before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading("reloading config")
    after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = listener.receive().decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[2] == "STATUS=reloading config"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before_us <= int(value) <= after_us


@pytest.mark.parametrize("plain", BACKENDS)
def test_newline_in_status_cannot_forge_an_assignment(
    listener: Listener, plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = _notifier(listener, plain, monkeypatch)
    assert n.status("evil\nREADY=1")
    assert listener.receive() == b"STATUS=evil READY=1"


def test_env_mapping_decides_the_socket(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    # The process environment points elsewhere; libsystemd would follow it, so the
    # notifier must use the plain protocol to honour the mapping it was given.
    monkeypatch.setenv("NOTIFY_SOCKET", "@ailfmd-test-somewhere-else")
    n = Notifier({"NOTIFY_SOCKET": listener.address})
    assert n.backend == BACKEND_PLAIN
    assert n.watchdog()
    assert listener.receive() == b"WATCHDOG=1"


@pytest.mark.parametrize("plain", [True, False])
def test_no_socket_is_a_no_op(listener: Listener, plain: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier({}, plain=plain)
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()
    listener.assert_nothing()


@pytest.mark.parametrize("plain", BACKENDS)
def test_send_failure_is_reported_not_raised(
    tmp_path: Path, plain: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gone = f"/nonexistent-{uuid.uuid4().hex}/notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", gone)
    n = Notifier(dict(os.environ), plain=plain)
    assert n.ready() is False
    assert gone in caplog.text


def test_unsupported_address_is_not_guessed(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}, plain=True)
    assert n.ready() is False
    assert "vsock:2:1234" in caplog.text


# --------------------------------------------------------------------------- watchdog


def test_watchdog_interval_is_half_the_timeout() -> None:
    n = Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_timeout_s() == 30.0
    assert n.watchdog_interval_s() == 15.0
    # Without WATCHDOG_PID the variables are taken to be ours.
    n = Notifier({"WATCHDOG_USEC": "500000"})
    assert n.watchdog_timeout_s() == 0.5
    assert n.watchdog_interval_s() == 0.25


def test_watchdog_for_another_process_is_off() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        n = Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(child.pid)})
        assert child.pid != os.getpid()
        assert n.watchdog_timeout_s() is None
        assert n.watchdog_interval_s() is None
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "30s"},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"},
    ],
)
def test_watchdog_off_for_missing_or_bad_values(env: dict[str, str]) -> None:
    n = Notifier(env)
    assert n.watchdog_timeout_s() is None
    assert n.watchdog_interval_s() is None
