"""The simulated OS: the thread table, CFS-like placement within affinity, time sharing.

What the simulated kernel does with the threads of inference requests:

- **placement**: a new thread goes to the least-loaded core its affinity allows (CFS's
  fork balancing spreads over idle CPUs). Load counts the live threads assigned to a core,
  sleeping ones included (PELT keeps a briefly blocked task's load on its CPU). Ties are
  broken at random from the engine's generator: which of several idle CPUs Linux picks
  depends on wake-up history this model does not track, and a fixed order (lowest id
  first) would quietly favour the layer nearest the heat sink;
- **load balancing**: at every tick, a thread on a core with ``L`` threads moves to an
  allowed core with at most ``L - 2`` (CFS's idle and periodic balancing pull work to idle
  CPUs within a few milliseconds); a thread whose core left its affinity moves at once
  (the kernel's migration stopper does that on ``sched_setaffinity``);
- **time sharing**: ``k`` runnable threads on one core each get ``1/k`` of its time.

Every move is a CPU migration: counted, and charged the cache warm-up by the engine.
"""

from __future__ import annotations

import numpy as np

# Counter names as Linux reports them (perf events and schedstat deltas), in the column
# order of ThreadTable.counters. Not modelled, hence never reported: page_faults and
# stalled_cycles_frontend (a name missing from a sample means "not measurable").
COUNTER_NAMES = (
    "instructions",
    "cycles",
    "llc_references",
    "llc_misses",
    "stalled_cycles_backend",
    "task_clock_ns",
    "context_switches",
    "cpu_migrations",
    "run_ns",
    "wait_ns",
    "timeslices",
)
COUNTER = {name: i for i, name in enumerate(COUNTER_NAMES)}

# CFS slice length with k runnable threads: sched_latency / k, at least the minimum
# granularity (the kernel's unscaled defaults, 6 ms and 0.75 ms).
CFS_LATENCY_S = 6e-3
CFS_MIN_GRANULARITY_S = 0.75e-3


class ThreadTable:
    """Per-thread state of the live threads, one row each, grouped by request.

    Rows of one request are contiguous and requests appear in admission order, so a
    request's threads form one block (the engine relies on it for barrier maxima).
    """

    _INT_FIELDS = ("tid", "pid", "start_tick", "req", "core", "seg", "step_end")
    # done: instructions done in the current segment; penalty_s: cache warm-up still to
    # pay; the rest accumulate time-based counters since the thread started.
    _FLOAT_FIELDS = ("done", "penalty_s", "active_s", "run_s", "cycles", "switches", "migrations")

    def __init__(self, n_cores: int) -> None:
        self.n_cores = n_cores
        for name in self._INT_FIELDS:
            setattr(self, name, np.zeros(0, dtype=np.int64))
        for name in self._FLOAT_FIELDS:
            setattr(self, name, np.zeros(0))
        self.affinity = np.zeros((0, n_cores), dtype=bool)
        self.seen = np.zeros((0, len(COUNTER_NAMES)))  # counters at the last observation
        self.row_of_tid: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.tid)

    def append(self, tids: np.ndarray, pid: int, start_tick: int, req: int, seg: int,
               step_end: int) -> np.ndarray:
        """Add the threads of one request (core -1 until placed); returns their rows."""
        n = len(tids)
        first = len(self)
        values = {"tid": tids, "pid": pid, "start_tick": start_tick, "req": req, "core": -1,
                  "seg": seg, "step_end": step_end}
        for name in self._INT_FIELDS:
            col = np.broadcast_to(np.asarray(values[name], dtype=np.int64), (n,))
            setattr(self, name, np.concatenate([getattr(self, name), col]))
        for name in self._FLOAT_FIELDS:
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(n)]))
        self.affinity = np.concatenate([self.affinity, np.ones((n, self.n_cores), dtype=bool)])
        self.seen = np.concatenate([self.seen, np.zeros((n, len(COUNTER_NAMES)))])
        self._reindex()
        return np.arange(first, first + n)

    def keep(self, mask: np.ndarray) -> None:
        """Drop the rows where ``mask`` is False (threads that exited)."""
        for name in (*self._INT_FIELDS, *self._FLOAT_FIELDS, "affinity", "seen"):
            setattr(self, name, getattr(self, name)[mask])
        self._reindex()

    def _reindex(self) -> None:
        self.row_of_tid = {int(t): i for i, t in enumerate(self.tid)}


