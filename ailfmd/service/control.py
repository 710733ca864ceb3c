"""The control socket: framing, peer credentials and errors for ``ailfmctl``.

One Unix stream socket, one JSON request per line, one JSON response per line
(docs/control-protocol.md). The server owns everything that must hold whatever the
daemon does: who may ask what (``SO_PEERCRED``), how big and how slow a request may be,
and turning any bad input into an ``ok: false`` answer instead of an exception. What a
command *means* is the daemon's business, supplied as a :data:`Handler`.

Concurrency: one thread multiplexes every connection with a selector, so a silent or
trickling client never delays another one; requests are handled one at a time in that
thread, so the handler is never called concurrently with itself.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ailfmd.errors import AilfmError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/ailfmd/control.sock"
MAX_REQUEST_BYTES = 64 * 1024
READ_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 32
READ_ONLY_COMMANDS = ("status", "sensors", "policy", "explain")
MUTATING_COMMANDS = ("pause", "resume", "reload")

# Error codes in ``{"ok": false, "code": ...}``; clients branch on these, not on text.
E_BAD_REQUEST = "bad_request"
E_UNKNOWN_COMMAND = "unknown_command"
E_PERMISSION = "permission_denied"
E_TOO_LARGE = "too_large"
E_TIMEOUT = "timeout"
E_BUSY = "busy"
E_VERSION = "unsupported_version"
E_FAILED = "failed"  # the handler refused the command (CommandError)
E_INTERNAL = "internal"  # the handler crashed; the server keeps running


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, as the kernel vouches for it.

    ``uid``/``gid``/``pid`` come from ``SO_PEERCRED`` (effective ids at connect time);
    ``groups`` are the supplementary groups from ``/proc/<pid>/status``.
    """

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    def in_group(self, gid: int | None) -> bool:
        return gid is not None and (self.gid == gid or gid in self.groups)

    def describe(self) -> str:
        return f"uid {self.uid} gid {self.gid} pid {self.pid}"


# handler(cmd, args, peer) -> result document. ``args`` has been checked against the
# command's ArgSpecs; raise CommandError for an expected refusal.
Handler = Callable[[str, Mapping[str, Any], Peer], dict[str, Any]]


class CommandError(AilfmError):
    """Raised by a handler to refuse a command with a message for the operator."""


