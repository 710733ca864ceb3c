"""systemd/ailfmd.service: clean under `systemd-analyze verify`, exposure <= 3.0 under
`systemd-analyze security --offline=yes`, and the sandbox still lets the daemon work."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "ailfmd.service"
EXEC_START = "/usr/bin/ailfmd"
MAX_EXPOSURE = 3.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60)


def _unit_dir(tmp_path: Path, unit_text: str, *, stub: bool = True) -> Path:
    """A copy of the unit, byte for byte, plus (optionally) a drop-in that points only
    ExecStart at an executable stub: verify insists the binary exists, and the package
    is not installed on the test machine."""
    d = tmp_path / "units"
    d.mkdir()
    unit = d / "ailfmd.service"
    unit.write_text(unit_text)
    if stub:
        exe = tmp_path / "ailfmd-stub"
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
        dropin = d / "ailfmd.service.d"
        dropin.mkdir()
        (dropin / "stub.conf").write_text(
            f"[Service]\nExecStart=\nExecStart={exe} --config /etc/ailfmd/ailfmd.toml\n"
        )
    return unit


def _verify(unit: Path) -> tuple[int, list[str]]:
    # --man=no: the test machine may lack man pages; --recursive-errors=no: problems in
    # the host's own units are not ours.
    r = _run("verify", "--man=no", "--recursive-errors=no", str(unit))
    return r.returncode, [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]


@needs_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    rc, lines = _verify(_unit_dir(tmp_path, UNIT.read_text()))
    # verify only warns (exit 0) about unknown keys and bad values, so any output counts.
    assert rc == 0 and lines == [], "\n".join(lines)


@needs_analyze
def test_verify_without_the_stub_only_misses_the_binary(tmp_path: Path) -> None:
    rc, lines = _verify(_unit_dir(tmp_path, UNIT.read_text(), stub=False))
    if Path(EXEC_START).exists():
        assert rc == 0 and lines == [], "\n".join(lines)
    else:
        assert lines and all(EXEC_START in line for line in lines), "\n".join(lines)


@needs_analyze
def test_verify_catches_a_bad_setting(tmp_path: Path) -> None:
    # The check above is only worth something if a mistake shows up in it.
    broken = UNIT.read_text().replace("ProtectClock=yes", "ProtectClock=yess")
    assert broken != UNIT.read_text()
    rc, lines = _verify(_unit_dir(tmp_path, broken))
    assert any("yess" in line for line in lines), "\n".join(lines)


def _exposure(unit: Path, *extra: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    r = _run("security", "--offline=yes", "--no-pager", *extra, str(unit))
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    return float(m.group(1)), r


@needs_analyze
def test_security_exposure_at_most_3(tmp_path: Path) -> None:
    score, r = _exposure(UNIT)
    assert score <= MAX_EXPOSURE, r.stdout
    # systemd-analyze's own gate agrees (its threshold is on the 0-100 scale).
    _, r = _exposure(UNIT, f"--threshold={int(MAX_EXPOSURE * 10)}")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_analyze
def test_security_score_reacts_to_the_unit(tmp_path: Path) -> None:
    # Parsing the right number: dropping the sandbox must raise it.
    text = "\n".join(
        line for line in UNIT.read_text().splitlines()
        if not line.startswith(("Protect", "Private", "SystemCall", "Restrict", "CapabilityBoundingSet"))
    )
    unsandboxed = _unit_dir(tmp_path, text + "\n", stub=False)
    score, _ = _exposure(unsandboxed)
    ours, _ = _exposure(UNIT)
    assert score > ours + 2.0


# --------------------------------------------------------------------------- what the daemon needs


def _service() -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp["Service"]


def _all_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(key + "=")]


def test_notify_watchdog_reload_and_restart() -> None:
    s = _service()
    assert s["Type"] == "notify"
    assert s["ExecStart"] == f"{EXEC_START} --config /etc/ailfmd/ailfmd.toml"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["WatchdogSec"]
    assert s["Restart"] == "on-failure"


def test_restore_journal_survives_a_crash() -> None:
    s = _service()
    assert s["RuntimeDirectory"] == "ailfmd"
    assert s["RuntimeDirectoryMode"] == "0750"
    assert s["RuntimeDirectoryPreserve"] == "yes"


def test_capabilities_are_exactly_what_the_daemon_uses() -> None:
    s = _service()
    needed = {"CAP_DAC_OVERRIDE", "CAP_SYS_NICE", "CAP_PERFMON"}
    assert set(s["CapabilityBoundingSet"].split()) == needed
    assert set(s["AmbientCapabilities"].split()) == needed


def test_syscall_filter_keeps_affinity_and_perf() -> None:
    filters = " ".join(_all_values("SystemCallFilter"))
    # ~@resources would block sched_setaffinity, the daemon's main actuator.
    assert "@resources" not in filters
    assert "@system-service" in filters
    assert "perf_event_open" in filters or "@debug" in filters
    assert "sched_setaffinity" not in re.findall(r"~\S+", filters)


def test_cpufreq_is_the_only_writable_sysfs() -> None:
    s = _service()
    assert s["ProtectKernelTunables"] == "yes"
    assert s["ProtectSystem"] == "strict"
    assert _all_values("ReadWritePaths") == ["-/sys/devices/system/cpu/cpufreq"]


# --------------------------------------------------------------------------- MemoryDenyWriteExecute

_MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77)
    import mmap
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("W+X mapping was allowed: the probe proves nothing")
    except PermissionError:
        pass
    import numpy as np
    import onnxruntime as ort
    sess = ort.InferenceSession(bytes.fromhex(sys.argv[1]), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.array([-1.0, 2.0, -3.0, 4.0], np.float32)})
    assert y.tolist() == [0.0, 2.0, 0.0, 4.0], y
    a = np.arange(65536, dtype=np.float64).reshape(256, 256)
    assert float((a @ a.T).trace()) > 0
    import pyudev
    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by("cpu")
    import prometheus_client
    from ailfmd.platform.linux import perf
    perf.perf_syscall_number()
    print("ok")
    """
)


