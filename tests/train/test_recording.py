"""Recordings survive crashes: torn tails are ignored and cut, corruption is named, never dropped."""

from __future__ import annotations

import json
import struct
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from childproc import start_child, stop_child

from ailfmd.train.recording import (
    MAGIC,
    RECORDING_FORMAT,
    Record,
    RecordingError,
    RecordWriter,
    read_header,
    read_records,
    record_as_json,
    render_summary,
    summarize,
)

HEADER = {"chip": "sim-8c", "policy": "oracle", "seed": 7}


def _step(i: int) -> tuple[dict, dict]:
    meta = {"i": i, "t_s": 0.25 * i, "note": f"step {i}", "nested": {"ok": True, "list": [1, 2.5, None]}}
    arrays = {
        "obs": np.arange(12, dtype=np.float32).reshape(3, 4) + i,
        "action": np.array([i, -i, 2**40], dtype=np.int64),
        "mask": np.array([True, False, i % 2 == 0]),
    }
    return meta, arrays


def _write_sample(path: Path, steps: int = 3) -> list[int]:
    """A run header, ``steps`` steps and an end record; returns the offsets."""
    with RecordWriter(path, HEADER) as w:
        offsets = [w.append("run", {"episode": 0})]
        for i in range(steps):
            offsets.append(w.append("step", *_step(i)))
        offsets.append(w.append("end", {"reward": -1.5}))
    return offsets


def _assert_sample(records: list[Record], steps: int = 3) -> None:
    assert [r.kind for r in records] == ["run", *["step"] * steps, "end"]
    for i, r in enumerate(records[1:-1]):
        meta, arrays = _step(i)
        assert r.meta == meta
        assert set(r.arrays) == set(arrays)
        for name, want in arrays.items():
            assert r.arrays[name].dtype == want.dtype
            np.testing.assert_array_equal(r.arrays[name], want)


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.rec"
    offsets = _write_sample(path)
    assert path.read_bytes().startswith(MAGIC)
    assert read_header(path) == {"format": RECORDING_FORMAT, **HEADER}
    records = list(read_records(path, strict=True))
    _assert_sample(records)
    assert [r.offset for r in records] == offsets
    assert records[-1].meta == {"reward": -1.5} and records[-1].arrays == {}
    records[1].arrays["obs"][0, 0] = 99.0  # arrays are writable copies


def test_edge_arrays_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "edge.rec"
    arrays = {
        "big_endian": np.arange(5, dtype=">f8"),
        "scalar": np.float16(1.5),
        "empty": np.zeros((0, 3), dtype=np.int16),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.uint8).reshape(2, 3)),
        "strided": np.arange(10, dtype=np.int32)[::3],
        "int8": np.array([-128, 127], dtype=np.int8),
    }
    with RecordWriter(path) as w:
        w.append("step", {"loss": np.float32(0.5), "n": np.int64(3)}, arrays)
    (rec,) = read_records(path)
    assert read_header(path) == {"format": RECORDING_FORMAT}
    assert rec.meta == {"loss": 0.5, "n": 3}
    for name, want in arrays.items():
        got = rec.arrays[name]
        assert got.shape == np.shape(want) and got.dtype.name == np.asarray(want).dtype.name
        assert got.dtype.isnative
        np.testing.assert_array_equal(got, want)


def test_reopen_and_append_keeps_old_records(tmp_path: Path) -> None:
    path = tmp_path / "run.rec"
    _write_sample(path)
    for header in (HEADER, None):
        with RecordWriter(path, header) as w:
            assert w.repaired_bytes == 0 and w.size == path.stat().st_size
            at = w.append("run", {"episode": 1}, {"x": np.ones(2, np.float64)})
            assert at < w.size == path.stat().st_size  # the next record goes at the end
    records = list(read_records(path))
    _assert_sample(records[:5])
    assert [r.meta for r in records[5:]] == [{"episode": 1}, {"episode": 1}]
    assert summarize(path).by_kind == {"run": 3, "step": 3, "end": 1}


