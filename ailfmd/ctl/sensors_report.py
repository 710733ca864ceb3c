"""What ``ailfmctl sensors`` reports: a JSON document and its human rendering.

The JSON schema is documented in docs/sensors-json.md; bump ``SCHEMA`` on any
incompatible change.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ailfmd.platform.base import Capabilities, Observation, TempSensor, Topology
from ailfmd.platform.linux.sysfs import format_cpu_list

SCHEMA = "ailfmd.sensors/1"


def _sensor(s: TempSensor | None) -> dict[str, Any] | None:
    return None if s is None else asdict(s)


def build_report(topology: Topology, caps: Capabilities, obs: Observation, roots: dict[str, str]) -> dict[str, Any]:
    """The whole report as plain JSON-able data."""
    return {
        "schema": SCHEMA,
        "roots": roots,
        "topology": {
            "online_cpus": list(topology.online_cpus),
            "offline_cpus": list(topology.offline_cpus),
            "packages": {str(p): list(c) for p, c in topology.packages().items()},
            "numa_nodes": {str(n): list(c) for n, c in sorted(topology.numa_nodes.items())},
            "caches": [
                {"level": c.level, "type": c.kind, "size_bytes": c.size_bytes, "cpus": list(c.cpus)}
                for c in topology.caches
            ],
            "cpus": [
                {
                    "cpu": c.cpu,
                    "package": c.package_id,
                    "die": c.die_id,
                    "core": c.core_id,
                    "cluster": c.cluster_id,
                    "siblings": list(c.thread_siblings),
                    "numa_node": c.numa_node,
                }
                for c in (topology.cpus[k] for k in topology.online_cpus)
            ],
        },
        "temperatures": {
            "cpus": [
                {
                    "cpu": s.cpu,
                    "temp_c": s.temp.temp_c,
                    "source": _sensor(s.temp.source),
                    "reason": s.temp.reason,
                }
                for s in (obs.cpus[k] for k in sorted(obs.cpus))
            ],
            "sensors": [
                {**asdict(r.sensor), "temp_c": r.temp_c, "error": r.error}
                for r in sorted(obs.sensors, key=lambda r: (r.sensor.chip, r.sensor.sensor))
            ],
        },
        "frequency": {
            "policies": [
                {
                    "policy": p.policy_id,
                    "cpus": list(p.cpus),
                    "driver": p.driver,
                    "governor": p.governor,
                    "min_khz": p.min_khz,
                    "max_khz": p.max_khz,
                    "cur_khz": p.cur_khz,
                    "hw_min_khz": p.hw_min_khz,
                    "hw_max_khz": p.hw_max_khz,
                    "available_khz": list(p.available_khz),
                    "available_governors": list(p.available_governors),
                    "active_mode": p.active_mode,
                    "energy_perf_preference": p.energy_perf_preference,
                    "errors": list(p.errors),
                }
                for p in obs.policies
            ]
        },
        "throttle": [
            {
                "cpu": s.cpu,
                "core_throttle_count": s.throttle.core_throttle_count,
                "package_throttle_count": s.throttle.package_throttle_count,
            }
            for s in (obs.cpus[k] for k in sorted(obs.cpus))
            if s.throttle is not None
        ],
        "capabilities": {k: {"available": v.available, "detail": v.detail} for k, v in caps.items.items()},
        "notes": list(caps.notes),
    }


def _fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}{unit}"
    return f"{v}{unit}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _range_mhz(lo: int | None, hi: int | None) -> str:
    return "-" if lo is None and hi is None else f"{_mhz(lo)}-{_mhz(hi)}"


def _mhz(khz: int | None) -> str:
    return "-" if khz is None else f"{khz / 1000:.0f}"


def render_text(rep: dict[str, Any]) -> str:
    """The report as aligned tables for a terminal."""
    t = rep["topology"]
    out: list[str] = []
    out.append(
        f"Topology: {len(t['online_cpus'])} online CPUs in {len(t['packages'])} package(s), "
        f"{len(t['numa_nodes'])} NUMA node(s)"
        + (f"; offline: {t['offline_cpus']}" if t["offline_cpus"] else "")
    )
    llc = [c for c in t["caches"] if c["type"] in ("Unified", "Unknown")]
    if llc:
        top = max(c["level"] for c in llc)
        doms = [c for c in llc if c["level"] == top]
        out.append(f"Last-level cache: L{top}, {len(doms)} domain(s)")
    out.append("")
    temps = {c["cpu"]: c for c in rep["temperatures"]["cpus"]}
    pol_of = {cpu: p for p in rep["frequency"]["policies"] for cpu in p["cpus"]}
    thr = {s["cpu"]: s for s in rep["throttle"]}
    rows = []
    for c in t["cpus"]:
        tc = temps[c["cpu"]]
        src = tc["source"]
        p = pol_of.get(c["cpu"])
        th = thr.get(c["cpu"])
        rows.append(
            [
                str(c["cpu"]),
                str(c["package"]),
                str(c["core"]),
                ",".join(map(str, c["siblings"])),
                _fmt(tc["temp_c"], " C"),
                f"{src['chip']}/{src['sensor']} ({src['scope']})" if src else "none",
                _mhz(p["cur_khz"]) if p else "-",
                _mhz(p["max_khz"]) if p else "-",
                f"{_fmt(th['core_throttle_count'])}/{_fmt(th['package_throttle_count'])}" if th else "-",
            ]
        )
    out += _table(["CPU", "PKG", "CORE", "SMT", "TEMP", "SOURCE", "MHZ", "CAP", "THROTTLE c/p"], rows)
    out.append("")
    if rep["frequency"]["policies"]:
        rows = [
            [
                f"policy{p['policy']}",
                format_cpu_list(p["cpus"]),
                p["driver"],
                p["governor"] or "-",
                _range_mhz(p["min_khz"], p["max_khz"]),
                _range_mhz(p["hw_min_khz"], p["hw_max_khz"]),
                "active" if p["active_mode"] else "passive",
            ]
            for p in rep["frequency"]["policies"]
        ]
        out += _table(["POLICY", "CPUS", "DRIVER", "GOVERNOR", "LIMITS MHZ", "HW MHZ", "MODE"], rows)
    else:
        out.append("Frequency: no cpufreq policies")
    out.append("")
    out.append("Sensors:")
    rows = [
        [
            f"{s['chip']}/{s['sensor']}",
            s["label"] or "-",
            s["scope"],
            _fmt(s["temp_c"], " C") if s["error"] is None else f"error: {s['error']}",
        ]
        for s in rep["temperatures"]["sensors"]
    ]
    out += _table(["SENSOR", "LABEL", "SCOPE", "VALUE"], rows) if rows else ["  none found"]
    out.append("")
    out.append("Capabilities:")
    for name, cap in rep["capabilities"].items():
        out.append(f"  [{'yes' if cap['available'] else 'no '}] {name}: {cap['detail']}")
    if rep["notes"]:
        out.append("")
        out.append("Notes:")
        out += [f"  - {n}" for n in rep["notes"]]
    return "\n".join(out) + "\n"
