"""LFM inference workloads: model profiles, request streams and per-thread programs.

Both are TOML data files (format in ``docs/workloads.md``):

* a *model profile* (``workloads/models/NAME.toml``) gives, per token and per kernel
  class, the instructions and DRAM bytes of prefill and of decode, each with a part
  that grows with the context the token attends to;
* a *request stream* (``workloads/NAME.toml``) says when requests arrive (Poisson,
  ON/OFF-modulated Poisson, or an explicit trace) and what they look like (model,
  prompt and output lengths, threads), as a weighted mix of request classes.

``Workload.requests(seed, duration_s)`` draws a reproducible list of :class:`Request`
and :func:`build_program` turns one into the :class:`ThreadProgram` its threads run.

Synchronisation assumption: the threads of a request split every kernel evenly and
advance step by step in lock-step, like OpenMP/oneDNN intra-op parallelism or
llama.cpp's thread pool with a barrier after each op. A step (a prefill chunk or one
decode token) ends when its slowest thread finishes it; a token is complete when a
decode step has finished on all of the request's threads.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError
from ..tomlcheck import Style, Table
from .kernels import CACHE_LINE_BYTES, Kernel, kernel_by_key, kernel_keys

SHIPPED_DIR = Path(__file__).with_name("workloads")
MODELS_DIRNAME = "models"
SUITES = ("train", "eval", "test")
_PHASES = ("prefill", "decode")
_MAX_THREADS = 4096
_MAX_TOKENS = 1 << 22
# Workload files: a missing key suggests a look-alike unused one; numbers must be finite.
_STYLE = Style(missing_hint=True)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class KernelCost:
    """Cost of one kernel class for one token, for the whole request (all threads).

    A token at position ``i`` (1-based) attends to ``i`` tokens of context, so it costs
    ``instructions_per_token + i * instructions_per_context_token`` (bytes likewise).
    """

    kernel: Kernel
    instructions_per_token: float
    instructions_per_context_token: float = 0.0
    dram_bytes_per_token: float = 0.0
    dram_bytes_per_context_token: float = 0.0

    def instructions(self, first_position: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Instructions for ``tokens`` tokens after ``first_position`` earlier ones."""
        return _cost(self.instructions_per_token, self.instructions_per_context_token,
                     first_position, tokens)

    def dram_bytes(self, first_position: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """DRAM bytes for ``tokens`` tokens after ``first_position`` earlier ones."""
        return _cost(self.dram_bytes_per_token, self.dram_bytes_per_context_token,
                     first_position, tokens)


def _cost(per_token: float, per_ctx: float, first: np.ndarray, n: np.ndarray) -> np.ndarray:
    first = np.asarray(first, dtype=float)
    n = np.asarray(n, dtype=float)
    context_sum = n * first + n * (n + 1.0) / 2.0  # sum of positions first+1 .. first+n
    return n * per_token + per_ctx * context_sum


@dataclass(frozen=True)
class ModelProfile:
    """Per-token costs of one decoder-only model, in execution order per phase."""

    name: str
    description: str
    max_context_tokens: int
    prefill_chunk_tokens: int
    prefill: tuple[KernelCost, ...]
    decode: tuple[KernelCost, ...]
    architecture: Mapping[str, float]
    source: str = ""


_ARCH_KEYS = {
    "parameters": float, "layers": int, "hidden_size": int, "attention_heads": int,
    "kv_heads": int, "head_dim": int, "ffn_size": int, "vocab_size": int,
    "weight_bytes_per_param": float, "kv_bytes_per_value": float,
}


def load_model(name_or_path: str | Path, search_dirs: tuple[Path, ...] = ()) -> ModelProfile:
    """Load a model profile by shipped name (or from ``search_dirs``) or by path."""
    path = _resolve(name_or_path, (*search_dirs, SHIPPED_DIR / MODELS_DIRNAME), "model")
    top = Table(read_toml(path), str(path), style=_STYLE)
    meta = top.table("model")
    name = meta.string("name")
    if name != path.stem:
        raise ConfigError(str(path), "model.name", name, f"must equal the file name {path.stem!r}")
    description = meta.string("description", default="")
    max_ctx = meta.integer("max_context_tokens", lo=2, hi=_MAX_TOKENS)
    chunk = meta.integer("prefill_chunk_tokens", default=512, lo=1, hi=_MAX_TOKENS)
    meta.finish()
    arch: dict[str, float] = {}
    arch_table = top.optional_table("architecture")
    if arch_table is not None:
        for key, kind in _ARCH_KEYS.items():
            if key in arch_table:
                arch[key] = (arch_table.integer(key, lo=1) if kind is int
                             else arch_table.number(key, lo=0.0, lo_open=True))
        arch_table.finish()
    phases = {phase: _parse_phase(top, phase) for phase in _PHASES}
    top.finish()
    return ModelProfile(name, description, max_ctx, chunk, phases["prefill"],
                        phases["decode"], arch, str(path))


def _parse_phase(top: Table, phase: str) -> tuple[KernelCost, ...]:
    table = top.table(phase)
    costs = []
    for key in table.keys():
        try:
            kernel = kernel_by_key(key)
        except KeyError:
            raise ConfigError(table.source, table.dotted(key), key,
                              f"unknown kernel class; known: {', '.join(kernel_keys())}") from None
        if kernel in (Kernel.IDLE, Kernel.SPIN_WAIT):
            raise ConfigError(table.source, table.dotted(key), key, "not a compute kernel")
        t = table.table(key)
        costs.append(KernelCost(
            kernel,
            t.number("instructions_per_token", lo=0.0),
            t.number("instructions_per_context_token", default=0.0, lo=0.0),
            t.number("dram_bytes_per_token", default=0.0, lo=0.0),
            t.number("dram_bytes_per_context_token", default=0.0, lo=0.0),
        ))
        t.finish()
    if not costs:
        raise ConfigError(table.source, table.dotted(""), {}, "needs at least one kernel class")
    table.finish()
    return tuple(costs)


# --------------------------------------------------------------------------- programs


@dataclass(frozen=True)
class ThreadProgram:
    """What each thread of one request executes: a list of segments, grouped in steps.

    All threads of a request run the same program (work is split evenly), so the
    arrays are per thread. Steps ``0 .. prefill_steps-1`` are prompt chunks, each later
    step is one decode token. A simulator keeps, per thread, the segment index and the
    instructions left in it, and lets a thread enter step ``s+1`` only when every
    thread of the request has finished step ``s``.
    """

    kernel: np.ndarray  # int8 Kernel value per segment
    instructions: np.ndarray  # per thread, per segment
    dram_bytes: np.ndarray  # per thread, per segment
    step: np.ndarray  # step index of each segment
    step_start: np.ndarray  # first segment of each step; last entry = number of segments
    prefill_steps: int
    threads: int

    @property
    def n_steps(self) -> int:
        return len(self.step_start) - 1

    @property
    def output_tokens(self) -> int:
        return self.n_steps - self.prefill_steps

    def dram_mpki(self) -> np.ndarray:
        """DRAM misses per kilo-instruction of each segment (64-byte lines)."""
        return self.dram_bytes / CACHE_LINE_BYTES / self.instructions * 1e3

    def tokens_done(self, steps_completed: int) -> int:
        """Output tokens finished once the first ``steps_completed`` steps are done."""
        return max(0, steps_completed - self.prefill_steps)


def build_program(profile: ModelProfile, prompt_tokens: int, output_tokens: int,
                  threads: int) -> ThreadProgram:
    """The per-thread program of a request: prompt chunks, then one step per token.

    The prompt is processed in chunks of ``profile.prefill_chunk_tokens`` (llama.cpp's
    micro-batch); each step has one segment per kernel class of its phase, in file
    order; segments with no instructions are left out.
    """
    if prompt_tokens < 1 or output_tokens < 0 or threads < 1:
        raise ValueError("need prompt_tokens >= 1, output_tokens >= 0, threads >= 1")
    chunk = profile.prefill_chunk_tokens
    n_chunks = math.ceil(prompt_tokens / chunk)
    first = np.arange(n_chunks) * chunk
    sizes = np.minimum(chunk, prompt_tokens - first)
    parts = [_phase_segments(profile.prefill, first, sizes, 0)]
    if output_tokens:
        decode_first = prompt_tokens + np.arange(output_tokens)
        parts.append(_phase_segments(profile.decode, decode_first,
                                     np.ones(output_tokens), n_chunks))
    kernel, instr, dram, step = (np.concatenate(x) for x in zip(*parts))
    keep = instr > 0
    kernel, instr, dram, step = kernel[keep], instr[keep], dram[keep], step[keep]
    n_steps = n_chunks + output_tokens
    step_start = np.searchsorted(step, np.arange(n_steps + 1)).astype(np.int64)
    arrays = (kernel, instr / threads, dram / threads, step, step_start)
    for arr in arrays:  # programs are shared read-only; progress lives in the engine
        arr.flags.writeable = False
    return ThreadProgram(*arrays, n_chunks, threads)


def _phase_segments(costs: tuple[KernelCost, ...], first: np.ndarray, tokens: np.ndarray,
                    step0: int) -> tuple[np.ndarray, ...]:
    n_steps, n_k = len(first), len(costs)
    instr = np.stack([c.instructions(first, tokens) for c in costs], axis=1).ravel()
    dram = np.stack([c.dram_bytes(first, tokens) for c in costs], axis=1).ravel()
    kernel = np.tile(np.array([c.kernel for c in costs], dtype=np.int8), n_steps)
    step = np.repeat(np.arange(step0, step0 + n_steps, dtype=np.int64), n_k)
    return kernel, instr, dram, step


# --------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class Request:
    """One inference request. ``request_id`` numbers requests in arrival order."""

    request_id: int
    arrival_s: float
    model: str
    prompt_tokens: int
    output_tokens: int
    threads: int


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integers (token counts, thread counts).

    ``kind`` is ``fixed`` (``value``), ``uniform`` (``low``..``high`` inclusive),
    ``lognormal`` (``median``, log-space ``sigma``) or ``choice`` (``values`` with
    optional ``weights``); samples are rounded and clamped to ``[min, max]``.
    """

    kind: str
    params: Mapping[str, Any]
    min: int = 1
    max: int = _MAX_TOKENS

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        p = self.params
        if self.kind == "fixed":
            x = np.full(n, p["value"], dtype=float)
        elif self.kind == "uniform":
            x = rng.integers(p["low"], p["high"] + 1, size=n).astype(float)
        elif self.kind == "lognormal":
            x = p["median"] * np.exp(p["sigma"] * rng.standard_normal(n))
        else:  # choice
            x = rng.choice(np.asarray(p["values"], dtype=float), size=n, p=p["weights"])
        return np.clip(np.rint(x), self.min, self.max).astype(np.int64)


@dataclass(frozen=True)
class MixEntry:
    """One class of requests in a stream's mix, drawn with probability ~ ``weight``."""

    model: str
    weight: float
    prompt_tokens: LengthDist
    output_tokens: LengthDist
    threads: LengthDist


@dataclass(frozen=True)
class Arrivals:
    """When requests arrive.

    ``poisson``: constant ``rate_per_s``. ``onoff``: Markov-modulated Poisson switching
    between ``rate_on_per_s`` and ``rate_off_per_s`` after exponentially distributed
    periods of mean ``mean_on_s`` / ``mean_off_s``. ``trace``: the file's ``[[trace]]``.
    """

    kind: str
    rate_per_s: float = 0.0
    rate_on_per_s: float = 0.0
    rate_off_per_s: float = 0.0
    mean_on_s: float = 0.0
    mean_off_s: float = 0.0

    def times(self, rng: np.random.Generator, duration_s: float) -> np.ndarray:
        if self.kind == "poisson":
            return _poisson_times(rng, self.rate_per_s, 0.0, duration_s)
        out, t = [], 0.0
        # Start in the stationary state distribution so a stream has no start-up bias.
        on = rng.random() < self.mean_on_s / (self.mean_on_s + self.mean_off_s)
        while t < duration_s:
            length = rng.exponential(self.mean_on_s if on else self.mean_off_s)
            end = min(t + length, duration_s)
            rate = self.rate_on_per_s if on else self.rate_off_per_s
            out.append(_poisson_times(rng, rate, t, end))
            t, on = t + length, not on
        return np.concatenate(out) if out else np.empty(0)


def _poisson_times(rng: np.random.Generator, rate: float, start: float, end: float) -> np.ndarray:
    if rate <= 0 or end <= start:
        return np.empty(0)
    mean = rate * (end - start)
    chunks, t = [], start
    while True:  # draw in bulk; one pass almost always suffices
        n = int(mean + 6.0 * math.sqrt(mean) + 16)
        times = t + np.cumsum(rng.exponential(1.0 / rate, n))
        chunks.append(times[times < end])
        if times[-1] >= end:
            return np.concatenate(chunks)
        t = float(times[-1])


@dataclass(frozen=True)
class Workload:
    """A request stream with the model profiles it refers to."""

    name: str
    description: str
    suite: str
    arrivals: Arrivals
    mix: tuple[MixEntry, ...]
    trace: tuple[Request, ...]
    models: Mapping[str, ModelProfile]
    source: str = ""

    def requests(self, seed: int, duration_s: float) -> list[Request]:
        """Requests arriving in ``[0, duration_s)``; the same seed gives the same list."""
        if self.arrivals.kind == "trace":
            return [r for r in self.trace if r.arrival_s < duration_s]
        rng = np.random.default_rng(seed)
        times = self.arrivals.times(rng, duration_s)
        n = len(times)
        weights = np.array([e.weight for e in self.mix])
        which = rng.choice(len(self.mix), size=n, p=weights / weights.sum())
        prompt = np.zeros(n, dtype=np.int64)
        output = np.zeros(n, dtype=np.int64)
        threads = np.zeros(n, dtype=np.int64)
        for i, entry in enumerate(self.mix):
            sel = which == i
            k = int(sel.sum())
            max_ctx = self.models[entry.model].max_context_tokens
            p = np.minimum(entry.prompt_tokens.sample(rng, k), max_ctx - 1)
            prompt[sel] = p
            output[sel] = np.minimum(entry.output_tokens.sample(rng, k), max_ctx - p)
            threads[sel] = entry.threads.sample(rng, k)
        return [
            Request(i, float(times[i]), self.mix[which[i]].model, int(prompt[i]),
                    int(output[i]), int(threads[i]))
            for i in range(n)
        ]

    def program(self, request: Request) -> ThreadProgram:
        """The per-thread program of one of this workload's requests."""
        return build_program(self.models[request.model], request.prompt_tokens,
                             request.output_tokens, request.threads)


def shipped_workloads(suite: str | None = None) -> tuple[str, ...]:
    """Names of the shipped request streams, optionally only those of one suite."""
    names = sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))
    if suite is None:
        return tuple(names)
    return tuple(n for n in names if load_workload(n).suite == suite)