class ControlSocketError(AilfmError):
    """The control socket could not be set up; names the path and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"control socket {path}: {reason}")
        self.path = path


@dataclass(frozen=True)
class ArgSpec:
    """The type (and for integers the lower bound) of one command argument."""

    kind: type
    minimum: int | None = None


COMMAND_ARGS: Mapping[str, Mapping[str, ArgSpec]] = {
    "explain": {"epochs": ArgSpec(int, minimum=1)},
}

_JSON_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array"}


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _is_kind(value: object, kind: type) -> bool:
    # JSON true/false arrive as bool, a subclass of int: never accept them as numbers.
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


class RequestError(Exception):
    """A request the server answers with ``ok: false`` (never leaves the server)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """One request line -> ``(cmd, args)``; RequestError names the offending field."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(E_BAD_REQUEST, f"request is not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        req = json.loads(text)
    except RecursionError:
        raise RequestError(E_BAD_REQUEST, "malformed JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise RequestError(E_BAD_REQUEST, f"malformed JSON: {e.msg} at column {e.colno}") from None
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        raise RequestError(E_BAD_REQUEST, f"malformed JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError(E_BAD_REQUEST, f"request: expected a JSON object, got {_type_name(req)}")
    unknown = sorted(set(req) - {"cmd", "args", "version"})
    if unknown:
        raise RequestError(E_BAD_REQUEST, f"{unknown[0]}: unknown request field (known: cmd, args, version)")
    if "version" in req:
        v = req["version"]
        if not _is_kind(v, int):
            raise RequestError(E_BAD_REQUEST, f"version: expected integer, got {_type_name(v)}")
        if v != PROTOCOL_VERSION:
            raise RequestError(E_VERSION, f"version: protocol {v} is not supported (this daemon speaks {PROTOCOL_VERSION})")
    if "cmd" not in req:
        raise RequestError(E_BAD_REQUEST, "cmd: missing")
    cmd = req["cmd"]
    if not isinstance(cmd, str):
        raise RequestError(E_BAD_REQUEST, f"cmd: expected string, got {_type_name(cmd)}")
    args = req.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError(E_BAD_REQUEST, f"args: expected object, got {_type_name(args)}")
    return cmd, args


def check_args(cmd: str, args: Mapping[str, Any], specs: Mapping[str, ArgSpec]) -> None:
    """Raise RequestError naming ``args.<name>`` when an argument is unknown or mistyped."""
    for name, value in args.items():
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            raise RequestError(E_BAD_REQUEST, f"args.{name}: unknown argument for {cmd} (known: {known})")
        if not _is_kind(value, spec.kind):
            raise RequestError(
                E_BAD_REQUEST, f"args.{name}: expected {_JSON_TYPE_NAMES[spec.kind]}, got {_type_name(value)}"
            )
        if spec.minimum is not None and value < spec.minimum:
            raise RequestError(E_BAD_REQUEST, f"args.{name}: must be >= {spec.minimum}, got {value}")


def encode_response(response: Mapping[str, Any]) -> bytes:
    # allow_nan=False: NaN/Infinity are not JSON and would break strict clients.
    return json.dumps(response, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def error_response(code: str, message: str) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "ok": False, "code": code, "error": message}


def read_peer_groups(procfs_root: Path, pid: int, uid: int, gid: int) -> frozenset[int]:
    """Supplementary groups of ``pid`` from ``/proc/<pid>/status``.

    Empty when the process is gone or its effective ids no longer match what
    SO_PEERCRED reported (it exited and the pid was reused, or it changed identity):
    then only the primary gid from SO_PEERCRED counts, which never grants more.
    """
    try:
        text = (procfs_root / str(pid) / "status").read_text()
    except OSError:
        return frozenset()
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = rest.split()
    try:
        if int(fields["Uid"][1]) != uid or int(fields["Gid"][1]) != gid:
            return frozenset()
        return frozenset(int(g) for g in fields.get("Groups", []))
    except (KeyError, IndexError, ValueError):
        return frozenset()


def peer_credentials(conn: socket.socket, procfs_root: Path) -> Peer:
    """The kernel's word on who connected (``SO_PEERCRED``: pid, uid, gid)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid=pid, uid=uid, gid=gid, groups=read_peer_groups(procfs_root, pid, uid, gid))


