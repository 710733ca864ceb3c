"""``ailfm sim`` as a user runs it: a subprocess, JSON out, clear errors with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ailfmd.sim.chip import CHIPS_DIR
from ailfmd.sim.workload import SHIPPED_DIR

METRIC_KEYS = {
    "duration_s", "requests_arrived", "requests_completed", "requests_in_flight",
    "mean_response_s", "p99_response_s", "output_tokens", "prefill_tokens",
    "output_tokens_per_s", "prefill_tokens_per_s", "peak_temp_c", "time_above_dtm_s",
    "time_above_dtm_fraction", "energy_j", "energy_per_output_token_j", "mean_freq_mhz",
    "mean_busy_freq_mhz", "dtm_throttle_events", "migrations",
}


def ailfm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ailfmd.lab.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_sim_json_reports_the_documented_metrics():
    r = ailfm("sim", "--chip", "tiny", "--workload", "tiny-test", "--policy", "linux",
              "--duration", "2", "--seed", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert METRIC_KEYS <= set(out)
    assert out["scenario"] == {"chip": "tiny", "workload": "tiny-test", "policy": "linux",
                               "seed": 3, "tick_s": 0.01, "epoch_s": 0.1}
    assert out["duration_s"] == 2.0
    assert out["requests_completed"] > 5 and out["mean_response_s"] > 0
    again = json.loads(ailfm("sim", "--chip", "tiny", "--workload", "tiny-test",
                             "--duration", "2", "--seed", "3", "--json").stdout)
    assert again == out  # deterministic


def test_sim_prints_a_human_table_from_files(tmp_path):
    chip = tmp_path / "my-chip.toml"
    chip.write_text((CHIPS_DIR / "tiny.toml").read_text())
    r = ailfm("sim", "--chip", str(chip), "--workload", str(SHIPPED_DIR / "tiny-trace.toml"),
              "--duration", "1", "--tick-ms", "5", "--epoch-ms", "50")
    assert r.returncode == 0, r.stderr
    for label in ("response", "tokens/s", "peak temp", "above DTM", "energy"):
        assert label in r.stdout
    assert "tick 5 ms" in r.stdout and "6 completed" in r.stdout


def test_bad_chip_file_names_file_key_and_value(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((CHIPS_DIR / "tiny.toml").read_text().replace("threshold_c = 80.0", "threshold_c = 30.0"))
    assert "threshold_c = 30.0" in bad.read_text()
    r = ailfm("sim", "--chip", str(bad), "--workload", "tiny-test", "--duration", "1")
    assert r.returncode == 2
    assert str(bad) in r.stderr and "dtm.threshold_c" in r.stderr and "30.0" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_workload_file_names_file_key_and_value(tmp_path):
    bad = tmp_path / "wl.toml"
    bad.write_text(Path(SHIPPED_DIR / "tiny-test.toml").read_text().replace("rate_per_s = 10.0",
                                                                             "rate_per_s = -1.0"))
    r = ailfm("sim", "--chip", "tiny", "--workload", str(bad), "--duration", "1")
    assert r.returncode == 2
    assert str(bad) in r.stderr and "arrivals.rate_per_s" in r.stderr and "-1.0" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_policy_and_missing_files_are_one_line_errors():
    r = ailfm("sim", "--chip", "tiny", "--workload", "tiny-test", "--duration", "1", "--policy", "magic")
    assert r.returncode == 2 and "unknown policy 'magic'" in r.stderr and "linux" in r.stderr
    r = ailfm("sim", "--chip", "no-such-chip", "--workload", "tiny-test", "--duration", "1")
    assert r.returncode == 2 and "no-such-chip" in r.stderr and "shipped chips" in r.stderr
    assert "Traceback" not in r.stderr