def shipped_models() -> tuple[str, ...]:
    """Names of the shipped model profiles."""
    return tuple(sorted(p.stem for p in (SHIPPED_DIR / MODELS_DIRNAME).glob("*.toml")))


def load_workload(name_or_path: str | Path) -> Workload:
    """Load a request stream by shipped name (``"decode-heavy"``) or by path.

    Models are looked up in ``models/`` beside the stream file, then among the shipped
    profiles. Any problem raises :class:`ConfigError` naming file, key and value.
    """
    path = _resolve(name_or_path, (SHIPPED_DIR,), "workload")
    source = str(path)
    top = Table(read_toml(path), source, style=_STYLE)
    meta = top.table("workload")
    name = meta.string("name", default=path.stem)
    description = meta.string("description", default="")
    suite = meta.choice("suite", SUITES)
    meta.finish()
    arrivals = _parse_arrivals(top.table("arrivals"))
    model_dirs = (path.parent / MODELS_DIRNAME,)
    models: dict[str, ModelProfile] = {}

    def model(t: Table, key: str = "model") -> str:
        value = t.string(key)
        if "/" in value or value.endswith(".toml"):
            t.fail(key, value, "a model name, not a path (custom models go in models/ "
                               "beside the stream)")
        if value not in models:
            try:
                models[value] = load_model(value, model_dirs)
            except ConfigError as err:
                if err.key != "(file)":
                    raise
                t.fail(key, value, "unknown model; shipped: " + ", ".join(shipped_models()))
        return value

    mix: tuple[MixEntry, ...] = ()
    trace: tuple[Request, ...] = ()
    if arrivals.kind == "trace":
        if "mix" in top:
            top.fail("mix", top.data["mix"], "a trace stream takes no mix")
        rows = top.table_list("trace")
        if not rows:
            top.fail("trace", [], "a trace needs at least one request")
        trace = _parse_trace(rows, model, models)
    else:
        if "trace" in top:
            top.fail("trace", top.data["trace"], "only arrivals.kind = 'trace' takes a trace")
        mix = tuple(_parse_mix_entry(t, model) for t in top.table_list("mix"))
    top.finish()
    return Workload(name, description, suite, arrivals, mix, trace, models, source)


