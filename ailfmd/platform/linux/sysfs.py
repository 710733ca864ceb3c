"""Small, rooted I/O helpers for sysfs and procfs (psutil's ``cat`` idiom).

Every path is relative to an injected root so tests run on fixture trees. Values come
back parsed or as a :class:`SysfsError` naming the file and the reason; callers decide
whether a failure skips a sensor or is fatal.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ailfmd.errors import SysfsError


class Root:
    """A filesystem root (``/sys``, ``/proc`` or a fixture tree)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r})"

    def join(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")

    def rel(self, p: Path) -> str:
        """Path relative to the root, for messages and journal entries."""
        try:
            return str(p.relative_to(self.path))
        except ValueError:
            return str(p)

    def exists(self, rel: str) -> bool:
        return self.join(rel).exists()

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.join(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise SysfsError(rel, os.strerror(e.errno or 0) or str(e)) from None

    def read_str(self, rel: str) -> str:
        """The file's content, stripped. Raises SysfsError with the reason."""
        p = self.join(rel)
        try:
            with open(p, "rb") as f:
                raw = f.read(65536)
        except FileNotFoundError:
            raise SysfsError(rel, "missing") from None
        except IsADirectoryError:
            raise SysfsError(rel, "is a directory") from None
        except PermissionError:
            raise SysfsError(rel, "permission denied") from None
        except OSError as e:
            # ENODATA from a thermal zone whose firmware has no reading, EIO from a
            # sensor that timed out, EAGAIN from some hwmon drivers: all "no value now".
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            raise SysfsError(rel, f"read failed: {name}") from None
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise SysfsError(rel, "not text") from None
        return text

    def read_int(self, rel: str) -> int:
        text = self.read_str(rel)
        if text == "":
            raise SysfsError(rel, "empty")
        try:
            return int(text)
        except ValueError:
            raise SysfsError(rel, f"not an integer: {text[:40]!r}") from None

    def read_opt_str(self, rel: str) -> str | None:
        try:
            return self.read_str(rel) or None
        except SysfsError:
            return None

    def read_opt_int(self, rel: str) -> int | None:
        try:
            return self.read_int(rel)
        except SysfsError:
            return None

    def write_str(self, rel: str, value: str) -> None:
        """Write one value the way sysfs wants it: one write() of the whole string."""
        p = self.join(rel)
        try:
            # O_TRUNC as a shell redirection does: ignored by sysfs, needed on fixture trees.
            fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
        except FileNotFoundError:
            raise SysfsError(rel, "missing") from None
        except PermissionError:
            raise SysfsError(rel, "permission denied") from None
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)


def parse_cpu_list(text: str, source: str = "cpu list") -> tuple[int, ...]:
    """Parse the kernel's cpulist format ("0-3,8,10-11"); raise ValueError naming the text."""
    text = text.strip()
    if not text:
        return ()
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo_s, _, hi_s = part.partition("-")
            try:
                lo, hi = int(lo_s), int(hi_s)
            except ValueError:
                raise ValueError(f"{source}: bad range {part!r}") from None
            if lo < 0 or hi < lo:
                raise ValueError(f"{source}: bad range {part!r}")
            out.extend(range(lo, hi + 1))
        else:
            try:
                v = int(part)
            except ValueError:
                raise ValueError(f"{source}: bad cpu {part!r}") from None
            if v < 0:
                raise ValueError(f"{source}: bad cpu {part!r}")
            out.append(v)
    return tuple(sorted(set(out)))


def format_cpu_list(cpus: "list[int] | tuple[int, ...] | frozenset[int] | set[int]") -> str:
    """Inverse of parse_cpu_list: (0,1,2,5) -> "0-2,5"."""
    s = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(parts)