class Scheduler:
    """CFS-like placement and balancing of a ThreadTable over ``n_cores`` cores."""

    def __init__(self, n_cores: int) -> None:
        self.n_cores = n_cores

    def load(self, table: ThreadTable) -> np.ndarray:
        """Live threads assigned to each core."""
        placed = table.core[table.core >= 0]
        return np.bincount(placed, minlength=self.n_cores)

    def pick_core(self, allowed: np.ndarray, load: np.ndarray, rng: np.random.Generator) -> int:
        """The least-loaded allowed core; a random one of them on a tie."""
        masked = np.where(allowed, load, np.iinfo(np.int64).max)
        best = np.flatnonzero(masked == masked.min())
        return int(best[0] if len(best) == 1 else rng.choice(best))

    def place(self, table: ThreadTable, rows: np.ndarray, rng: np.random.Generator) -> None:
        """Put new threads (core -1) on cores, one after another (each sees the last)."""
        load = self.load(table)
        for row in rows:
            core = self.pick_core(table.affinity[row], load, rng)
            table.core[row] = core
            load[core] += 1

    def enforce_affinity(self, table: ThreadTable, rows: np.ndarray,
                         rng: np.random.Generator) -> list[int]:
        """Move the threads among ``rows`` whose core left their affinity; returns them."""
        moved = []
        for row in rows:
            if not table.affinity[row, table.core[row]]:
                load = self.load(table)
                load[table.core[row]] -= 1
                table.core[row] = self.pick_core(table.affinity[row], load, rng)
                moved.append(int(row))
        return moved

    def rebalance(self, table: ThreadTable, rng: np.random.Generator) -> list[int]:
        """Move threads off cores with >= 2 more threads than an allowed core; returns rows moved."""
        moved: list[int] = []
        if len(table) < 2:
            return moved
        load = self.load(table)
        for _ in range(len(table)):  # every move lowers the imbalance; this bounds the loop
            crowded = np.flatnonzero(load[table.core] >= 2)
            if crowded.size == 0:
                break
            limit = load[table.core[crowded]] - 2
            ok = table.affinity[crowded] & (load[None, :] <= limit[:, None])
            movable = crowded[ok.any(axis=1)]
            if movable.size == 0:
                break
            # From the most crowded core, the newest thread (CFS moves the least cache-hot).
            crowd = load[table.core[movable]]
            row = int(movable[crowd == crowd.max()][-1])
            old = int(table.core[row])
            load[old] -= 1
            allowed = table.affinity[row] & (load <= load[old] - 1)
            new = self.pick_core(allowed, load, rng)
            table.core[row] = new
            load[new] += 1
            moved.append(row)
        return moved


def time_shares(core: np.ndarray, runnable: np.ndarray, n_cores: int) -> tuple[np.ndarray, np.ndarray]:
    """Runnable threads per core at the start of a tick, and each thread's share divisor.

    A thread that is not runnable at the start (asleep at a barrier, or arriving later in
    the tick) shares with the runnable ones once it runs: its divisor counts itself.
    """
    per_core = np.bincount(core[runnable], minlength=n_cores)
    divisor = per_core[core] + (~runnable)
    return per_core, divisor


def cfs_slice_s(divisor: np.ndarray) -> np.ndarray:
    """Length of one CFS time slice for a thread sharing its core ``divisor`` ways."""
    return np.maximum(CFS_LATENCY_S / divisor, CFS_MIN_GRANULARITY_S)
