"""Workloads: shipped files load, seeded generation, arrival statistics, traces, the
per-thread programs and the errors bad files give."""

from __future__ import annotations

import math
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

from ailfmd.errors import ConfigError
from ailfmd.sim.kernels import Kernel
from ailfmd.sim.workload import (
    SHIPPED_DIR, KernelCost, ModelProfile, build_program, load_model, load_workload,
    shipped_models, shipped_workloads,
)

TRAINING = {"prefill-heavy", "decode-heavy", "bursty", "long-context", "mixed"}


# --------------------------------------------------------------------------- shipped files


def test_shipped_suite_is_complete():
    names = set(shipped_workloads())
    assert TRAINING | {"tiny-test"} <= names
    assert TRAINING <= set(shipped_workloads("train"))
    assert shipped_workloads("eval"), "at least one held-out evaluation mix"
    assert not set(shipped_workloads("eval")) & set(shipped_workloads("train"))
    assert {"tinyllama-1.1b", "llama2-7b", "llama2-13b"} <= set(shipped_models())


@pytest.mark.parametrize("name", shipped_workloads())
def test_every_shipped_workload_loads_and_generates(name):
    w = load_workload(name)
    assert w.name == name and w.suite in ("train", "eval", "test")
    requests = w.requests(seed=1, duration_s=120.0)
    assert requests, f"{name} produced no request in 120 s"
    for r in requests[:20]:
        profile = w.models[r.model]
        assert r.prompt_tokens >= 1 and r.output_tokens >= 1 and r.threads >= 1
        assert r.prompt_tokens + r.output_tokens <= profile.max_context_tokens
        program = w.program(r)
        assert program.output_tokens == r.output_tokens
        assert np.all(program.instructions > 0)


@pytest.mark.parametrize("name", shipped_models())
def test_shipped_models_follow_the_documented_formulas(name):
    m = load_model(name)
    a = m.architecture
    L, h, H, Hkv, d, ffn, V = (int(a[k]) for k in (
        "layers", "hidden_size", "attention_heads", "kv_heads", "head_dim", "ffn_size",
        "vocab_size"))
    layer_params = L * (2 * h * H * d + 2 * h * Hkv * d + 3 * h * ffn)
    total = layer_params + 2 * V * h + (2 * L + 1) * h
    assert total == pytest.approx(a["parameters"], rel=1e-3)
    kv_bytes = 2 * L * Hkv * d * a["kv_bytes_per_value"]
    prefill = {c.kernel: c for c in m.prefill}
    decode = {c.kernel: c for c in m.decode}
    wb = a["weight_bytes_per_param"]
    gemv = decode[Kernel.DECODE_GEMV]
    assert gemv.dram_bytes_per_token == pytest.approx(wb * (layer_params + V * h), rel=1e-6)
    gemm = prefill[Kernel.PREFILL_GEMM]
    assert gemm.instructions_per_token == pytest.approx(2 * layer_params / 32, rel=1e-6)
    assert gemm.dram_bytes_per_token == pytest.approx(
        wb * layer_params / m.prefill_chunk_tokens, rel=1e-6)
    attention = decode[Kernel.ATTENTION]
    assert attention.dram_bytes_per_context_token == pytest.approx(kv_bytes)
    assert attention.instructions_per_context_token == pytest.approx(4 * L * H * d / 8)
    # Decode streams every weight; prefill reuses them across the micro-batch.
    gemv_bpi = gemv.dram_bytes_per_token / gemv.instructions_per_token
    gemm_bpi = gemm.dram_bytes_per_token / gemm.instructions_per_token
    assert gemv_bpi > 50 * gemm_bpi


def test_model_sizes_match_their_names():
    for name, billions in (("tinyllama-1.1b", 1.1), ("llama2-7b", 6.74), ("llama2-13b", 13.0)):
        params = load_model(name).architecture["parameters"]
        assert params / 1e9 == pytest.approx(billions, rel=0.02)


# --------------------------------------------------------------------------- generation


def test_same_seed_same_requests():
    w = load_workload("mixed")
    assert w.requests(42, 600.0) == w.requests(42, 600.0)


