"""Which CPUs a process's cgroup cpuset lets its threads run on.

``sched_setaffinity`` keeps a thread inside its cpuset: a mask with no CPU of it is
refused (EINVAL), a mask with some is narrowed. Containers (``docker --cpuset-cpus``),
Kubernetes' static CPU manager and ``AllowedCPUs=`` in a systemd unit all confine an
inference server this way, so a placement must be chosen inside the set, not discovered
by the kernel refusing it every epoch.

The set is the cgroup's ``cpuset.cpus.effective`` (cgroup v2) or, where the cpuset
controller is mounted as a v1 hierarchy (``/sys/fs/cgroup/cpuset``), its
``cpuset.effective_cpus`` (``cpuset.cpus`` on kernels without it). A cgroup without the
file (v2: the cpuset controller is not enabled for it) has its parent's set, so the
lookup walks up to the root. None: no cpuset is known (no cgroup file system at the
configured root, or the process is gone), so nothing is restricted.
"""

from __future__ import annotations

from ailfmd.errors import SysfsError
from ailfmd.platform.linux import procfs as pfs
from ailfmd.platform.linux.sysfs import Root, parse_cpu_list

V2_FILES = ("cpuset.cpus.effective",)
V1_FILES = ("cpuset.effective_cpus", "cpuset.cpus")
V1_MOUNT = "cpuset"  # the v1 hierarchy's directory under the cgroup mount point


def read_cpuset(cgroupfs: Root, path: str, files: tuple[str, ...]) -> frozenset[int] | None:
    """The first of ``files`` found in the cgroup ``path`` or, failing that, in its
    nearest ancestor, parsed; None when no level has one. SysfsError names a file whose
    content is not a CPU list."""
    parts = [p for p in path.split("/") if p]
    while True:
        level = "/".join(parts)
        for name in files:
            rel = f"{level}/{name}" if level else name
            try:
                text = cgroupfs.read_str(rel)
            except SysfsError as e:
                if e.reason == "missing":
                    continue
                raise
            try:
                cpus = parse_cpu_list(text)  # SysfsError below names the file
            except ValueError as e:
                raise SysfsError(rel, str(e)) from None
            # An empty effective set only exists while a cpuset is being changed; the
            # kernel then runs the tasks on the parent's CPUs.
            if cpus:
                return frozenset(cpus)
        if not parts:
            return None
        parts.pop()


def process_cpuset(procfs: Root, cgroup2: Root, cpuset_v1: Root, pid: int) -> frozenset[int] | None:
    """The CPUs the cpuset of ``pid``'s cgroup allows, None when unknown (see the module
    docstring). ``cgroup2`` is the v2 hierarchy (``/sys/fs/cgroup``, or its ``unified``
    directory on a hybrid system), ``cpuset_v1`` where a v1 cpuset hierarchy would be
    mounted (``/sys/fs/cgroup/cpuset``). NoSuchThread when the process is gone,
    SysfsError (naming the file) when a file cannot be read or parsed."""
    entries = pfs.read_cgroups(procfs, pid)
    for entry in entries:
        # The cpuset controller is in exactly one hierarchy: a v1 one when listed there.
        if "cpuset" in entry.controllers:
            return read_cpuset(cpuset_v1, entry.path, V1_FILES)
    for entry in entries:
        if entry.hierarchy_id == 0 and not entry.controllers:
            return read_cpuset(cgroup2, entry.path, V2_FILES)
    return None
