"""Human rendering of the control-socket documents, heat map included.

Input is the JSON the daemon returns (docs/control-protocol.md), so what an operator
reads is exactly what ``--json`` would show. Colour is ANSI 256-colour backgrounds; the
caller decides whether to use it (:func:`use_color`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, TextIO

RESET = "\x1b[0m"
# A blue -> cyan -> green -> yellow -> red ramp from the xterm 256-colour cube.
RAMP = (21, 27, 33, 39, 45, 51, 50, 48, 46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196)
AT_LIMIT_BG = 160  # darker red for cells at or above the limit, so they stand out of the ramp
NO_READING_BG = 240
CELL_W = 7


def use_color(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _f(v: float | None, digits: int = 1, unit: str = "") -> str:
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def _mhz(khz: int | None) -> str:
    return "-" if khz is None else f"{khz / 1000:.0f}"


def _when(wall_time_s: float | None) -> str:
    if wall_time_s is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall_time_s))


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + f"{m:02d}m{s:02d}s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


# --------------------------------------------------------------------------- heat map


def temp_bg(temp_c: float | None, min_c: float, max_c: float) -> int:
    """The 256-colour background for a temperature on the ambient..limit scale."""
    if temp_c is None:
        return NO_READING_BG
    if temp_c >= max_c:
        return AT_LIMIT_BG
    frac = (temp_c - min_c) / (max_c - min_c)
    frac = min(max(frac, 0.0), 1.0)
    return RAMP[min(int(frac * len(RAMP)), len(RAMP) - 1)]


def _fg(bg: int) -> int:
    # White text on the dark blues, greys and the limit red; black on the rest.
    return 231 if bg in (21, 27, 33, NO_READING_BG, AT_LIMIT_BG) else 16


def _cell_text(temp_c: float | None, max_c: float) -> str:
    if temp_c is None:
        return "-- ".rjust(CELL_W)
    # A "!" marks the limit in plain text too, where there is no colour to show it.
    return (f"{temp_c:5.1f}" + ("!" if temp_c >= max_c else " ")).rjust(CELL_W)


def render_heatmap(hm: Mapping[str, Any], color: bool) -> list[str]:
    """One block per grid: a title line, then rows of temperature cells labelled with
    the CPUs they hold (blank cells are positions without an online CPU)."""
    lo, hi = float(hm["min_c"]), float(hm["max_c"])
    out: list[str] = []
    for g in hm["grids"]:
        out.append(f"{g['name']} (cpus {g['cpus']})")
        for row in g["cells"]:
            present = [c["cpu"] for c in row if c is not None]
            label = (f"{present[0]}-{present[-1]}" if len(present) > 1 else str(present[0])) if present else ""
            parts = []
            for c in row:
                if c is None:
                    parts.append(" " * CELL_W)
                    continue
                text = _cell_text(c["temp_c"], hi)
                if color:
                    bg = temp_bg(c["temp_c"], lo, hi)
                    text = f"\x1b[48;5;{bg}m\x1b[38;5;{_fg(bg)}m{text}{RESET}"
                parts.append(text)
            out.append(f"  {label:>7} |" + "".join(parts).rstrip())
        out.append("")
    legend = f"scale: {lo:.0f} C"
    if color:
        legend += " " + "".join(f"\x1b[48;5;{b}m {RESET}" for b in RAMP) + f" {hi:.0f} C"
        legend += f"  \x1b[48;5;{AT_LIMIT_BG}m\x1b[38;5;231m ! {RESET} at/above limit"
    else:
        legend += f" .. {hi:.0f} C; '!' = at/above limit, '--' = no reading"
    out.append(legend)
    return out


# --------------------------------------------------------------------------- documents


def _reason_line(r: Mapping[str, Any]) -> str:
    line = f"{r['target']}: {r['kind']} by {r['source']}"
    if r.get("shield"):
        line += " [shield]"
    line += f" - {r['detail']}"
    trig = []
    if r.get("sensor"):
        trig.append(f"sensor {r['sensor']}")
    if r.get("value_c") is not None:
        trig.append(f"{r['value_c']:.1f} C")
    if r.get("threshold_c") is not None:
        trig.append(f"threshold {r['threshold_c']:.1f} C")
    if trig:
        line += f" ({', '.join(trig)})"
    if r.get("predicted"):
        line += f"; expect: {r['predicted']}"
    return line


def _policy_line(p: Mapping[str, Any]) -> str:
    s = f"{p['name']} ({p['kind']}"
    if p.get("path"):
        s += f", {p['path']}"
    if p.get("feature_schema"):
        s += f", features {p['feature_schema']}"
    s += ")"
    if p.get("fallback"):
        s += f", falls back to {p['fallback']}"
    return s


def render_status(doc: Mapping[str, Any], color: bool) -> str:
    d = doc["daemon"]
    out = [
        f"ailfmd {d['version']} (pid {d['pid']}) on {d['platform']}: mode {d['mode']}"
        + (", PAUSED (observing only)" if d["paused"] else "")
        + f", up {_duration(d['uptime_s'])}, epoch {_f(d['epoch_ms'], 0)} ms, limit {_f(d['limit_c'], 1, ' C')}",
        f"policy: {_policy_line(doc['policy'])}",
    ]
    tel = d.get("telemetry")
    if tel:
        out.append(f"telemetry: OFF after an error: {tel['error']}" if tel["error"] else
                   f"telemetry: {tel['records']} record(s) to {tel['path']}")
    le = doc["last_epoch"]
    if le is None:
        out.append("last epoch: none yet")
    else:
        timing = ", ".join(f"{k} {_f(v, 2)}" for k, v in le["timings_ms"].items() if k != "total")
        out.append(
            f"last epoch: {le['epoch']} at {_when(le['wall_time_s'])}, took {_f(le['duration_ms'], 2)} ms"
            + (f" ({timing})" if timing else "")
            + f"; decided by {le['policy']}, {le['actions']} action(s), "
            + ("applied" if le["applied"] else "not applied")
        )
        if le["fallback"]:
            out.append(f"FALLBACK: {le['fallback']}")
        landing = le.get("landing_cap_fraction")
        if landing is not None and landing < 1.0:
            out.append(f"landing caps: idle CPUs held at {landing:.0%} of their frequency range "
                       "(threads waking on idle CPUs ran hot; raised again as landings stay cool)")
        for f in le["apply_failures"]:
            out.append(f"apply failed: {f['target']}: wanted {f['requested']}: {f['detail']}")
    v = doc["violations"]
    out.append(
        f"violations: CPUs {', '.join(map(str, v['cpus']))} at/above the limit"
        if v["cpus"]
        else "violations: none this epoch"
    )
    out.append(f"  epochs with a violation since start: {v['total_epochs']}")
    out.append("")
    out += render_heatmap(doc["heatmap"], color)
    out.append("")
    rows = [
        [
            str(c["cpu"]),
            _f(c["temp_c"], 1, " C") + (" !" if c["violation"] else ""),
            c["source"] or "none",
            _mhz(c["freq_khz"]),
            _mhz(c["cap_khz"]),
            _mhz(c["hw_max_khz"]),
            _f(c.get("limit_c"), 1, " C"),
        ]
        for c in doc["cpus"]
    ]
    out += _table(["CPU", "TEMP", "SOURCE", "MHZ", "CAP", "HW MAX", "LIMIT"], rows)
    out.append("")
    if doc["threads"]:
        rows = [
            [str(t["tid"]), str(t["pid"]), t["comm"], t["cpu_list"], t.get("cpuset") or "-",
             "-" if t["last_cpu"] is None else str(t["last_cpu"])]
            for t in doc["threads"]
        ]
        out.append("Managed threads:")
        out += _table(["TID", "PID", "COMM", "CPUS", "CPUSET", "LAST CPU"], rows)
    else:
        out.append("Managed threads: none")
    out.append("")
    sh = doc["shield"]
    out.append(f"Shield interventions: {sh['total']} since start" + (", recent:" if sh["recent"] else ""))
    out += [f"  epoch {e['epoch']} {_when(e['wall_time_s'])}  {_reason_line(e)}" for e in sh["recent"]]
    fb = doc["fallbacks"]
    out.append(f"Fallback epochs: {fb['total_epochs']} since start" + (", recent:" if fb["recent"] else ""))
    out += [
        f"  epochs {e['first_epoch']}-{e['last_epoch']} ({e['epochs']}): {e['policy']} because {e['reason']}"
        for e in fb["recent"]
    ]
    return "\n".join(out) + "\n"


def render_explain(doc: Mapping[str, Any]) -> str:
    if not doc["epochs"]:
        return "no epochs recorded yet\n"
    out: list[str] = []
    for e in doc["epochs"]:
        state = "applied" if e["applied"] else ("paused, not applied" if e["paused"] else f"{e['mode']}, not applied")
        out.append(f"epoch {e['epoch']} at {_when(e['wall_time_s'])}: {e['policy']}, {state}")
        if e["fallback"]:
            out.append(f"  fallback: {e['fallback']}")
        if e["violations"]:
            out.append(f"  violations: CPUs {', '.join(map(str, e['violations']))}")
        if not e["actions"]:
            out.append("  no actions")
        out += [f"  {_reason_line(a)}" for a in e["actions"]]
        out += [f"  apply failed: {f['target']}: wanted {f['requested']}: {f['detail']}" for f in e["apply_failures"]]
    return "\n".join(out) + "\n"


def render_policy(doc: Mapping[str, Any]) -> str:
    out = [
        f"configured: {_policy_line(doc['configured'])}",
        f"active: {doc['active'] or '-'}" + (f" (fallback: {doc['fallback_reason']})" if doc["fallback_reason"] else ""),
        f"mode: {doc['mode']}" + (", paused" if doc["paused"] else ""),
        f"last inference: {_f(doc['inference_ms'], 3, ' ms')} (epoch {doc['last_epoch'] if doc['last_epoch'] is not None else '-'})",
    ]
    out += [f"  {k}: {v}" for k, v in doc["info"].items()]
    fb = doc["fallbacks"]
    out.append(f"fallback epochs since start: {fb['total_epochs']}")
    out += [
        f"  epochs {e['first_epoch']}-{e['last_epoch']} ({e['epochs']}): {e['policy']} because {e['reason']}"
        for e in fb["recent"]
    ]
    return "\n".join(out) + "\n"


def render_mode(doc: Mapping[str, Any]) -> str:
    state = "paused (observing only, nothing applied)" if doc["paused"] else f"running in {doc['mode']} mode"
    head = doc["detail"] or ("done" if doc["changed"] else "no change")
    return f"{head}\nailfmd is {state}; policy {_policy_line(doc['policy'])}\n"