def _parse_arrivals(t: Table) -> Arrivals:
    kind = t.choice("kind", ("poisson", "onoff", "trace"))
    if kind == "poisson":
        out = Arrivals(kind, rate_per_s=t.number("rate_per_s", lo=0.0, lo_open=True))
    elif kind == "onoff":
        out = Arrivals(
            kind,
            rate_on_per_s=t.number("rate_on_per_s", lo=0.0, lo_open=True),
            rate_off_per_s=t.number("rate_off_per_s", default=0.0, lo=0.0),
            mean_on_s=t.number("mean_on_s", lo=0.0, lo_open=True),
            mean_off_s=t.number("mean_off_s", lo=0.0, lo_open=True),
        )
    else:
        out = Arrivals(kind)
    t.finish()
    return out


def _parse_mix_entry(t: Table, model: Any) -> MixEntry:
    name = model(t)
    entry = MixEntry(
        name,
        t.number("weight", default=1.0, lo=0.0, lo_open=True),
        _parse_dist(t, "prompt_tokens"),
        _parse_dist(t, "output_tokens"),
        _parse_dist(t, "threads", maximum=_MAX_THREADS),
    )
    t.finish()
    return entry


def _parse_dist(parent: Table, key: str, maximum: int = _MAX_TOKENS) -> LengthDist:
    if parent.is_integer(key):
        value = parent.integer(key, lo=1, hi=maximum)
        return LengthDist("fixed", {"value": value}, 1, maximum)
    t = parent.table(key)
    kind = t.choice("kind", ("fixed", "uniform", "lognormal", "choice"))
    params: dict[str, Any]
    if kind == "fixed":
        params = {"value": t.integer("value", lo=1, hi=maximum)}
    elif kind == "uniform":
        low = t.integer("low", lo=1, hi=maximum)
        params = {"low": low, "high": t.integer("high", lo=low, hi=maximum)}
    elif kind == "lognormal":
        params = {"median": t.number("median", lo=1.0, hi=float(maximum)),
                  "sigma": t.number("sigma", lo=0.0, hi=5.0)}
    else:
        values = t.integer_list("values", lo=1, hi=maximum)
        weights = t.number_list("weights", lo=0.0, default=[1.0] * len(values))
        if len(weights) != len(values) or sum(weights) <= 0:
            t.fail("weights", weights, "needs one non-negative weight per value, not all 0")
        params = {"values": values, "weights": [w / sum(weights) for w in weights]}
    low = t.integer("min", default=1, lo=1, hi=maximum)
    high = t.integer("max", default=maximum, lo=low, hi=maximum)
    t.finish()
    return LengthDist(kind, params, low, high)


