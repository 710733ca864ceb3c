"""The wheel built from pyproject.toml carries the code, the data files and the commands."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_has_data_and_entry_points_and_runs(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("ailfmd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        z.extractall(tmp_path / "site")
    for data in ("ailfmd/sim/chips/3d-64.toml", "ailfmd/sim/workloads/mixed.toml",
                 "ailfmd/sim/workloads/models/llama2-7b.toml"):
        assert data in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    for script in ("ailfmd = ailfmd.service.daemon:main", "ailfmctl = ailfmd.ctl.cli:main", "ailfm = ailfmd.lab.cli:main"):
        assert script in entry_points
    # The unpacked wheel alone (not this checkout) runs a simulation from its data files.
    run = subprocess.run(
        [sys.executable, "-c", "import sys, ailfmd; print(ailfmd.__file__); from ailfmd.lab.cli import main; "
         "sys.exit(main(['sim', '--chip', 'tiny', '--workload', 'tiny-test', '--duration', '1', '--json']))"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[0].startswith(str(tmp_path / "site"))  # not this checkout
    assert '"peak_temp_c"' in run.stdout
