"""Fit the two heads with scikit-learn and export them as one ONNX graph.

Both heads are small multi-layer perceptrons behind a standard scaler (scikit-learn's
``MLPRegressor`` for the cap fraction, ``MLPClassifier`` for the pair score). The export
writes the graph with ``onnx.helper`` from the fitted weights: the scaler folds into the
first layer, so a 64-CPU, 64-thread decision is a few small matrix products. The export
is checked against scikit-learn's own predictions on held-back steps
(:func:`verify_export`); a mismatch stops the training.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ailfmd.errors import AilfmError
from ailfmd.policy.feature_schema import (
    CORE_COLUMNS,
    describe_schema,
    FEATURE_SCHEMA,
    PAIR_COLUMNS,
    PAIR_OWN_COLUMNS,
    THREAD_COLUMNS,
)
from ailfmd.policy.learned import (
    CAP_COLUMNS,
    CAP_INPUT,
    CAP_OUTPUT,
    METADATA_KEY,
    PAIR_INPUT,
    PAIR_OUTPUT,
    POLICY_FORMAT,
    THREAD_INPUT,
)
from ailfmd.train.dataset import TrainingData

OPSET = 17
EXPORT_TOLERANCE = 1e-4  # float32 graph vs scikit-learn's float64 arithmetic
_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "logistic": "Sigmoid"}


class TrainingError(AilfmError):
    """Training cannot go on (no data, export mismatch); the message says what."""


@dataclass(frozen=True)
class ModelConfig:
    cap_hidden: tuple[int, ...] = (32, 32)
    pair_hidden: tuple[int, ...] = (32, 16)
    max_iter: int = 60
    alpha: float = 1e-4  # L2 penalty
    batch_size: int = 512
    learning_rate: float = 1e-3


@dataclass
class FittedHeads:
    cap: Any  # sklearn Pipeline(StandardScaler, MLPRegressor)
    pair: Any  # sklearn Pipeline(StandardScaler, MLPClassifier)
    config: ModelConfig


def fit_heads(data: TrainingData, config: ModelConfig, seed: int) -> FittedHeads:
    """Fit both heads on ``data`` (reproducible for a seed)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(data.cap_y) == 0:
        raise TrainingError("no training steps: the recordings hold no complete episode")
    common = dict(alpha=config.alpha, learning_rate_init=config.learning_rate,
                  max_iter=config.max_iter, early_stopping=True, validation_fraction=0.1,
                  n_iter_no_change=8, random_state=seed)
    cap = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=config.cap_hidden,
                                                       batch_size=_batch(config, len(data.cap_y)), **common))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cap.fit(data.cap_x, data.cap_y)
        if len(np.unique(data.pair_y)) == 2:
            pair = make_pipeline(StandardScaler(),
                                 MLPClassifier(hidden_layer_sizes=config.pair_hidden,
                                               batch_size=_batch(config, len(data.pair_y)), **common))
            pair.fit(data.pair_x, data.pair_y)
        else:
            # Every thread stayed put or none was placed: a constant scorer that prefers
            # the CPU a thread is on is the only thing the data says.
            pair = None
    return FittedHeads(cap, pair, config)


def _batch(config: ModelConfig, rows: int) -> int:
    """The batch size, at most the rows left after the early-stopping split."""
    return max(1, min(config.batch_size, int(rows * 0.9)))


def _layers(pipe: Any) -> tuple[list[np.ndarray], list[np.ndarray], str, str]:
    """Weights with the scaler folded into the first layer; (activation, output op)."""
    scaler, mlp = pipe[0], pipe[-1]
    W = [np.asarray(w, dtype=np.float64) for w in mlp.coefs_]
    b = [np.asarray(x, dtype=np.float64) for x in mlp.intercepts_]
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    W0 = W[0] / scale[:, None]
    b0 = b[0] - (scaler.mean_ / scale) @ W[0]
    return [W0, *W[1:]], [b0, *b[1:]], mlp.activation, mlp.out_activation_


def _mlp_nodes(prefix: str, inp: str, out: str, pipe: Any, helper: Any, numpy_helper: Any,
               inits: list, nodes: list, first: str | None = None) -> None:
    """The MLP's layers as nodes. ``first`` names an already computed first-layer
    pre-activation (the factorised pair head); then layer 0 is not emitted."""
    W, b, act, out_act = _layers(pipe)
    x = inp

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    for k, (w, bias) in enumerate(zip(W, b)):
        if k == 0 and first is not None:
            x = first
        else:
            wn = init(f"{prefix}/W{k}", w.astype(np.float32))
            bn = init(f"{prefix}/b{k}", bias.astype(np.float32))
            nodes += [helper.make_node("MatMul", [x, wn], [f"{prefix}/mm{k}"]),
                      helper.make_node("Add", [f"{prefix}/mm{k}", bn], [f"{prefix}/z{k}"])]
            x = f"{prefix}/z{k}"
        if k < len(W) - 1:
            nodes.append(helper.make_node(_ACTIVATIONS[act], [x], [f"{prefix}/h{k}"]))
            x = f"{prefix}/h{k}"
    if out_act == "logistic":
        nodes.append(helper.make_node("Sigmoid", [x], [f"{prefix}/prob"]))
        x = f"{prefix}/prob"
    elif out_act != "identity":
        raise TrainingError(f"cannot export output activation {out_act!r}")
    nodes.append(helper.make_node("Reshape", [x, init(f"{prefix}/flat", np.array([-1], dtype=np.int64))], [out]))


