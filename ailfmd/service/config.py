"""The daemon's configuration: TOML at ``/etc/ailfmd/ailfmd.toml``, validated at load.

:func:`load_config` reads a file, :func:`parse_config` a string; both return a frozen
:class:`DaemonConfig`. Every problem raises :class:`ailfmd.errors.ConfigError` naming the
file, the dotted key (``safety.critical_c``) and the bad value: TOML syntax errors (with
the line), unknown keys and sections (with a "did you mean" hint), wrong types,
out-of-range numbers, bad choices and inconsistent pairs of keys. A typo therefore never
falls back silently to a default. Keys, defaults and ranges: ``docs/configuration.md``;
the commented example is ``packaging/ailfmd.toml``.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ailfmd.control.records import MODES
from ailfmd.errors import ConfigError
from ailfmd.platform.linux.targets import TargetSelector
from ailfmd.platform.linux.threads import DEFAULT_SAMPLE_EVERY
from ailfmd.tomlcheck import Style, Table

DEFAULT_CONFIG_PATH = Path("/etc/ailfmd/ailfmd.toml")
DEFAULT_RUN_DIR = Path("/run/ailfmd")
CONTROL_SOCKET_NAME = "control.sock"

PLATFORM_KINDS = ("linux", "sim")
POLICY_KINDS = ("onnx", "baseline")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

EPOCH_MS_RANGE = (10, 10_000)
POLICY_TIMEOUT_MS_RANGE = (1, 10_000)
LIMIT_C_RANGE = (40.0, 125.0)  # below 40 °C no server could run; above 125 °C no silicon survives
CRITICAL_C_RANGE = (40.0, 150.0)
MARGIN_C_RANGE = (0.0, 30.0)  # exclusive of 0: acting exactly at the limit is too late
MIN_FREQ_KHZ_RANGE = (1, 10_000_000)  # 10 GHz
SIM_SPEED_RANGE = (0.0, 10_000.0)  # exclusive of 0
THREAD_SAMPLE_EVERY_RANGE = (1, 100)  # epochs between two reads of a thread's counters
TELEMETRY_EVERY_RANGE = (1, 100_000)  # epochs between two telemetry records
TELEMETRY_MAX_MIB_RANGE = (1, 1 << 20)  # size at which the telemetry file is rotated
SUN_PATH_MAX_BYTES = 107  # sockaddr_un.sun_path is 108 bytes including the NUL

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # baseline names
_GROUP = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")  # POSIX-portable group names
_NAME_WHAT = "a name (letters, digits, '_', '.', '-')"

# Every key is optional (absent sections read as empty); unknown keys and bad choices
# get a "did you mean" hint.
_STYLE = Style(int_range="between", num_range="span", number_reason="must be a number",
               non_empty_strings=True, unknown_hint=True, choice_hint=True,
               absent_table_empty=True)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class DaemonSettings:
    """``[daemon]``: how the loop runs."""

    mode: str = "observe"  # "observe" decides and reports but touches nothing
    epoch_ms: int = 100
    run_dir: Path = DEFAULT_RUN_DIR
    log_level: str = "info"

    @property
    def epoch_s(self) -> float:
        return self.epoch_ms / 1000.0


@dataclass(frozen=True)
class SimSettings:
    """``[platform.sim]``: the simulated chip, when ``platform.kind = "sim"``.

    ``chip`` and ``workload`` are shipped names or file paths, resolved when the
    platform is built (``ailfmd.sim.chip.load_chip``, ``ailfmd.sim.workload``).
    """

    chip: str = "3d-64"
    workload: str = "mixed"
    seed: int = 0
    speed: float = 1.0  # simulated seconds per wall-clock second


@dataclass(frozen=True)
class PlatformSettings:
    """``[platform]``: the machine the loop drives."""

    kind: str = "linux"
    sysfs_root: Path = Path("/sys")
    procfs_root: Path = Path("/proc")
    cgroupfs_root: Path = Path("/sys/fs/cgroup")
    # Read each managed thread's counters every this many epochs (linux only); in the
    # epochs between, its last sample is reused (see docs/configuration.md).
    thread_sample_every: int = DEFAULT_SAMPLE_EVERY
    sim: SimSettings = field(default_factory=SimSettings)


@dataclass(frozen=True)
class PolicySettings:
    """``[policy]``: who decides. ``baseline`` and ``fallback`` are baseline names; the
    daemon checks that they exist when it builds the policy."""

    kind: str = "onnx"
    path: Path = Path("/usr/share/ailfmd/policies/default.onnx")
    baseline: str = "linux"
    fallback: str = "stepwise"
    timeout_ms: int = 50

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000.0


@dataclass(frozen=True)
class SafetySettings:
    """``[safety]``: the shield's thresholds. It acts from ``limit_c - margin_c`` up."""

    limit_c: float = 85.0
    margin_c: float = 3.0
    critical_c: float = 95.0
    min_freq_khz: int | None = None  # floor for the shield's caps; None: hardware minimum
    landing_caps: bool = True  # cap idle CPUs once threads landing on idle CPUs ran hot

    @property
    def act_at_c(self) -> float:
        return self.limit_c - self.margin_c


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: the Prometheus endpoint."""

    enabled: bool = True
    listen_address: str = "127.0.0.1"
    # 9464, the first choice, is OpenTelemetry's Prometheus exporter default, which
    # inference servers often run; see docs/configuration.md.
    port: int = 9747


@dataclass(frozen=True)
class ControlSettings:
    """``[control]``: the Unix socket ``ailfmctl`` talks to. Members of ``group`` may
    query; only root may change anything."""

    socket: Path = DEFAULT_RUN_DIR / CONTROL_SOCKET_NAME  # default follows daemon.run_dir
    group: str = "ailfmd"


@dataclass(frozen=True)
class TelemetrySettings:
    """``[telemetry]``: record what the daemon sees and does (docs/telemetry.md); off
    unless ``path`` is set."""

    path: Path | None = None
    every_epochs: int = 10  # one record per second at the default 100 ms epoch
    max_mib: int = 256  # then the file moves to <path>.1 and a new one starts


@dataclass(frozen=True)
class DaemonConfig:
    """The whole configuration. ``DaemonConfig()`` is the built-in default."""

    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    platform: PlatformSettings = field(default_factory=PlatformSettings)
    targets: TargetSelector = field(default_factory=TargetSelector)
    policy: PolicySettings = field(default_factory=PolicySettings)
    safety: SafetySettings = field(default_factory=SafetySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    # Where it came from, for logs and errors; not part of the value.
    source: str = field(default="(built-in defaults)", compare=False)


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, *, default_path: str | Path = DEFAULT_CONFIG_PATH
) -> DaemonConfig:
    """Read and validate a config file.

    ``path=None`` reads ``default_path`` (``/etc/ailfmd/ailfmd.toml``), and a missing
    default file means every default. A missing file named explicitly is an error.
    """
    explicit = path is not None
    file = Path(path if path is not None else default_path)
    source = str(file)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        if not explicit:
            return DaemonConfig(source=f"(built-in defaults; {source} does not exist)")
        raise ConfigError(source, "(file)", source, "no such file") from None
    except OSError as e:
        raise ConfigError(source, "(file)", source, e.strerror or str(e)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, "(file)", source, f"not UTF-8 text: {e}") from None
    return parse_config(text, source)


def parse_config(text: str, source: str) -> DaemonConfig:
    """Validate TOML ``text``; ``source`` names it in errors (usually the file path)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(text, source, e) from None
    top = Table(doc, source, style=_STYLE)

    t = top.table("daemon")
    daemon = DaemonSettings(
        mode=t.choice("mode", MODES, default=DaemonSettings.mode),
        epoch_ms=t.integer("epoch_ms", *EPOCH_MS_RANGE, default=DaemonSettings.epoch_ms),
        run_dir=t.path("run_dir", default=DaemonSettings.run_dir),
        log_level=t.choice("log_level", LOG_LEVELS, default=DaemonSettings.log_level),
    )
    t.finish()

    t = top.table("platform")
    s = t.table("sim")
    sim = SimSettings(
        chip=s.string("chip", default=SimSettings.chip),
        workload=s.string("workload", default=SimSettings.workload),
        seed=s.integer("seed", 0, 2**63 - 1, default=SimSettings.seed),
        speed=s.number("speed", *SIM_SPEED_RANGE, default=SimSettings.speed, lo_open=True),
    )
    s.finish()
    platform = PlatformSettings(
        kind=t.choice("kind", PLATFORM_KINDS, default=PlatformSettings.kind),
        sysfs_root=t.path("sysfs_root", default=PlatformSettings.sysfs_root),
        procfs_root=t.path("procfs_root", default=PlatformSettings.procfs_root),
        cgroupfs_root=t.path("cgroupfs_root", default=PlatformSettings.cgroupfs_root),
        thread_sample_every=t.integer("thread_sample_every", *THREAD_SAMPLE_EVERY_RANGE,
                                      default=PlatformSettings.thread_sample_every),
        sim=sim,
    )
    t.finish()

    targets = _targets(top.table("targets"))

    t = top.table("policy")
    policy = PolicySettings(
        kind=t.choice("kind", POLICY_KINDS, default=PolicySettings.kind),
        path=t.path("path", default=PolicySettings.path),
        baseline=t.matching("baseline", _NAME, _NAME_WHAT, default=PolicySettings.baseline),
        fallback=t.matching("fallback", _NAME, _NAME_WHAT, default=PolicySettings.fallback),
        timeout_ms=t.integer("timeout_ms", *POLICY_TIMEOUT_MS_RANGE, default=PolicySettings.timeout_ms),
    )
    t.finish()

    t = top.table("safety")
    safety = SafetySettings(
        limit_c=t.number("limit_c", *LIMIT_C_RANGE, default=SafetySettings.limit_c),
        margin_c=t.number("margin_c", *MARGIN_C_RANGE, default=SafetySettings.margin_c, lo_open=True),
        critical_c=t.number("critical_c", *CRITICAL_C_RANGE, default=SafetySettings.critical_c),
        min_freq_khz=t.integer("min_freq_khz", *MIN_FREQ_KHZ_RANGE, default=None),
        landing_caps=t.boolean("landing_caps", default=SafetySettings.landing_caps),
    )
    t.finish()

    t = top.table("metrics")
    metrics = MetricsSettings(
        enabled=t.boolean("enabled", default=MetricsSettings.enabled),
        listen_address=_ip_address(t, "listen_address", MetricsSettings.listen_address),
        port=t.integer("port", 1, 65535, default=MetricsSettings.port),
    )
    t.finish()

    t = top.table("control")
    control = ControlSettings(
        socket=t.path("socket", default=daemon.run_dir / CONTROL_SOCKET_NAME),
        group=t.matching("group", _GROUP, "a group name (letters, digits, '_', '.', '-'; at most 32)",
                         default=ControlSettings.group),
    )
    if len(str(control.socket).encode()) > SUN_PATH_MAX_BYTES:
        t.fail("socket", str(control.socket),
               f"longer than the {SUN_PATH_MAX_BYTES} bytes a Unix socket address can hold")
    t.finish()

    t = top.table("telemetry")
    telemetry = TelemetrySettings(
        path=t.path("path", default=None),
        every_epochs=t.integer("every_epochs", *TELEMETRY_EVERY_RANGE, default=TelemetrySettings.every_epochs),
        max_mib=t.integer("max_mib", *TELEMETRY_MAX_MIB_RANGE, default=TelemetrySettings.max_mib),
    )
    t.finish()
    top.finish()

    _check_pairs(source, daemon, policy, safety)
    return DaemonConfig(daemon, platform, targets, policy, safety, metrics, control, telemetry, source=source)


