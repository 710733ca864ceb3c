"""Requests come and go: admission at arrival, the pool of active programs, exit.

Requests arriving before a tick ends are admitted at its start; their threads are placed
at once (``Scheduler.place``) and start running at their arrival time inside the tick, so
no arrival is delayed to a tick boundary. A completed request's threads exit.
"""

from __future__ import annotations

import numpy as np

from ailfmd.sim.perfmodel import PerfModel
from ailfmd.sim.program import Pool, Program, build_program
from ailfmd.sim.scheduler import Scheduler
from ailfmd.sim.state import ActiveRequest, EngineState
from ailfmd.sim.workload import Request, Workload


class Admission:
    """Admits the arrivals of ``requests`` and retires completed requests."""

    def __init__(self, workload: Workload, requests: tuple[Request, ...], perf: PerfModel,
                 scheduler: Scheduler, n_cores: int) -> None:
        self.workload = workload
        self.requests = requests
        self.perf = perf
        self.scheduler = scheduler
        self.n_cores = n_cores
        self._programs: dict[int, Program] = {}  # a pure function of the request: shared

    def program(self, request: Request) -> Program:
        prog = self._programs.get(request.request_id)
        if prog is None:
            prog = build_program(self.workload, request, self.perf)
            self._programs[request.request_id] = prog
        return prog

    def relayout(self, st: EngineState) -> None:
        st.relayout(self.perf.llc_latency_ns, self.n_cores)

    def admit(self, st: EngineState, t0: float, dt: float) -> np.ndarray:
        """Admit the requests arriving before the tick ends; per-row start offsets (s).

        Returns ``layout.zeros`` itself when nobody arrives (the common case).
        """
        i, horizon = st.next_arrival, t0 + dt
        if i >= len(self.requests) or self.requests[i].arrival_s >= horizon:
            return st.layout.zeros
        tt = st.threads
        new: list[tuple[np.ndarray, float]] = []
        while i < len(self.requests) and self.requests[i].arrival_s < horizon:
            req = self.requests[i]
            prog = self.program(req)
            pid = st.next_id
            st.next_id += req.threads
            st.active.append(ActiveRequest(req, pid))
            # Program-local positions; rebuild_pool shifts them to the pool offset.
            rows = tt.append(np.arange(pid, pid + req.threads), pid, st.tick_no,
                             len(st.active) - 1, 0, int(prog.step_start[1]))
            new.append((rows, max(0.0, req.arrival_s - t0)))
            st.metrics.arrived += 1
            i += 1
        st.next_arrival = i
        self.rebuild_pool(st)
        start = np.zeros(len(tt))
        for rows, offset_s in new:
            self.scheduler.place(tt, rows, st.rng)
            start[rows] = offset_s
        st.balance_due = True
        self.relayout(st)
        return start

    def rebuild_pool(self, st: EngineState) -> None:
        programs = [self.program(a.request) for a in st.active]
        offsets = np.concatenate([[0], np.cumsum([len(p.length) for p in programs])])[:-1]
        shift = np.array([int(o) - a.offset for o, a in zip(offsets, st.active)], dtype=np.int64)
        tt = st.threads
        if len(tt):
            tt.seg += shift[tt.req]
            tt.step_end += shift[tt.req]
        for o, a in zip(offsets, st.active):
            a.offset = int(o)
        st.pool = Pool(programs)
        st.request_start = np.asarray(offsets, dtype=np.int64)
        st.request_end = np.array([int(o) + len(p.length) for o, p in zip(offsets, programs)],
                                  dtype=np.int64)

    def retire(self, st: EngineState, completed: list[int]) -> None:
        """Remove finished requests and their threads (they exit)."""
        done = np.zeros(len(st.active), dtype=bool)
        done[completed] = True
        for i in completed:
            self._programs.pop(st.active[i].request.request_id, None)
        new_index = np.cumsum(~done) - 1
        tt = st.threads
        tt.keep(~done[tt.req])
        tt.req = new_index[tt.req]
        st.active = [a for a, d in zip(st.active, done) if not d]
        self.rebuild_pool(st)
        st.balance_due = True
        self.relayout(st)
