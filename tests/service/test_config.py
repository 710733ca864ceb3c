"""Daemon configuration: every key parses, the shipped example is the defaults, and every
kind of bad input is a ConfigError naming the file, the key and the value."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ailfmd.errors import ConfigError
from ailfmd.platform.linux.targets import TargetSelector
from ailfmd.service.config import (
    DaemonConfig,
    DaemonSettings,
    TelemetrySettings,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "packaging" / "ailfmd.toml"
DOCS = ROOT / "docs" / "configuration.md"
SRC = "/etc/ailfmd/test.toml"


def schema_keys(cls: type = DaemonConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every setting, from the records themselves."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.extend(schema_keys(type(default), f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


ALL_KEYS = schema_keys()

# Every key set to a valid value that differs from its default.
EVERYTHING = """
[daemon]
mode = "enforce"
epoch_ms = 250
run_dir = "/run/ailfmd-test"
log_level = "debug"

[platform]
kind = "sim"
sysfs_root = "/tmp/fixture/sys"
procfs_root = "/tmp/fixture/proc"
cgroupfs_root = "/tmp/fixture/cgroup"
thread_sample_every = 5

[platform.sim]
chip = "tiny"
workload = "/srv/workloads/chat.toml"
seed = 42
speed = 20

[targets]
pids = [1234, 5678]
comm_patterns = ["^llama-server$", "vllm"]
cgroup_paths = ["system.slice/inference.service"]
systemd_units = ["llama.service", "system.slice/vllm.service"]

[policy]
kind = "baseline"
path = "/opt/policies/p.onnx"
baseline = "tsp"
fallback = "linux"
timeout_ms = 120

[safety]
limit_c = 80
margin_c = 5.5
critical_c = 100.0
min_freq_khz = 1200000
landing_caps = false

[metrics]
enabled = false
listen_address = "::1"
port = 9999

[control]
socket = "/run/ailfmd-test/ctl.sock"
group = "inference-ops"

