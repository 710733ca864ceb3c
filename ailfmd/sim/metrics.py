"""Run metrics of a simulation: response times, throughput, temperature, energy.

Definitions (also in docs/simulator.md):

- **response time**: completion - arrival of each request completed within the run;
  requests still in flight at the end are counted apart, not as zero or as infinite;
- **output tokens/s**: generated tokens (decode steps finished on every thread of their
  request) per simulated second; **prefill tokens/s**: prompt tokens whose prefill chunk
  finished, per simulated second;
- **peak temperature**: the hottest core at any thermal step end (tick or DTM sub-step);
- **time above DTM**: simulated time during which at least one core was at or above the
  DTM threshold, sampled at thermal step ends like the peak;
- **energy**: tile power (dynamic, idle, leakage, uncore) integrated over time;
  **energy per output token**: that energy over the generated tokens;
- **mean frequency**: the clock of every core averaged over cores and time (idle cores
  count at the clock they sit at); **busy** mean frequency averages only cores with work;
- **DTM throttle events**: transitions of any core into the throttled state;
- **migrations**: thread moves between cores (balancer, affinity changes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class RunMetrics:
    """What one run achieved, in SI units named in each field."""

    duration_s: float
    requests_arrived: int
    requests_completed: int
    requests_in_flight: int
    mean_response_s: float | None
    p99_response_s: float | None
    output_tokens: int
    prefill_tokens: int
    output_tokens_per_s: float
    prefill_tokens_per_s: float
    peak_temp_c: float
    time_above_dtm_s: float
    time_above_dtm_fraction: float
    energy_j: float
    energy_per_output_token_j: float | None
    mean_freq_mhz: float | None
    mean_busy_freq_mhz: float | None
    dtm_throttle_events: int
    migrations: int

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


class MetricsAccumulator:
    """Sums what the engine reports tick by tick; cheap to update, copied with snapshots."""

    def __init__(self, n_cores: int, tick_s: float, initial_peak_c: float) -> None:
        self.n_cores = n_cores
        self.tick_s = tick_s
        self.ticks = 0  # elapsed time = ticks x tick_s, free of summation drift
        self.energy_j = 0.0
        self.above_dtm_s = 0.0
        self.peak_c = float(initial_peak_c)
        self.freq_mhz_s = 0.0  # sum over cores of clock x time
        self.busy_freq_mhz_s = 0.0
        self.busy_core_s = 0.0
        self.throttle_events = 0
        self.migrations = 0
        self.arrived = 0
        self.output_tokens = 0
        self.prefill_tokens = 0
        self.response_s: list[float] = []

    def add_interval(self, dt_s: float, energy_j: float, above_s: float, peak_c: float,
                     throttle_events: int, freq_mhz: np.ndarray, busy: np.ndarray,
                     ticks: int = 1) -> None:
        """``ticks`` ticks lasting ``dt_s`` in all: energy, time above DTM, hottest core,
        throttle events, and each core's clock and whether it had work (bool, or 0/1)."""
        self.ticks += ticks
        self.energy_j += energy_j
        self.above_dtm_s += above_s
        if peak_c > self.peak_c:
            self.peak_c = float(peak_c)
        self.freq_mhz_s += float(np.add.reduce(freq_mhz)) * dt_s
        n_busy = int(np.count_nonzero(busy))
        if n_busy:
            self.busy_freq_mhz_s += float(np.dot(freq_mhz, busy)) * dt_s
            self.busy_core_s += n_busy * dt_s
        self.throttle_events += throttle_events

    def add_completion(self, arrival_s: float, completion_s: float) -> None:
        self.response_s.append(completion_s - arrival_s)

    def result(self, in_flight: int) -> RunMetrics:
        t = self.ticks * self.tick_s
        resp = np.asarray(self.response_s)
        per_s = (lambda x: x / t) if t > 0 else (lambda x: 0.0)
        return RunMetrics(
            duration_s=t,
            requests_arrived=self.arrived,
            requests_completed=len(resp),
            requests_in_flight=in_flight,
            mean_response_s=float(resp.mean()) if resp.size else None,
            p99_response_s=float(np.percentile(resp, 99)) if resp.size else None,
            output_tokens=self.output_tokens,
            prefill_tokens=self.prefill_tokens,
            output_tokens_per_s=per_s(self.output_tokens),
            prefill_tokens_per_s=per_s(self.prefill_tokens),
            peak_temp_c=self.peak_c,
            time_above_dtm_s=self.above_dtm_s,
            time_above_dtm_fraction=self.above_dtm_s / t if t > 0 else 0.0,
            energy_j=self.energy_j,
            energy_per_output_token_j=(self.energy_j / self.output_tokens
                                       if self.output_tokens else None),
            mean_freq_mhz=self.freq_mhz_s / (self.n_cores * t) if t > 0 else None,
            mean_busy_freq_mhz=(self.busy_freq_mhz_s / self.busy_core_s
                                if self.busy_core_s > 0 else None),
            dtm_throttle_events=self.throttle_events,
            migrations=self.migrations,
        )
