"""The control socket for real: a ControlServer thread, real clients, real credentials.

Documents come from ailfmd.service.status built on hand-made TickRecords of a small
3D chip (2 layers of 2x2), so what travels over the socket is what the daemon sends.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from ailfmd.control.records import TickRecord
from ailfmd.ctl.client import ControlClient, DaemonError, DaemonNotRunning
from ailfmd.ctl.sensors_report import build_report
from ailfmd.platform.base import (
    Action,
    ApplyOutcome,
    ApplyResult,
    Capabilities,
    Capability,
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
from ailfmd.service.control import CommandError, ControlServer, ControlSocketError, Peer, read_peer_groups
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
NOBODY = 65534
NOGROUP = 65534
OTHER_GID = 1  # "daemon" on Debian: a group nobody is not in
LIMIT_C = 80.0

# --------------------------------------------------------------------------- scenario


def chip_topology() -> Topology:
    """8 CPUs as 2 layers of 2x2 tiles; cpu = layer*4 + row*2 + col."""
    cpus = {
        c: CpuTopology(cpu=c, package_id=0, core_id=c, thread_siblings=(c,), position=(c // 4, (c % 4) // 2, c % 2))
        for c in range(8)
    }
    return Topology(cpus=cpus)


def sensor(cpu: int) -> TempSensor:
    return TempSensor(kind="sim", chip="sim", sensor=f"core{cpu}", label=f"Core {cpu}", scope="core", path="")


def temp_of(cpu: int) -> float:
    return 81.5 if cpu == 7 else 50.0 + 4 * cpu  # cpu 7 above the 80 C limit


def observation(temps: Mapping[int, float] | None = None) -> Observation:
    temps = temps or {c: temp_of(c) for c in range(8)}
    cpus = {
        c: CpuState(
            cpu=c,
            temp=CpuTemp(c, temps[c], sensor(c), "simulated per-core sensor"),
            freq_khz=3_000_000,
            cap_khz=2_400_000 if c == 7 else 4_000_000,
            hw_min_khz=1_000_000,
            hw_max_khz=4_000_000,
        )
        for c in range(8)
    }
    threads = {
        4243: ThreadSample(ThreadRef(4242, 4243, 100), "llama-server", 1, frozenset({0, 1})),
        4244: ThreadSample(ThreadRef(4242, 4244, 101), "llama-server", 7, frozenset({6, 7}), {},
                           frozenset({4, 5, 6, 7})),
    }
    sensors = tuple(TempReading(sensor(c), temps[c]) for c in range(8))
    return Observation(time_s=12.5, cpus=cpus, threads=threads, sensors=sensors)


MOVE = Reason("thread 4244", "placement", "policy:onnx", "move the decode thread to the cooler layer 0",
              predicted="cpu 7 about 2 C cooler")
CAP = Reason("cpu 7", "freq_cap", "shield", "cap cpu 7 to 2400 MHz", sensor="sim/core7", value_c=81.5,
             threshold_c=78.0, predicted="cpu 7 below 78 C within 2 s")


def record(epoch: int, *, fallback: str | None = None, failed: bool = False, paused: bool = False,
           obs: Observation | None = None) -> TickRecord:
    outcomes = (
        ApplyOutcome("thread 4244", "6-7", "6-7", True),
        ApplyOutcome("policy7", "2400000", None, not failed, "EBUSY" if failed else ""),
    )
    return TickRecord(
        epoch=epoch,
        time_s=12.5 + epoch,
        wall_time_s=1_700_000_000.0 + epoch,
        mode="enforce",
        paused=paused,
        policy_name="fallback:stepwise" if fallback else "onnx",
        observation=obs or observation(),
        decision=Decision(Action(freq_cap_khz={7: 2_400_000}), reasons=(MOVE, CAP), info={"inference_ms": 0.21}),
        shield=(CAP,),
        fallback=fallback,
        applied=None if paused else ApplyResult(outcomes),
        inference_s=0.00021,
        timings_s={"observe": 0.0004, "decide": 0.0003, "shield": 0.0001, "apply": 0.0002, "total": 0.0012},
        limit_c=LIMIT_C,
        # cpu 7's sensor reports a lower maximum than the configured limit.
        cpu_limits_c={c: ((LIMIT_C - 2.0, 90.0) if c == 7 else (LIMIT_C, 95.0)) for c in range(8)},
        violations=(7,),
    )


CAPS = Capabilities({"per_core_temperature": Capability(True, "simulated")})


class FakeDaemon:
    """The daemon side of the protocol, as small as it gets: documents from status.py."""

    def __init__(self, topology: Topology | None = None) -> None:
        self.topology = topology or chip_topology()
        self.history = History(epochs=5)
        self.latest: TickRecord | None = None
        self.paused = False
        self.peers: list[Peer] = []
        for e in range(3):
            self.feed(record(e, fallback="onnx: NaN in output" if e >= 1 else None, failed=e == 2))

    def feed(self, rec: TickRecord) -> None:
        self.latest = rec
        self.history.add(rec)

    def info(self) -> DaemonInfo:
        return DaemonInfo(
            version="0.1.0", pid=os.getpid(), platform="sim:test-2x2x2", mode="enforce", paused=self.paused,
            epoch_ms=100.0, uptime_s=3725.0, limit_c=LIMIT_C, ambient_c=45.0,
            policy=PolicyInfo("onnx", "onnx", "/var/lib/ailfmd/p.onnx", "ailfm.features/1", "stepwise"),
        )

    def handle(self, cmd: str, args: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        self.peers.append(peer)
        if cmd == "status":
            return status_document(self.latest, self.topology, self.info(), self.history)
        if cmd == "explain":
            return explain_document(self.history, args.get("epochs", 10))
        if cmd == "policy":
            return policy_document(self.info(), self.latest, self.history)
        if cmd == "sensors":
            assert self.latest is not None
            return build_report(self.topology, CAPS, self.latest.observation, {"sysfs": "sim", "procfs": "sim"})
        if cmd in ("pause", "resume"):
            was = self.paused
            self.paused = cmd == "pause"
            return mode_document(self.info(), changed=was != self.paused, detail=f"{cmd}d by uid {peer.uid}")
        if cmd == "reload":
            raise CommandError("reload failed: /etc/ailfmd/ailfmd.toml: policy.path = '/nope.onnx': no such file")
        raise AssertionError(cmd)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory nobody may traverse: pytest's tmp_path sits under a 0700
    directory (unreachable once a child drops to nobody) and can exceed the 108-byte
    limit of AF_UNIX paths."""
    d = Path(tempfile.mkdtemp(prefix="ailfm-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def serve(sock_dir: Path, daemon: FakeDaemon) -> Iterator[Any]:
    """Start ControlServers on sockets in sock_dir; all stopped at teardown."""
    servers: list[ControlServer] = []

    def start(name: str = "ctl.sock", handler: Any = None, group_gid: int | None = NOGROUP, **kw: Any) -> ControlServer:
        srv = ControlServer(sock_dir / name, handler or daemon.handle, group_gid, **kw)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def server(serve: Any) -> ControlServer:
    return serve()


def raw(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def read_line(s: socket.socket) -> dict[str, Any] | None:
    """One response line, or None at EOF."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            assert buf == b"", f"partial answer {buf!r}"
            return None
        buf += chunk
    assert buf.count(b"\n") == 1, "one response at a time"
    return json.loads(buf)


def ask(s: socket.socket, req: Mapping[str, Any]) -> dict[str, Any]:
    s.sendall(json.dumps(req).encode() + b"\n")
    resp = read_line(s)
    assert resp is not None
    return resp


def assert_serving(path: Path) -> None:
    with ControlClient(path, timeout_s=5) as c:
        assert c.call("status")["schema"] == "ailfmd.status/1"


# --------------------------------------------------------------------------- documents


def test_status_document_joins_topology_records_and_history(daemon: FakeDaemon) -> None:
    doc = status_document(daemon.latest, daemon.topology, daemon.info(), daemon.history)
    json.dumps(doc, allow_nan=False)  # plain JSON, no NaN
    assert doc["daemon"]["mode"] == "enforce" and doc["daemon"]["paused"] is False
    assert doc["daemon"]["limit_c"] == 80.0 and doc["daemon"]["epoch_ms"] == 100.0
    assert doc["policy"] == {"name": "onnx", "kind": "onnx", "path": "/var/lib/ailfmd/p.onnx",
                             "feature_schema": "ailfm.features/1", "fallback": "stepwise"}
    le = doc["last_epoch"]
    assert le["epoch"] == 2 and le["duration_ms"] == 1.2 and le["inference_ms"] == 0.21
    assert le["policy"] == "fallback:stepwise" and le["fallback"] == "onnx: NaN in output"
    assert [f["target"] for f in le["apply_failures"]] == ["policy7"]
    cpu7 = doc["cpus"][7]
    assert cpu7 == {"cpu": 7, "package": 0, "core": 7, "position": [1, 1, 1], "temp_c": 81.5,
                    "source": "sim/core7", "source_scope": "core", "source_reason": "simulated per-core sensor",
                    "freq_khz": 3_000_000, "cap_khz": 2_400_000, "hw_max_khz": 4_000_000,
                    "limit_c": LIMIT_C - 2.0, "violation": True}
    assert {c["limit_c"] for c in doc["cpus"] if c["cpu"] != 7} == {LIMIT_C}
    assert [c["violation"] for c in doc["cpus"]].count(True) == 1
    hm = doc["heatmap"]
    assert hm["kind"] == "layers" and (hm["min_c"], hm["max_c"]) == (45.0, 80.0)
    assert [g["name"] for g in hm["grids"]] == ["layer 0", "layer 1"]
    # Cells sit at the CPU's (row, col) within its layer.
    for layer, g in enumerate(hm["grids"]):
        for r in range(2):
            for c in range(2):
                cpu = layer * 4 + r * 2 + c
                assert g["cells"][r][c] == {"cpu": cpu, "temp_c": temp_of(cpu)}
    assert doc["threads"][1] == {"tid": 4244, "pid": 4242, "comm": "llama-server", "cpus": [6, 7],
                                 "cpu_list": "6-7", "cpuset": "4-7", "last_cpu": 7}
    assert doc["threads"][0]["cpuset"] is None  # no cpuset known: unrestricted
    assert doc["shield"]["total"] == 3
    assert doc["shield"]["recent"][0]["epoch"] == 2 and doc["shield"]["recent"][0]["threshold_c"] == 78.0
    # Two fallback epochs in a row make one episode.
    assert doc["fallbacks"]["total_epochs"] == 2
    assert [(e["first_epoch"], e["last_epoch"], e["epochs"]) for e in doc["fallbacks"]["recent"]] == [(1, 2, 2)]
    assert doc["violations"] == {"cpus": [7], "total_epochs": 3}


def test_status_before_first_epoch_and_with_broken_readings(daemon: FakeDaemon) -> None:
    doc = status_document(None, daemon.topology, daemon.info(), History())
    assert doc["last_epoch"] is None and doc["threads"] == []
    assert all(c["temp_c"] is None and c["source"] is None for c in doc["cpus"])
    # A NaN from a sensor must become null, not an invalid JSON token.
    temps = {c: temp_of(c) for c in range(8)}
    temps[3] = math.nan
    doc = status_document(record(9, obs=observation(temps)), daemon.topology, daemon.info())
    assert doc["cpus"][3]["temp_c"] is None and doc["heatmap"]["grids"][0]["cells"][1][1]["temp_c"] is None
    json.dumps(doc, allow_nan=False)


def test_heatmap_of_a_real_machine_is_per_package_in_rows_of_eight() -> None:
    cpus = {c: CpuTopology(cpu=c, package_id=c // 12, core_id=c % 12) for c in range(24)}
    info = FakeDaemon().info()
    doc = status_document(None, Topology(cpus=cpus), info)
    hm = doc["heatmap"]
    assert hm["kind"] == "packages"
    assert [(g["name"], g["cpus"]) for g in hm["grids"]] == [("package 0", "0-11"), ("package 1", "12-23")]
    cells = hm["grids"][1]["cells"]
    assert [[c and c["cpu"] for c in row] for row in cells] == [
        [12, 13, 14, 15, 16, 17, 18, 19],
        [20, 21, 22, 23, None, None, None, None],
    ]


def test_history_is_bounded_and_explain_lists_every_action_with_its_reason() -> None:
    h = History(epochs=3, events=4)
    for e in range(6):
        h.add(record(e, paused=e == 5))
    doc = explain_document(h, epochs=10)
    assert [e["epoch"] for e in doc["epochs"]] == [5, 4, 3]  # newest first, only what is kept
    assert doc["epochs_kept"] == 3
    newest = doc["epochs"][0]
    assert newest["paused"] is True and newest["applied"] is False
    # The shield's cap is in both the decision and record.shield: listed once, flagged.
    assert [(a["target"], a["source"], a["shield"]) for a in newest["actions"]] == [
        ("thread 4244", "policy:onnx", False),
        ("cpu 7", "shield", True),
    ]
    cap = newest["actions"][1]
    assert (cap["sensor"], cap["value_c"], cap["threshold_c"]) == ("sim/core7", 81.5, 78.0)
    assert cap["predicted"] == "cpu 7 below 78 C within 2 s" and cap["kind"] == "freq_cap"
    assert [e["epoch"] for e in explain_document(h, epochs=2)["epochs"]] == [5, 4]
    assert len(h.shield_events(100)) == 4  # event ring bounded too
    assert h.totals()["shield_interventions"] == 6  # totals are not
    # Shield reasons missing from the decision are still shown.
    only_shield = TickRecord(**{**record(7).__dict__, "decision": Decision(Action(), reasons=(MOVE,))})
    h.add(only_shield)
    assert [a["target"] for a in explain_document(h, 1)["epochs"][0]["actions"]] == ["thread 4244", "cpu 7"]


def test_fallback_episodes_split_on_new_reason_or_gap() -> None:
    h = History()
    for e, why in [(0, "timeout"), (1, "timeout"), (2, "NaN"), (4, "NaN")]:
        h.add(record(e, fallback=why))
    assert [(x.reason, x.first_epoch, x.last_epoch) for x in h.fallback_episodes(10)] == [
        ("NaN", 4, 4), ("NaN", 2, 2), ("timeout", 0, 1)
    ]


def test_policy_and_mode_documents(daemon: FakeDaemon) -> None:
    doc = policy_document(daemon.info(), daemon.latest, daemon.history)
    assert doc["configured"]["name"] == "onnx" and doc["active"] == "fallback:stepwise"
    assert doc["fallback_reason"] == "onnx: NaN in output" and doc["info"] == {"inference_ms": 0.21}
    m = mode_document(daemon.info(), changed=False, detail="x")
    assert m["schema"] == "ailfmd.mode/1" and m["paused"] is False and m["changed"] is False


# --------------------------------------------------------------------------- server basics


def test_socket_file_is_0660_and_owned_by_the_group(server: ControlServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, NOGROUP)


def test_root_runs_every_command_on_one_connection(server: ControlServer, daemon: FakeDaemon) -> None:
    with ControlClient(server.path) as c:
        assert c.call("status")["cpus"][7]["temp_c"] == 81.5
        ex = c.call("explain", {"epochs": 2})
        assert [e["epoch"] for e in ex["epochs"]] == [2, 1]
        assert c.call("policy")["active"] == "fallback:stepwise"
        assert c.call("sensors")["schema"] == "ailfmd.sensors/1"
        assert c.call("pause")["paused"] is True and daemon.paused
        assert c.call("pause")["changed"] is False
        assert c.call("resume")["paused"] is False and not daemon.paused
        with pytest.raises(DaemonError, match="no such file") as ei:
            c.call("reload")
        assert ei.value.code == "failed"
        assert c.call("status")["daemon"]["paused"] is False  # still usable after an error
    assert {(p.uid, p.pid) for p in daemon.peers} == {(0, os.getpid())}


def test_response_carries_the_protocol_version(server: ControlServer) -> None:
    with raw(server.path) as s:
        resp = ask(s, {"cmd": "status", "version": 1})
    assert resp["version"] == 1 and resp["ok"] is True and resp["result"]["schema"] == "ailfmd.status/1"


# --------------------------------------------------------------------------- garbage


GARBAGE = [
    (b"\x00\xff\xfe\x80junk", "bad_request", "not UTF-8"),
    (b'{"cmd": "stat', "bad_request", "malformed JSON"),
    (b"[1, 2]", "bad_request", "request: expected a JSON object, got array"),
    (b'{"cmd": 5}', "bad_request", "cmd: expected string, got integer"),
    (b'{"args": {}}', "bad_request", "cmd: missing"),
    (b'{"cmd": "selfdestruct"}', "unknown_command", "cmd: unknown command 'selfdestruct'"),
    (b'{"cmd": "explain", "args": [3]}', "bad_request", "args: expected object, got array"),
    (b'{"cmd": "explain", "args": {"epochs": "ten"}}', "bad_request", "args.epochs: expected integer, got string"),
    (b'{"cmd": "explain", "args": {"epochs": true}}', "bad_request", "args.epochs: expected integer, got boolean"),
    (b'{"cmd": "explain", "args": {"epochs": 0}}', "bad_request", "args.epochs: must be >= 1"),
    (b'{"cmd": "status", "args": {"verbose": 1}}', "bad_request", "args.verbose: unknown argument for status"),
    (b'{"cmd": "status", "version": 2}', "unsupported_version", "protocol 2 is not supported"),
    (b'{"cmd": "status", "version": "1"}', "bad_request", "version: expected integer"),
    (b'{"cmd": "status", "sudo": true}', "bad_request", "sudo: unknown request field"),
    (b"[" * 50_000, "bad_request", "nested too deeply"),
    (b'{"cmd": "status", "n": ' + b"9" * 5000 + b"}", "bad_request", "malformed JSON"),
]


@pytest.mark.parametrize("junk,code,message", GARBAGE, ids=[g[2][:30] for g in GARBAGE])
def test_garbage_is_answered_and_the_connection_stays_usable(
    server: ControlServer, junk: bytes, code: str, message: str
) -> None:
    with raw(server.path) as s:
        s.sendall(junk + b"\n")
        resp = read_line(s)
        assert resp is not None and resp["ok"] is False and resp["code"] == code
        assert message in resp["error"]
        assert "Traceback" not in resp["error"]
        assert ask(s, {"cmd": "status"})["ok"] is True
    assert_serving(server.path)


def test_a_line_over_the_limit_is_refused_and_the_connection_closed(server: ControlServer) -> None:
    with raw(server.path) as s:
        s.sendall(b'{"cmd": "status", "pad": "' + b"x" * (70 * 1024))
        resp = read_line(s)
        assert resp is not None and resp["code"] == "too_large" and "65536" in resp["error"]
        assert read_line(s) is None  # framing is lost, so the server hung up
    assert_serving(server.path)


def test_a_request_cut_off_by_eof_is_answered(server: ControlServer) -> None:
    with raw(server.path) as s:
        s.sendall(b'{"cmd": "sta')
        s.shutdown(socket.SHUT_WR)
        resp = read_line(s)
        assert resp is not None and "incomplete request" in resp["error"]
        assert read_line(s) is None
    assert_serving(server.path)


def test_requests_sent_together_are_answered_in_order_even_after_half_close(server: ControlServer) -> None:
    with raw(server.path) as s:
        s.sendall(b'{"cmd": "policy"}\n{"cmd": "explain", "args": {"epochs": 1}}\n')
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    lines = [json.loads(x) for x in buf.splitlines()]
    assert [r["result"]["schema"] for r in lines] == ["ailfmd.policy/1", "ailfmd.explain/1"]


def test_silent_and_trickling_clients_block_nobody_and_time_out(serve: Any) -> None:
    srv = serve(read_timeout_s=0.5)
    silent = raw(srv.path)
    trickle = raw(srv.path)
    hog = raw(srv.path)
    # A client that floods requests and never reads its answers.
    hog.sendall(b'{"cmd": "status"}\n' * 2000)
    t0 = time.monotonic()
    assert_serving(srv.path)  # answered at once although three connections misbehave
    closed_at = None
    while time.monotonic() - t0 < 8:
        try:
            trickle.send(b" ")
        except OSError:
            closed_at = time.monotonic()
            break
        time.sleep(0.05)
    # Bytes that never make a full line do not keep a connection alive.
    assert closed_at is not None, "a trickling client was never timed out"
    resp = read_line(silent)
    assert resp is not None and resp["code"] == "timeout" and "0.5 s" in resp["error"]
    assert read_line(silent) is None
    for s in (silent, trickle, hog):
        s.close()
    assert_serving(srv.path)


def test_too_many_connections_get_busy_not_a_hang(serve: Any) -> None:
    srv = serve(max_connections=2)
    held = [raw(srv.path), raw(srv.path)]
    with raw(srv.path) as s:
        resp = read_line(s)
        assert resp is not None and resp["code"] == "busy"
    held[0].close()
    time.sleep(0.1)
    assert ask(held[1], {"cmd": "status"})["ok"] is True
    held[1].close()


def test_a_crashing_handler_gives_an_internal_error_and_the_server_lives(serve: Any, daemon: FakeDaemon) -> None:
    def handler(cmd: str, args: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        if cmd == "policy":
            raise ZeroDivisionError("division by zero")
        if cmd == "explain":
            return {"bad": math.inf}  # type: ignore[dict-item]
        if cmd == "sensors":
            return ["not", "a", "dict"]  # type: ignore[return-value]
        return daemon.handle(cmd, args, peer)

    srv = serve(handler=handler)
    with ControlClient(srv.path) as c:
        with pytest.raises(DaemonError, match="internal error in policy: ZeroDivisionError") as ei:
            c.call("policy")
        assert ei.value.code == "internal"
        with pytest.raises(DaemonError, match="not JSON"):
            c.call("explain")
        with pytest.raises(DaemonError, match="handler returned list"):
            c.call("sensors")
        assert c.call("status")["schema"] == "ailfmd.status/1"


# --------------------------------------------------------------------------- socket file life


def test_stale_socket_is_replaced_but_other_files_and_live_daemons_are_not(sock_dir: Path, serve: Any) -> None:
    stale = sock_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: what SIGKILL leaves behind
    with pytest.raises(DaemonNotRunning, match="nothing listening"):
        ControlClient(stale).connect()
    assert_serving(serve("stale.sock").path)

    precious = sock_dir / "precious"
    precious.write_text("operator data\n")
    with pytest.raises(ControlSocketError, match="not a socket"):
        ControlServer(precious, lambda c, a, p: {}, None).start()
    assert precious.read_text() == "operator data\n"

    with pytest.raises(ControlSocketError, match="another daemon is listening"):
        ControlServer(sock_dir / "stale.sock", lambda c, a, p: {}, None).start()
    assert_serving(sock_dir / "stale.sock")  # the live one is untouched


def test_stop_removes_the_socket_and_clients_see_no_daemon(sock_dir: Path, daemon: FakeDaemon) -> None:
    srv = ControlServer(sock_dir / "x.sock", daemon.handle, None)
    srv.start()
    assert_serving(srv.path)
    srv.stop()
    assert not srv.path.exists()
    with pytest.raises(DaemonNotRunning, match=f"no socket at {srv.path}"):
        ControlClient(srv.path).connect()
    # stop() removes only the socket it bound, not whatever took the path since.
    srv.start()
    srv.path.unlink()
    srv.path.write_text("someone else's\n")
    srv.stop()
    assert srv.path.read_text() == "someone else's\n"


# --------------------------------------------------------------------------- peer credentials

# The child imports everything first, then drops to the given identity (the venv's
# interpreter lives under /root, unreadable once the child is nobody), then runs
# ailfmctl: SO_PEERCRED then reports the dropped identity, as for a real user.
AS_USER = textwrap.dedent(
    """
    import locale, os, sys
    import ailfmd.ctl.cli as cli
    cli.build_parser()  # warms argparse/gettext imports
    uid, gid = int(sys.argv[1]), int(sys.argv[2])
    groups = [int(g) for g in sys.argv[3].split(",") if g]
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    print("pid", os.getpid(), file=sys.stderr)
    sys.exit(cli.main(sys.argv[4:]))
    """
)


def ailfmctl_as(uid: int, gid: int, groups: list[int], *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", AS_USER, str(uid), str(gid), ",".join(map(str, groups)), *argv],
        capture_output=True, text=True, timeout=60, env=env, cwd="/",
    )


def child_pid(p: subprocess.CompletedProcess[str]) -> int:
    return int(p.stderr.split("pid ", 1)[1].split()[0])


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to nobody needs root")


@needs_root
def test_nobody_outside_the_group_is_refused_even_status(serve: Any, daemon: FakeDaemon) -> None:
    srv = serve(group_gid=OTHER_GID)
    p = ailfmctl_as(NOBODY, NOGROUP, [], "status", "--socket", str(srv.path))
    # The file mode already stops it at connect().
    assert p.returncode == 4, p.stderr
    assert "permission denied" in p.stderr and str(srv.path) in p.stderr and "Traceback" not in p.stderr
    # Even with a careless mode on the file, the credential check refuses it.
    os.chmod(srv.path, 0o666)
    p = ailfmctl_as(NOBODY, NOGROUP, [], "status", "--json", "--socket", str(srv.path))
    assert p.returncode == 4, p.stderr
    assert "permission denied: uid 65534 gid 65534" in p.stderr and "neither root nor in the control group" in p.stderr
    assert p.stdout == ""
    assert daemon.peers == []  # the handler never saw the request


@needs_root
def test_a_group_member_may_read_but_not_change(server: ControlServer, daemon: FakeDaemon) -> None:
    p = ailfmctl_as(NOBODY, NOGROUP, [], "status", "--json", "--socket", str(server.path))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["schema"] == "ailfmd.status/1"
    assert (daemon.peers[-1].uid, daemon.peers[-1].gid, daemon.peers[-1].pid) == (NOBODY, NOGROUP, child_pid(p))

    p = ailfmctl_as(NOBODY, NOGROUP, [], "pause", "--socket", str(server.path))
    assert p.returncode == 4
    assert "permission denied: pause requires root" in p.stderr and "Traceback" not in p.stderr
    assert daemon.paused is False


@needs_root
def test_membership_through_a_supplementary_group_counts(server: ControlServer, daemon: FakeDaemon) -> None:
    # Primary gid elsewhere; the control group only among the supplementary groups,
    # which the server reads from /proc/<pid>/status.
    p = ailfmctl_as(NOBODY, OTHER_GID, [NOGROUP], "explain", "--json", "-n", "1", "--socket", str(server.path))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["epochs"][0]["epoch"] == 2
    assert daemon.peers[-1].gid == OTHER_GID and NOGROUP in daemon.peers[-1].groups


@needs_root
def test_root_may_pause(server: ControlServer, daemon: FakeDaemon) -> None:
    p = ailfmctl_as(0, 0, [], "pause", "--json", "--socket", str(server.path))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["paused"] is True and daemon.paused is True


def test_peer_groups_come_from_proc_only_when_the_ids_still_match(tmp_path: Path) -> None:
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "status").write_text(
        "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t4 24 27 \n"
    )
    assert read_peer_groups(tmp_path, 77, 1000, 100) == {4, 24, 27}
    # A reused pid (or a process that changed identity) grants nothing extra.
    assert read_peer_groups(tmp_path, 77, 1001, 100) == frozenset()
    assert read_peer_groups(tmp_path, 78, 1000, 100) == frozenset()


def test_the_server_keeps_serving_while_a_client_thread_hammers_it(server: ControlServer) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                with ControlClient(server.path) as c:
                    c.call("status")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

