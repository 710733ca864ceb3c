"""The committed fixture trees are exactly what tests/fixtures/machines.py builds.

Regenerate with ``python tests/fixtures/make_fixtures.py`` after changing a machine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

import machines  # noqa: E402
import make_fixtures  # noqa: E402


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every file (contents) and symlink (target) under ``root``, by relative path.

    Directories are implied by their entries.
    """
    out: dict[str, tuple[str, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", p.read_bytes())
    return out


def describe_diff(built: dict, committed: dict, limit: int = 10) -> str:
    lines = [f"missing from the committed tree: {k}" for k in sorted(built.keys() - committed.keys())]
    lines += [f"not produced by the builder: {k}" for k in sorted(committed.keys() - built.keys())]
    lines += [
        f"differs: {k}: built {built[k]!r}, committed {committed[k]!r}"
        for k in sorted(built.keys() & committed.keys())
        if built[k] != committed[k]
    ]
    more = f"\n... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more + "\nrun: python tests/fixtures/make_fixtures.py"


@pytest.mark.parametrize("name", sorted(machines.MACHINES))
def test_committed_tree_matches_builder(name: str, tmp_path: Path) -> None:
    make_fixtures.write_fixture(machines.MACHINES[name], tmp_path / "built")
    built_tar, committed_tar = tmp_path / "built" / name / "sys.tar.gz", FIXTURES / name / "sys.tar.gz"
    assert (tmp_path / "built" / name / "expected.json").read_text() == (FIXTURES / name / "expected.json").read_text()
    if built_tar.read_bytes() != committed_tar.read_bytes():
        built = snapshot(make_fixtures.extract_fixture(built_tar, tmp_path / "b"))
        committed = snapshot(make_fixtures.extract_fixture(committed_tar, tmp_path / "c"))
        assert built == committed, describe_diff(built, committed)
        pytest.fail("same files but the tarball differs: regenerate with make_fixtures.py")


@pytest.mark.parametrize("name", sorted(machines.MACHINES))
def test_every_symlink_resolves_inside_the_tree(name: str, tmp_path: Path) -> None:
    sys_root = make_fixtures.extract_fixture(FIXTURES / name / "sys.tar.gz", tmp_path).resolve()
    for rel, (kind, target) in snapshot(sys_root).items():
        if kind == "link":
            resolved = (sys_root / rel).resolve()
            assert resolved.exists(), f"{rel} -> {target} dangles"
            assert resolved.is_relative_to(sys_root), f"{rel} -> {target} leaves the tree"


@pytest.mark.parametrize("name", sorted(machines.MACHINES))
def test_expected_temperatures_cover_online_cpus(name: str) -> None:
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    assert sorted(map(int, expected["temperatures"])) == expected["online_cpus"]
    assert sorted(map(int, expected["cpus"])) == expected["online_cpus"]


def test_build_large_writes_a_consistent_tree(tmp_path: Path) -> None:
    sys_root = machines.build_large(tmp_path, 64, offline=(5,))
    cpu = sys_root / "devices/system/cpu"
    assert (cpu / "online").read_text() == "0-4,6-63\n"
    assert not (cpu / "cpu5/topology").exists()
    # CPUs are numbered like x86 Linux does: first threads, then their siblings.
    assert (cpu / "cpu37/topology/thread_siblings_list").read_text() == "37\n"
    chips = sorted((sys_root / "class/hwmon").iterdir())
    assert [(c / "name").read_text() for c in chips] == ["coretemp\n", "coretemp\n"]
    truth = machines.expected_truth(machines.large_machine(64, offline=(5,)))
    src = truth["temperatures"]["37"]["source"]
    label = sys_root / "devices/platform/coretemp.0/hwmon/hwmon0" / f"{src['sensor']}_label"
    assert label.read_text() == f"{src['label']}\n"


def test_build_large_sequential_coretemp_index_keeps_labels(tmp_path: Path) -> None:
    # Kernels 6.7-6.9 numbered coretemp inputs densely; labels still carry core ids.
    sys_root = machines.build_large(tmp_path, 32, sequential_coretemp_index=True)
    chip = sys_root / "devices/platform/coretemp.1/hwmon/hwmon1"
    indices = sorted(int(p.name[4:].split("_")[0]) for p in chip.glob("temp*_label"))
    assert indices == list(range(1, 10))
    core_ids = sorted(c.core_id for c in machines.large_machine(32).cpus if c.package_id == 1)[::2]
    assert core_ids != list(range(8))  # sparse, so the dense indices do not match core_id + 2
    assert (chip / "temp9_label").read_text() == f"Core {core_ids[-1]}\n"
