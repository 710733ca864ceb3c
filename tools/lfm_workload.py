#!/usr/bin/env python3
"""A real CPU LLM-inference workload for ailfmd to manage: a small decoder-only
transformer with random float32 weights, served request by request (prefill, then
token-by-token greedy decode) by a persistent pool of named worker threads.

The process names itself ``lfm-workload`` and its workers ``lfm-w0`` .. ``lfm-w<N-1>``
(kernel ``comm``), so the daemon can select it by name and tell its threads apart.
Prefill runs every layer over the whole prompt (GEMMs: compute-bound), decode runs
every layer over one token (GEMVs that stream all weights: memory-bound), and the two
phases show in each worker's hardware counters. See docs/workload-tool.md.

Dependencies: the standard library and numpy.
"""

from __future__ import annotations

import os

# The worker pool is the only source of intra-op parallelism: BLAS must not start
# threads of its own (they would do the work under names the daemon does not expect).
# Takes effect only when numpy is first imported after this, i.e. when run as a script.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import IO, Any, Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402

PROCESS_COMM = "lfm-workload"
WORKER_COMM_PREFIX = "lfm-w"
PR_SET_NAME = 15  # include/uapi/linux/prctl.h
COMM_MAX_BYTES = 15  # TASK_COMM_LEN - 1
ROPE_BASE = 10000.0
RMS_EPS = 1e-5


# --------------------------------------------------------------------------- thread names