[telemetry]
path = "/var/lib/ailfmd-test/t.rec"
every_epochs = 5
max_mib = 64
"""


def test_every_key_parses() -> None:
    c = parse_config(EVERYTHING, SRC)
    assert c.source == SRC
    assert c.daemon == DaemonSettings("enforce", 250, Path("/run/ailfmd-test"), "debug")
    assert c.daemon.epoch_s == 0.25
    p = c.platform
    assert (p.kind, p.sysfs_root, p.procfs_root, p.cgroupfs_root) == (
        "sim", Path("/tmp/fixture/sys"), Path("/tmp/fixture/proc"), Path("/tmp/fixture/cgroup"),
    )
    assert p.thread_sample_every == 5
    assert (p.sim.chip, p.sim.workload, p.sim.seed, p.sim.speed) == ("tiny", "/srv/workloads/chat.toml", 42, 20.0)
    assert isinstance(p.sim.speed, float)
    assert c.targets == TargetSelector(
        pids=(1234, 5678),
        comm_patterns=("^llama-server$", "vllm"),
        cgroup_paths=("system.slice/inference.service",),
        systemd_units=("llama.service", "system.slice/vllm.service"),
    )
    po = c.policy
    assert (po.kind, po.path, po.baseline, po.fallback, po.timeout_ms) == (
        "baseline", Path("/opt/policies/p.onnx"), "tsp", "linux", 120,
    )
    assert po.timeout_s == 0.12
    s = c.safety
    assert (s.limit_c, s.margin_c, s.critical_c, s.min_freq_khz) == (80.0, 5.5, 100.0, 1200000)
    assert s.landing_caps is False
    assert isinstance(s.limit_c, float)
    assert s.act_at_c == 74.5
    assert (c.metrics.enabled, c.metrics.listen_address, c.metrics.port) == (False, "::1", 9999)
    assert (c.control.socket, c.control.group) == (Path("/run/ailfmd-test/ctl.sock"), "inference-ops")
    assert c.telemetry == TelemetrySettings(Path("/var/lib/ailfmd-test/t.rec"), 5, 64)
    # Every field differs from its default, so nothing above was silently defaulted.
    defaults = DaemonConfig()
    for key in ALL_KEYS:
        assert _get(c, key) != _get(defaults, key), key


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_defaults() -> None:
    c = parse_config("", SRC)
    assert c == DaemonConfig()
    assert c.daemon.mode == "observe"  # first installs touch nothing
    assert c.daemon.epoch_ms == 100
    assert c.platform.kind == "linux"
    assert c.platform.thread_sample_every == 3
    assert c.targets.is_empty
    assert (c.safety.limit_c, c.safety.margin_c, c.safety.critical_c) == (85.0, 3.0, 95.0)
    assert c.safety.min_freq_khz is None
    assert (c.metrics.listen_address, c.metrics.port) == ("127.0.0.1", 9747)
    assert c.control.socket == Path("/run/ailfmd/control.sock")


def test_control_socket_follows_run_dir() -> None:
    c = parse_config('[daemon]\nrun_dir = "/run/other"\n', SRC)
    assert c.control.socket == Path("/run/other/control.sock")


def test_example_file_is_the_defaults() -> None:
    c = load_config(EXAMPLE)
    assert c == DaemonConfig()
    assert c.source == str(EXAMPLE)


def test_example_file_and_docs_cover_every_key() -> None:
    example = EXAMPLE.read_text()
    docs = DOCS.read_text()
    for key in ALL_KEYS:
        section, _, name = key.rpartition(".")
        # Set, or shown commented out ("# min_freq_khz = ...").
        assert re.search(rf"^(# )?{name} = ", example, re.M), f"{key} missing from {EXAMPLE.name}"
        assert f"`{name}`" in docs and f"[{section}]" in docs, f"{key} missing from {DOCS.name}"


def test_example_values_uncommented_parse_too() -> None:
    # The commented examples must be valid when an operator uncomments them.
    text = re.sub(r"^# ((?:min_freq_khz|socket|comm_patterns|systemd_units) = .*)$", r"\1",
                  EXAMPLE.read_text(), flags=re.M)
    text = re.sub(r"^(comm_patterns|systemd_units) = \[\]\n", "", text, flags=re.M)
    c = parse_config(text, str(EXAMPLE))
    assert c.safety.min_freq_khz == 1200000
    assert c.control.socket == Path("/run/ailfmd/control.sock")
    assert c.targets.systemd_units == ("llama.service",)


# --------------------------------------------------------------------------- files


def test_missing_default_file_means_defaults(tmp_path: Path) -> None:
    c = load_config(None, default_path=tmp_path / "absent.toml")
    assert c == DaemonConfig()
    assert "absent.toml" in c.source


def test_default_file_is_read_when_present(tmp_path: Path) -> None:
    f = tmp_path / "ailfmd.toml"
    f.write_text('[daemon]\nmode = "enforce"\n')
    assert load_config(None, default_path=f).daemon.mode == "enforce"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert str(f) in str(ei.value)
    assert "no such file" in str(ei.value)


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)  # a directory
    assert str(tmp_path) in str(ei.value)
    f = tmp_path / "latin1.toml"
    f.write_bytes(b'[daemon]\nlog_level = "d\xe9bug"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(f)


# --------------------------------------------------------------------------- bad input


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, SRC)
    return ei.value


def _names(err: ConfigError, key: str, value: str) -> None:
    msg = str(err)
    assert SRC in msg and key in msg and value in msg, msg
    assert err.source == SRC


@pytest.mark.parametrize(
    "text, key, value, hint",
    [
        ("[daemon]\nepoch = 100\n", "daemon.epoch", "100", "did you mean 'daemon.epoch_ms'"),
        ("[safety]\nlimit = 80.0\n", "safety.limit", "80.0", "did you mean 'safety.limit_c'"),
        ("[platform.sim]\nseeds = 3\n", "platform.sim.seeds", "3", "did you mean 'platform.sim.seed'"),
        ("[safty]\nlimit_c = 80.0\n", "safty", "80.0", "did you mean 'safety'"),
        # A key written above its section header.
        ('mode = "enforce"\n', "mode", "enforce", "did you mean 'daemon.mode'"),
        ("[metrics]\nbanana = 1\n", "metrics.banana", "1", "known: metrics.enabled"),
    ],
)
def test_unknown_keys_with_hint(text: str, key: str, value: str, hint: str) -> None:
    err = _error(text)
    _names(err, key, value)
    assert err.key == key
    assert hint in str(err)


@pytest.mark.parametrize(
    "text, key, value",
    [
        ('[daemon]\nepoch_ms = "100"\n', "daemon.epoch_ms", "'100'"),
        ("[daemon]\nepoch_ms = 100.0\n", "daemon.epoch_ms", "100.0"),
        ("[daemon]\nmode = 1\n", "daemon.mode", "1"),
        ("[daemon]\nrun_dir = 7\n", "daemon.run_dir", "7"),
        ('[safety]\nlimit_c = "hot"\n', "safety.limit_c", "'hot'"),
        ("[safety]\nlimit_c = true\n", "safety.limit_c", "True"),
        ('[metrics]\nenabled = "yes"\n', "metrics.enabled", "'yes'"),
        ("[metrics]\nport = true\n", "metrics.port", "True"),
        ("[targets]\npids = 1234\n", "targets.pids", "1234"),
        ('[targets]\npids = [1234, "5678"]\n', "targets.pids[1]", "'5678'"),
        ("[targets]\npids = [1, true]\n", "targets.pids[1]", "True"),
        ("[targets]\ncomm_patterns = [3]\n", "targets.comm_patterns[0]", "3"),
        ("daemon = 5\n", "daemon", "5"),
        ("[platform]\nsim = 1\n", "platform.sim", "1"),
        ('[control]\ngroup = ""\n', "control.group", "''"),
    ],
)
def test_wrong_types(text: str, key: str, value: str) -> None:
    err = _error(text)
    _names(err, key, value)
    assert err.key == key


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("[daemon]\nepoch_ms = 9\n", "daemon.epoch_ms", "9"),
        ("[daemon]\nepoch_ms = 10001\n", "daemon.epoch_ms", "10001"),
        ("[safety]\nlimit_c = 200.0\n", "safety.limit_c", "200.0"),
        ("[safety]\nmargin_c = 0\n", "safety.margin_c", "0"),
        ("[safety]\nmargin_c = -1.0\n", "safety.margin_c", "-1.0"),
        ("[safety]\nlimit_c = nan\n", "safety.limit_c", "nan"),
        ("[safety]\nmin_freq_khz = 0\n", "safety.min_freq_khz", "0"),
        ("[safety]\nlanding_caps = \"yes\"\n", "safety.landing_caps", "yes"),
        ("[metrics]\nport = 0\n", "metrics.port", "0"),
        ("[metrics]\nport = 70000\n", "metrics.port", "70000"),
        ("[policy]\ntimeout_ms = 0\n", "policy.timeout_ms", "0"),
        ("[platform.sim]\nspeed = 0.0\n", "platform.sim.speed", "0.0"),
        ("[platform]\nthread_sample_every = 0\n", "platform.thread_sample_every", "0"),
        ("[platform]\nthread_sample_every = 101\n", "platform.thread_sample_every", "101"),
        ("[platform.sim]\nseed = -1\n", "platform.sim.seed", "-1"),
        ("[targets]\npids = [0]\n", "targets.pids[0]", "0"),
    ],
)
def test_out_of_range(text: str, key: str, value: str) -> None:
    err = _error(text)
    _names(err, key, value)
    assert err.key == key


@pytest.mark.parametrize(
    "text, key, value, hint",
    [
        ('[daemon]\nmode = "enforcing"\n', "daemon.mode", "enforcing", "did you mean 'enforce'"),
        ('[daemon]\nmode = "Observe"\n', "daemon.mode", "Observe", "did you mean 'observe'"),
        ('[daemon]\nlog_level = "verbose"\n', "daemon.log_level", "verbose", "'debug'"),
        ('[platform]\nkind = "windows"\n', "platform.kind", "windows", "'linux', 'sim'"),
        ('[policy]\nkind = "pytorch"\n', "policy.kind", "pytorch", "'onnx', 'baseline'"),
    ],
)
def test_bad_enum_values(text: str, key: str, value: str, hint: str) -> None:
    err = _error(text)
    _names(err, key, value)
    assert hint in str(err)


@pytest.mark.parametrize(
    "text, key, value",
    [
        ('[daemon]\nrun_dir = "run/ailfmd"\n', "daemon.run_dir", "run/ailfmd"),
        ('[policy]\npath = "policies/x.onnx"\n', "policy.path", "policies/x.onnx"),
        ('[metrics]\nlisten_address = "localhost"\n', "metrics.listen_address", "localhost"),
        ('[metrics]\nlisten_address = "127.0.0.256"\n', "metrics.listen_address", "127.0.0.256"),
        ('[policy]\nfallback = "step wise"\n', "policy.fallback", "step wise"),
        ('[control]\ngroup = "ops:admin"\n', "control.group", "ops:admin"),
        ('[control]\nsocket = "/run/' + "x" * 110 + '.sock"\n', "control.socket", "xxxx.sock"),
        ('[targets]\ncomm_patterns = ["(unclosed"]\n', "targets.comm_patterns[0]", "(unclosed"),
        ('[targets]\ncgroup_paths = ["../escape"]\n', "targets.cgroup_paths[0]", "../escape"),
        ('[targets]\nsystemd_units = ["multi-user.target"]\n', "targets.systemd_units[0]", "multi-user.target"),
    ],
)
def test_bad_strings(text: str, key: str, value: str) -> None:
    err = _error(text)
    _names(err, key, value)
    assert err.key == key


def test_cross_field_critical_above_limit() -> None:
    err = _error("[safety]\nlimit_c = 90.0\ncritical_c = 90.0\n")
    _names(err, "safety.critical_c", "90.0")
    assert "safety.limit_c" in str(err)
    # The default critical (95) against a raised limit is caught as well.
    err = _error("[safety]\nlimit_c = 100.0\n")
    assert "safety.critical_c" in str(err) and "safety.limit_c = 100.0" in str(err)


def test_cross_field_timeout_within_epoch() -> None:
    # The default timeout (50 ms) does not fit a 40 ms epoch.
    err = _error("[daemon]\nepoch_ms = 40\n")
    _names(err, "policy.timeout_ms", "50")
    assert "daemon.epoch_ms = 40" in str(err)
    assert parse_config("[daemon]\nepoch_ms = 40\n[policy]\ntimeout_ms = 30\n", SRC).policy.timeout_ms == 30


@pytest.mark.parametrize(
    "text, line, content",
    [
        ("[daemon]\nmode = 'observe'\nepoch_ms 100\n", 3, "epoch_ms 100"),
        ("[daemon]\nmode = observe\n", 2, "mode = observe"),
        ("[safety]\nlimit_c = 80.0\nlimit_c = 81.0\n", 3, "limit_c = 81.0"),
        ("[daemon\nmode = 'observe'\n", 1, "[daemon"),
        ("[targets]\npids = [1, 2,\n", 2, "pids = [1, 2,"),
    ],
)
def test_syntax_error_names_the_line(text: str, line: int, content: str) -> None:
    err = _error(text)
    _names(err, f"line {line}", content)
    assert err.key == f"line {line}"
    assert err.value == content
    assert "not valid TOML" in str(err)


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "ailfmd.toml"
    f.write_text("[safety]\ncritical_c = 50.0\n")
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert ei.value.source == str(f)
    assert str(ei.value).startswith(f"{f}: safety.critical_c = 50.0: ")


def test_config_is_frozen() -> None:
    c = DaemonConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.daemon.mode = "enforce"  # type: ignore[misc]
