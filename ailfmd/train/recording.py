"""Recorded training runs: an append-only, crash-safe, inspectable file of records.

A recording outlives the process writing it (a simulator run, a DAgger round on a real
machine), so it is framed for crashes: every record carries its length and a CRC, and a
process killed mid-append leaves at worst an incomplete *last* record. Readers stop before
it; the next writer cuts it off and carries on. A damaged record followed by an intact one
cannot come from a crash, so it is reported as corruption and never silently dropped.
numpy only, no pickle: loading a recording must not run code. Layout (docs/recording.md):

    file    = b"AILFMREC" record*                  (the first record has kind "header")
    record  = b"RC" u32le(len) u32le(crc32(payload)) payload
    payload = u32le(len(head)) head(JSON, UTF-8) array-bytes(little-endian, C order)
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ailfmd.errors import AilfmError

RECORDING_FORMAT = "ailfm.recording/1"
MAGIC = b"AILFMREC"
TAG = b"RC"
MAX_PAYLOAD_BYTES = 1 << 30  # a larger length is a damaged length field, not a record
ALLOWED_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")
_FRAME = struct.Struct("<2sII")  # tag, payload length, crc32 of the payload
_U32 = struct.Struct("<I")


class RecordingError(AilfmError):
    """A recording is unreadable or a record cannot be written; names file and offset/key."""


@dataclass(frozen=True, eq=False)  # eq=False: == on numpy arrays is ambiguous
class Record:
    kind: str  # "run" (episode header), "step", "end", ...
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    offset: int = 0  # byte offset of the record's frame in the file


@dataclass(frozen=True)
class RecordingSummary:
    path: str
    header: dict[str, Any]
    records: int  # not counting the header record
    by_kind: dict[str, int]  # in order of first appearance
    bytes: int
    torn_tail_bytes: int
    array_shapes: dict[str, list[int]]  # of the first "step" record


def _bad_key(value: Any, path: str = "") -> str | None:
    """Where in ``value`` json.dumps(allow_nan=False) fails, as a key path ("stats.max", "hist[1]")."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, (dict, list, tuple)):
        named = isinstance(value, dict)
        for k, v in value.items() if named else enumerate(value):
            key = (f"{path}.{k}" if path else str(k)) if named else f"{path}[{k}]"
            bad_k = named and not isinstance(k, (str, int, float, bool, type(None)))
            if found := key if bad_k else _bad_key(v, key):
                return found
        return None
    ok = isinstance(value, (str, int, type(None))) or (isinstance(value, float) and math.isfinite(value))
    return None if ok else path


def _json_bytes(head: dict[str, Any], where: str) -> bytes:
    try:  # numpy scalars (an np.float32 loss, ...) are stored as the Python number they equal
        return json.dumps(head, allow_nan=False, separators=(",", ":"), default=np.generic.item).encode()
    except (TypeError, ValueError) as e:
        raise RecordingError(f"{where}: meta key {_bad_key(head['meta'])!r} is not JSON-serialisable: {e}") from None


