"""Request programs as the engine advances them: per-segment constants and prefix sums.

A thread's time per instruction in segment ``j`` is linear in three per-segment weights
(base cycles, exposed LLC latency, exposed DRAM latency; see ``PerfModel.rates``), so the
time to reach *any* point of a program is a linear combination of three prefix sums over
its segments. ``Pool`` concatenates the programs of every active request and keeps those
sums, so finding where a thread is at the end of a tick is a search over the few segments
left in its step, never a loop over instructions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ailfmd.sim.perfmodel import PerfModel
from ailfmd.sim.workload import Request, Workload


@dataclass(frozen=True)
class Program:
    """Per-segment constants of one request's per-thread program."""

    length: np.ndarray  # instructions per thread
    kernel: np.ndarray
    mpki: np.ndarray
    base_cpi: np.ndarray  # cycles per instruction without memory stalls
    llc_weight: np.ndarray  # apki/1000/mlp: exposed LLC ns per instruction per ns of latency
    dram_weight: np.ndarray  # mpki/1000/mlp: the same for the loaded DRAM latency
    refs: np.ndarray  # LLC references per instruction
    misses: np.ndarray  # DRAM (LLC) misses per instruction
    step_start: np.ndarray  # program-local first segment of each step, plus the total
    step_tokens: np.ndarray  # prompt tokens per prefill step, 1 per decode step
    prefill_steps: int

    @property
    def n_steps(self) -> int:
        return len(self.step_start) - 1


def build_program(workload: Workload, request: Request, perf: PerfModel) -> Program:
    prog = workload.program(request)
    kt = perf.kernels
    k = prog.kernel.astype(np.intp)
    mpki = prog.dram_mpki()
    apki = (kt.llc_apki - kt.dram_mpki)[k] + mpki  # as PerfModel.rates: extra misses add accesses
    inv_mlp = 1.0 / kt.mlp[k]
    chunk = workload.models[request.model].prefill_chunk_tokens
    first = np.arange(prog.prefill_steps) * chunk
    prefill_tokens = np.minimum(chunk, request.prompt_tokens - first)
    tokens = np.concatenate([prefill_tokens, np.ones(prog.output_tokens, dtype=np.int64)])
    return Program(prog.instructions, k, mpki, kt.base_cpi[k], 1e-3 * apki * inv_mlp,
                   1e-3 * mpki * inv_mlp, 1e-3 * apki, 1e-3 * mpki,
                   np.asarray(prog.step_start, dtype=np.int64), tokens, prog.prefill_steps)


class Pool:
    """The segments of every active request, concatenated, with prefix sums.

    ``X, B, A, M, R, Q`` are exclusive prefix sums (length n + 1) of instructions, base
    cycles, LLC weight, DRAM weight, LLC references and misses; per-segment arrays have a
    zero sentinel at index n so that a thread parked at the very end can be gathered.
    ``cum`` stacks ``B, A, M`` and ``rate`` stacks ``qb, qa, qm`` (3 x (n + 1)), so one
    gather fetches all three for a set of positions.
    """

    def __init__(self, programs: list[Program]) -> None:
        def cat(name: str, dtype: type = float) -> np.ndarray:
            return np.concatenate([*(getattr(p, name) for p in programs), np.zeros(1)]).astype(dtype)

        self.length = cat("length")
        self.kernel = cat("kernel", np.intp)
        self.mpki = cat("mpki")
        self.rate = np.stack([cat("base_cpi"), cat("llc_weight"), cat("dram_weight")])
        self.qb, self.qa, self.qm = self.rate
        self.qr, self.qx = cat("refs"), cat("misses")

        def prefix(rate: np.ndarray | None) -> np.ndarray:
            per_seg = self.length[:-1] if rate is None else self.length[:-1] * rate[:-1]
            return np.concatenate([[0.0], np.cumsum(per_seg)])

        self.X = prefix(None)
        self.cum = np.stack([prefix(self.qb), prefix(self.qa), prefix(self.qm)])
        self.B, self.A, self.M = self.cum
        self.R, self.Q = prefix(self.qr), prefix(self.qx)
        widest = max((int(np.diff(p.step_start).max(initial=0)) for p in programs), default=0)
        self.knots = np.arange(1, max(widest, 1) + 1)  # offsets to the rest of a step
