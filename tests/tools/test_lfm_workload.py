"""tools/lfm_workload.py as a real process: named worker threads that share the work,
throughput reports, phases visible in per-thread hardware counters, clean stop."""

from __future__ import annotations

import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "lfm_workload.py"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and perf counters")

# Weights (~63 MB) well beyond a usual LLC, so decode streams them from memory, and a
# prompt long enough for prefill to last many counter samples.
PHASE_MODEL = ("--layers", "4", "--d-model", "384", "--heads", "6", "--vocab", "8192", "--prompt", "512", "--output", "64")
TINY_MODEL = ("--layers", "1", "--d-model", "64", "--heads", "2", "--vocab", "256", "--prompt", "16", "--output", "8")


class Workload:
    """A running tool process; its stdout lines are collected by a reader thread."""

    def __init__(self, *args: str, timeout_s: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(TOOL), "--json", *args], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        waiter = select.poll()
        waiter.register(self.proc.stdout, select.POLLIN)
        if not waiter.poll(timeout_s * 1000):
            self.kill()
            pytest.fail("workload did not start")
        self.start: dict[str, Any] = json.loads(self.proc.stdout.readline())
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    @property
    def worker_tids(self) -> dict[str, int]:
        return {name: int(tid) for name, tid in self.start["workers"].items()}

    def wait_for(self, pred: Any, timeout_s: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for rec in list(self.lines):
                if pred(rec):
                    return rec
            time.sleep(0.05)
        pytest.fail(f"no matching output within {timeout_s} s; got {self.lines}")

    def finish(self, timeout_s: float = 15.0) -> int:
        rc = self.proc.wait(timeout_s)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _run_ns(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


@pytest.fixture(scope="module")
def phase_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workload, Path]]:
    log = tmp_path_factory.mktemp("lfm") / "phases.jsonl"
    w = Workload("--threads", "3", *PHASE_MODEL, "--report-s", "1", "--phase-log", str(log))
    try:
        yield w, log
    finally:
        w.kill()


def test_process_and_worker_threads_are_named(phase_run: tuple[Workload, Path]) -> None:
    w, _ = phase_run
    pid = w.proc.pid
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "lfm-workload"
    assert list(w.worker_tids) == ["lfm-w0", "lfm-w1", "lfm-w2"]
    comms = {int(t.name): (t / "comm").read_text().strip() for t in Path(f"/proc/{pid}/task").iterdir()}
    for name, tid in w.worker_tids.items():
        assert comms[tid] == name
    # No thread pool hidden inside BLAS: the main thread and the three workers only.
    assert sorted(comms.values()) == ["lfm-w0", "lfm-w1", "lfm-w2", "lfm-workload"]


def test_reports_throughput_of_both_phases(phase_run: tuple[Workload, Path]) -> None:
    w, _ = phase_run
    rec = w.wait_for(lambda r: r["kind"] == "report" and r["prefill_tok_s"] and r["decode_tok_s"])
    assert rec["prefill_tok_s"] > 0 and rec["decode_tok_s"] > 0
    assert rec["ttft_ms"] > 0 and rec["itl_ms"] > 0
    # Batched prompt tokens go far faster than one-at-a-time decode tokens.
    assert rec["prefill_tok_s"] > rec["decode_tok_s"]


def test_worker_threads_do_the_work_in_parallel(phase_run: tuple[Workload, Path]) -> None:
    w, _ = phase_run
    pid, tids = w.proc.pid, list(w.worker_tids.values())
    before = {t: _run_ns(pid, t) for t in [pid, *tids]}
    t0 = time.monotonic()
    time.sleep(1.0)
    after = {t: _run_ns(pid, t) for t in [pid, *tids]}
    wall_ns = (time.monotonic() - t0) * 1e9
    grown = {t: after[t] - before[t] for t in before}
    for t in tids:
        assert grown[t] > 0.1 * wall_ns, f"worker {t} barely ran: {grown}"
    workers_ns = sum(grown[t] for t in tids)
    assert workers_ns > 3 * grown[pid], f"the main thread did much of the work: {grown}"
    # The work is split evenly, so the workers run for about as long as one another.
    assert min(grown[t] for t in tids) > 0.5 * max(grown[t] for t in tids), grown
    # (Whether they overlap in time depends on free cores; the tool's own tokens/s for
    # --threads 1 against N is the measure of speed-up, not a test on a shared machine.)