@pytest.mark.parametrize("name", ["mixed", "bursty", "tiny-test"])
def test_different_seed_different_arrivals(name):
    w = load_workload(name)
    a = [r.arrival_s for r in w.requests(1, 300.0)]
    b = [r.arrival_s for r in w.requests(2, 300.0)]
    assert a != b


def test_poisson_mean_rate_over_a_long_horizon():
    w = load_workload("tiny-test")
    duration_s = 2000.0
    requests = w.requests(5, duration_s)
    rate = w.arrivals.rate_per_s
    # 20,000 expected arrivals: the standard deviation of the count is under 1 %.
    assert len(requests) / duration_s == pytest.approx(rate, rel=0.03)
    times = np.array([r.arrival_s for r in requests])
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < duration_s
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps
    assert [r.request_id for r in requests] == list(range(len(requests)))


def test_onoff_stream_has_the_right_mean_rate_and_is_bursty():
    w = load_workload("bursty")
    a = w.arrivals
    duration_s = 20000.0
    times = np.array([r.arrival_s for r in w.requests(9, duration_s)])
    expected = (a.rate_on_per_s * a.mean_on_s + a.rate_off_per_s * a.mean_off_s) / (
        a.mean_on_s + a.mean_off_s)
    assert len(times) / duration_s == pytest.approx(expected, rel=0.1)
    counts = np.bincount(times.astype(int), minlength=int(duration_s))
    assert counts.var() / counts.mean() > 2.0  # a Poisson stream would give 1


def test_lengths_follow_their_distributions():
    w = load_workload("decode-heavy")
    requests = w.requests(3, 20000.0)
    by_model = {name: [r for r in requests if r.model == name] for name in w.models}
    tiny = by_model["tinyllama-1.1b"]
    assert len(tiny) / len(requests) == pytest.approx(0.85, abs=0.03)
    outputs = np.array([r.output_tokens for r in tiny])
    assert outputs.min() >= 64 and outputs.max() <= 384
    assert outputs.mean() == pytest.approx((64 + 384) / 2, rel=0.05)
    prompts = np.array([r.prompt_tokens for r in tiny])
    assert np.median(prompts) == pytest.approx(64, rel=0.1)
    assert prompts.min() >= 8 and prompts.max() <= 512
    assert {r.threads for r in tiny} == {4, 8}


def test_trace_is_reproduced_exactly_whatever_the_seed():
    path = SHIPPED_DIR / "tiny-trace.toml"
    rows = tomllib.loads(path.read_text())["trace"]
    w = load_workload(path)
    got = w.requests(1, 1e9)
    assert got == w.requests(99, 1e9)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens, r.model, r.threads) for r in got] == [
        (float(x["arrival_s"]), x["prompt_tokens"], x["output_tokens"], x["model"], x["threads"])
        for x in rows
    ]
    cut = w.requests(1, 0.3)
    assert cut == [r for r in got if r.arrival_s < 0.3]


def test_trace_written_out_of_order_is_sorted_by_arrival(tmp_path):
    path = write(tmp_path, "t.toml", TRACE_HEAD + trace_row(2.0, 10) + trace_row(1.0, 20)
                 + trace_row(1.0, 30))
    got = load_workload(path).requests(0, 10.0)
    assert [(r.arrival_s, r.prompt_tokens) for r in got] == [(1.0, 20), (1.0, 30), (2.0, 10)]


def test_custom_model_beside_the_stream_is_found(tmp_path):
    (tmp_path / "models").mkdir()
    text = (SHIPPED_DIR / "models" / "tinyllama-1.1b.toml").read_text()
    write(tmp_path / "models", "my-model.toml", text.replace('"tinyllama-1.1b"', '"my-model"'))
    path = write(tmp_path, "s.toml", POISSON.replace("tinyllama-1.1b", "my-model"))
    w = load_workload(path)
    assert w.requests(0, 100.0)[0].model == "my-model"


# --------------------------------------------------------------------------- programs


