"""One seconds-long training shared by the trainer and runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ailfmd.train.dagger import QUICK, train


@pytest.fixture(scope="session")
def quick_training(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(output folder, evaluation summary) of ``ailfm train --quick``."""
    out = tmp_path_factory.mktemp("train") / "quick"
    summary = train(QUICK, out, jobs=1, progress=None)
    return out, summary