def _pair_first_layer(pipe: Any, helper: Any, numpy_helper: Any, inits: list, nodes: list) -> str:
    """Layer 0 of the pair head from its parts: thread rows x W_t (per thread), core rows
    x W_c (per CPU), pair-own rows x W_p (per pair), broadcast-added to [threads, cpus,
    hidden] and flattened to [pairs, hidden]. Equal to the whole pair row times W."""
    W, b, _, _ = _layers(pipe)
    w0, b0 = W[0], b[0]
    kt, kc = len(THREAD_COLUMNS), len(CORE_COLUMNS)
    hidden = w0.shape[1]
    w_core = np.zeros((len(CAP_COLUMNS), hidden))
    w_core[:kc] = w0[kt:kt + kc]  # cap_input = core columns then context columns (unused here)

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    mk = helper.make_node
    nodes += [
        mk("MatMul", [THREAD_INPUT, init("pair/Wt", w0[:kt].astype(np.float32))], ["pair/t"]),
        mk("MatMul", [CAP_INPUT, init("pair/Wc", w_core.astype(np.float32))], ["pair/c0"]),
        mk("Add", ["pair/c0", init("pair/b0", b0.astype(np.float32))], ["pair/c"]),
        mk("MatMul", [PAIR_INPUT, init("pair/Wp", w0[kt + kc:].astype(np.float32))], ["pair/p"]),
        mk("Shape", [THREAD_INPUT], ["pair/m"], start=0, end=1),
        mk("Shape", [CAP_INPUT], ["pair/n"], start=0, end=1),
        mk("Concat", ["pair/m", "pair/n", init("pair/h", np.array([hidden], dtype=np.int64))], ["pair/mnh"],
           axis=0),
        mk("Reshape", ["pair/p", "pair/mnh"], ["pair/p3"]),
        mk("Unsqueeze", ["pair/t", init("pair/ax1", np.array([1], dtype=np.int64))], ["pair/t3"]),
        mk("Unsqueeze", ["pair/c", init("pair/ax0", np.array([0], dtype=np.int64))], ["pair/c3"]),
        mk("Add", ["pair/p3", "pair/t3"], ["pair/pt"]),
        mk("Add", ["pair/pt", "pair/c3"], ["pair/z3"]),
        mk("Reshape", ["pair/z3", init("pair/flat_h", np.array([-1, hidden], dtype=np.int64))], ["pair/z0"]),
    ]
    return "pair/z0"


def export_onnx(heads: FittedHeads, metadata: dict[str, Any]) -> bytes:
    """The ONNX policy file's bytes: both heads in one graph, ``metadata`` as its card."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits: list = []
    nodes: list = []
    _mlp_nodes("cap", CAP_INPUT, CAP_OUTPUT, heads.cap, helper, numpy_helper, inits, nodes)
    if heads.pair is not None:
        first = _pair_first_layer(heads.pair, helper, numpy_helper, inits, nodes)
        _mlp_nodes("pair", PAIR_INPUT, PAIR_OUTPUT, heads.pair, helper, numpy_helper, inits, nodes, first)
    else:
        # Constant scorer: the "on_core" pair column (1 on the thread's CPU) is the score.
        on_core = PAIR_OWN_COLUMNS.index("on_core")
        inits.append(numpy_helper.from_array(np.array([on_core], dtype=np.int64), "pair/col"))
        nodes.append(helper.make_node("Gather", [PAIR_INPUT, "pair/col"], ["pair/g"], axis=1))
        inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "pair/flat"))
        nodes.append(helper.make_node("Reshape", ["pair/g", "pair/flat"], [PAIR_OUTPUT]))
    graph = helper.make_graph(
        nodes, "ailfmd_policy",
        [helper.make_tensor_value_info(CAP_INPUT, TensorProto.FLOAT, ["n_cpus", len(CAP_COLUMNS)]),
         helper.make_tensor_value_info(THREAD_INPUT, TensorProto.FLOAT, ["n_threads", len(THREAD_COLUMNS)]),
         helper.make_tensor_value_info(PAIR_INPUT, TensorProto.FLOAT, ["n_pairs", len(PAIR_OWN_COLUMNS)])],
        [helper.make_tensor_value_info(CAP_OUTPUT, TensorProto.FLOAT, ["n_cpus"]),
         helper.make_tensor_value_info(PAIR_OUTPUT, TensorProto.FLOAT, ["n_pairs"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="ailfm train")
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    # The whole feature schema (units, normalisation, defaults, masks) travels with the
    # model, so a file says what its inputs mean without this source tree.
    full = {"format": POLICY_FORMAT, "feature_schema": FEATURE_SCHEMA, "features": describe_schema(),
            "cap_columns": list(CAP_COLUMNS),
            "pair_columns": list(PAIR_COLUMNS), "pair_own_columns": list(PAIR_OWN_COLUMNS),
            "thread_columns": list(THREAD_COLUMNS), "model": {"cap_hidden": list(heads.config.cap_hidden),
            "pair_hidden": list(heads.config.pair_hidden), **{k: v for k, v in asdict(heads.config).items()
                                                             if k not in ("cap_hidden", "pair_hidden")}},
            **metadata}
    helper.set_model_props(model, {METADATA_KEY: json.dumps(full, sort_keys=True)})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def set_metadata(model_bytes: bytes, updates: dict[str, Any]) -> bytes:
    """The same graph with ``updates`` merged into its policy card (scores after evaluation)."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(model_bytes)
    props = {p.key: p.value for p in model.metadata_props}
    card = json.loads(props.get(METADATA_KEY, "{}"))
    card.update(updates)
    props[METADATA_KEY] = json.dumps(card, sort_keys=True)
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    return model.SerializeToString()