def test_prefill_and_decode_differ_in_instructions_per_cycle(phase_run: tuple[Workload, Path]) -> None:
    perf = pytest.importorskip("ailfmd.platform.linux.perf")
    w, log = phase_run
    try:
        missing = perf.probe_pmu(("instructions", "cycles"))
    except perf.PerfUnsupported as e:
        pytest.skip(f"perf_event_open unavailable: {e}")
    absent = {n: why for n, why in missing.items() if why is not None}
    if absent:
        pytest.skip(f"no hardware PMU events here: {absent}")
    samples: list[tuple[float, float, float | None, float | None]] = []
    with perf.ThreadCounters(w.worker_tids["lfm-w0"], ("instructions", "cycles")) as counters:
        if counters.missing:
            pytest.skip(f"cannot count the worker's events: {counters.missing}")
        counters.read_deltas()
        t_prev = time.monotonic()
        deadline = t_prev + 3.0
        while time.monotonic() < deadline:
            time.sleep(0.005)
            d = counters.read_deltas()
            t = time.monotonic()
            samples.append((t_prev, t, d.get("instructions"), d.get("cycles")))
            t_prev = t
    # The phase log's `t` is CLOCK_MONOTONIC, as is time.monotonic() here.
    marks = [json.loads(line) for line in log.read_text().splitlines()]
    spans = [(a["t"], b["t"], a["phase"]) for a, b in zip(marks, marks[1:])]
    totals: dict[str, list[float]] = {}
    for start, end, instructions, cycles in samples:
        if not instructions or not cycles:
            continue  # not counted (multiplexed out) or the thread did not run
        for s0, s1, phase in spans:
            if s0 <= start and end <= s1:  # the sample lies wholly inside one phase
                acc = totals.setdefault(phase, [0.0, 0.0, 0])
                acc[0] += instructions
                acc[1] += cycles
                acc[2] += 1
    assert totals.get("prefill", [0, 0, 0])[2] >= 5 and totals.get("decode", [0, 0, 0])[2] >= 5, totals
    ipc = {phase: acc[0] / acc[1] for phase, acc in totals.items()}
    # Prefill: GEMMs, compute-bound, high IPC. Decode: GEMVs streaming the weights.
    assert ipc["prefill"] > 1.5 * ipc["decode"], ipc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_with_a_final_report(signum: int) -> None:
    w = Workload("--threads", "3", *TINY_MODEL, "--report-s", "0.2")
    try:
        w.wait_for(lambda r: r["kind"] == "report" and r["decode_tokens"] > 0)
        w.proc.send_signal(signum)
        assert w.finish() == 0
    finally:
        w.kill()
    final = w.lines[-1]
    assert final["kind"] == "final"
    assert final["requests"] > 0 and final["prefill_tok_s"] > 0 and final["decode_tok_s"] > 0


def test_fixed_requests_with_poisson_arrivals_log_every_phase(tmp_path: Path) -> None:
    log = tmp_path / "phases.jsonl"
    w = Workload("--threads", "2", *TINY_MODEL, "--requests", "3", "--rate", "40", "--report-s", "0", "--phase-log", str(log))
    try:
        assert w.finish() == 0
    finally:
        w.kill()
    assert [r["kind"] for r in w.lines] == ["final"]
    assert w.lines[0]["requests"] == 3
    assert w.lines[0]["prefill_tokens"] == 3 * 16 and w.lines[0]["decode_tokens"] == 3 * 7
    marks = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(m["phase"], m["request"], m["tokens"]) for m in marks] == [
        *[step for r in range(3) for step in (("idle", None, 0), ("prefill", r, 16), ("decode", r, 7))],
        ("stopped", None, 0),
    ]
    assert all(a["t"] <= b["t"] for a, b in zip(marks, marks[1:]))


def test_bad_shape_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--d-model", "100", "--heads", "3", "--requests", "1"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert "multiple of heads" in proc.stderr


@pytest.fixture(scope="module")
def tool_module() -> Any:
    # The tool pins BLAS threads through the environment at import; keep that local.
    with mock.patch.dict(os.environ):
        spec = importlib.util.spec_from_file_location("lfm_workload", TOOL)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # Registered while it runs: dataclasses look their module up by name.
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        finally:
            del sys.modules[spec.name]
    return module


def test_decode_with_kv_cache_matches_full_recompute(tool_module: Any) -> None:
    import numpy as np

    config = tool_module.ModelConfig(layers=2, d_model=64, heads=4, d_ff=96, vocab=97, context=24)
    pool = tool_module.WorkerPool(3, comm_prefix="test-w")
    try:
        model = tool_module.Transformer(config, pool, seed=3)
        prompt = np.random.default_rng(0).integers(0, config.vocab, 10)
        tokens = list(prompt)
        tokens.append(model.forward(prompt, 0))
        for pos in range(10, 20):
            tokens.append(model.forward([tokens[-1]], pos))
        # Every cached step must agree with recomputing the whole sequence from scratch.
        for n in (11, 15, 20):
            assert model.forward(np.array(tokens[:n]), 0) == tokens[n]
    finally:
        pool.close()


def test_split_ranges_cover_everything_once(tool_module: Any) -> None:
    assert tool_module.split_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert tool_module.split_ranges(2, 3) == [(0, 1), (1, 2), (2, 2)]
