"""SimPlatform speaks the Platform protocol like LinuxPlatform, deterministically."""

from __future__ import annotations

import numpy as np
import pytest

from ailfmd.platform.base import (
    CAPABILITY_NAMES,
    Action,
    Platform,
    TempSensor,
    ThreadRef,
)
from ailfmd.sim.chip import load_chip
from ailfmd.sim.platform import SimPlatform, SimulationError
from ailfmd.sim.scheduler import COUNTER_NAMES
from ailfmd.sim.workload import load_workload


@pytest.fixture(scope="module")
def tiny():
    return load_chip("tiny")


@pytest.fixture(scope="module")
def stream():
    return load_workload("tiny-test")


def make(tiny, stream, seed=0, **kw) -> SimPlatform:
    return SimPlatform(tiny, stream, seed, duration_s=kw.pop("duration_s", 5.0), **kw)


def trace(p: SimPlatform, epochs: int, epoch_s: float = 0.05) -> list[tuple]:
    """What a controller sees, epoch by epoch, while it moves threads around."""
    out = []
    for i in range(epochs):
        obs = p.observe()
        temps = tuple(round(c.temp.temp_c, 12) for c in obs.cpus.values())
        freqs = tuple(c.freq_khz for c in obs.cpus.values())
        threads = tuple(sorted((tid, s.last_cpu, tuple(round(s.counters[n], 3) for n in COUNTER_NAMES))
                               for tid, s in obs.threads.items()))
        out.append((obs.time_s, temps, freqs, threads))
        if obs.threads and i % 3 == 0:  # exercise migrations (random tie-breaks included)
            ref = min(obs.threads.values(), key=lambda s: s.ref.tid).ref
            p.apply(Action(affinity={ref: frozenset({i % 4, 4 + i % 4})}))
        p.advance(epoch_s)
    return out


def test_is_a_platform_and_every_observed_field_is_populated(tiny, stream):
    p = make(tiny, stream)
    assert isinstance(p, Platform)
    topo = p.topology()
    assert topo.online_cpus == tuple(range(8))
    assert topo.cpus[5].position == tiny.position(5) == (1, 0, 1)
    assert topo.cpus[5].die_id == 1 and topo.cpus[5].thread_siblings == (5,)
    (llc,) = topo.caches
    assert (llc.level, llc.kind, llc.cpus) == (3, "Unified", tuple(range(8)))
    caps = p.capabilities()
    assert all(caps.has(name) for name in CAPABILITY_NAMES)
    assert all("simulated" in caps.items[name].detail for name in CAPABILITY_NAMES)

    p.advance(0.3)
    obs = p.observe()
    assert obs.time_s == pytest.approx(0.3)
    assert set(obs.cpus) == set(range(8))
    for cpu, st in obs.cpus.items():
        assert st.temp.temp_c is not None and 45.0 < st.temp.temp_c < 100.0
        assert st.temp.source == TempSensor("sim", "tiny", f"core{cpu}", st.temp.source.label, "core", "")
        assert st.freq_khz // 1000 in tiny.vf.frequencies_mhz and st.freq_khz % 1000 == 0
        assert (st.cap_khz, st.hw_min_khz, st.hw_max_khz) == (4_000_000, 1_000_000, 4_000_000)
        assert st.throttle is not None and st.throttle.core_throttle_count == 0
    assert len(obs.sensors) == 8 and all(r.temp_c is not None for r in obs.sensors)
    assert len(obs.policies) == 8 and obs.policies[3].available_khz[0] == 1_000_000
    assert obs.threads
    for tid, s in obs.threads.items():
        assert s.ref.tid == tid and s.ref.pid <= tid and s.comm
        assert s.last_cpu in range(8) and s.affinity == frozenset(range(8))
        assert set(s.counters) == set(COUNTER_NAMES)
        assert "page_faults" not in s.counters  # not modelled: absent, not zero
    running = [s for s in obs.threads.values() if s.counters["instructions"] > 0]
    assert running
    for s in running:
        c = s.counters
        assert c["cycles"] > 0 and c["llc_references"] >= c["llc_misses"] > 0
        assert c["run_ns"] == c["task_clock_ns"] > 0
        # cycles = clock x time on the CPU, between the lowest and highest level
        assert 1.0e9 * 0.999 <= c["cycles"] / (c["run_ns"] * 1e-9) <= 4.0e9 * 1.001


def test_counters_are_deltas_since_the_last_observation(tiny, stream):
    p = make(tiny, stream)
    p.advance(0.2)
    first = p.observe()
    again = p.observe()
    assert set(again.threads) == set(first.threads)
    for s in again.threads.values():
        assert all(v == 0.0 for v in s.counters.values())
    p.advance(0.05)
    later = p.observe()
    assert sum(s.counters["instructions"] for s in later.threads.values()) > 0


def test_same_seed_same_trace_other_seed_other_arrivals(tiny, stream):
    a = trace(make(tiny, stream, seed=4), 30)
    b = trace(make(tiny, stream, seed=4), 30)
    assert a == b
    pa, pb = make(tiny, stream, seed=4), make(tiny, stream, seed=5)
    assert [r.arrival_s for r in pa.engine.requests] != [r.arrival_s for r in pb.engine.requests]
    pa.advance(1.0)
    pb.advance(1.0)
    assert pa.metrics() != pb.metrics()