def test_torn_tail_at_every_cut_point(tmp_path: Path) -> None:
    full = tmp_path / "full.rec"
    offsets = _write_sample(full, steps=2)
    data = full.read_bytes()
    last = offsets[-1]
    for cut in range(last + 1, len(data)):
        path = tmp_path / f"cut{cut}.rec"
        path.write_bytes(data[:cut])
        assert [r.kind for r in read_records(path)] == ["run", "step", "step"], cut
        with pytest.raises(RecordingError, match=f"byte {last}"):
            list(read_records(path, strict=True))
        s = summarize(path)
        assert (s.records, s.torn_tail_bytes, s.bytes) == (3, cut - last, cut)
        with RecordWriter(path, HEADER) as w:
            assert w.repaired_bytes == cut - last
            assert w.append("end", {"reward": -1.5}) == last
        assert path.read_bytes() == data
        _assert_sample(list(read_records(path, strict=True)), steps=2)


@pytest.mark.parametrize("where", ["tag", "length", "crc", "payload", "last_byte"])
def test_damaged_last_record_is_a_torn_tail(tmp_path: Path, where: str) -> None:
    path = tmp_path / "run.rec"
    offsets = _write_sample(path, steps=1)
    data = bytearray(path.read_bytes())
    pos = {"tag": 0, "length": 3, "crc": 7, "payload": 20}.get(where, len(data) - 1 - offsets[-1])
    data[offsets[-1] + pos] ^= 0x01
    path.write_bytes(bytes(data))
    assert [r.kind for r in read_records(path)] == ["run", "step"]
    assert summarize(path).torn_tail_bytes == len(data) - offsets[-1]
    with RecordWriter(path) as w:
        assert w.repaired_bytes == len(data) - offsets[-1]
        w.append("end")
    assert [r.kind for r in read_records(path, strict=True)] == ["run", "step", "end"]


@pytest.mark.parametrize("where", ["tag", "length", "crc", "head", "array_data"])
def test_damaged_middle_record_is_corruption(tmp_path: Path, where: str) -> None:
    path = tmp_path / "run.rec"
    offsets = _write_sample(path)
    mid = offsets[2]
    data = bytearray(path.read_bytes())
    pos = {"tag": 1, "length": 2, "crc": 8, "head": 20, "array_data": offsets[3] - offsets[2] - 3}[where]
    data[mid + pos] ^= 0x40
    path.write_bytes(bytes(data))
    for action in (
        lambda: list(read_records(path)),
        lambda: list(read_records(path, strict=True)),
        lambda: summarize(path),
        lambda: RecordWriter(path),
    ):
        with pytest.raises(RecordingError) as err:
            action()
        assert str(path) in str(err.value) and f"byte {mid}" in str(err.value)
    assert path.read_bytes() == bytes(data)  # the writer never cut it
    records = read_records(path)
    assert [next(records).kind, next(records).kind] == ["run", "step"]  # records before it still read


def test_oversized_length_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "run.rec"
    _write_sample(path, steps=1)
    end = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"RC" + struct.pack("<II", (1 << 30) + 1, 0) + b"x" * 10)
    with pytest.raises(RecordingError, match=f"{path}.*byte {end}"):
        list(read_records(path))
    with pytest.raises(RecordingError, match=f"byte {end}"):
        RecordWriter(path)


@pytest.mark.parametrize("content", [b"NOTAREC!" + b"\0" * 40, b"AILF", b"AILFMREC"])
def test_bad_magic_or_missing_header(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.rec"
    path.write_bytes(content)
    for action in (lambda: read_header(path), lambda: list(read_records(path)), lambda: summarize(path),
                   lambda: RecordWriter(path)):
        with pytest.raises(RecordingError, match=str(path)):
            action()
    assert path.read_bytes() == content


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="nope.rec"):
        read_header(tmp_path / "nope.rec")
    empty = tmp_path / "empty.rec"
    empty.touch()
    with pytest.raises(RecordingError, match="empty.rec.*empty"):
        summarize(empty)
    with RecordWriter(empty, HEADER) as w:  # its creator died before writing: start afresh
        w.append("run")
    assert read_header(empty)["chip"] == "sim-8c"


