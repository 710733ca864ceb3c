"""Other agents on the box that also manage CPU frequency or thermals.

Two managers writing the same ``scaling_max_freq`` fight each other (auto-cpufreq and
tuned users know the result). We do not stop them; we say they are there.
"""

from __future__ import annotations

import re

from ailfmd.platform.linux.sysfs import Root

# comm (as in /proc/<pid>/comm, 15 chars max) -> what it is
KNOWN_MANAGERS = {
    "thermald": "Intel thermald (caps frequency/RAPL on thermal trips)",
    "tuned": "tuned (applies cpufreq governor/EPP profiles)",
    "auto-cpufreq": "auto-cpufreq (rewrites governor and turbo)",
    "power-profiles-": "power-profiles-daemon (sets EPP/platform profile)",
    "tlp": "TLP (sets governor/EPP on power source changes)",
    "cpupower": "cpupower (one-shot frequency settings)",
    "cpufreqd": "cpufreqd (rule-based frequency changes)",
    "powerd": "powerd (frequency management)",
}
_PID = re.compile(r"^\d+$")


def find_other_managers(procfs: Root, own_pid: int) -> list[str]:
    """Descriptions of known frequency/thermal managers running now."""
    found: dict[str, str] = {}
    for name in procfs.listdir(""):
        if not _PID.match(name) or int(name) == own_pid:
            continue
        comm = procfs.read_opt_str(f"{name}/comm")
        if comm is None:
            continue
        for key, what in KNOWN_MANAGERS.items():
            # auto-cpufreq runs as a python script: its comm is python3, argv names it.
            if comm.startswith(key):
                found[key] = f"{what}, pid {name}"
            elif comm.startswith("python") and key == "auto-cpufreq":
                cmdline = procfs.read_opt_str(f"{name}/cmdline") or ""
                if "auto-cpufreq" in cmdline:
                    found[key] = f"{what}, pid {name}"
    return sorted(found.values())
