"""Telling systemd how the daemon is doing: the ``sd_notify`` protocol.

A message is one datagram of ``KEY=value`` lines sent to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name written with a leading ``@``).
With no ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=`` is not ``notify``) every
call is a no-op. Messages the daemon sends:

- ``READY=1``: start-up finished (after restoring from the journal and the first epoch);
- ``STATUS=...``: one line for ``systemctl status``;
- ``WATCHDOG=1``: alive; send every :meth:`Notifier.watchdog_interval_s` seconds;
- ``RELOADING=1`` with ``MONOTONIC_USEC=...`` on SIGHUP, then ``READY=1`` when done.
  systemd >= 253 requires the timestamp for ``Type=notify-reload`` and older versions
  ignore it, so it is always sent;
- ``STOPPING=1``: shutting down (restoring the machine).

systemd-python's ``systemd.daemon.notify`` (libsystemd's ``sd_notify``) is used when it
is importable; otherwise the plain protocol is spoken here. libsystemd reads the socket
address from the process environment, so when the mapping given to :class:`Notifier`
names a different socket than the process environment does, the plain implementation
is used: the mapping always decides where messages go.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

BACKEND_SYSTEMD = "systemd-python"
BACKEND_PLAIN = "plain"


def _load_sd_notify() -> Callable[[str], bool] | None:
    try:
        from systemd import daemon  # type: ignore[import-not-found]
    except ImportError:
        return None
    return daemon.notify


def _clean(value: str) -> str:
    # A newline would end the assignment and start another: "STATUS=x\nREADY=1" sent as
    # a status would tell systemd we are ready. Status text can carry process names.
    return value.replace("\r", " ").replace("\n", " ")


class Notifier:
    """Sends ``sd_notify`` messages for one daemon process.

    ``env`` is the environment to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
    ``WATCHDOG_PID`` from (default: the process environment). ``plain=True`` forces the
    built-in protocol implementation even when systemd-python is installed.

    Each method returns True when a message was sent, False when notification is off or
    sending failed; a failure is logged, never raised, because losing a status line must
    not stop the daemon protecting the machine.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, plain: bool = False) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env
        self.socket_address: str | None = self._env.get("NOTIFY_SOCKET") or None
        sd_notify = None if plain else _load_sd_notify()
        # libsystemd only sees the process environment.
        if sd_notify is not None and self.socket_address != (os.environ.get("NOTIFY_SOCKET") or None):
            sd_notify = None
        self._sd_notify = sd_notify
        self.backend = BACKEND_SYSTEMD if sd_notify is not None else BACKEND_PLAIN

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for notifications (``$NOTIFY_SOCKET`` is set)."""
        return self.socket_address is not None

    # ------------------------------------------------------------------ messages

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments as one message (newlines in values are blanked)."""
        if self.socket_address is None or not assignments:
            return False
        message = "\n".join(_clean(a) for a in assignments)
        try:
            if self._sd_notify is not None:
                return bool(self._sd_notify(message))
            return self._send_plain(message)
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self.socket_address, e.strerror or e)
            return False

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        return self.send("READY=1", *self._status(status))

    def status(self, text: str) -> bool:
        """One line of free text for ``systemctl status``."""
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``."""
        return self.send("WATCHDOG=1")

    def reloading(self, status: str | None = None) -> bool:
        """A reload started; follow with :meth:`ready` when it is done."""
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_us}", *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown started."""
        return self.send("STOPPING=1", *self._status(status))

    @staticmethod
    def _status(status: str | None) -> tuple[str, ...]:
        return () if status is None else (f"STATUS={status}",)

    # ------------------------------------------------------------------ watchdog

    def watchdog_timeout_s(self) -> float | None:
        """``WatchdogSec=`` in seconds, or None when the watchdog is off for this process.

        Off when ``WATCHDOG_USEC`` is unset, not a positive integer, or when
        ``WATCHDOG_PID`` names another process (the variables were inherited).
        """
        usec = self._env.get("WATCHDOG_USEC")
        if usec is None or not usec.isdigit() or int(usec) == 0:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
            return None
        return int(usec) / 1e6

    def watchdog_interval_s(self) -> float | None:
        """How often to send :meth:`watchdog`: half the timeout, as sd_watchdog_enabled(3)
        recommends, so one late epoch does not get the daemon killed. None when off."""
        timeout_s = self.watchdog_timeout_s()
        return None if timeout_s is None else timeout_s / 2

    # ------------------------------------------------------------------ plain protocol

    def _send_plain(self, message: str) -> bool:
        address = self.socket_address
        assert address is not None
        if address.startswith("@"):
            target = "\0" + address[1:]  # abstract namespace
        elif address.startswith("/"):
            target = address
        else:
            # vsock: and relative paths are not ours to guess at; libsystemd refuses the
            # latter too.
            log.warning("NOTIFY_SOCKET=%r is not a path or @name; not notifying", address)
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), target)
        return True
