"""Errors ailfmd raises. Each names the thing it is about (file, key, value, thread)."""

from __future__ import annotations


class AilfmError(Exception):
    """Base of every error ailfmd raises on purpose."""

    def __reduce__(self) -> tuple[object, ...]:
        # Subclasses build their message from their own arguments; the default pickling
        # calls the constructor with the message alone and fails, so an error raised in
        # a worker process (bench, training) would reach the parent as a broken pool
        # instead of the error that names the file. Rebuild from message and attributes.
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))


def _rebuild_error(cls: type[AilfmError], args: tuple[object, ...], state: dict[str, object]) -> AilfmError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class SysfsError(AilfmError):
    """A sysfs/procfs file could not be read or parsed."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class WriteRefused(AilfmError):
    """The kernel (or our own limits check) refused a write."""

    def __init__(self, path: str, value: str, reason: str) -> None:
        super().__init__(f"writing {value!r} to {path} refused: {reason}")
        self.path = path
        self.value = value
        self.reason = reason


class NoSuchThread(AilfmError):
    """The thread is gone (ESRCH), a normal event for managed threads."""

    def __init__(self, tid: int, detail: str = "") -> None:
        super().__init__(f"thread {tid} is gone" + (f" ({detail})" if detail else ""))
        self.tid = tid


class ThreadReused(AilfmError):
    """The tid now belongs to another thread (start time differs)."""

    def __init__(self, tid: int, expected_start: int, found_start: int) -> None:
        super().__init__(
            f"thread {tid} was reused: start time {found_start} != expected {expected_start}"
        )
        self.tid = tid


class ConfigError(AilfmError):
    """A configuration or data file is invalid; names file, key and value."""

    def __init__(self, source: str, key: str, value: object, reason: str) -> None:
        super().__init__(f"{source}: {key} = {value!r}: {reason}")
        self.source = source
        self.key = key
        self.value = value
        self.reason = reason


class JournalError(AilfmError):
    """The restore journal is unreadable; names the file and the line."""