def test_other_format_version_refused(tmp_path: Path) -> None:
    path = tmp_path / "v2.rec"
    _write_sample(path, steps=0)
    data = path.read_bytes().replace(b"ailfm.recording/1", b"ailfm.recording/2")
    payload_start = len(MAGIC) + 10
    (length,) = struct.unpack_from("<I", data, len(MAGIC) + 2)
    crc = zlib.crc32(data[payload_start : payload_start + length])
    path.write_bytes(data[: len(MAGIC) + 6] + struct.pack("<I", crc) + data[payload_start:])
    with pytest.raises(RecordingError, match="ailfm.recording/2"):
        read_header(path)


def test_header_mismatch_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "run.rec"
    _write_sample(path, steps=1)
    before = path.read_bytes()
    with pytest.raises(RecordingError, match=f"{path}.*seed"):
        RecordWriter(path, {**HEADER, "seed": 8})
    with pytest.raises(RecordingError, match="extra"):
        RecordWriter(path, {**HEADER, "extra": 1})
    with pytest.raises(RecordingError, match="format"):
        RecordWriter(path, {**HEADER, "format": RECORDING_FORMAT})
    with RecordWriter(path, dict(reversed(list(HEADER.items())))):  # key order does not matter
        pass
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "value, dtype",
    [
        (np.array([1 + 2j]), "complex128"),
        (np.array(["a", "b"]), "<U1"),
        (np.array([object()], dtype=object), "object"),
        (np.array([1], dtype=np.uint16), "uint16"),
    ],
)
def test_disallowed_dtype(tmp_path: Path, value: np.ndarray, dtype: str) -> None:
    path = tmp_path / "run.rec"
    with RecordWriter(path) as w:
        size = path.stat().st_size
        with pytest.raises(RecordingError, match=f"{path}.*'weird'.*{dtype}"):
            w.append("step", {}, {"fine": np.zeros(2, np.float32), "weird": value})
        w.append("step", {}, {"fine": np.zeros(2, np.float32)})  # the writer is still usable
    assert path.stat().st_size > size
    assert len(list(read_records(path, strict=True))) == 1


@pytest.mark.parametrize(
    "meta, key",
    [
        ({"ok": 1, "loss": float("nan")}, "loss"),
        ({"stats": {"max": float("inf")}}, "stats.max"),
        ({"hist": [1.0, np.float32("-inf")]}, r"hist\[1\]"),
        ({"when": object()}, "when"),
    ],
)
def test_bad_meta_names_the_key(tmp_path: Path, meta: dict, key: str) -> None:
    path = tmp_path / "run.rec"
    with RecordWriter(path) as w:
        size = path.stat().st_size
        with pytest.raises(RecordingError, match=f"{path}.*{key}"):
            w.append("step", meta)
    assert path.stat().st_size == size  # nothing was written
    with pytest.raises(RecordingError, match="seed"):
        RecordWriter(tmp_path / "new.rec", {"seed": float("nan")})


def test_second_writer_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.rec"
    with RecordWriter(path) as w:
        with pytest.raises(RecordingError, match="another writer"):
            RecordWriter(path)
        w.append("run")
    with RecordWriter(path) as w:  # the lock went with the first writer
        w.append("end")
    assert [r.kind for r in read_records(path)] == ["run", "end"]


