"""CPU topology from ``/sys/devices/system/cpu`` and ``/sys/devices/system/node``.

Core, die and cluster ids are the kernel's: sparse on Xeons (0-4, 8-12, ...) and only
unique within their package, so cores are keyed by (package, die, core), never by core
id alone. Offline CPUs have no ``topology`` directory and are listed separately.
"""

from __future__ import annotations

import re

from ailfmd.errors import SysfsError
from ailfmd.platform.base import CacheDomain, CpuTopology, Topology
from ailfmd.platform.linux.sysfs import Root, parse_cpu_list

CPU_DIR = "devices/system/cpu"
NODE_DIR = "devices/system/node"
_CPU_NAME = re.compile(r"^cpu(\d+)$")
_NODE_NAME = re.compile(r"^node(\d+)$")
_SIZE = re.compile(r"^(\d+)([KMG]?)$")


def _cpu_list_file(sysfs: Root, rel: str) -> tuple[int, ...] | None:
    try:
        text = sysfs.read_str(rel)
    except SysfsError:
        return None
    try:
        return parse_cpu_list(text, rel)
    except ValueError as e:
        raise SysfsError(rel, str(e)) from None


def _cpu_dirs(sysfs: Root) -> list[int]:
    return sorted(int(m.group(1)) for n in sysfs.listdir(CPU_DIR) if (m := _CPU_NAME.match(n)))


def online_cpus(sysfs: Root) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(online, offline) CPUs. Falls back to per-CPU ``online`` files and topology dirs."""
    online = _cpu_list_file(sysfs, f"{CPU_DIR}/online")
    present = _cpu_dirs(sysfs)
    if online is None:
        # Old or stripped trees: a CPU is online if its online file says 1, or it has no
        # online file (cpu0 on x86 cannot be offlined) but has a topology directory.
        found = []
        for cpu in present:
            flag = sysfs.read_opt_int(f"{CPU_DIR}/cpu{cpu}/online")
            if flag == 1 or (flag is None and sysfs.exists(f"{CPU_DIR}/cpu{cpu}/topology")):
                found.append(cpu)
        online = tuple(found)
    offline = tuple(c for c in present if c not in set(online))
    return online, offline


def _parse_size(text: str | None) -> int | None:
    if not text:
        return None
    m = _SIZE.match(text.strip())
    if not m:
        return None
    mult = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2)]
    return int(m.group(1)) * mult


def _read_caches(sysfs: Root, cpu: int) -> list[CacheDomain]:
    base = f"{CPU_DIR}/cpu{cpu}/cache"
    out = []
    for index in sysfs.listdir(base):
        if not index.startswith("index"):
            continue
        level = sysfs.read_opt_int(f"{base}/{index}/level")
        cpus = _cpu_list_file(sysfs, f"{base}/{index}/shared_cpu_list")
        if level is None or cpus is None:
            continue  # incomplete cache entry: some hypervisors expose only `type`
        out.append(
            CacheDomain(
                level=level,
                kind=sysfs.read_opt_str(f"{base}/{index}/type") or "Unknown",
                cpus=cpus,
                size_bytes=_parse_size(sysfs.read_opt_str(f"{base}/{index}/size")),
                cache_id=sysfs.read_opt_int(f"{base}/{index}/id"),
            )
        )
    return out


def _numa_nodes(sysfs: Root) -> dict[int, tuple[int, ...]]:
    nodes: dict[int, tuple[int, ...]] = {}
    for name in sysfs.listdir(NODE_DIR):
        m = _NODE_NAME.match(name)
        if not m:
            continue
        cpus = _cpu_list_file(sysfs, f"{NODE_DIR}/{name}/cpulist")
        if cpus is not None:
            nodes[int(m.group(1))] = cpus
    return nodes


def read_topology(sysfs: Root) -> Topology:
    """Read the topology of every online CPU.

    A CPU whose ``topology`` directory is missing or unreadable is treated as a single
    core in package 0 with its id as core id, so placement still works on stripped
    container/VM trees; that is visible in the result (no siblings, no caches).
    """
    online, offline = online_cpus(sysfs)
    nodes = _numa_nodes(sysfs)
    node_of = {cpu: node for node, cpus in nodes.items() for cpu in cpus}
    cpus: dict[int, CpuTopology] = {}
    caches: dict[tuple[int, str, tuple[int, ...]], CacheDomain] = {}
    for cpu in online:
        topo = f"{CPU_DIR}/cpu{cpu}/topology"
        package = sysfs.read_opt_int(f"{topo}/physical_package_id")
        core = sysfs.read_opt_int(f"{topo}/core_id")
        die = sysfs.read_opt_int(f"{topo}/die_id")
        cluster = sysfs.read_opt_int(f"{topo}/cluster_id")
        # -1 means "unknown" on some arches (e.g. physical_package_id on old Arm kernels).
        package = package if package is not None and package >= 0 else 0
        core = core if core is not None and core >= 0 else cpu
        die = die if die is not None and die >= 0 else 0
        if cluster is not None and cluster < 0:
            cluster = None
        siblings = _cpu_list_file(sysfs, f"{topo}/thread_siblings_list")
        if siblings is None:
            siblings = _cpu_list_file(sysfs, f"{topo}/core_cpus_list")
        cpus[cpu] = CpuTopology(
            cpu=cpu,
            package_id=package,
            core_id=core,
            die_id=die,
            cluster_id=cluster,
            thread_siblings=tuple(c for c in (siblings or (cpu,)) if c in set(online)),
            numa_node=node_of.get(cpu),
        )
        for cache in _read_caches(sysfs, cpu):
            caches.setdefault((cache.level, cache.kind, cache.cpus), cache)
    return Topology(
        cpus=cpus,
        caches=tuple(sorted(caches.values(), key=lambda c: (c.level, c.kind, c.cpus))),
        numa_nodes=nodes,
        offline_cpus=offline,
    )


def llc_domains(topology: Topology) -> list[tuple[int, ...]]:
    """Last-level cache domains (highest level, unified), ordered by lowest CPU."""
    unified = [c for c in topology.caches if c.kind in ("Unified", "Unknown")]
    if not unified:
        return []
    top = max(c.level for c in unified)
    return sorted((c.cpus for c in unified if c.level == top), key=min)