def group_gid(name: str) -> int | None:
    """The gid of group ``name``, or None when the group does not exist."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


@dataclass
class _Conn:
    sock: socket.socket
    peer: Peer
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    closing: bool = False  # answer what is queued, then close
    eof: bool = False  # the peer will send nothing more
    events: int = 0  # what the selector currently watches


class ControlServer:
    """The control socket server; see the module docstring for the model.

    ``group_gid`` names the group whose members may run ``read_only_cmds``; root may
    run everything; anyone else is refused. The socket file is mode 0660 and owned by
    ``<daemon uid>:group_gid`` (the daemon runs as root).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: Handler,
        group_gid: int | None,
        read_only_cmds: tuple[str, ...] = READ_ONLY_COMMANDS,
        mutating_cmds: tuple[str, ...] = MUTATING_COMMANDS,
        *,
        command_args: Mapping[str, Mapping[str, ArgSpec]] = COMMAND_ARGS,
        read_timeout_s: float = READ_TIMEOUT_S,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        procfs_root: str | os.PathLike[str] = "/proc",
    ) -> None:
        both = set(read_only_cmds) & set(mutating_cmds)
        if both:
            raise ValueError(f"commands both read-only and mutating: {sorted(both)}")
        self.path = Path(path)
        self.handler = handler
        self.group_gid = group_gid
        self.read_only_cmds = tuple(read_only_cmds)
        self.mutating_cmds = tuple(mutating_cmds)
        self.command_args = command_args
        self.read_timeout_s = read_timeout_s
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self.procfs_root = Path(procfs_root)
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind, set mode and owner, listen, and serve in a background thread.

        Errors (path taken by a file or a live daemon, chown refused) raise
        ControlSocketError here, in the caller, not later in the thread.
        """
        if self._thread is not None:
            raise RuntimeError("control server already started")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            sock.bind(str(self.path))
            bound = True
            # Until listen() nobody can connect, so fixing the mode here leaves no window
            # in which the umask's looser mode could be used.
            os.chmod(self.path, 0o660)
            if self.group_gid is not None:
                os.chown(self.path, -1, self.group_gid)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(16)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            if bound:  # only a file we bound ourselves; a failed bind may mean another daemon's
                self.path.unlink(missing_ok=True)
            raise ControlSocketError(str(self.path), e.strerror or str(e)) from None
        self._listener = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="ailfmd-control", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s (group %s)", self.path, self.group_gid)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close every connection and remove the socket file."""
        if self._thread is None:
            return
        self._stop.set()
        assert self._wake_w is not None
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout_s)
        self._thread = None
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._listener = self._wake_r = self._wake_w = None
        self._unlink_own()

    def __enter__(self) -> "ControlServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _remove_stale(self) -> None:
        """Remove a socket file left by a killed daemon; never anything else."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(str(self.path), "exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            pass  # nobody listens: stale
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlSocketError(str(self.path), f"cannot probe existing socket: {e.strerror}") from None
        else:
            raise ControlSocketError(str(self.path), "another daemon is listening on it")
        finally:
            probe.close()
        log.info("removing stale control socket %s", self.path)
        self.path.unlink(missing_ok=True)

    def _unlink_own(self) -> None:
        # Only the file we bound: a newer daemon may have replaced it meanwhile.
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if self._inode is not None and (st.st_dev, st.st_ino) == self._inode and stat.S_ISSOCK(st.st_mode):
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ event loop

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._listener is not None and self._wake_r is not None
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                timeout = min((c.deadline for c in self._conns.values()), default=now + 60.0) - now
                for key, mask in sel.select(max(timeout, 0.0)):
                    if key.fileobj is self._listener:
                        self._accept(sel)
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        conn = self._conns.get(key.fd)
                        if conn is not None:
                            self._on_event(sel, conn, mask)
                self._expire(sel)
        except Exception:  # the loop itself must never die silently
            log.exception("control server loop failed")
        finally:
            for conn in list(self._conns.values()):
                self._close(sel, conn)
            sel.close()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            self._wake_r.recv(64)
        except OSError:
            pass

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._listener is not None
        while True:
            try:
                s, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving the others
                log.warning("control socket accept failed: %s", e)
                return
            s.setblocking(False)
            try:
                peer = peer_credentials(s, self.procfs_root)
            except OSError as e:
                log.warning("control socket: no peer credentials (%s); closing", e)
                s.close()
                continue
            conn = _Conn(sock=s, peer=peer, deadline=time.monotonic() + self.read_timeout_s)
            if len(self._conns) >= self.max_connections:
                conn.outbuf += encode_response(
                    error_response(E_BUSY, f"busy: {self.max_connections} connections open; try again")
                )
                conn.closing = True
            self._conns[s.fileno()] = conn
            self._update(sel, conn)

    def _on_event(self, sel: selectors.BaseSelector, conn: _Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ:
                self._read(conn)
            self._pump(conn)
        except OSError as e:  # peer reset or vanished: that connection only
            log.debug("control connection %s: %s", conn.peer.describe(), e)
            self._close(sel, conn)
            return
        self._update(sel, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            conn.eof = True  # complete lines already buffered are still answered
        elif not conn.closing:  # when closing, input is discarded until our answer is out
            conn.inbuf += data

    def _pump(self, conn: _Conn) -> None:
        """Answer complete lines, one at a time: the next only once the last is sent,
        so a client that never reads cannot make us buffer without bound."""
        while not conn.outbuf and not conn.closing:
            nl = conn.inbuf.find(b"\n")
            if nl > self.max_request_bytes or (nl < 0 and len(conn.inbuf) > self.max_request_bytes):
                # The framing is lost: answer once and hang up.
                self._reply(conn, error_response(E_TOO_LARGE, f"request larger than {self.max_request_bytes} bytes"))
                conn.inbuf.clear()
                conn.closing = True
                return
            if nl < 0:
                if conn.eof:
                    if conn.inbuf.strip():
                        self._reply(conn, error_response(E_BAD_REQUEST, "incomplete request: stream ended before newline"))
                    conn.inbuf.clear()
                    conn.closing = True
                return
            line = bytes(conn.inbuf[:nl]).strip()
            del conn.inbuf[: nl + 1]
            if not line:
                continue  # blank lines are harmless; they do not extend the deadline
            self._reply(conn, self._answer(conn.peer, line))
            conn.deadline = time.monotonic() + self.read_timeout_s

    def _reply(self, conn: _Conn, response: dict[str, Any]) -> None:
        try:
            conn.outbuf += encode_response(response)
        except (TypeError, ValueError) as e:
            log.error("control command produced a result that is not JSON: %s", e)
            conn.outbuf += encode_response(error_response(E_INTERNAL, f"internal error: result is not JSON ({e})"))
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            del conn.outbuf[:n]

    def _update(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        if conn.closing and not conn.outbuf:
            self._close(sel, conn)
            return
        events = 0
        # Stop reading once a full request's worth is buffered; the rest waits in the
        # kernel until the pending answers are sent.
        if not conn.eof and (conn.closing or len(conn.inbuf) <= self.max_request_bytes):
            events |= selectors.EVENT_READ
        if conn.outbuf:
            events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        if conn.events == 0:
            sel.register(conn.sock, events, None)
        elif events == 0:
            sel.unregister(conn.sock)
        else:
            sel.modify(conn.sock, events, None)
        conn.events = events

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            if not conn.outbuf and not conn.closing:
                # Best effort: tell the client why before hanging up.
                conn.outbuf += encode_response(
                    error_response(E_TIMEOUT, f"timeout: no complete request within {self.read_timeout_s:g} s")
                )
                try:
                    self._flush(conn)
                except OSError:
                    pass
            self._close(sel, conn)

    def _close(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        if conn.events:
            sel.unregister(conn.sock)
            conn.events = 0
        self._conns.pop(conn.sock.fileno(), None)
        try:
            # Tell the peer we are done sending before close, so it reads our last
            # answer even if it still had unread bytes on its way to us.
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.sock.close()

    # ------------------------------------------------------------------ requests

    def _answer(self, peer: Peer, line: bytes) -> dict[str, Any]:
        try:
            cmd, args = parse_request(line)
            self._authorize(peer, cmd)
            check_args(cmd, args, self.command_args.get(cmd, {}))
        except RequestError as e:
            return error_response(e.code, str(e))
        try:
            result = self.handler(cmd, args, peer)
        except CommandError as e:
            return error_response(E_FAILED, str(e))
        except Exception as e:  # a handler bug must not take the socket down
            log.exception("control command %r failed", cmd)
            return error_response(E_INTERNAL, f"internal error in {cmd}: {type(e).__name__}: {e}")
        if not isinstance(result, dict):
            log.error("control handler returned %s for %r", type(result).__name__, cmd)
            return error_response(E_INTERNAL, f"internal error in {cmd}: handler returned {type(result).__name__}")
        if cmd in self.mutating_cmds:
            log.info("control: %s by %s", cmd, peer.describe())
        return {"version": PROTOCOL_VERSION, "ok": True, "result": result}

    def _authorize(self, peer: Peer, cmd: str) -> None:
        if peer.uid != 0 and not peer.in_group(self.group_gid):
            # Say nothing about commands to a peer that may not use any.
            raise RequestError(
                E_PERMISSION,
                f"permission denied: {peer.describe()} is neither root nor in the control group"
                + (f" (gid {self.group_gid})" if self.group_gid is not None else " (none configured)"),
            )
        if cmd not in self.read_only_cmds and cmd not in self.mutating_cmds:
            known = ", ".join(self.read_only_cmds + self.mutating_cmds)
            raise RequestError(E_UNKNOWN_COMMAND, f"cmd: unknown command {cmd!r} (known: {known})")
        if cmd in self.mutating_cmds and peer.uid != 0:
            raise RequestError(E_PERMISSION, f"permission denied: {cmd} requires root")
