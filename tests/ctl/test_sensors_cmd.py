"""``ailfmctl sensors`` as an operator runs it: a real process, real trees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CAPS = {
    "per_core_temperature",
    "package_temperature",
    "frequency_read",
    "frequency_cap",
    "throttle_counters",
    "hw_counters",
    "sw_counters",
    "schedstat",
    "affinity",
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ailfmd.ctl.cli", "sensors", *args], capture_output=True, text=True, timeout=60
    )


def test_json_on_node_exporter_tree(node_exporter_sys: Path) -> None:
    p = run("--sysfs-root", str(node_exporter_sys), "--json", "--no-perf")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["schema"] == "ailfmd.sensors/1"
    assert set(rep) == {"schema", "roots", "topology", "temperatures", "frequency", "throttle", "capabilities", "notes"}
    assert rep["topology"]["online_cpus"] == [0, 1, 2, 3]
    assert rep["topology"]["packages"] == {"0": [0, 1], "1": [2, 3]}
    cpu3 = rep["temperatures"]["cpus"][3]
    assert cpu3["temp_c"] == 52.0 and cpu3["source"]["chip"] == "platform_coretemp_1"
    assert cpu3["source"]["scope"] == "core" and "Core 1" in cpu3["reason"]
    assert {p["driver"] for p in rep["frequency"]["policies"]} == {"intel_pstate"}
    assert rep["throttle"][3] == {"cpu": 3, "core_throttle_count": 9, "package_throttle_count": 6}
    assert set(rep["capabilities"]) == CAPS
    assert rep["capabilities"]["frequency_cap"]["available"] is True


def test_human_output_names_sources_and_capabilities(node_exporter_sys: Path) -> None:
    p = run("--sysfs-root", str(node_exporter_sys), "--no-perf")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "platform_coretemp_1/temp3 (core)" in out
    assert "intel_pstate" in out and "active" in out
    assert "[yes] per_core_temperature" in out
    assert "thermal_zone0" in out and "12.4 C" in out


def test_this_machine(tmp_path: Path) -> None:
    p = run("--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["topology"]["online_cpus"]
    # Whatever this box has, every CPU gets an entry, with a reason when it has no value.
    for c in rep["temperatures"]["cpus"]:
        assert c["temp_c"] is not None or c["reason"]
    assert rep["capabilities"]["affinity"]["available"] is True
    assert rep["capabilities"]["sw_counters"]["available"] is True


def test_bad_root_is_a_clear_error(tmp_path: Path) -> None:
    p = run("--sysfs-root", str(tmp_path / "missing"))
    assert p.returncode == 1
    assert "not a sysfs tree" in p.stderr and str(tmp_path / "missing") in p.stderr
    assert "Traceback" not in p.stderr
