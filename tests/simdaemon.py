"""A daemon configuration on the simulated chip, for tests that run the real Daemon."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ailfmd.service.config import DaemonConfig


def sim_config(tmp_path: Path, baseline: str = "linux", **sections: Any) -> DaemonConfig:
    """The built-in defaults on the simulated chip, with ``baseline`` deciding (``linux``
    as fallback), no metrics endpoint, run dir and control socket under ``tmp_path``;
    ``sections`` replace whole sections (``telemetry=TelemetrySettings(...)``)."""
    base = DaemonConfig()
    cfg = dataclasses.replace(
        base,
        daemon=dataclasses.replace(base.daemon, run_dir=tmp_path / "run"),
        platform=dataclasses.replace(base.platform, kind="sim"),
        policy=dataclasses.replace(base.policy, kind="baseline", baseline=baseline, fallback="linux"),
        metrics=dataclasses.replace(base.metrics, enabled=False),
        control=dataclasses.replace(base.control, socket=tmp_path / "c.sock"),
    )
    return dataclasses.replace(cfg, **sections)
