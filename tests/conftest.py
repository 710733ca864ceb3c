"""Shared fixtures: sysfs trees of real machine layouts, unpacked so tests may write."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def extract(tarball: Path, dest: Path) -> Path:
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="tar")
    return dest / "sys"


@pytest.fixture(scope="session")
def node_exporter_sys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """node_exporter's real sysfs fixture, unpacked (read-only use)."""
    return extract(FIXTURES / "node-exporter" / "sys.tar.gz", tmp_path_factory.mktemp("node-exporter"))


@pytest.fixture(scope="session")
def machine_sys(tmp_path_factory: pytest.TempPathFactory):
    """The sysfs root of a committed machine (tests/fixtures/<name>/sys.tar.gz), read-only use."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = extract(FIXTURES / name / "sys.tar.gz", tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture
def machine_copy(tmp_path: Path):
    """A private, writable copy of a committed machine's sysfs tree."""

    def copy(name: str) -> Path:
        return extract(FIXTURES / name / "sys.tar.gz", tmp_path / name)

    return copy