def _encode(kind: str, meta: dict[str, Any], arrays: dict[str, Any], where: str) -> bytes:
    """One whole record (frame + payload), so that it goes out in a single write()."""
    if not isinstance(meta, dict):
        raise RecordingError(f"{where}: meta must be a dict, not {type(meta).__name__}")
    specs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, value in arrays.items():
        arr = np.asarray(value)
        if not isinstance(name, str) or arr.dtype.name not in ALLOWED_DTYPES:
            raise RecordingError(f"{where}: array {name!r} has dtype {arr.dtype}; allowed: {', '.join(ALLOWED_DTYPES)}")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        specs.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                      "offset": sum(map(len, chunks)), "nbytes": len(data)})
        chunks.append(data)
    head = _json_bytes({"kind": kind, "meta": meta, "arrays": specs}, where)
    payload = b"".join([_U32.pack(len(head)), head, *chunks])
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RecordingError(f"{where}: record of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return _FRAME.pack(TAG, len(payload), zlib.crc32(payload)) + payload


def _head(payload: bytes, where: str) -> tuple[dict[str, Any], int]:
    """The JSON head and where the array data starts, checked so decoding stays in bounds."""
    try:
        (n,) = _U32.unpack_from(payload, 0)
        head = json.loads(payload[4 : 4 + n]) if 4 + n <= len(payload) else None
        if not (isinstance(head, dict) and isinstance(head.get("kind"), str) and isinstance(head.get("meta"), dict)):
            raise ValueError("no kind/meta")
        for a in head["arrays"]:
            ints = [a["offset"], a["nbytes"], *a["shape"]] if isinstance(a["shape"], list) else [-1]
            if not isinstance(a["name"], str) or a["dtype"] not in ALLOWED_DTYPES or min(ints, default=0) < 0 \
                    or not all(type(v) is int for v in ints):
                raise ValueError(f"array {a['name']!r}: bad name/dtype/shape/offset")
            if a["nbytes"] != math.prod(a["shape"]) * np.dtype(a["dtype"]).itemsize \
                    or a["offset"] + a["nbytes"] > len(payload) - 4 - n:
                raise ValueError(f"array {a['name']!r}: size does not match shape, or bytes outside the payload")
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise RecordingError(f"{where}: unreadable record head: {e}") from None
    return head, 4 + n


@dataclass(frozen=True)
class _Source:
    """A recording open for reading, up to the size it had when opened. pread, not mmap: a
    writer may cut a torn tail meanwhile, and touching a mapping past the new end is SIGBUS."""

    fd: int
    size: int

    def read(self, off: int, n: int) -> bytes:
        return os.pread(self.fd, max(0, min(n, self.size - off)), off)

    def tags(self, start: int, chunk: int = 1 << 20) -> Iterator[int]:
        """Offsets of every TAG from ``start`` on; chunks overlap by a byte as a tag may straddle two."""
        for pos in range(start, self.size, chunk):
            buf = self.read(pos, chunk + 1)
            i = buf.find(TAG)
            while 0 <= i < chunk:
                yield pos + i
                i = buf.find(TAG, i + 1)


def _valid_payload(src: _Source, off: int) -> bytes | None:
    """The payload of an intact record framed at ``off``, else None."""
    frame = src.read(off, _FRAME.size)
    if len(frame) < _FRAME.size:
        return None
    tag, length, crc = _FRAME.unpack(frame)
    if tag != TAG or length > MAX_PAYLOAD_BYTES or off + _FRAME.size + length > src.size:
        return None
    payload = src.read(off + _FRAME.size, length)
    return payload if len(payload) == length and zlib.crc32(payload) == crc else None


@contextmanager
def _records(path: str | os.PathLike[str]) -> Iterator[tuple[str, _Source, dict[str, Any], Iterator[Any]]]:
    """(path, source, header meta, iterator of (index, offset, payload)): a torn tail ends
    the iterator with payload None; corruption anywhere raises."""
    p = os.fspath(path)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise RecordingError(f"{p}: cannot read: {e.strerror}") from None
    with f:
        src = _Source(f.fileno(), os.fstat(f.fileno()).st_size)
        if src.size == 0:
            raise RecordingError(f"{p}: empty file, not a recording")
        if (magic := src.read(0, len(MAGIC))) != MAGIC:
            raise RecordingError(f"{p}: not a recording (bad magic {magic!r})")
        if (payload := _valid_payload(src, len(MAGIC))) is None:
            raise RecordingError(f"{p}: header record at byte {len(MAGIC)} is missing or damaged")
        head, _ = _head(payload, f"{p}: header record at byte {len(MAGIC)}")
        if head["kind"] != "header" or head["meta"].get("format") != RECORDING_FORMAT:
            raise RecordingError(f"{p}: unsupported format {head['meta'].get('format')!r} (want {RECORDING_FORMAT})")
        yield p, src, head["meta"], _scan(src, p, len(MAGIC) + _FRAME.size + len(payload))


def _scan(src: _Source, p: str, off: int) -> Iterator[tuple[int, int, bytes | None]]:
    index = 1  # the header is record #0
    while (payload := _valid_payload(src, off)) is not None:
        yield index, off, payload
        index, off = index + 1, off + _FRAME.size + len(payload)
    if off == src.size:
        return
    frame = src.read(off, _FRAME.size)
    tag, length, _ = _FRAME.unpack(frame) if len(frame) == _FRAME.size else (b"", 0, 0)
    if tag == TAG and length > MAX_PAYLOAD_BYTES:  # the writer never writes one, so it is no torn tail
        raise RecordingError(f"{p}: corrupt record #{index} at byte {off}: length {length} exceeds {MAX_PAYLOAD_BYTES}")
    for pos in src.tags(off + 1):  # a crash damages only the end: an intact record further on is corruption
        if _valid_payload(src, pos) is not None:
            raise RecordingError(f"{p}: corrupt record #{index} at byte {off} (an intact record follows at byte {pos})")
    yield index, off, None


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header meta, including ``"format"``."""
    with _records(path) as (_, _, header, _):
        return header


def read_records(path: str | os.PathLike[str], *, strict: bool = False) -> Iterator[Record]:
    """Every complete record after the header. A torn tail ends iteration (raises if ``strict``)."""
    with _records(path) as (p, src, _, scan):
        for index, off, payload in scan:
            if payload is None:
                if strict:
                    raise RecordingError(f"{p}: record #{index} at byte {off} is torn ({src.size - off} bytes)")
                return
            head, start = _head(payload, f"{p}: record #{index} at byte {off}")
            arrays = {}
            for a in head["arrays"]:
                dtype, at = np.dtype(a["dtype"]), start + a["offset"]
                raw = np.frombuffer(memoryview(payload)[at : at + a["nbytes"]], dtype=dtype.newbyteorder("<"))
                arrays[a["name"]] = raw.astype(dtype).reshape(a["shape"])  # native byte order, writable copy
            yield Record(head["kind"], head["meta"], arrays, off)


def summarize(path: str | os.PathLike[str]) -> RecordingSummary:
    """Counts and shapes from the record heads alone: cheap even for large recordings."""
    by_kind: dict[str, int] = {}
    shapes: dict[str, list[int]] | None = None
    torn = 0
    with _records(path) as (p, src, header, scan):
        for index, off, payload in scan:
            if payload is None:
                torn = src.size - off
                break
            head, _ = _head(payload, f"{p}: record #{index} at byte {off}")
            by_kind[head["kind"]] = by_kind.get(head["kind"], 0) + 1
            if shapes is None and head["kind"] == "step":
                shapes = {a["name"]: list(a["shape"]) for a in head["arrays"]}
        return RecordingSummary(p, header, sum(by_kind.values()), by_kind, src.size, torn, shapes or {})


def render_summary(summary: RecordingSummary) -> str:
    """A short two-column table for ``ailfm inspect``."""
    s = summary
    rest = {k: v for k, v in s.header.items() if k != "format"}
    rows = [("file", s.path), ("format", str(s.header.get("format"))), ("header", json.dumps(rest, sort_keys=True)),
            ("size", f"{s.bytes} bytes"), ("records", str(s.records))]
    rows += [(f"  {kind}", str(n)) for kind, n in s.by_kind.items()]
    cut = " (ignored; the next writer cuts it)" if s.torn_tail_bytes else ""
    rows += [("torn tail", f"{s.torn_tail_bytes} bytes{cut}")]
    rows += [(f"step array {name}", str(shape)) for name, shape in s.array_shapes.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


def record_as_json(record: Record, max_values: int = 16) -> dict[str, Any]:
    """A JSON-able view of a record: arrays as dtype, shape, size and their first flat values."""
    arrays = {  # NaN/inf as the strings "nan"/"inf", so that the result is strict JSON
        name: {"dtype": a.dtype.name, "shape": list(a.shape), "size": int(a.size),
               "values": [v if not isinstance(v, float) or math.isfinite(v) else repr(v)
                          for v in a.reshape(-1)[:max_values].tolist()]}
        for name, a in record.arrays.items()
    }
    return {"kind": record.kind, "offset": record.offset, "meta": record.meta, "arrays": arrays}


class RecordWriter:
    """The one writer of a recording (flock'ed): creates it, or cuts a torn tail and appends."""

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any] | None = None) -> None:
        self.path = os.fspath(path)
        self.repaired_bytes = 0
        if header is not None and "format" in header:
            raise RecordingError(f"{self.path}: header key 'format' is reserved")
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RecordingError(f"{self.path}: cannot open for writing: {e.strerror}") from None
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RecordingError(f"{self.path}: another writer has it open") from None
            self._size = os.fstat(self._fd).st_size
            # An empty file is one whose creator died before its first write: start it afresh.
            self._create(header or {}) if self._size == 0 else self._resume(header)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def _create(self, header: dict[str, Any]) -> None:
        self._write(MAGIC + _encode("header", {"format": RECORDING_FORMAT, **header}, {}, f"{self.path}: header"))
        self.flush(sync=True)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)  # so that the file itself survives a power cut, not only its bytes
        finally:
            os.close(dfd)

    def _resume(self, header: dict[str, Any] | None) -> None:
        with _records(self.path) as (_, src, stored, scan):
            end = next((off for _, off, payload in scan if payload is None), src.size)
        if header is not None:
            given = json.loads(_json_bytes({"meta": header}, f"{self.path}: header"))["meta"]
            keys = (given.keys() | stored.keys()) - {"format"}
            diff = sorted(k for k in keys if given.get(k, ...) != stored.get(k, ...))
            if diff:
                raise RecordingError(f"{self.path}: header differs from the stored one in {', '.join(diff)}")
        if end < self._size:
            os.ftruncate(self._fd, end)  # type: ignore[arg-type]
            os.fsync(self._fd)  # type: ignore[arg-type]
            self.repaired_bytes, self._size = self._size - end, end

    def _write(self, blob: bytes) -> None:
        assert self._fd is not None
        try:
            done = os.write(self._fd, blob)
            while done < len(blob):  # only after a signal or on a nearly full disk
                done += os.write(self._fd, memoryview(blob)[done:])
        except OSError as e:
            try:  # end the file on a record boundary again, so that it stays appendable
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise RecordingError(f"{self.path}: write at byte {self._size} failed: {e.strerror}") from None
        self._size += len(blob)

    def append(self, kind: str, meta: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None) -> int:
        """Write one record with a single write(); returns its byte offset. Durable after flush()."""
        if self._fd is None:
            raise RecordingError(f"{self.path}: writer is closed")
        if not isinstance(kind, str) or not kind or kind == "header":
            raise RecordingError(f"{self.path}: invalid record kind {kind!r}")
        offset = self._size
        where = f"{self.path}: record {kind!r} at byte {offset}"
        self._write(_encode(kind, {} if meta is None else meta, arrays or {}, where))
        return offset

    @property
    def size(self) -> int:
        """The file's size in bytes: where the next record goes."""
        return self._size

    def flush(self, sync: bool = True) -> None:
        """Records are not buffered (one write() each), so this only fsyncs, when ``sync``."""
        if self._fd is not None and sync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.flush(sync=True)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
