"""``ailfmd``: the daemon. Wires config, platform, policy, shield, loop and reporters.

Life cycle: restore whatever a killed predecessor left (the journal), build everything,
report READY after the first epoch, then tick every ``epoch_ms``. Between epochs it
waits on the hotplug monitor and a signal pipe, so hotplug, SIGTERM and SIGHUP act at
once. SIGTERM/SIGINT restore every setting and exit 0; SIGHUP reloads config and policy
without dropping protection (a bad new config is refused and the old one stays).
Operator commands from the control socket are queued and run on the loop's thread at
the next epoch boundary, so nothing touches the machine concurrently.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import logging
import os
import queue
import resource
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from prometheus_client import CollectorRegistry

from ailfmd import __version__
from ailfmd.control.loop import ControlLoop
from ailfmd.control.records import TickRecord
from ailfmd.control.shield import SafetyShield, ShieldConfig
from ailfmd.ctl.sensors_report import build_report
from ailfmd.errors import AilfmError, ConfigError
from ailfmd.platform.base import Platform
from ailfmd.service import status as st
from ailfmd.service.config import DaemonConfig, load_config
from ailfmd.service.control import CommandError, ControlServer, Peer, group_gid
from ailfmd.service.hotplug import HotplugWatcher
from ailfmd.service.metrics import DaemonMetrics
from ailfmd.service.notify import Notifier
from ailfmd.policy.baselines import configure_for_chip
from ailfmd.service.policies import LoadedPolicy, load_policy
from ailfmd.service.telemetry import TelemetryRecorder

log = logging.getLogger("ailfmd")


def build_platform(cfg: DaemonConfig, wall_clock: Any = time.monotonic) -> tuple[Platform, str]:
    """The platform the config names, and a short description of it."""
    p = cfg.platform
    if p.kind == "sim":
        from ailfmd.sim.chip import load_chip
        from ailfmd.sim.platform import SimPlatform
        from ailfmd.sim.workload import load_workload

        chip = load_chip(p.sim.chip)
        start = wall_clock()
        speed = p.sim.speed
        # The simulated chip runs in real time (scaled by `speed`): observe() advances
        # it to "now", so the daemon's epoch timing is exercised exactly as on Linux.
        plat = SimPlatform(chip, load_workload(p.sim.workload), seed=p.sim.seed, clock=lambda: (wall_clock() - start) * speed)
        return plat, f"sim:{chip.name}"
    from ailfmd.platform.linux.platform import LinuxPlatform

    plat = LinuxPlatform(
        sysfs_root=p.sysfs_root,
        procfs_root=p.procfs_root,
        run_dir=cfg.daemon.run_dir,
        targets=cfg.targets,
        cgroupfs_root=p.cgroupfs_root,
        thread_sample_every=p.thread_sample_every,
    )
    return plat, "linux"


def shield_config(cfg: DaemonConfig) -> ShieldConfig:
    s = cfg.safety
    return ShieldConfig(limit_c=s.limit_c, margin_c=s.margin_c, critical_c=s.critical_c, min_freq_khz=s.min_freq_khz,
                        landing_caps=s.landing_caps)


class Daemon:
    def __init__(self, cfg: DaemonConfig, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.notifier = Notifier(env if env is not None else os.environ)
        self.commands: queue.Queue[tuple[str, Peer]] = queue.Queue()
        self._stop = False
        self._reload = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.platform, self.platform_name = build_platform(cfg)
        restored = self.platform.restore()  # a killed predecessor's changes, first of all
        for o in restored.outcomes:
            if o.detail != "unchanged":
                log.info("restored %s -> %s (%s)", o.target, o.applied, o.detail or "ok")
        self.policy: LoadedPolicy = self._load_policy(cfg)
        self.history = st.History()
        self.loop = ControlLoop(
            self.platform,
            self.policy.policy,
            self.policy.fallback,
            SafetyShield(shield_config(cfg), self.platform.topology()),
            mode=cfg.daemon.mode,
            decide_budget_s=cfg.policy.timeout_s,
        )
        self.loop.sinks.append(self.history.add)
        self.registry = CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry, self.platform.topology())
        self.metrics.set_policy(self.policy.info.name, self.policy.info.kind, self.policy.info.feature_schema or "",
                                self.policy.info.path or "")
        self.loop.sinks.append(self.metrics.update)
        self.telemetry: TelemetryRecorder | None = self._telemetry(cfg)
        self.loop.sinks.append(self._record_telemetry)
        self.metrics_address: tuple[str, int] | None = None
        self.control: ControlServer | None = None
        self.hotplug: HotplugWatcher | None = None
        self._poll: tuple[select.poll, int] | None = None

    def _load_policy(self, cfg: DaemonConfig) -> LoadedPolicy:
        loaded = load_policy(cfg.policy, limit_c=cfg.safety.limit_c)
        chip = getattr(self.platform, "chip", None)  # the simulated chip's model, if any
        if chip is not None:
            for p in (loaded.policy, loaded.fallback):
                configure_for_chip(p, chip)
        return loaded

    def _telemetry(self, cfg: DaemonConfig) -> TelemetryRecorder | None:
        """The recorder ``cfg`` asks for (None: off), with the metrics told so."""
        rec = None
        if cfg.telemetry.path is not None:
            rec = TelemetryRecorder(cfg.telemetry, self.platform.topology, platform=self.platform_name,
                                    epoch_ms=cfg.daemon.epoch_ms, limit_c=cfg.safety.limit_c)
            if rec.error is None:
                log.info("telemetry: every %d epochs to %s", cfg.telemetry.every_epochs, cfg.telemetry.path)
        self.metrics.set_telemetry(None if rec is None else 0, rec is not None and rec.error is None)
        return rec

    def _record_telemetry(self, record: TickRecord) -> None:
        tel = self.telemetry
        if tel is None:
            return
        before, was_up = tel.records, tel.error is None
        tel.add(record)
        if tel.records != before or (tel.error is None) != was_up:  # most epochs record nothing
            self.metrics.set_telemetry(tel.records - before, tel.error is None)

    # ------------------------------------------------------------------ set-up
    def start_services(self) -> None:
        m = self.cfg.metrics
        if m.enabled:
            self.metrics_address = self.metrics.start_http(listen_address=m.listen_address, port=m.port)
            log.info("metrics on http://%s:%d/metrics", *self.metrics_address)
        sock = self.cfg.control.socket
        self.control = ControlServer(str(sock), self.handle, group_gid(self.cfg.control.group))
        self.control.start()
        log.info("control socket %s (group %s may read)", sock, self.cfg.control.group)
        if self.cfg.platform.kind == "linux":
            try:
                self.hotplug = HotplugWatcher()
            except Exception as e:  # no netlink in some sandboxes: poll-free operation still works
                log.warning("no hotplug events (%s); CPU or sensor changes need a reload", e)

    def install_signals(self) -> None:
        # `kill -USR1` dumps every thread's stack to the journal: the first thing to ask
        # for when a daemon seems stuck.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum: int, frame: object) -> None:
        self._stop = True
        self._wake()

    def _on_reload(self, signum: int, frame: object) -> None:
        self._reload = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    # ------------------------------------------------------------------ control socket
    def info(self) -> st.DaemonInfo:
        return st.DaemonInfo(
            version=__version__,
            pid=os.getpid(),
            platform=self.platform_name,
            mode=self.loop.mode,
            paused=self.loop.paused,
            epoch_ms=self.cfg.daemon.epoch_ms,
            uptime_s=time.monotonic() - self.started,
            policy=self.policy.info,
            limit_c=self.cfg.safety.limit_c,
            ambient_c=getattr(self.platform, "ambient_c", None),
            telemetry=None if self.telemetry is None else {
                "path": str(self.telemetry.path), "records": self.telemetry.records, "error": self.telemetry.error},
        )

    def handle(self, cmd: str, args: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        """Runs on the control server's thread: read-only answers, mutations queued."""
        last = self.loop.last
        if cmd == "status":
            return st.status_document(last, self.platform.topology(), self.info(), self.history)
        if cmd == "explain":
            return st.explain_document(self.history, int(args.get("epochs", 10)))
        if cmd == "policy":
            return st.policy_document(self.info(), last, self.history)
        if cmd == "sensors":
            if last is None:
                raise CommandError("no epoch has run yet")
            return build_report(self.platform.topology(), self.platform.capabilities(), last.observation,
                                {"platform": self.platform_name})
        if cmd in ("pause", "resume", "reload"):
            log.info("%s requested by %s", cmd, peer.describe())
            self.commands.put((cmd, peer))
            self._wake()
            return st.mode_document(self.info(), changed=True, detail=f"{cmd} takes effect at the next epoch")
        raise CommandError(f"unknown command {cmd!r}")

    def _run_commands(self) -> None:
        if self.commands.empty():
            return  # the usual case, without raising queue.Empty every epoch
        while True:
            try:
                cmd, _peer = self.commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "pause" and not self.loop.paused:
                # Paused: the policy stops and its changes are undone; the shield stays on.
                self.loop.paused = True
                self.platform.restore()
                self.loop.shield.forget_policy_caps()
                log.info("paused: policy suspended, settings restored, safety shield still active")
            elif cmd == "resume" and self.loop.paused:
                self.loop.paused = False
                log.info("resumed")
            elif cmd == "reload":
                self._reload = True

    # ------------------------------------------------------------------ reload
    def reload(self, path: str | None) -> None:
        self.notifier.reloading("reloading configuration")
        try:
            new = load_config(path)
            policy = self._load_policy(new)
        except (ConfigError, AilfmError, OSError) as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            self.notifier.ready(f"reload refused: {e}")
            return
        if new.platform != self.cfg.platform:
            log.warning("[platform] changes need a restart; kept the running platform")
            new = dataclasses.replace(new, platform=self.cfg.platform)
        if new.telemetry != self.cfg.telemetry or new.safety.limit_c != self.cfg.safety.limit_c:
            if self.telemetry is not None:
                self.telemetry.close()
            self.telemetry = self._telemetry(new)
        self.cfg, self.policy = new, policy
        self.loop.policy, self.loop.fallback = policy.policy, policy.fallback
        self.loop.shield.config = shield_config(new)
        self.loop.mode = new.daemon.mode
        self.loop.decide_budget_s = new.policy.timeout_s
        threads = getattr(self.platform, "threads", None)
        if threads is not None:
            threads.set_selector(new.targets)
        self.loop.reset()
        self.metrics.set_policy(policy.info.name, policy.info.kind, policy.info.feature_schema or "", policy.info.path or "")
        log.info("reloaded %s: policy %s, mode %s", new.source, policy.info.name, new.daemon.mode)
        self.notifier.ready(self.status_line())

    # ------------------------------------------------------------------ run
    def status_line(self) -> str:
        rec = self.loop.last
        mode = "paused" if self.loop.paused else self.loop.mode
        if rec is None:
            return f"{mode}, policy {self.policy.info.name}"
        temps = [s.temp.temp_c for s in rec.observation.cpus.values() if s.temp.temp_c is not None]
        hottest = f"{max(temps):.1f} C" if temps else "no sensors"
        return f"{mode}, policy {rec.policy_name}, hottest {hottest}, {len(rec.observation.threads)} threads"

    def _waiter(self) -> tuple[select.poll, int]:
        """The poll set of the wait between epochs and the hotplug descriptor in it (-1:
        none), built once: it only changes when the hotplug monitor does."""
        hotplug_fd = self.hotplug.fileno() if self.hotplug else -1
        if self._poll is None or self._poll[1] != hotplug_fd:
            # poll(), not select(): a big machine keeps well over 1024 sysfs and perf
            # descriptors open, and select() cannot watch descriptors numbered that high.
            waiter = select.poll()
            waiter.register(self._wake_r, select.POLLIN)
            if hotplug_fd >= 0:
                waiter.register(hotplug_fd, select.POLLIN)
            self._poll = (waiter, hotplug_fd)
        return self._poll

    def _wait(self, until: float) -> None:
        waiter, hotplug_fd = self._waiter()
        while not self._stop:
            left = until - time.monotonic()
            if left <= 0:
                return
            ready = [fd for fd, _ in waiter.poll(left * 1000)]
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                return
            if self.hotplug and hotplug_fd in ready:
                events = self.hotplug.drain()
                if events:
                    log.info("hotplug: %s; re-discovering", ", ".join(f"{e.subsystem} {e.action}" for e in events[:5]))
                    rediscover = getattr(self.platform, "rediscover", None)
                    if rediscover:
                        rediscover()
                        self.metrics.set_topology(self.platform.topology())
                        self.loop.reset()

    def run(self, config_path: str | None = None, max_epochs: int | None = None) -> int:
        epoch_s = self.cfg.daemon.epoch_s
        watchdog_s = self.notifier.watchdog_interval_s()
        last_ping = 0.0
        ready = False
        last_error: str | None = None
        next_tick = time.monotonic()
        try:
            while not self._stop:
                self._run_commands()
                if self._reload:
                    self._reload = False
                    self.reload(config_path)
                    epoch_s = self.cfg.daemon.epoch_s
                try:
                    self.loop.tick()
                    if last_error is not None:
                        log.info("epochs run again after: %s", last_error)
                        last_error = None
                except Exception as e:  # observe failed: keep going, the next epoch may work
                    if str(e) != last_error:  # once per distinct failure, not every epoch
                        log.exception("epoch failed: %s", e)
                        last_error = str(e)
                now = time.monotonic()
                if not ready:
                    self.notifier.ready(self.status_line())
                    ready = True
                elif self.loop.epoch % 50 == 0:
                    self.notifier.status(self.status_line())
                if watchdog_s is not None and now - last_ping >= watchdog_s:
                    self.notifier.watchdog()
                    last_ping = now
                if max_epochs is not None and self.loop.epoch >= max_epochs:
                    break
                next_tick += epoch_s
                if next_tick < now:  # overran: do not try to catch up with a burst
                    next_tick = now
                self._wait(next_tick)
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        self.notifier.stopping("restoring settings")
        res = self.platform.restore()
        for o in res.outcomes:
            if not o.ok:
                log.error("could not restore %s to %s: %s", o.target, o.requested, o.detail)
        if self.control is not None:
            self.control.stop()
        self.metrics.stop()
        if self.telemetry is not None:
            self.telemetry.close()
        if self.hotplug is not None:
            self.hotplug.close()
        self.platform.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        log.info("stopped; every setting restored" if res.ok else "stopped; some settings could not be restored")


