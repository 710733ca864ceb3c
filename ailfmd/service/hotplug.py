"""CPU and sensor hotplug: re-discover the machine when it changes, not by polling.

A netlink uevent monitor (pyudev) for the ``cpu``, ``hwmon`` and ``thermal``
subsystems. Its descriptor goes into the daemon's wait between epochs, so an event wakes
the loop at once and no thread is needed. Where udevd runs, the monitor listens to
udev's processed events (devices are ready when they arrive); without udevd (minimal
containers, early boot) it listens to the kernel's raw uevents instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pyudev

log = logging.getLogger("ailfmd.hotplug")

SUBSYSTEMS = ("cpu", "hwmon", "thermal")
# "change" on a cpu is what `echo change > .../uevent` and some firmware events send;
# online/offline are CPU hotplug, add/remove are drivers and devices coming and going.
ACTIONS = frozenset({"add", "remove", "online", "offline", "change", "bind", "unbind"})


@dataclass(frozen=True)
class HotplugEvent:
    action: str
    subsystem: str
    sys_path: str


class HotplugWatcher:
    """Non-blocking uevent monitor; ``fileno()`` for select, ``drain()`` to read events."""

    def __init__(self, source: str | None = None) -> None:
        if source is None:
            source = "udev" if os.path.exists("/run/udev/control") else "kernel"
        self.source = source
        ctx = pyudev.Context()
        self._monitor = pyudev.Monitor.from_netlink(ctx, source=source)
        for subsystem in SUBSYSTEMS:
            self._monitor.filter_by(subsystem)
        self._monitor.start()
        # The netlink socket is the monitor's for its whole life; asking libudev for it
        # costs a foreign call, and the daemon asks between every two epochs.
        self._fd: int = self._monitor.fileno()

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> list[HotplugEvent]:
        """Every event waiting now (never blocks)."""
        out = []
        while True:
            dev = self._monitor.poll(timeout=0)
            if dev is None:
                return out
            if dev.action in ACTIONS and dev.subsystem in SUBSYSTEMS:
                out.append(HotplugEvent(dev.action, dev.subsystem, dev.sys_path))

    def close(self) -> None:
        # pyudev has no explicit close: libudev closes the netlink socket when the
        # monitor's last reference goes.
        self._monitor = None  # type: ignore[assignment]
        self._fd = -1