def set_thread_comm(name: str) -> None:
    """Set the kernel name (``comm``) of the calling thread; Linux keeps 15 bytes.

    Python's ``threading`` names are invisible to the kernel (before 3.14), and the
    daemon reads ``/proc/<pid>/task/<tid>/comm``. Elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    raw = name.encode("ascii", "replace")[:COMM_MAX_BYTES]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        zero = ctypes.c_ulong(0)
        if libc.prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(raw), zero, zero, zero) == 0:
            return
    except (OSError, AttributeError):
        pass  # no usable libc: fall back to procfs
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "wb") as f:
            f.write(raw)
    except OSError:
        pass  # a name is a convenience; the workload runs without it


# --------------------------------------------------------------------------- worker pool


class WorkerPool:
    """``n`` persistent named threads that run one task at a time, all together.

    ``run(task)`` calls ``task(i)`` on worker ``i`` for every ``i`` in parallel and
    returns the results in worker order. numpy releases the GIL inside matmul and
    large element-wise loops, so the workers really use several cores.
    """

    def __init__(self, n_workers: int, comm_prefix: str = WORKER_COMM_PREFIX) -> None:
        if n_workers < 1:
            raise ValueError("need at least one worker thread")
        self.n_workers = n_workers
        self._start = threading.Barrier(n_workers + 1)
        self._done = threading.Barrier(n_workers + 1)
        self._task: Callable[[int], Any] | None = None
        self._results: list[Any] = [None] * n_workers
        self._errors: list[BaseException | None] = [None] * n_workers
        self.tids: dict[str, int] = {}
        self._ready = threading.Barrier(n_workers + 1)
        self._threads = [
            threading.Thread(target=self._loop, args=(i, f"{comm_prefix}{i}"), name=f"{comm_prefix}{i}", daemon=True)
            for i in range(n_workers)
        ]
        for t in self._threads:
            t.start()
        self._ready.wait()  # every worker has named itself and published its tid

    def _loop(self, index: int, name: str) -> None:
        set_thread_comm(name)
        self.tids[name] = threading.get_native_id()
        self._ready.wait()
        while True:
            self._start.wait()
            task = self._task
            if task is None:
                return
            try:
                self._results[index] = task(index)
            except BaseException as e:  # re-raised on the main thread
                self._errors[index] = e
            self._done.wait()

    def run(self, task: Callable[[int], Any]) -> list[Any]:
        """Run ``task(i)`` on every worker; wait for all; return their results."""
        self._task = task
        self._start.wait()
        self._done.wait()
        self._task = None
        for i, err in enumerate(self._errors):
            if err is not None:
                self._errors[i] = None
                raise err
        results, self._results = self._results, [None] * self.n_workers
        return results

    def close(self) -> None:
        """Stop and join the workers; safe to call twice."""
        if not self._threads:
            return
        self._task = None
        self._start.wait()
        for t in self._threads:
            t.join()
        self._threads = []


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer. ``d_ff`` is the SwiGLU hidden width."""

    layers: int = 4
    d_model: int = 512
    heads: int = 8
    d_ff: int = 2048
    vocab: int = 8192
    context: int = 512

    def __post_init__(self) -> None:
        for name in ("layers", "d_model", "heads", "d_ff", "vocab", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if (self.d_model // self.heads) % 2:
            raise ValueError("the head width d_model/heads must be even (rotary embedding)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def weight_count(self) -> int:
        d, f = self.d_model, self.d_ff
        per_layer = 4 * d * d + 3 * d * f + 2 * d
        return self.layers * per_layer + 2 * self.vocab * d + d


def split_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """``total`` items cut into ``parts`` contiguous ranges, sizes differing by <= 1."""
    base, extra = divmod(total, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def _rms_norm(x: np.ndarray, gain: np.ndarray) -> np.ndarray:
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS)
    return (x * scale * gain).astype(np.float32, copy=False)


class Transformer:
    """Pre-norm decoder: RMSNorm, multi-head causal attention with rotary positions,
    SwiGLU feed-forward, untied output head; random float32 weights from ``seed``.

    Tensor parallel over the pool's workers, Megatron style: worker ``i`` owns a
    contiguous range of heads and of FFN hidden columns. The first matmul of each block
    is split by output columns (QKV of its heads, gate/up of its hidden columns), the
    second by input rows (its rows of the output projection / down projection); the
    main thread sums the partial outputs. The output head is split by vocabulary
    columns and each worker returns its local argmax. Each worker holds its shards as
    separate contiguous arrays, so it streams only its own weights.
    """

    def __init__(self, config: ModelConfig, pool: WorkerPool, seed: int = 0) -> None:
        self.config = config
        self.pool = pool
        c, n = config, pool.n_workers
        rng = np.random.default_rng(seed)
        hd = c.head_dim
        self.head_ranges = split_ranges(c.heads, n)
        self.ff_ranges = split_ranges(c.d_ff, n)
        self.vocab_ranges = split_ranges(c.vocab, n)

        def normal(shape: tuple[int, int], fan_in: int) -> np.ndarray:
            # 1/sqrt(fan_in) keeps activations O(1) through the random layers.
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(fan_in**-0.5)
            return w

        self.embedding = rng.standard_normal((c.vocab, c.d_model), dtype=np.float32)
        self.layers: list[dict[str, Any]] = []
        for _ in range(c.layers):
            layer: dict[str, Any] = {
                "attn_norm": np.ones(c.d_model, np.float32),
                "ffn_norm": np.ones(c.d_model, np.float32),
                "qkv": [],  # per worker: (d_model, 3 * its heads * head_dim)
                "o": [],  # per worker: (its heads * head_dim, d_model)
                "gate_up": [],  # per worker: (d_model, 2 * its hidden columns)
                "down": [],  # per worker: (its hidden columns, d_model)
            }
            for (h0, h1), (f0, f1) in zip(self.head_ranges, self.ff_ranges):
                layer["qkv"].append(normal((c.d_model, 3 * (h1 - h0) * hd), c.d_model))
                layer["o"].append(normal(((h1 - h0) * hd, c.d_model), c.d_model))
                layer["gate_up"].append(normal((c.d_model, 2 * (f1 - f0)), c.d_model))
                layer["down"].append(normal((f1 - f0, c.d_model), c.d_ff))
            self.layers.append(layer)
        self.final_norm = np.ones(c.d_model, np.float32)
        self.lm_head = [normal((c.d_model, v1 - v0), c.d_model) for v0, v1 in self.vocab_ranges]

        inv_freq = ROPE_BASE ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        angles = np.outer(np.arange(c.context, dtype=np.float64), inv_freq)
        self._cos = np.cos(angles).astype(np.float32)  # (context, head_dim/2)
        self._sin = np.sin(angles).astype(np.float32)
        # Per layer: (heads, context, head_dim); a worker touches only its heads' rows.
        self.k_cache = [np.zeros((c.heads, c.context, hd), np.float32) for _ in range(c.layers)]
        self.v_cache = [np.zeros((c.heads, c.context, hd), np.float32) for _ in range(c.layers)]

    def weight_bytes(self) -> int:
        return self.config.weight_count() * 4

    # ------------------------------------------------------------------ worker tasks
    def _rope(self, x: np.ndarray, pos0: int) -> np.ndarray:
        """Rotate (heads, T, head_dim) by positions pos0 .. pos0+T-1 (half-split form)."""
        t, half = x.shape[1], x.shape[2] // 2
        cos, sin = self._cos[pos0 : pos0 + t], self._sin[pos0 : pos0 + t]
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate((x1 * cos - x2 * sin, x1 * sin + x2 * cos), axis=-1)

    def _attention(self, i: int, layer: int, x: np.ndarray, pos0: int) -> np.ndarray | None:
        h0, h1 = self.head_ranges[i]
        if h0 == h1:
            return None  # fewer heads than workers
        lw = self.layers[layer]
        t, h, hd = x.shape[0], h1 - h0, self.config.head_dim
        qkv = (x @ lw["qkv"][i]).reshape(t, 3, h, hd).transpose(1, 2, 0, 3)  # (3, h, t, hd)
        q = self._rope(qkv[0], pos0)
        k = self._rope(qkv[1], pos0)
        end = pos0 + t
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc[h0:h1, pos0:end] = k
        vc[h0:h1, pos0:end] = qkv[2]
        keys, values = kc[h0:h1, :end], vc[h0:h1, :end]  # (h, end, hd)
        scores = q @ keys.transpose(0, 2, 1)  # (h, t, end)
        scores *= np.float32(hd**-0.5)
        if t > 1:  # causal: query at pos0+j sees keys 0 .. pos0+j
            scores[:, np.triu(np.ones((t, end), bool), k=pos0 + 1)] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = (scores @ values).transpose(1, 0, 2).reshape(t, h * hd)
        return out @ lw["o"][i]  # partial (t, d_model)

    def _ffn(self, i: int, layer: int, x: np.ndarray) -> np.ndarray | None:
        f0, f1 = self.ff_ranges[i]
        if f0 == f1:
            return None
        lw = self.layers[layer]
        gate_up = x @ lw["gate_up"][i]
        gate, up = gate_up[:, : f1 - f0], gate_up[:, f1 - f0 :]
        hidden = gate / (1.0 + np.exp(-gate)) * up  # SiLU(gate) * up
        return hidden @ lw["down"][i]  # partial (t, d_model)

    def _head_argmax(self, i: int, x: np.ndarray) -> tuple[float, int]:
        v0, v1 = self.vocab_ranges[i]
        if v0 == v1:
            return (-np.inf, -1)
        logits = x @ self.lm_head[i]  # (1, its vocabulary)
        j = int(np.argmax(logits[0]))
        return (float(logits[0, j]), v0 + j)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: Sequence[int] | np.ndarray, pos0: int) -> int:
        """Run ``tokens`` at positions pos0.. through every layer (filling the KV cache)
        and return the greedy next token after the last one."""
        t = len(tokens)
        if pos0 + t > self.config.context:
            raise ValueError(f"position {pos0 + t} beyond the context of {self.config.context}")
        x = self.embedding[np.asarray(tokens)]  # (t, d_model), a copy
        for layer in range(self.config.layers):
            lw = self.layers[layer]
            xn = _rms_norm(x, lw["attn_norm"])
            for part in self.pool.run(lambda i: self._attention(i, layer, xn, pos0)):
                if part is not None:
                    x += part
            xn = _rms_norm(x, lw["ffn_norm"])
            for part in self.pool.run(lambda i: self._ffn(i, layer, xn)):
                if part is not None:
                    x += part
        last = _rms_norm(x[-1:], self.final_norm)
        best = max(self.pool.run(lambda i: self._head_argmax(i, last)))
        return best[1]


# --------------------------------------------------------------------------- statistics


@dataclass
class Window:
    """What happened over one reporting interval (or the whole run)."""

    requests: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    idle_s: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0

    def add(self, other: "Window") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self, kind: str, elapsed_s: float, interval_s: float) -> dict[str, Any]:
        def ratio(a: float, b: float, scale: float = 1.0) -> float | None:
            return a / b * scale if b > 0 else None

        return {
            "kind": kind,
            "elapsed_s": round(elapsed_s, 3),
            "interval_s": round(interval_s, 3),
            "requests": self.requests,
            "prefill_tokens": self.prefill_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "prefill_tok_s": ratio(self.prefill_tokens, self.prefill_s),
            "decode_tokens": self.decode_tokens,
            "decode_s": round(self.decode_s, 4),
            "decode_tok_s": ratio(self.decode_tokens, self.decode_s),
            "idle_s": round(self.idle_s, 4),
            "ttft_ms": ratio(self.ttft_sum_s, self.ttft_count, 1e3),
            "itl_ms": ratio(self.decode_s, self.decode_tokens, 1e3),
        }


def format_text(s: dict[str, Any]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    return (
        f"[{s['kind']} {s['elapsed_s']:8.1f}s] requests {s['requests']} | "
        f"prefill {num(s['prefill_tok_s'], '.1f')} tok/s ({s['prefill_tokens']} tok, {s['prefill_s']:.2f} s) | "
        f"decode {num(s['decode_tok_s'], '.1f')} tok/s ({s['decode_tokens']} tok, {s['decode_s']:.2f} s) | "
        f"idle {s['idle_s']:.2f} s | TTFT {num(s['ttft_ms'], '.1f')} ms | ITL {num(s['itl_ms'], '.2f')} ms"
    )


# --------------------------------------------------------------------------- serving


class Server:
    """Serves generated requests one at a time; reports; stops on request."""

    def __init__(
        self,
        model: Transformer,
        prompt_tokens: int,
        output_tokens: int,
        requests: int,
        rate_per_s: float,
        report_s: float,
        seed: int,
        as_json: bool,
        out: IO[str],
        phase_log: IO[str] | None = None,
    ) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.requests = requests
        self.rate_per_s = rate_per_s
        self.report_s = report_s
        self.as_json = as_json
        self.out = out
        self.phase_log = phase_log
        # Its own stream, so request arrivals and prompts do not depend on the weights.
        self._rng = np.random.default_rng([seed, 1])
        self.stop_requested = False
        self._t0 = time.monotonic()
        self._last_report = self._t0
        self._window = Window()
        self._total = Window()

    def request_stop(self, *_: object) -> None:
        """Signal handler: finish the current step, then stop (only sets a flag, so it
        is safe whatever the main thread was doing)."""
        self.stop_requested = True

    def _log_phase(self, phase: str, request: int | None, tokens: int) -> None:
        if self.phase_log is not None:
            rec = {"t": time.monotonic(), "phase": phase, "request": request, "tokens": tokens}
            self.phase_log.write(json.dumps(rec) + "\n")
            self.phase_log.flush()

    def emit(self, record: dict[str, Any]) -> None:
        self.out.write((json.dumps(record) if self.as_json else format_text(record)) + "\n")
        self.out.flush()

    def _maybe_report(self, now: float) -> None:
        if self.report_s > 0 and now - self._last_report >= self.report_s:
            self.emit(self._window.summary("report", now - self._t0, now - self._last_report))
            self._total.add(self._window)
            self._window = Window()
            self._last_report = now

    def final_report(self) -> dict[str, Any]:
        now = time.monotonic()
        self._total.add(self._window)
        self._window = Window()
        record = self._total.summary("final", now - self._t0, now - self._t0)
        self.emit(record)
        return record

    def _idle_until(self, deadline: float) -> None:
        """Wait for the next arrival, reporting on time and noticing a stop quickly."""
        while not self.stop_requested:
            now = time.monotonic()
            if now >= deadline:
                return
            # Short sleeps: a signal handler cannot safely wake an Event the main thread waits on.
            time.sleep(min(deadline - now, 0.05))
            after = time.monotonic()
            self._window.idle_s += after - now
            self._maybe_report(after)

    def serve(self) -> None:
        """Serve until ``requests`` are done (0: forever) or a stop is requested."""
        c = self.model.config
        arrival = time.monotonic()
        done = 0
        while not self.stop_requested and (self.requests == 0 or done < self.requests):
            if self.rate_per_s > 0:
                # Open loop: Poisson arrivals; a request that arrives while another is
                # being served waits, and that wait counts in its time to first token.
                arrival += float(self._rng.exponential(1.0 / self.rate_per_s))
                self._log_phase("idle", None, 0)
                self._idle_until(arrival)
                if self.stop_requested:
                    break
            else:
                arrival = time.monotonic()
            prompt = self._rng.integers(0, c.vocab, self.prompt_tokens)
            self._log_phase("prefill", done, self.prompt_tokens)
            t_start = time.monotonic()
            token = self.model.forward(prompt, 0)
            t_first = time.monotonic()
            self._window.prefill_tokens += self.prompt_tokens
            self._window.prefill_s += t_first - t_start
            self._window.ttft_sum_s += t_first - arrival
            self._window.ttft_count += 1
            self._maybe_report(t_first)
            # The first output token came from prefill; decode makes the others.
            self._log_phase("decode", done, self.output_tokens - 1)
            pos = self.prompt_tokens
            for _ in range(self.output_tokens - 1):
                if self.stop_requested:
                    break  # cut short: not counted as served
                t_step = time.monotonic()
                token = self.model.forward([token], pos)
                pos += 1
                t_end = time.monotonic()
                self._window.decode_tokens += 1
                self._window.decode_s += t_end - t_step
                self._maybe_report(t_end)
            else:
                self._window.requests += 1
            done += 1
        self._log_phase("stopped", None, 0)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lfm_workload.py",
        description="Serve LLM inference requests on a random-weight transformer (CPU, numpy).",
    )
    p.add_argument("--threads", type=int, default=4, help="worker threads lfm-w0.. (default 4)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-ff", type=int, default=None, help="SwiGLU hidden width (default 4 x d-model)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--context", type=int, default=None, help="KV cache length (default prompt + output)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output", type=int, default=64, help="generated tokens per request")
    p.add_argument("--requests", type=int, default=0, help="requests to serve, 0 = until stopped")
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second, 0 = back to back")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-s", type=float, default=5.0, help="report interval in seconds, 0 = final only")
    p.add_argument("--json", action="store_true", help="reports as JSON lines")
    p.add_argument("--phase-log", default=None, help="append a JSON line {t, phase, request, tokens} per phase change")
    args = p.parse_args(argv)
    for name in ("threads", "prompt", "output"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.requests < 0 or args.rate < 0 or args.report_s < 0:
        p.error("--requests, --rate and --report-s must be >= 0")
    if args.d_ff is None:
        args.d_ff = 4 * args.d_model
    if args.context is None:
        args.context = args.prompt + args.output
    if args.prompt + args.output > args.context:
        p.error(f"--prompt + --output ({args.prompt + args.output}) exceeds --context ({args.context})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = ModelConfig(args.layers, args.d_model, args.heads, args.d_ff, args.vocab, args.context)
    except ValueError as e:
        print(f"lfm_workload.py: error: {e}", file=sys.stderr)
        return 2
    # Named before the workers start, so no thread ever shows the interpreter's name.
    set_thread_comm(PROCESS_COMM)
    phase_log = open(args.phase_log, "a", encoding="utf-8") if args.phase_log else None
    pool = WorkerPool(args.threads)
    try:
        model = Transformer(config, pool, seed=args.seed)
        server = Server(
            model, args.prompt, args.output, args.requests, args.rate, args.report_s,
            args.seed, args.json, sys.stdout, phase_log,
        )
        signal.signal(signal.SIGTERM, server.request_stop)
        signal.signal(signal.SIGINT, server.request_stop)
        start = {
            "kind": "start",
            "pid": os.getpid(),
            "workers": dict(sorted(pool.tids.items(), key=lambda kv: int(kv[0][len(WORKER_COMM_PREFIX):]))),
            "model": {
                "layers": config.layers, "d_model": config.d_model, "heads": config.heads,
                "d_ff": config.d_ff, "vocab": config.vocab, "context": config.context,
                "dtype": "float32", "weight_mb": round(model.weight_bytes() / 1e6, 1),
            },
        }
        if args.json:
            server.out.write(json.dumps(start) + "\n")
        else:
            workers = " ".join(f"{n}={t}" for n, t in start["workers"].items())
            m = start["model"]
            server.out.write(
                f"lfm-workload pid {start['pid']}: {m['layers']} layers, d_model {m['d_model']}, "
                f"{m['heads']} heads, d_ff {m['d_ff']}, vocab {m['vocab']}, context {m['context']}, "
                f"float32 weights {m['weight_mb']} MB; workers {workers}\n"
            )
        server.out.flush()
        server.serve()
        server.final_report()
    finally:
        pool.close()
        if phase_log is not None:
            phase_log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
