"""Errors cross process boundaries intact: workers of `ailfm bench` and `ailfm train`
raise them in another process."""

from __future__ import annotations

import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from ailfmd.errors import AilfmError, ConfigError, NoSuchThread, SysfsError, ThreadReused, WriteRefused
from ailfmd.policy.onnx_policy import OnnxPolicy, PolicyFileError

ERRORS = [
    SysfsError("/sys/x", "not a number"),
    WriteRefused("/sys/y", "100", "EINVAL"),
    NoSuchThread(12, "ESRCH"),
    ThreadReused(12, 1, 2),
    ConfigError("a.toml", "safety.limit_c", 200.0, "above 125"),
    PolicyFileError("p.onnx", "writable by group or others"),
]


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_survives_pickling_with_its_message_and_fields(err: AilfmError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.__dict__ == err.__dict__


def _load(path: str) -> None:
    OnnxPolicy(path, service=False)


def test_a_policy_refused_in_a_worker_reaches_the_parent_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    bad.chmod(0o644)
    with ProcessPoolExecutor(1) as pool:
        with pytest.raises(PolicyFileError, match="bad.onnx"):
            pool.submit(_load, str(bad)).result()