@pytest.mark.parametrize("prompt,output,threads", [(1, 1, 1), (100, 7, 4), (1300, 20, 6)])
def test_program_totals_equal_profile_costs_times_tokens(prompt, output, threads):
    m = load_model("llama2-7b")
    program = build_program(m, prompt, output, threads)
    chunks = math.ceil(prompt / m.prefill_chunk_tokens)
    assert program.prefill_steps == chunks and program.n_steps == chunks + output
    assert program.threads == threads
    prefill = program.step < chunks
    positions_prefill = prompt * (prompt + 1) / 2  # sum of 1..prompt
    positions_decode = sum(range(prompt + 1, prompt + output + 1))
    for costs, mask, tokens, positions in (
        (m.prefill, prefill, prompt, positions_prefill),
        (m.decode, ~prefill, output, positions_decode),
    ):
        for c in costs:
            sel = mask & (program.kernel == c.kernel)
            instr = c.instructions_per_token * tokens + c.instructions_per_context_token * positions
            dram = c.dram_bytes_per_token * tokens + c.dram_bytes_per_context_token * positions
            assert program.instructions[sel].sum() * threads == pytest.approx(instr, rel=1e-9)
            assert program.dram_bytes[sel].sum() * threads == pytest.approx(dram, rel=1e-9)


def test_decode_steps_are_ordered_segments_with_growing_attention():
    m = load_model("tinyllama-1.1b")
    program = build_program(m, 10, 5, 2)
    order = [c.kernel for c in m.decode]
    attention = []
    for s in range(program.prefill_steps, program.n_steps):
        seg = slice(program.step_start[s], program.step_start[s + 1])
        assert list(program.kernel[seg]) == order
        attention.append(program.instructions[seg][order.index(Kernel.ATTENTION)])
    assert all(b > a for a, b in zip(attention, attention[1:]))
    assert program.step_start[-1] == len(program.kernel)
    assert program.tokens_done(program.prefill_steps) == 0
    assert program.tokens_done(program.n_steps) == 5


def test_prompt_is_processed_in_micro_batches():
    m = load_model("tinyllama-1.1b")
    program = build_program(m, 1200, 1, 1)
    assert program.prefill_steps == 3  # 512 + 512 + 176
    gemm = program.instructions[program.kernel == Kernel.PREFILL_GEMM]
    np.testing.assert_allclose(gemm / gemm[0], [1.0, 1.0, 176 / 512])


def test_zero_cost_segments_are_left_out():
    profile = ModelProfile("z", "", 64, 16,
                           (KernelCost(Kernel.PREFILL_GEMM, 100.0),
                            KernelCost(Kernel.ATTENTION, 0.0)),
                           (KernelCost(Kernel.DECODE_GEMV, 10.0),), {})
    program = build_program(profile, 20, 3, 1)
    assert list(program.kernel) == [Kernel.PREFILL_GEMM] * 2 + [Kernel.DECODE_GEMV] * 3
    np.testing.assert_allclose(program.dram_mpki(), 0.0)


# --------------------------------------------------------------------------- bad files

POISSON = """
[workload]
suite = "train"

[arrivals]
kind = "poisson"
rate_per_s = 1.0

[[mix]]
model = "tinyllama-1.1b"
prompt_tokens = { kind = "uniform", low = 8, high = 64 }
output_tokens = 16
threads = 4
"""

TRACE_HEAD = """
[workload]
suite = "test"

[arrivals]
kind = "trace"
"""


def trace_row(arrival_s: float, prompt: int, output: int = 4, model: str = "tinyllama-1.1b") -> str:
    return textwrap.dedent(f"""
        [[trace]]
        arrival_s = {arrival_s}
        prompt_tokens = {prompt}
        output_tokens = {output}
        model = "{model}"
        threads = 2
        """)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