def _parse_trace(rows: list[Table], model: Any, models: Mapping[str, ModelProfile]
                 ) -> tuple[Request, ...]:
    raw = []
    for t in rows:
        name = model(t)
        arrival = t.number("arrival_s", lo=0.0)
        prompt = t.integer("prompt_tokens", lo=1, hi=_MAX_TOKENS)
        output = t.integer("output_tokens", lo=1, hi=_MAX_TOKENS)
        threads = t.integer("threads", lo=1, hi=_MAX_THREADS)
        if prompt + output > models[name].max_context_tokens:
            t.fail("output_tokens", output,
                   f"prompt + output exceeds {name}'s context of {models[name].max_context_tokens}")
        t.finish()
        raw.append((arrival, name, prompt, output, threads))
    raw.sort(key=lambda r: r[0])  # stable: equal arrivals keep file order
    return tuple(Request(i, *r) for i, r in enumerate(raw))


# --------------------------------------------------------------------------- TOML checks


def _resolve(name_or_path: str | Path, dirs: tuple[Path, ...], what: str) -> Path:
    """A path if one is given, else ``DIR/NAME.toml`` from the first dir that has it."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(text, "(file)", text, f"no such {what} file")
        return path
    for d in dirs:
        candidate = d / f"{text}.toml"
        if candidate.is_file():
            return candidate
    raise ConfigError(text, "(file)", text, f"no {what} named {text!r}")


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; syntax errors become :class:`ConfigError`."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), "(syntax)", None, str(err)) from None
    except OSError as err:
        raise ConfigError(str(path), "(file)", str(path), err.strerror or str(err)) from None
