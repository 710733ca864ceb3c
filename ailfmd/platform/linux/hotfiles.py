"""Keep hot sysfs/procfs files open and re-read them with ``os.pread``.

A sensor sweep touches hundreds of files every epoch; opening each one costs a path
walk and a file object. kernfs regenerates a sysfs attribute on every read at offset 0,
so one open descriptor serves for the life of the file.
"""

from __future__ import annotations

import errno
import os

from ailfmd.errors import SysfsError
from ailfmd.platform.linux.sysfs import Root


class HotFiles:
    """A cache of read-only descriptors under one root."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self._fds: dict[str, int] = {}
        # Files found missing stay missing until close(): sysfs attributes appear only
        # with a device, and a new device means re-discovery, which starts afresh.
        self._missing: set[str] = set()

    def _fd(self, rel: str) -> int:
        fd = self._fds.get(rel)
        if fd is None:
            if rel in self._missing:
                raise SysfsError(rel, "missing")
            try:
                fd = os.open(self.root.join(rel), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._missing.add(rel)
                raise SysfsError(rel, "missing") from None
            except PermissionError:
                raise SysfsError(rel, "permission denied") from None
            except OSError as e:
                raise SysfsError(rel, f"open failed: {errno.errorcode.get(e.errno or 0, e)}") from None
            self._fds[rel] = fd
        return fd

    def read_str(self, rel: str) -> str:
        fd = self._fd(rel)
        try:
            raw = os.pread(fd, 4096, 0)
        except IsADirectoryError:
            self.forget(rel)
            raise SysfsError(rel, "is a directory") from None
        except OSError as e:
            # ENODATA (firmware has no reading yet), EIO, EAGAIN: no value this time.
            # ENODEV/ESTALE: the device went away; reopen on the next read.
            if e.errno in (errno.ENODEV, errno.ESTALE, errno.ENOENT):
                self.forget(rel)
            raise SysfsError(rel, f"read failed: {errno.errorcode.get(e.errno or 0, e)}") from None
        try:
            return raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise SysfsError(rel, "not text") from None

    def read_int(self, rel: str) -> int:
        fd = self._fd(rel)
        try:
            # Fast path: int() takes the raw bytes, newline included.
            return int(os.pread(fd, 64, 0))
        except (OSError, ValueError):
            pass  # the slow path below names the reason
        text = self.read_str(rel)
        if not text:
            raise SysfsError(rel, "empty")
        try:
            return int(text)
        except ValueError:
            raise SysfsError(rel, f"not an integer: {text[:40]!r}") from None

    def forget(self, rel: str) -> None:
        fd = self._fds.pop(rel, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._missing.clear()

    def __del__(self) -> None:
        # Last resort, like a file object: an owner that forgot close() must not leak
        # hundreds of descriptors.
        if getattr(self, "_fds", None):
            self.close()


class IntBank:
    """A fixed set of integer files read together each epoch, as fast as Python allows.

    The raw bytes of all files are compared with the previous read in one step and
    parsed only when they differ; ``int()`` parses raw bytes directly (it accepts the
    trailing newline). The reason for a failure is worked out only when one happens.
    """

    def __init__(self, hot: HotFiles, rels: list[str]) -> None:
        self.hot = hot
        self.rels = list(rels)
        self._fds: list[int] = []
        for rel in self.rels:
            try:
                self._fds.append(hot._fd(rel))
            except SysfsError:
                self._fds.append(-1)
        self._clean = all(fd >= 0 for fd in self._fds)  # the last read had no failure
        # The last clean read: raw contents and their values.
        self._raw: list[bytes] | None = None
        self._values: list[int] = []

    def read(self) -> tuple[list[int | None], dict[int, str]]:
        """(values, {index: reason}) with None at the failed indexes; a new list each call."""
        if self._clean:
            pread = os.pread
            try:
                raw = [pread(fd, 64, 0) for fd in self._fds]
                if raw != self._raw:
                    self._values = [int(r) for r in raw]
                    self._raw = raw
                return list(self._values), {}
            except (OSError, ValueError):
                self._raw = None  # read them one by one below, each failure with its reason
        values: list[int | None] = []
        errors: dict[int, str] = {}
        pread = os.pread
        for i, fd in enumerate(self._fds):
            try:
                values.append(int(pread(fd, 64, 0)))
            except (OSError, ValueError):
                values.append(None)
                errors[i] = self._why(i)
        self._clean = not errors
        return values, errors

    def _why(self, i: int) -> str:
        rel = self.rels[i]
        if self._fds[i] < 0:
            try:
                self._fds[i] = self.hot._fd(rel)  # it may have appeared since
            except SysfsError as e:
                return e.reason
        try:
            self.hot.read_int(rel)
        except SysfsError as e:
            return e.reason
        finally:
            # Another reader of the same file may have made HotFiles drop and reopen it.
            self._fds[i] = self.hot._fds.get(rel, -1)
        return "value changed while reading"