BAD_WORKLOADS = [
    ("unknown key", POISSON.replace("rate_per_s = 1.0", "rate_per_s = 1.0\nburst = 3"),
     "arrivals.burst", 3),
    ("misspelt key", POISSON.replace("rate_per_s", "rate_per_sec"), "arrivals.rate_per_s", None),
    ("missing key", POISSON.replace('suite = "train"', ""), "workload.suite", None),
    ("wrong type", POISSON.replace("rate_per_s = 1.0", 'rate_per_s = "fast"'),
     "arrivals.rate_per_s", "fast"),
    ("negative rate", POISSON.replace("rate_per_s = 1.0", "rate_per_s = -2.0"),
     "arrivals.rate_per_s", -2.0),
    ("unknown model", POISSON.replace("tinyllama-1.1b", "gpt-9"), "mix[0].model", "gpt-9"),
    ("bad suite", POISSON.replace('"train"', '"training"'), "workload.suite", "training"),
    ("bad distribution", POISSON.replace('"uniform"', '"gaussian"'),
     "mix[0].prompt_tokens.kind", "gaussian"),
    ("empty range", POISSON.replace("high = 64", "high = 4"), "mix[0].prompt_tokens.high", 4),
    ("zero threads", POISSON.replace("threads = 4", "threads = 0"), "mix[0].threads", 0),
    ("bool as number", POISSON.replace("rate_per_s = 1.0", "rate_per_s = true"),
     "arrivals.rate_per_s", True),
    ("trace beyond context", TRACE_HEAD + trace_row(0.0, 2000, 100),
     "trace[0].output_tokens", 100),
    ("trace with negative time", TRACE_HEAD + trace_row(0.0, 10) + trace_row(-1.0, 10),
     "trace[1].arrival_s", -1.0),
    ("trace unknown model", TRACE_HEAD + trace_row(0.0, 10, model="nope"), "trace[0].model",
     "nope"),
    ("mix in a trace", TRACE_HEAD + trace_row(0.0, 10) + "[[mix]]\nmodel = 'x'\n", "mix",
     [{"model": "x"}]),
]


@pytest.mark.parametrize("label,text,key,value", BAD_WORKLOADS, ids=[b[0] for b in BAD_WORKLOADS])
def test_bad_workload_files_name_file_key_and_value(tmp_path, label, text, key, value):
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_workload(path)
    err = info.value
    assert err.source == str(path)
    assert err.key == key
    assert err.value == value and type(err.value) is type(value)
    assert str(path) in str(err) and key in str(err)
    if label == "misspelt key":
        assert "arrivals.rate_per_sec" in str(err)


def test_toml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "broken.toml", "[workload\nsuite = 1")
    with pytest.raises(ConfigError) as info:
        load_workload(path)
    assert info.value.source == str(path) and info.value.key == "(syntax)"


def test_unknown_workload_name():
    with pytest.raises(ConfigError, match="no workload named 'no-such-stream'"):
        load_workload("no-such-stream")


MODEL_TEXT = (SHIPPED_DIR / "models" / "tinyllama-1.1b.toml").read_text()
BAD_MODELS = [
    ("unknown kernel", MODEL_TEXT.replace("[decode.attention]", "[decode.flash_attention]"),
     "decode.flash_attention", "flash_attention"),
    ("name mismatch", MODEL_TEXT.replace('name = "tinyllama-1.1b"', 'name = "other"'),
     "model.name", "other"),
    ("negative cost",
     MODEL_TEXT.replace("instructions_per_token = 1_408", "instructions_per_token = -1", 1),
     "prefill.attention.instructions_per_token", -1),
    ("unknown arch key", MODEL_TEXT.replace("layers = 22", "n_layers = 22"),
     "architecture.n_layers", 22),
    ("idle is no kernel", MODEL_TEXT.replace("[decode.attention]", "[decode.idle]"),
     "decode.idle", "idle"),
]


@pytest.mark.parametrize("label,text,key,value", BAD_MODELS, ids=[b[0] for b in BAD_MODELS])
def test_bad_model_files_name_file_key_and_value(tmp_path, label, text, key, value):
    assert text != MODEL_TEXT, "the replacement must change the file"
    path = write(tmp_path, "tinyllama-1.1b.toml", text)
    with pytest.raises(ConfigError) as info:
        load_model(path)
    assert (info.value.source, info.value.key, info.value.value) == (str(path), key, value)


def test_bad_model_beside_a_stream_is_reported_in_the_model_file(tmp_path):
    (tmp_path / "models").mkdir()
    bad = MODEL_TEXT.replace('name = "tinyllama-1.1b"', 'name = "mine"').replace(
        "max_context_tokens = 2048", "max_context_tokens = 1")
    model_path = write(tmp_path / "models", "mine.toml", bad)
    path = write(tmp_path, "s.toml", POISSON.replace("tinyllama-1.1b", "mine"))
    with pytest.raises(ConfigError) as info:
        load_workload(path)
    assert (info.value.source, info.value.key) == (str(model_path), "model.max_context_tokens")