def _relu_model() -> bytes:
    """A one-node ONNX model (Relu over 4 floats), protobuf-encoded by hand so the test
    needs no onnx package."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def ld(field: int, payload: bytes) -> bytes:  # length-delimited field
        return varint(field << 3 | 2) + varint(len(payload)) + payload

    def vi(field: int, value: int) -> bytes:  # varint field
        return varint(field << 3) + varint(value)

    def value_info(name: str) -> bytes:
        tensor_type = vi(1, 1) + ld(2, ld(1, vi(1, 4)))  # FLOAT, shape [4]
        return ld(1, name.encode()) + ld(2, ld(1, tensor_type))

    node = ld(1, b"x") + ld(2, b"y") + ld(4, b"Relu")
    graph = ld(1, node) + ld(2, b"g") + ld(11, value_info("x")) + ld(12, value_info("y"))
    return vi(1, 7) + ld(7, graph) + ld(8, ld(1, b"") + vi(2, 13))  # ir 7, opset 13


def test_runtime_works_without_writable_executable_memory() -> None:
    """The unit sets MemoryDenyWriteExecute=yes; the libraries the daemon loads must not
    need W+X memory. PR_SET_MDWE (Linux >= 6.3) enforces the same rule on one process."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("pyudev")
    assert "MemoryDenyWriteExecute=yes" in UNIT.read_text()
    r = subprocess.run(
        [sys.executable, "-c", _MDWE_PROBE, _relu_model().hex()],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    if r.returncode == 77:
        pytest.skip("kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr



SYSUSERS = shutil.which("systemd-sysusers")


@pytest.mark.skipif(SYSUSERS is None, reason="systemd-sysusers not installed")
def test_sysusers_creates_the_account_the_unit_runs_as(tmp_path: Path) -> None:
    """The unit's User=/Group= must exist on a fresh system: sysusers.d creates them."""
    conf = ROOT / "packaging" / "sysusers.d" / "ailfmd.conf"
    (tmp_path / "etc").mkdir()
    res = subprocess.run([SYSUSERS, f"--root={tmp_path}", str(conf)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    unit = UNIT.read_text()
    user = next(line.split("=", 1)[1].strip() for line in unit.splitlines() if line.startswith("User="))
    grp = next(line.split("=", 1)[1].strip() for line in unit.splitlines() if line.startswith("Group="))
    assert any(line.startswith(f"{user}:") and line.endswith("/usr/sbin/nologin") for line in passwd.splitlines())
    assert any(line.startswith(f"{grp}:") for line in group.splitlines())
