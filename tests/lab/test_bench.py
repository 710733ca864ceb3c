"""``ailfm bench``: complete output, reproducible numbers, clear errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ailfmd.lab import bench
from ailfmd.lab.cli import main
from ailfmd.policy.baselines import baseline_names
from ailfmd.sim.metrics import RunMetrics
from dataclasses import fields


def ailfm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ailfmd.lab.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    base = tmp_path_factory.mktemp("bench")
    first = ailfm("bench", "--quick", "--out", str(base / "a"), "--jobs", "2")
    second = ailfm("bench", "--quick", "--out", str(base / "b"), "--jobs", "1")
    assert second.returncode == 0, second.stderr
    return base / "a", base / "b", first


def test_quick_writes_every_file_with_one_row_per_combination(quick_runs):
    out, _, proc = quick_runs
    assert proc.returncode == 0, proc.stderr
    assert "[" in proc.stderr and "/" in proc.stderr  # progress bar
    policies = set(baseline_names()) | {"oracle"}
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == len(policies)  # 1 chip x 1 workload x 1 seed
    assert {r["policy"] for r in rows} == policies
    metric_names = {f.name for f in fields(RunMetrics)}
    for r in rows:
        assert metric_names <= set(r)
        assert {"chip", "workload", "policy", "seed", "wall_s"} <= set(r)
        assert (r["chip"], r["workload"], r["seed"]) == ("tiny", "tiny-test", 0)
    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["policy"] for r in csv_rows] == [r["policy"] for r in rows]
    table = (out / "table.md").read_text()
    for p in policies:
        assert f"| {p} |" in table
    assert "**" in table
    assert proc.stdout == table
    oracle = next(r for r in rows if r["policy"] == "oracle")
    assert oracle["time_above_dtm_s"] == 0.0 and oracle["oracle_decision_ms"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in proc.stderr
    else:
        assert sorted(p.name for p in out.glob("*.png"))


def test_quick_is_reproducible_for_a_fixed_seed(quick_runs):
    a, b, _ = quick_runs
    rows_a = json.loads((a / "results.json").read_text())
    rows_b = json.loads((b / "results.json").read_text())
    assert bench.numeric_rows(rows_a) == bench.numeric_rows(rows_b)
    assert (a / "table.md").read_text() == (b / "table.md").read_text()
    assert (a / "traces.json").read_text() == (b / "traces.json").read_text()


def test_accepts_chip_and_workload_files_from_anywhere(tmp_path: Path, capsys):
    from ailfmd.sim.chip import CHIPS_DIR
    from ailfmd.sim.workload import SHIPPED_DIR

    chip = tmp_path / "mychip.toml"
    chip.write_text((CHIPS_DIR / "tiny.toml").read_text().replace('name = "tiny"', 'name = "mine"'))
    code = main(["bench", "--chips", str(chip), "--workloads", str(SHIPPED_DIR / "tiny-test.toml"),
                 "--policies", "linux", "--duration", "0.5", "--jobs", "1", "--out", str(tmp_path / "o")])
    assert code == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [(r["chip"], r["policy"]) for r in rows] == [("mine", "linux")]


@pytest.mark.parametrize("option", ["--chips", "--workloads"])
def test_bad_file_names_it_and_exits_2(tmp_path: Path, option: str):
    missing = tmp_path / "nope.toml"
    args = {"--chips": "tiny", "--workloads": "tiny-test", option: str(missing)}
    r = ailfm("bench", *[x for kv in args.items() for x in kv], "--duration", "1",
              "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "nope.toml" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_policy_lists_the_known_ones(tmp_path: Path, capsys):
    code = main(["bench", "--quick", "--policies", "linux,bogus", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "'bogus'" in err and "oracle" in err
