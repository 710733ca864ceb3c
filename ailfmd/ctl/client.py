"""Client side of the control socket (docs/control-protocol.md).

Every failure becomes one of three errors with a message fit for an operator:
:class:`DaemonNotRunning`, :class:`PermissionDenied`, :class:`DaemonError`.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Mapping

from ailfmd.errors import AilfmError
from ailfmd.service.control import DEFAULT_SOCKET, E_PERMISSION, PROTOCOL_VERSION

__all__ = ["DEFAULT_SOCKET", "ControlClient", "DaemonError", "DaemonNotRunning", "PermissionDenied", "request"]
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # far above any real document; stops a runaway peer


class DaemonNotRunning(AilfmError):
    """No daemon at the socket path (missing file or nobody listening)."""

    def __init__(self, path: str, detail: str = "no socket at") -> None:
        super().__init__(f"ailfmd is not running ({detail} {path})")
        self.path = path


class PermissionDenied(AilfmError):
    """The socket file or the daemon refused this user."""


class DaemonError(AilfmError):
    """The daemon answered ``ok: false``, or the exchange broke down."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ControlClient:
    """One connection to ailfmd; send requests with :meth:`call`.

    Usable as a context manager. Requests on one connection are answered in order.
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_SOCKET, timeout_s: float = 10.0) -> None:
        self.path = os.fspath(path)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def connect(self) -> "ControlClient":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        try:
            s.connect(self.path)
        except FileNotFoundError:
            s.close()
            raise DaemonNotRunning(self.path) from None
        except ConnectionRefusedError:
            s.close()
            # A socket file without a listener: a daemon that was killed.
            raise DaemonNotRunning(self.path, "nothing listening on") from None
        except PermissionError:
            s.close()
            raise PermissionDenied(
                f"permission denied: cannot connect to {self.path} (root or the control group is required)"
            ) from None
        except socket.timeout:
            s.close()
            raise DaemonError(f"ailfmd did not accept a connection on {self.path} within {self.timeout_s:g} s") from None
        except OSError as e:
            s.close()
            raise DaemonError(f"cannot connect to {self.path}: {e.strerror or e}") from None
        self._sock = s
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "ControlClient":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, cmd: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send one command and return its ``result``; raise on ``ok: false``."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        req = {"version": PROTOCOL_VERSION, "cmd": cmd, "args": dict(args or {})}
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
            line = self._read_line()
        except socket.timeout:
            raise DaemonError(f"no answer from ailfmd within {self.timeout_s:g} s") from None
        except OSError as e:
            raise DaemonError(f"connection to ailfmd lost: {e.strerror or e}") from None
        try:
            resp = json.loads(line)
        except ValueError:
            raise DaemonError("ailfmd sent an answer that is not JSON") from None
        if not isinstance(resp, dict) or "ok" not in resp:
            raise DaemonError("ailfmd sent an answer without 'ok'")
        if resp["ok"] is True:
            result = resp.get("result")
            if not isinstance(result, dict):
                raise DaemonError("ailfmd sent ok without a result object")
            return result
        code = resp.get("code")
        message = str(resp.get("error") or "unknown error")
        if code == E_PERMISSION:
            raise PermissionDenied(message)
        raise DaemonError(message, code)

    def _read_line(self) -> bytes:
        assert self._sock is not None
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return line
            if len(self._buf) > MAX_RESPONSE_BYTES:
                raise DaemonError(f"answer from ailfmd larger than {MAX_RESPONSE_BYTES} bytes")
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise DaemonError("ailfmd closed the connection without answering")
            self._buf += chunk


def request(path: str | os.PathLike[str], cmd: str, args: Mapping[str, Any] | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """One command on a fresh connection."""
    with ControlClient(path, timeout_s) as c:
        return c.call(cmd, args)
