"""The teacher's action as training targets for the two heads of the learned policy.

- **cap target** per CPU: the cap the oracle asked for, as a fraction of the CPU's
  hardware maximum; a CPU the action leaves alone keeps the cap in effect.
- **placement target** per thread: the CPU the oracle pinned it to; a thread the action
  leaves alone (the oracle's ``keep``) stays on the CPU it last ran on; a thread whose
  affinity allows several CPUs and whose last CPU is unknown has no target (-1) and is
  left out of the pair training.
"""

from __future__ import annotations

import numpy as np

from ailfmd.platform.base import Action, Observation
from ailfmd.policy.features import FeatureSet


def cap_targets(obs: Observation, fs: FeatureSet, action: Action) -> np.ndarray:
    """float32 ``[n_cpus]``: the cap each CPU gets, over its hardware maximum (NaN: unknown)."""
    out = np.full(len(fs.cpus), np.nan, dtype=np.float32)
    for i, cpu in enumerate(fs.cpus):
        st = obs.cpus.get(cpu)
        if st is None or not st.hw_max_khz:
            continue
        cap = action.freq_cap_khz.get(cpu, st.cap_khz if st.cap_khz is not None else st.hw_max_khz)
        out[i] = min(1.0, cap / st.hw_max_khz)
    return out


def placement_targets(obs: Observation, fs: FeatureSet, action: Action) -> np.ndarray:
    """int64 ``[n_threads]``: the CPU row index the teacher runs each thread on (-1: none)."""
    out = np.full(len(fs.tids), -1, dtype=np.int64)
    by_tid = {ref.tid: cpus for ref, cpus in action.affinity.items()}
    index = {c: i for i, c in enumerate(fs.cpus)}
    for t, tid in enumerate(fs.tids):
        cpus = by_tid.get(tid)
        if cpus is not None and len(cpus) == 1:
            out[t] = index.get(next(iter(cpus)), -1)
            continue
        if cpus is not None and len(cpus) > 1:
            # A set of CPUs: where the thread is now if that is allowed, else unknown.
            last = obs.threads[tid].last_cpu
            out[t] = index.get(last, -1) if last in cpus else -1
            continue
        out[t] = fs.last_cpu_index[t]
    return out
