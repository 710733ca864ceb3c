"""Shared fixtures: sysfs trees of real machine layouts, copied so tests may write."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def node_exporter_sys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """node_exporter's real sysfs fixture, unpacked (read-only use)."""
    dest = tmp_path_factory.mktemp("node-exporter")
    with tarfile.open(FIXTURES / "node-exporter" / "sys.tar.gz") as tar:
        tar.extractall(dest, filter="tar")
    return dest / "sys"


@pytest.fixture
def machine_copy(tmp_path: Path):
    """Copy a committed machine tree (tests/fixtures/<name>/sys) to a writable place."""

    def copy(name: str) -> Path:
        dest = tmp_path / name / "sys"
        shutil.copytree(FIXTURES / name / "sys", dest, symlinks=True)
        return dest

    return copy