def _override(cfg: DaemonConfig, args: argparse.Namespace) -> DaemonConfig:
    """Command-line options beat the file (handy for trying things out)."""
    d, p, pol, m, c = cfg.daemon, cfg.platform, cfg.policy, cfg.metrics, cfg.control
    if args.mode:
        d = dataclasses.replace(d, mode=args.mode)
    if args.epoch_ms:
        d = dataclasses.replace(d, epoch_ms=args.epoch_ms)
    if args.run_dir:
        d = dataclasses.replace(d, run_dir=Path(args.run_dir))
        if args.socket is None:
            c = dataclasses.replace(c, socket=Path(args.run_dir) / "control.sock")
    if args.platform:
        p = dataclasses.replace(p, kind=args.platform)
    if args.chip or args.workload or args.seed is not None:
        sim = p.sim
        sim = dataclasses.replace(
            sim,
            chip=args.chip or sim.chip,
            workload=args.workload or sim.workload,
            seed=sim.seed if args.seed is None else args.seed,
        )
        p = dataclasses.replace(p, sim=sim)
    if args.policy:
        if args.policy.endswith(".onnx"):
            pol = dataclasses.replace(pol, kind="onnx", path=Path(args.policy))
        else:
            pol = dataclasses.replace(pol, kind="baseline", baseline=args.policy)
    if args.metrics_port is not None:
        m = dataclasses.replace(m, port=args.metrics_port)
    if args.socket:
        c = dataclasses.replace(c, socket=Path(args.socket))
    return dataclasses.replace(cfg, daemon=d, platform=p, policy=pol, metrics=m, control=c)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ailfmd", description="Thermal-aware scheduling daemon for CPU inference servers.")
    ap.add_argument("--config", help="config file (default /etc/ailfmd/ailfmd.toml if it exists)")
    ap.add_argument("--mode", choices=("enforce", "observe"))
    ap.add_argument("--platform", choices=("linux", "sim"))
    ap.add_argument("--chip", help="simulated chip: shipped name or file")
    ap.add_argument("--workload", help="simulated workload: shipped name or file")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--policy", help="baseline name, or a .onnx policy file")
    ap.add_argument("--epoch-ms", type=int)
    ap.add_argument("--run-dir")
    ap.add_argument("--socket", help="control socket path")
    ap.add_argument("--metrics-port", type=int)
    ap.add_argument("--epochs", type=int, help="stop after this many epochs (testing)")
    ap.add_argument("--restore-only", action="store_true", help="restore what a killed daemon left, then exit")
    return ap


def _setup_logging(level: str) -> None:
    # Under systemd, journald stamps time and unit itself.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr)


def raise_fd_limit() -> None:
    """Lift the soft descriptor limit to the hard one: every hot sysfs file and perf
    counter stays open, which on a 256-CPU box is more than the usual soft 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the descriptor limit from %d: %s", soft, e)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _override(load_config(args.config), args)
    except ConfigError as e:
        print(f"ailfmd: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg.daemon.log_level)
    try:
        if args.restore_only:
            plat, _ = build_platform(cfg)
            res = plat.restore()
            for o in res.outcomes:
                print(f"{o.target}: {'restored' if o.ok else 'FAILED'} {o.applied or ''} {o.detail}".rstrip())
            plat.close()
            return 0 if res.ok else 1
        raise_fd_limit()
        daemon = Daemon(cfg)
        daemon.install_signals()
        daemon.start_services()
    except (AilfmError, OSError) as e:
        log.error("cannot start: %s", e)
        return 1
    return daemon.run(args.config, max_epochs=args.epochs)


if __name__ == "__main__":
    sys.exit(main())