def test_closed_writer(tmp_path: Path) -> None:
    w = RecordWriter(tmp_path / "run.rec")
    w.close()
    w.close()  # idempotent
    with pytest.raises(RecordingError, match="closed"):
        w.append("step")


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from ailfmd.train.recording import RecordWriter, read_records
    path = sys.argv[1]
    try:
        i = sum(r.kind == "step" for r in read_records(path))
    except Exception:
        i = 0
    w = RecordWriter(path, {"experiment": "sigkill"})
    print("ready", w.repaired_bytes, flush=True)
    while True:
        w.append("step", {"i": i}, {"obs": np.full(60_000, i, np.float32), "i": np.array([i], np.int64)})
        if i % 16 == 0:
            w.flush(sync=False)
        i += 1
    """
)


def test_sigkill_mid_append_leaves_a_readable_continuable_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.rec"
    torn_seen = []
    for delay_s in (0.05, 0.11, 0.17, 0.23):
        proc, words = start_child(KILLED_WRITER, str(path))
        assert words[0] == "ready"
        time.sleep(delay_s)
        stop_child(proc)  # SIGKILL, whatever it is doing
        s = summarize(path)
        torn_seen.append(s.torn_tail_bytes)
        steps = list(read_records(path))
        assert [r.meta["i"] for r in steps] == list(range(len(steps)))
        for r in steps:
            assert r.arrays["obs"].shape == (60_000,) and np.all(r.arrays["obs"] == r.meta["i"])
            assert r.arrays["i"].tolist() == [r.meta["i"]]
    with RecordWriter(path, {"experiment": "sigkill"}) as w:
        assert w.repaired_bytes == torn_seen[-1]
        w.append("end", {"steps": len(steps)})
    records = list(read_records(path, strict=True))
    assert len(records) == len(steps) + 1 and records[-1].kind == "end"


def test_render_summary_and_record_as_json(tmp_path: Path) -> None:
    path = tmp_path / "run.rec"
    _write_sample(path)
    with open(path, "ab") as f:
        f.write(b"RC\x10\x00")  # a torn tail
    s = summarize(path)
    assert s.header == {"format": RECORDING_FORMAT, **HEADER}
    assert (s.records, s.by_kind, s.torn_tail_bytes) == (5, {"run": 1, "step": 3, "end": 1}, 4)
    assert s.array_shapes == {"obs": [3, 4], "action": [3], "mask": [3]}
    text = render_summary(s)
    for needed in (str(path), RECORDING_FORMAT, "sim-8c", "run", "step", "end", "[3, 4]", "obs", "torn tail", "4 bytes"):
        assert needed in text, needed

    rec = list(read_records(path))[1]
    dumped = record_as_json(rec, max_values=5)
    json.dumps(dumped, allow_nan=False)
    assert dumped["kind"] == "step" and dumped["offset"] == rec.offset and dumped["meta"]["i"] == 0
    assert dumped["arrays"]["obs"] == {"dtype": "float32", "shape": [3, 4], "size": 12, "values": [0.0, 1.0, 2.0, 3.0, 4.0]}
    assert dumped["arrays"]["mask"]["values"] == [True, False, True]
    odd = Record("step", {}, {"x": np.array([np.nan, np.inf, 1.0])})
    assert record_as_json(odd)["arrays"]["x"]["values"] == ["nan", "inf", 1.0]


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_corruption_found_across_read_chunks(tmp_path: Path, delta: int) -> None:
    # The search for an intact record after a damaged one reads 1 MiB chunks starting just
    # after the damage; with delta 0 the next record's tag straddles two chunks.
    def write(path: Path, pad: int) -> tuple[int, int]:
        with RecordWriter(path) as w:
            w.append("run")
            damaged = w.append("step", {}, {"pad": np.zeros(pad, np.uint8)})
            return damaged, w.append("end")

    damaged, after = write(tmp_path / "probe.rec", 1_040_000)
    path = tmp_path / "big.rec"
    damaged, after = write(path, 1_040_000 + (1 << 20) + delta - (after - damaged))
    assert after - damaged == (1 << 20) + delta
    with open(path, "r+b") as f:
        f.seek(damaged + 100)
        f.write(b"\xff")
    with pytest.raises(RecordingError, match=f"byte {damaged} .*byte {after}"):
        summarize(path)


def test_reader_survives_a_writer_cutting_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "run.rec"
    _write_sample(path)
    with open(path, "ab") as f:  # a record of 4 MiB of which 3 MiB made it to disk
        f.write(b"RC" + struct.pack("<II", 4 << 20, 0) + bytes(3 << 20))
    reader = read_records(path)
    first = next(reader)
    with RecordWriter(path) as w:
        assert w.repaired_bytes == 10 + (3 << 20)
    assert [first.kind, *(r.kind for r in reader)] == ["run", "step", "step", "step", "end"]
