"""A real Prometheus server from Debian's `prometheus` package, scraping one target on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
JOB = "ailfmd-test"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """A real Prometheus scraping one target every second, on loopback."""

    def __init__(self, tmp_path: Path, target: str) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            f"scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = tmp_path / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )

    def query(self, promql: str) -> list[dict]:
        """The vector result of an instant query; [] while the server is not up yet."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = json.load(resp)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return []
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, want: dict[str, float], key: str = "cpu", timeout_s: float = 30.0) -> list[dict]:
        """Poll until the query returns exactly ``want`` (label ``key`` value -> sample value)."""
        deadline = time.monotonic() + timeout_s
        got: dict[str, float] = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            result = self.query(promql)
            got = {r["metric"].get(key, ""): float(r["value"][1]) for r in result}
            if got == want:
                return result
            time.sleep(0.5)
        pytest.fail(f"{promql}: wanted {want}, Prometheus has {got}; targets: {self.target_errors()}\n"
                    f"{self.log.read_text()[-2000:]}")

    def target_errors(self) -> list[str]:
        """Each scrape target's health and last error, for failure messages."""
        url = f"http://127.0.0.1:{self.port}/api/v1/targets"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = json.load(resp)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            return [f"targets API unreachable: {e}"]
        return [f"{t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in body["data"]["activeTargets"]]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


