"""Prometheus metrics: a collector fed one :class:`TickRecord` per epoch, and its HTTP endpoint.

``update()`` runs on the control loop's thread every epoch, so it only bumps counters and
histogram buckets and keeps a reference to the (frozen) record; the per-CPU and per-sensor
gauges are built from that record in ``collect()``, at scrape time, which is far rarer than
an epoch. Nothing here does I/O on the machine. Everything lives in the registry passed in,
never in prometheus_client's global one.

Label cardinality is bounded by design (see docs/metrics.md): per-CPU and per-sensor series
are bounded by the hardware; threads come and go, so they are never a label — placements are
counted by process ``comm``, and free-text reasons are reduced to their first clause with
numbers replaced by ``N``; each such label keeps at most a fixed number of distinct values
and counts the rest under ``other``.
"""

from __future__ import annotations

import operator
import re
import socket
import threading
from bisect import bisect_left
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from ailfmd import __version__
from ailfmd.control.loop import CPUSET_SOURCE
from ailfmd.control.records import MODES, TickRecord
from ailfmd.platform.base import Topology

# Policy inference runs from ~10 us (a baseline) to tens of ms (a large ONNX model).
INFERENCE_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)
# A whole epoch: sub-millisecond on the simulator, a few ms on a big machine, 100 ms at 10 Hz.
EPOCH_BUCKETS_S = (2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
MAX_REASON_VALUES = 32  # distinct values of a `reason` label before "other"
MAX_COMM_VALUES = 64  # distinct values of the `comm` label before "other"
OTHER = "other"

_Values = list[tuple[tuple[str, ...], float]]  # label values -> sample value
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_outcome_ok = operator.attrgetter("ok")


def reason_label(text: str) -> str:
    """A bounded label value for a free-text reason: its first clause, numbers as ``N``.

    ``"timeout: onnx took 61.2 ms > 50 ms"`` -> ``"timeout"``;
    ``"busiest thread on hot cpu 5 moved to the coolest cpu 9"`` ->
    ``"busiest thread on hot cpu N moved to the coolest cpu N"``.
    """
    head = re.split(r"[:;(]", text, maxsplit=1)[0]
    head = " ".join(_NUMBER.sub("N", head).split())[:80]
    return head or "unspecified"


def apply_kind(target: str) -> str:
    """What an ApplyOutcome acted on, from its target ("thread 12", "policy0", "cpu 3")."""
    if target.startswith("thread"):
        return "placement"
    if target.startswith(("policy", "cpu")):
        return "freq_cap"
    return OTHER


class _BoundedCounter:
    """Counts by label tuple, folding new label values into ``other`` past a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        if key not in self.counts and len(self.counts) >= self.limit:
            key = (OTHER,) * len(key)
        self.counts[key] = self.counts.get(key, 0.0) + amount


class _Histogram:
    """Non-cumulative bucket counts; made cumulative only when scraped."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # `le` is inclusive
        self.sum += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            buckets.append((floatToGoString(bound), total))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        pass  # a scrape every few seconds must not flood the journal


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper must not keep the daemon from exiting


class DaemonMetrics:
    """ailfmd's metrics, registered as one collector in ``registry``.

    Call :meth:`update` once per epoch with the loop's record, :meth:`set_topology` after
    re-discovery, :meth:`set_policy` when a policy is loaded, and :meth:`start_http` /
    :meth:`stop` around the daemon's life.
    """

    def __init__(self, registry: CollectorRegistry, topology: Topology) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._record: TickRecord | None = None
        self._policy: tuple[str, str, str, str] | None = None
        self._telemetry: tuple[int, bool] | None = None  # (records written, still recording); None: off
        self._telemetry_records = 0  # across reloads, so the counter never goes back
        self._epochs = 0
        self._violations = 0
        self._outside_cpuset = 0
        self._actions = _BoundedCounter(MAX_REASON_VALUES)  # (kind, source)
        self._shield = _BoundedCounter(MAX_REASON_VALUES)  # (reason,)
        self._fallbacks = _BoundedCounter(MAX_REASON_VALUES)  # (reason,)
        self._placements = _BoundedCounter(MAX_COMM_VALUES)  # (comm,)
        self._apply_failures = _BoundedCounter(MAX_REASON_VALUES)  # (kind,)
        self._inference = _Histogram(INFERENCE_BUCKETS_S)
        self._epoch_duration = _Histogram(EPOCH_BUCKETS_S)
        self._reason_cache: dict[str, str] = {}
        self._cpu_labels: dict[int, tuple[str, str, str]] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.set_topology(topology)
        registry.register(self)

    # ------------------------------------------------------------------ inputs
    def set_topology(self, topology: Topology) -> None:
        """Per-CPU (cpu, package, core) label values, computed once per discovery."""
        labels = {c.cpu: (str(c.cpu), str(c.package_id), str(c.core_id)) for c in topology.cpus.values()}
        with self._lock:
            self._cpu_labels = labels

    def set_telemetry(self, written: int | None, recording: bool) -> None:
        """``written`` new telemetry records since the last call (None: telemetry is off)
        and whether it is still recording (False: stopped by an error)."""
        with self._lock:
            if written is None:
                self._telemetry = None
                return
            self._telemetry_records += written
            self._telemetry = (self._telemetry_records, recording)

    def set_policy(self, name: str, kind: str, schema: str = "", path: str = "") -> None:
        """What ``ailfm_policy_info`` reports: the configured policy (not the fallback)."""
        with self._lock:
            self._policy = (name, kind, schema, path)

    def _reason(self, text: str) -> str:
        label = self._reason_cache.get(text)
        if label is None:
            if len(self._reason_cache) > 4096:  # texts carry numbers: keep the cache bounded
                self._reason_cache.clear()
            label = self._reason_cache[text] = reason_label(text)
        return label

    def update(self, record: TickRecord) -> None:
        """Account one epoch. Cheap and I/O-free: runs on the control loop's thread."""
        obs = record.observation
        threads = obs.threads
        with self._lock:
            self._record = record
            self._epochs += 1
            self._violations += len(record.violations)
            actions = self._actions
            for r in record.decision.reasons:
                if r.source == CPUSET_SOURCE:  # a placement not made: not an actuation
                    self._outside_cpuset += 1
                elif r.kind != "fallback":  # a note that the fallback decided, not an actuation
                    actions.inc((r.kind, r.source))
            for r in record.shield:
                self._shield.inc((self._reason(r.detail),))
            if record.fallback is not None:
                self._fallbacks.inc((self._reason(record.fallback),))
            for ref, cpus in record.decision.action.affinity.items():
                th = threads.get(ref.tid)
                # Only a change of CPU set is a placement; policies may restate one every epoch.
                if th is not None and th.affinity != cpus:
                    self._placements.inc((th.comm,))
            # Usually every outcome is ok: checked in one C-level pass before looping.
            if record.applied is not None and not all(map(_outcome_ok, record.applied.outcomes)):
                for o in record.applied.outcomes:
                    if not o.ok:
                        self._apply_failures.inc((apply_kind(o.target),))
            if record.inference_s is not None:
                self._inference.observe(record.inference_s)
            total_s = record.timings_s.get("total")
            if total_s is not None:
                self._epoch_duration.observe(total_s)

    # ------------------------------------------------------------------ scrape
    def collect(self) -> Iterator[Metric]:
        """Metric families from the latest record and the accumulated counters."""
        with self._lock:
            rec, policy, cpu_labels = self._record, self._policy, self._cpu_labels
            counters = {
                "actions": dict(self._actions.counts),
                "shield": dict(self._shield.counts),
                "fallbacks": dict(self._fallbacks.counts),
                "placements": dict(self._placements.counts),
                "apply_failures": dict(self._apply_failures.counts),
            }
            epochs, violations, outside_cpuset = self._epochs, self._violations, self._outside_cpuset
            telemetry = self._telemetry
            inference = self._inference.family(
                "ailfm_policy_inference_seconds", "Time the deciding policy took per epoch."
            )
            epoch_duration = self._epoch_duration.family(
                "ailfm_epoch_duration_seconds", "Wall time of one control epoch: observe, decide, shield, apply."
            )

        yield _gauge("ailfm_build_info", "ailfmd's version; always 1.", ["version"], [((__version__,), 1.0)])
        yield CounterMetricFamily("ailfm_epochs_total", "Control epochs run.", value=epochs)
        yield CounterMetricFamily(
            "ailfm_thermal_violations_total", "CPU-epochs with a temperature at or above the limit.", value=violations
        )
        yield CounterMetricFamily(
            "ailfm_placements_outside_cpuset_total",
            "Placements a policy asked for outside the thread's cpuset, not made.", value=outside_cpuset,
        )
        for name, doc, labels, key in (
            ("ailfm_actions_total", "Actuations decided, by kind and by who decided.", ["kind", "source"], "actions"),
            ("ailfm_shield_interventions_total", "Changes the safety shield made, by reason.", ["reason"], "shield"),
            ("ailfm_policy_fallbacks_total", "Epochs decided by the fallback, by reason.", ["reason"], "fallbacks"),
            ("ailfm_placements_total", "Threads given a new CPU set, by process comm.", ["comm"], "placements"),
            ("ailfm_apply_failures_total", "Actuations the platform refused, by kind.", ["kind"], "apply_failures"),
        ):
            fam = CounterMetricFamily(name, doc, labels=labels)
            for lv, n in sorted(counters[key].items()):
                fam.add_metric(lv, n)
            yield fam
        yield inference
        yield epoch_duration
        if telemetry is not None:
            yield CounterMetricFamily("ailfm_telemetry_records_total", "Telemetry records written.",
                                      value=telemetry[0])
            yield _gauge("ailfm_telemetry_up", "1 while telemetry records, 0 once an error stopped it.", [],
                         [((), float(telemetry[1]))])
        if policy is None and rec is not None:
            policy = (rec.policy_name, "", "", "")
        yield _gauge(
            "ailfm_policy_info",
            "The configured policy; always 1.",
            ["name", "kind", "schema", "path"],
            [(policy, 1.0)] if policy else [],
        )
        if rec is not None:
            yield from self._from_record(rec, cpu_labels)

    def _from_record(self, rec: TickRecord, cpu_labels: dict[int, tuple[str, str, str]]) -> Iterator[Metric]:
        """The gauges that describe the latest epoch."""
        obs = rec.observation
        current = "paused" if rec.paused else rec.mode
        yield _gauge("ailfm_mode", "1 for the current mode (enforce, observe or paused), 0 for the others.", ["mode"],
                     [((m,), float(m == current)) for m in (*MODES, "paused")])
        if rec.limit_c is not None:
            yield _gauge("ailfm_thermal_limit_celsius", "The limit the safety shield protects.", [], [((), rec.limit_c)])
        if rec.landing_fraction is not None:
            yield _gauge("ailfm_shield_landing_cap_ratio",
                         "Share of their frequency range idle CPUs are capped at after hot landings (1: no cap).",
                         [], [((), rec.landing_fraction)])
        yield _gauge("ailfm_last_epoch_timestamp_seconds", "Unix time of the latest epoch.", [], [((), rec.wall_time_s)])
        yield _gauge("ailfm_epoch_phase_seconds", "Time each phase of the latest epoch took.", ["phase"],
                     [((k,), v) for k, v in sorted(rec.timings_s.items())])
        yield _gauge("ailfm_managed_threads", "Threads ailfmd manages.", [], [((), float(len(obs.threads)))])

        per_cpu = ["cpu", "package", "core"]
        temps: _Values = []
        freq: _Values = []
        cap: _Values = []
        fmax: _Values = []
        fmin: _Values = []
        for cpu, st in sorted(obs.cpus.items()):
            base = cpu_labels.get(cpu) or (str(cpu), "", "")
            t, src = st.temp.temp_c, st.temp.source
            if t is not None:  # no reading -> no series, never a fake 0
                temps.append(((*base, src.kind if src else "", src.scope if src else "",
                               src.chip if src else "", src.sensor if src else ""), t))
            for out, khz in ((freq, st.freq_khz), (cap, st.cap_khz), (fmax, st.hw_max_khz), (fmin, st.hw_min_khz)):
                if khz is not None:
                    out.append((base, khz * 1000.0))
        yield _gauge("ailfm_cpu_temperature_celsius", "The temperature ailfmd uses for each CPU, and its sensor.",
                     [*per_cpu, "source", "scope", "chip", "sensor"], temps)
        yield _gauge("ailfm_cpu_frequency_hertz", "Current CPU frequency.", per_cpu, freq)
        yield _gauge("ailfm_cpu_frequency_cap_hertz", "Frequency cap in effect (scaling_max_freq).", per_cpu, cap)
        yield _gauge("ailfm_cpu_frequency_max_hertz", "Hardware maximum frequency.", per_cpu, fmax)
        yield _gauge("ailfm_cpu_frequency_min_hertz", "Hardware minimum frequency.", per_cpu, fmin)

        on_cpu = dict.fromkeys(sorted({*cpu_labels, *obs.cpus}), 0)
        for th in obs.threads.values():
            if th.last_cpu is not None:
                on_cpu[th.last_cpu] = on_cpu.get(th.last_cpu, 0) + 1
        yield _gauge("ailfm_cpu_managed_threads", "Managed threads that last ran on each CPU.", per_cpu,
                     [(cpu_labels.get(c) or (str(c), "", ""), float(n)) for c, n in sorted(on_cpu.items())])

        sensor_labels = ["chip", "sensor", "label", "kind"]
        now: _Values = []
        high: _Values = []
        crit: _Values = []
        seen: set[tuple[str, str, str, str]] = set()
        for r in obs.sensors:
            s = r.sensor
            lv = (s.chip, s.sensor, s.label, s.kind)
            if lv in seen:  # one series per sensor even if discovery listed it twice
                continue
            seen.add(lv)
            for out, v in ((now, r.temp_c), (high, r.max_c), (crit, r.crit_c)):
                if v is not None:
                    out.append((lv, v))
        yield _gauge("ailfm_sensor_temperature_celsius", "Every temperature sensor read this epoch.", sensor_labels, now)
        yield _gauge("ailfm_sensor_temperature_max_celsius", "A sensor's high threshold (tempN_max).", sensor_labels, high)
        yield _gauge("ailfm_sensor_temperature_crit_celsius", "A sensor's critical threshold.", sensor_labels, crit)

    # ------------------------------------------------------------------ exposition
    def start_http(self, *, listen_address: str = "127.0.0.1", port: int) -> tuple[str, int]:
        """Serve ``/metrics`` from this collector's registry; the bound (address, port).

        Port 0 picks a free port. Loopback by default: metrics describe the machine.
        """
        if self._server is not None:
            raise RuntimeError("metrics server already running")
        family, _, _, _, sockaddr = socket.getaddrinfo(
            listen_address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        # A per-call subclass: address_family is a class attribute and IPv6 needs AF_INET6.
        server_cls = type("_Server", (_ThreadingServer,), {"address_family": family})
        server: WSGIServer = make_server(str(sockaddr[0]), port, make_wsgi_app(self._registry), server_cls, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="ailfmd-metrics", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        host, bound = server.server_address[:2]
        return str(host), int(bound)

    def stop(self) -> None:
        """Stop serving; safe to call when not started."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _gauge(name: str, doc: str, labels: list[str], values: _Values) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, labels=labels)
    for lv, v in values:
        fam.add_metric(lv, v)
    return fam