def test_snapshot_then_restore_replays_the_same_trace(tiny, stream):
    p = make(tiny, stream, seed=2)
    p.advance(0.4)
    p.observe()  # counter baselines are part of the state too
    snap = p.snapshot()
    first = trace(p, 20)
    metrics_first = p.metrics()
    p.restore_snapshot(snap)
    second = trace(p, 20)
    assert first == second
    assert p.metrics() == metrics_first
    p.restore_snapshot(snap)  # the snapshot is still good after being restored once
    assert trace(p, 20) == first


def test_apply_answers_like_the_kernel(tiny, stream):
    p = make(tiny, stream)
    p.advance(0.2)
    obs = p.observe()
    ref = next(iter(obs.threads.values())).ref
    res = p.apply(Action(
        affinity={
            ref: frozenset({2, 3, 42}),
            ThreadRef(ref.pid, 999_999, 0): frozenset({1}),
        },
        freq_cap_khz={0: 2_100_000, 1: 5, 2: 9_000_000, 77: 2_000_000},
    ))
    by_target = {o.target: o for o in res.outcomes}
    assert by_target["policy0"].ok and by_target["policy0"].applied == "2000000 kHz"
    assert "rounded down" in by_target["policy0"].detail
    assert by_target["policy1"].applied == "1000000 kHz" and "minimum" in by_target["policy1"].detail
    assert by_target["policy2"].applied == "4000000 kHz" and "hardware max" in by_target["policy2"].detail
    assert not by_target["policy77"].ok
    narrowed = by_target[f"thread {ref.tid}"]
    assert not narrowed.ok and narrowed.applied == "2-3" and "narrowed" in narrowed.detail
    gone = by_target["thread 999999"]
    assert not gone.ok and gone.applied is None and "gone" in gone.detail
    assert not res.ok

    empty = p.apply(Action(affinity={ref: frozenset({50, 60})}))
    assert not empty.ok and empty.outcomes[0].applied is None and "EINVAL" in empty.outcomes[0].detail
    stale = ThreadRef(ref.pid, ref.tid, ref.start_ticks + 1)
    reused = p.apply(Action(affinity={stale: frozenset({1})}))
    assert not reused.ok and "reused" in reused.outcomes[0].detail

    obs = p.observe()
    assert obs.threads[ref.tid].affinity == frozenset({2, 3})
    assert obs.threads[ref.tid].last_cpu in (2, 3)
    assert obs.cpus[0].cap_khz == 2_000_000 and obs.cpus[1].cap_khz == 1_000_000

    p.advance(0.05)
    obs = p.observe()
    if 0 in {s.last_cpu for s in obs.threads.values()}:
        assert obs.cpus[0].freq_khz <= 2_000_000

    restored = p.restore()
    assert restored.ok
    obs = p.observe()
    assert all(c.cap_khz == 4_000_000 for c in obs.cpus.values())
    assert all(s.affinity == frozenset(range(8)) for s in obs.threads.values())


def test_threads_come_and_go_and_tids_are_never_reused(tiny, stream):
    p = make(tiny, stream, duration_s=3.0)
    seen: dict[int, ThreadRef] = {}
    for _ in range(60):
        for tid, s in p.observe().threads.items():
            assert seen.setdefault(tid, s.ref) == s.ref
        p.advance(0.05)
    done = p.metrics().requests_completed
    assert done > 5
    assert len(seen) > len(p.observe().threads)
    pids = {r.pid for r in seen.values()}
    assert pids.isdisjoint(set(seen) - pids)  # one id space for pids and tids


def test_clock_drives_time_when_given(tiny, stream):
    now = [100.0]
    p = make(tiny, stream, clock=lambda: now[0])
    assert p.observe().time_s == 0.0
    now[0] += 0.25
    assert p.observe().time_s == pytest.approx(0.25)
    now[0] += 0.004  # less than a tick: the simulation waits for a whole one
    assert p.observe().time_s == pytest.approx(0.25)
    with pytest.raises(SimulationError):
        p.advance(0.1)
    p.close()
    with pytest.raises(SimulationError):
        p.observe()


def test_metrics_report_what_the_run_did(tiny, stream):
    p = make(tiny, stream, duration_s=3.0)
    p.advance(3.0)
    m = p.metrics()
    assert m.duration_s == pytest.approx(3.0)
    assert m.requests_completed + m.requests_in_flight == m.requests_arrived > 10
    assert 0 < m.mean_response_s <= m.p99_response_s
    assert m.output_tokens_per_s == pytest.approx(m.output_tokens / 3.0)
    assert m.energy_per_output_token_j == pytest.approx(m.energy_j / m.output_tokens)
    assert 1000.0 <= m.mean_freq_mhz <= m.mean_busy_freq_mhz <= 4000.0
    assert 0.0 <= m.time_above_dtm_fraction <= 1.0
    assert m.peak_temp_c >= max(c.temp.temp_c for c in p.observe().cpus.values())
    # All the chip's heat comes from the tiles: energy lies between all-idle and all-busy.
    idle_w = float(np.sum(p.engine.power.idle_tile_power_w(45.0)))
    assert m.energy_j > idle_w * 3.0