def _check_pairs(source: str, daemon: DaemonSettings, policy: PolicySettings, safety: SafetySettings) -> None:
    """Checks that involve two keys; each error names both."""
    if not safety.critical_c > safety.limit_c:
        raise ConfigError(source, "safety.critical_c", safety.critical_c,
                          f"must be above safety.limit_c = {safety.limit_c}")
    if not policy.timeout_ms < daemon.epoch_ms:
        raise ConfigError(source, "policy.timeout_ms", policy.timeout_ms,
                          f"must be below daemon.epoch_ms = {daemon.epoch_ms}: a decision has to fit in one epoch")


def _targets(t: Table) -> TargetSelector:
    lists = {name: t.items(name, default=[]) for name in ("pids", "comm_patterns", "cgroup_paths", "systemd_units")}
    t.finish()
    try:
        return TargetSelector(**lists)
    except ConfigError as e:
        # The selector validates the items; say which file and which item. Identity
        # first: True == 1, but `pids = [1, true]` is wrong at index 1, not 0.
        items = lists.get(e.key, [])
        index = next((i for i, v in enumerate(items) if v is e.value), None)
        if index is None:
            index = next((i for i, v in enumerate(items) if v == e.value), None)
        key = e.key if index is None else f"{e.key}[{index}]"
        raise ConfigError(t.source, t.dotted(key), e.value, e.reason) from None


def _syntax_error(text: str, source: str, e: tomllib.TOMLDecodeError) -> ConfigError:
    # tomllib (Python < 3.14) puts the position only in the message: "... (at line 3, column 9)".
    msg = str(e)
    lines = text.splitlines()
    m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
    if m is not None:
        lineno = int(m.group(1))
        line = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
        return ConfigError(source, f"line {lineno}", line.strip(), f"not valid TOML: {msg}")
    # "(at end of document)": an unterminated value; name the last line that has text.
    last = max((i for i, line in enumerate(lines) if line.strip()), default=None)
    if last is None:
        return ConfigError(source, "(document)", None, f"not valid TOML: {msg}")
    return ConfigError(source, f"line {last + 1}", lines[last].strip(), f"not valid TOML: {msg}")


def _ip_address(t: Table, key: str, default: str) -> str:
    value = t.string(key, default=default)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        # A host name could resolve to several addresses, or to a public one later.
        t.fail(key, value, "must be an IPv4 or IPv6 address (not a host name)")
    return value