def predict_reference(heads: FittedHeads, cap_x: np.ndarray, pair_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's own outputs, the export's reference."""
    cap = heads.cap.predict(cap_x)
    if heads.pair is None:
        pair = pair_x[:, PAIR_COLUMNS.index("pair.on_core")].astype(float)
    elif len(pair_x):
        pair = heads.pair.predict_proba(pair_x)[:, 1]
    else:
        pair = np.zeros(0)
    return np.asarray(cap, dtype=float), np.asarray(pair, dtype=float)


def run_onnx(model_bytes: bytes, steps: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(cap fractions, pair scores) of the ONNX graph for each whole step."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    out = []
    for h in steps:
        cap, pair = sess.run([CAP_OUTPUT, PAIR_OUTPUT], {
            CAP_INPUT: h.cap_x.astype(np.float32), THREAD_INPUT: h.thread_x.astype(np.float32),
            PAIR_INPUT: h.pair_own.astype(np.float32)})
        out.append((np.asarray(cap, dtype=float), np.asarray(pair, dtype=float)))
    return out


def verify_export(heads: FittedHeads, model_bytes: bytes, data: TrainingData) -> dict[str, float]:
    """Largest difference between the ONNX graph and scikit-learn on the check steps
    (held back, else the first training steps). Raises when over the tolerance."""
    steps = data.check
    if not steps:
        raise TrainingError("no whole step to check the export on")
    got = run_onnx(model_bytes, steps)
    cap_diff = pair_diff = 0.0
    rows = 0
    for h, (got_cap, got_pair) in zip(steps, got):
        ref_cap, ref_pair = predict_reference(heads, h.cap_x, h.pair_x)
        cap_diff = max(cap_diff, float(np.max(np.abs(ref_cap - got_cap), initial=0.0)))
        pair_diff = max(pair_diff, float(np.max(np.abs(ref_pair - got_pair), initial=0.0)))
        rows += len(h.cap_x) + len(h.pair_x)
    diff = {"cap_max_abs_diff": cap_diff, "pair_max_abs_diff": pair_diff, "rows_checked": float(rows),
            "steps_checked": float(len(steps))}
    if max(cap_diff, pair_diff) > EXPORT_TOLERANCE:
        raise TrainingError(f"the ONNX export differs from the trained model by {max(cap_diff, pair_diff):.3g} "
                            f"(tolerance {EXPORT_TOLERANCE:g})")
    return diff


def imitation_scores(model_bytes: bytes, data: TrainingData) -> dict[str, float]:
    """How closely the exported policy follows the teacher on held-back steps: mean
    absolute cap error (fraction of hw max) and top-1 placement agreement."""
    from ailfmd.policy.learned import assign

    if not data.held:
        return {}
    cap_err: list[float] = []
    agree = total = 0
    for h, (cap, pair) in zip(data.held, run_onnx(model_bytes, data.held)):
        known = np.isfinite(h.cap_y)
        cap_err.extend(np.abs(np.clip(cap[known], 0, 1) - h.cap_y[known]).tolist())
        m = len(h.core_target)
        if m:
            choice = assign(pair.reshape(m, h.n_cpus))
            has = h.core_target >= 0
            agree += int((choice[has] == h.core_target[has]).sum())
            total += int(has.sum())
    return {"held_steps": float(len(data.held)),
            "cap_mae": float(np.mean(cap_err)) if cap_err else 0.0,
            "placement_agreement": agree / total if total else 1.0}
