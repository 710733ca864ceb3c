"""Cost of one telemetry record: features of the observation and one appended record.

Run: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_telemetry.py [--epochs 400]``

Runs the daemon on the simulated ``3d-64`` chip (``mixed`` workload, the simulated clock
sped up so that requests arrive and threads are managed), keeps every epoch's record,
then times ``TelemetryRecorder.add`` on each (``every_epochs`` = 1, so every call
builds the features and appends a record). Prints the median and p99 per record, the
managed threads and the bytes per record.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ailfmd.control.records import TickRecord  # noqa: E402
from ailfmd.service.config import DaemonConfig, TelemetrySettings  # noqa: E402
from ailfmd.service.daemon import Daemon  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=400)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ailfm-telemetry-"))
    base = DaemonConfig()
    cfg = dataclasses.replace(
        base,
        daemon=dataclasses.replace(base.daemon, run_dir=tmp / "run"),
        platform=dataclasses.replace(base.platform, kind="sim",
                                     sim=dataclasses.replace(base.platform.sim, chip="3d-64", workload="mixed",
                                                             speed=100.0)),
        policy=dataclasses.replace(base.policy, kind="baseline", baseline="pcgov", fallback="linux"),
        metrics=dataclasses.replace(base.metrics, enabled=False),
        control=dataclasses.replace(base.control, socket=tmp / "c.sock"),
        telemetry=TelemetrySettings(path=tmp / "telemetry.rec", every_epochs=1, max_mib=4096),
    )
    d = Daemon(cfg, env={})
    recorder = d.telemetry
    assert recorder is not None and recorder.error is None, recorder and recorder.error
    d.loop.sinks.remove(d._record_telemetry)  # timed below, on the kept records
    kept: list[TickRecord] = []
    d.loop.sinks.append(kept.append)
    try:
        for _ in range(args.epochs):
            d.loop.tick()
            time.sleep(0.001)  # 0.1 simulated seconds at speed 100
        times = []
        for rec in kept:
            t0 = time.perf_counter_ns()
            recorder.add(rec)
            times.append(time.perf_counter_ns() - t0)
    finally:
        d.shutdown()
    times.sort()
    threads = [len(r.observation.threads) for r in kept]
    size = (tmp / "telemetry.rec").stat().st_size
    print(f"{len(kept)} records of {len(kept[0].observation.cpus)} CPUs, managed threads "
          f"{min(threads)}-{max(threads)} (mean {statistics.mean(threads):.0f}): "
          f"median {statistics.median(times) / 1e3:.0f} us, p99 {times[int(len(times) * 0.99)] / 1e3:.0f} us "
          f"per record; {size / len(kept) / 1024:.1f} KiB per record")


if __name__ == "__main__":
    main()
