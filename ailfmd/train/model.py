"""Fit the three heads with scikit-learn and export them as one ONNX graph.

Every head is a small multi-layer perceptron behind a standard scaler (scikit-learn's
``MLPRegressor`` for the cap fraction, ``MLPClassifier`` for the move probability and
the destination score). The export
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
    THREAD_COLUMNS,
)
from ailfmd.policy.learned import (
    CAP_COLUMNS,
    CAP_INPUT,
    CAP_OUTPUT,
    DEFAULT_MOVE_THRESHOLD,
    DEST_COLUMNS,
    DEST_OWN_COLUMNS,
    METADATA_KEY,
    MOVE_COLUMNS,
    MOVE_INPUT,
    MOVE_OUTPUT,
    PAIR_INPUT,
    PAIR_OUTPUT,
    POLICY_FORMAT,
    THREAD_INPUT,
    forced_movers,
    place,
)
from ailfmd.train.dataset import TrainingData, as_good_as

OPSET = 17
EXPORT_TOLERANCE = 1e-4  # float32 graph vs scikit-learn's float64 arithmetic
_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "logistic": "Sigmoid"}


class TrainingError(AilfmError):
    """Training cannot go on (no data, export mismatch); the message says what."""


@dataclass(frozen=True)
class ModelConfig:
    cap_hidden: tuple[int, ...] = (32, 32)
    move_hidden: tuple[int, ...] = (32, 16)
    pair_hidden: tuple[int, ...] = (32, 16)
    max_iter: int = 60
    alpha: float = 1e-4  # L2 penalty
    batch_size: int = 512
    learning_rate: float = 1e-3


@dataclass
class FittedHeads:
    cap: Any  # sklearn Pipeline(StandardScaler, MLPRegressor)
    move: Any  # sklearn Pipeline(StandardScaler, MLPClassifier), or a constant probability
    pair: Any  # sklearn Pipeline(StandardScaler, MLPClassifier), or None (constant scores)
    config: ModelConfig


def fit_heads(data: TrainingData, config: ModelConfig, seed: int) -> FittedHeads:
    """Fit the three heads on ``data`` (reproducible for a seed)."""
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
        if len(np.unique(data.move_y)) == 2:
            move: Any = make_pipeline(StandardScaler(),
                                      MLPClassifier(hidden_layer_sizes=config.move_hidden,
                                                    batch_size=_batch(config, len(data.move_y)), **common))
            move.fit(data.move_x, data.move_y)
        else:
            # The teacher always (or never) moved threads: that share is all there is to learn.
            move = float(data.move_y.mean()) if len(data.move_y) else 0.0
        if len(np.unique(data.pair_y)) == 2:
            pair = make_pipeline(StandardScaler(),
                                 MLPClassifier(hidden_layer_sizes=config.pair_hidden,
                                               batch_size=_batch(config, len(data.pair_y)), **common))
            pair.fit(data.pair_x, data.pair_y)
        else:
            # No move, or no CPU the teacher passed over: every destination scores the same.
            pair = None
    return FittedHeads(cap, move, pair, config)


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


def _constant_per_row(prefix: str, inp: str, out: str, value: float, helper: Any, numpy_helper: Any,
                      inits: list, nodes: list) -> None:
    """``out[i] = value`` for every row of ``inp`` (a head the data gave nothing to learn)."""
    from onnx import TensorProto

    nodes += [helper.make_node("Shape", [inp], [f"{prefix}/rows"], start=0, end=1),
              helper.make_node("ConstantOfShape", [f"{prefix}/rows"], [out],
                               value=helper.make_tensor(f"{prefix}/value", TensorProto.FLOAT, [1], [value]))]


def export_onnx(heads: FittedHeads, metadata: dict[str, Any]) -> bytes:
    """The ONNX policy file's bytes: the three heads in one graph, ``metadata`` as its card."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits: list = []
    nodes: list = []
    _mlp_nodes("cap", CAP_INPUT, CAP_OUTPUT, heads.cap, helper, numpy_helper, inits, nodes)
    if isinstance(heads.move, float):
        _constant_per_row("move", MOVE_INPUT, MOVE_OUTPUT, heads.move, helper, numpy_helper, inits, nodes)
    else:
        _mlp_nodes("move", MOVE_INPUT, MOVE_OUTPUT, heads.move, helper, numpy_helper, inits, nodes)
    if heads.pair is not None:
        first = _pair_first_layer(heads.pair, helper, numpy_helper, inits, nodes)
        _mlp_nodes("pair", PAIR_INPUT, PAIR_OUTPUT, heads.pair, helper, numpy_helper, inits, nodes, first)
    else:
        _constant_per_row("pair", PAIR_INPUT, PAIR_OUTPUT, 0.5, helper, numpy_helper, inits, nodes)
    graph = helper.make_graph(
        nodes, "ailfmd_policy",
        [helper.make_tensor_value_info(CAP_INPUT, TensorProto.FLOAT, ["n_cpus", len(CAP_COLUMNS)]),
         helper.make_tensor_value_info(MOVE_INPUT, TensorProto.FLOAT, ["n_threads", len(MOVE_COLUMNS)]),
         helper.make_tensor_value_info(THREAD_INPUT, TensorProto.FLOAT, ["n_movers", len(THREAD_COLUMNS)]),
         helper.make_tensor_value_info(PAIR_INPUT, TensorProto.FLOAT, ["n_pairs", len(DEST_OWN_COLUMNS)])],
        [helper.make_tensor_value_info(CAP_OUTPUT, TensorProto.FLOAT, ["n_cpus"]),
         helper.make_tensor_value_info(MOVE_OUTPUT, TensorProto.FLOAT, ["n_threads"]),
         helper.make_tensor_value_info(PAIR_OUTPUT, TensorProto.FLOAT, ["n_pairs"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="ailfm train")
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    # The whole feature schema (units, normalisation, defaults, masks) travels with the
    # model, so a file says what its inputs mean without this source tree.
    full = {"format": POLICY_FORMAT, "feature_schema": FEATURE_SCHEMA, "features": describe_schema(),
            "cap_columns": list(CAP_COLUMNS), "move_columns": list(MOVE_COLUMNS),
            "pair_columns": list(DEST_COLUMNS), "pair_own_columns": list(DEST_OWN_COLUMNS),
            "thread_columns": list(THREAD_COLUMNS),
            "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(heads.config).items()},
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


def predict_reference(heads: FittedHeads, cap_x: np.ndarray, move_x: np.ndarray,
                      pair_x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's own outputs (cap fraction, move probability, destination score),
    the export's reference."""
    cap = heads.cap.predict(cap_x)
    move = _proba(heads.move, move_x)
    pair = _proba(0.5 if heads.pair is None else heads.pair, pair_x)
    return np.asarray(cap, dtype=float), move, pair


def _proba(head: Any, x: np.ndarray) -> np.ndarray:
    if isinstance(head, float):
        return np.full(len(x), head)
    return head.predict_proba(x)[:, 1].astype(float) if len(x) else np.zeros(0)


def run_onnx(model_bytes: bytes, steps: list[Any]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(cap fractions, move probabilities, destination scores of every pair) of the ONNX
    graph for each whole step (every thread fed to the destination head)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    out = []
    for h in steps:
        cap, move, pair = sess.run([CAP_OUTPUT, MOVE_OUTPUT, PAIR_OUTPUT], {
            CAP_INPUT: h.cap_x.astype(np.float32), MOVE_INPUT: h.move_x.astype(np.float32),
            THREAD_INPUT: h.thread_x.astype(np.float32), PAIR_INPUT: h.pair_own.astype(np.float32)})
        out.append((np.asarray(cap, dtype=float), np.asarray(move, dtype=float), np.asarray(pair, dtype=float)))
    return out


def verify_export(heads: FittedHeads, model_bytes: bytes, data: TrainingData) -> dict[str, float]:
    """Largest difference between the ONNX graph and scikit-learn on the check steps
    (held back, else the first training steps). Raises when over the tolerance."""
    steps = data.check
    if not steps:
        raise TrainingError("no whole step to check the export on")
    diff = {"cap_max_abs_diff": 0.0, "move_max_abs_diff": 0.0, "pair_max_abs_diff": 0.0}
    rows = 0
    for h, got in zip(steps, run_onnx(model_bytes, steps)):
        ref = predict_reference(heads, h.cap_x, h.move_x, h.pair_x)
        for key, r, g in zip(diff, ref, got):
            diff[key] = max(diff[key], float(np.max(np.abs(r - g), initial=0.0)))
        rows += len(h.cap_x) + len(h.move_x) + len(h.pair_x)
    worst = max(diff.values())
    if worst > EXPORT_TOLERANCE:
        raise TrainingError(f"the ONNX export differs from the trained model by {worst:.3g} "
                            f"(tolerance {EXPORT_TOLERANCE:g})")
    return {**diff, "rows_checked": float(rows), "steps_checked": float(len(steps))}


def tune_move_threshold(model_bytes: bytes, data: TrainingData) -> float:
    """The move probability above which a thread moves: the one (0.10 to 0.95) that places
    the most held-back threads where the teacher did, or on a CPU as good (same die, at
    most 1 °C warmer), decoded exactly as at run time. A move the destination head sends
    to a worse CPU costs a cache warm-up for nothing, a missed one leaves a thread hot:
    judging whole placements weighs both, and how good the destinations are."""
    if not data.held:
        return DEFAULT_MOVE_THRESHOLD
    outputs = run_onnx(model_bytes, data.held)
    best, best_score = DEFAULT_MOVE_THRESHOLD, -1.0
    for thr in np.round(np.arange(0.1, 0.96, 0.05), 2).tolist():
        score = _placement_scores(data.held, outputs, thr)["placement_as_good"]
        if score > best_score + 1e-12:
            best, best_score = thr, score
    return best


def _placement_scores(held: list[Any], outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      move_threshold: float) -> dict[str, float]:
    agree = as_good = total = moved = caught = flagged = right = 0
    for h, (_, move_p, pair) in zip(held, outputs):
        m = len(h.core_target)
        if not m:
            continue
        move = (move_p >= move_threshold) | forced_movers(h.last_cpu_index, h.n_cpus)
        choice = place(h.last_cpu_index, move, pair.reshape(m, h.n_cpus)[move])
        core = h.cap_x[:, :len(CORE_COLUMNS)]
        for t in np.flatnonzero(h.core_target >= 0).tolist():
            j, c = int(h.core_target[t]), int(choice[t])
            total += 1
            agree += c == j
            as_good += c == j or (c >= 0 and bool(as_good_as(core, j)[c]))
        placed = (h.core_target >= 0) & (h.last_cpu_index >= 0)
        teacher = placed & (h.core_target != h.last_cpu_index)
        learner = placed & move
        moved += int(teacher.sum())
        flagged += int(learner.sum())
        caught += int((teacher & learner).sum())
        right += int((teacher & learner & (choice == h.core_target)).sum())
    return {"placement_agreement": agree / total if total else 1.0,
            "placement_as_good": as_good / total if total else 1.0,
            "move_recall": caught / moved if moved else 1.0,
            "move_precision": caught / flagged if flagged else 1.0,
            "destination_agreement": right / caught if caught else 1.0}


def imitation_scores(model_bytes: bytes, data: TrainingData, move_threshold: float) -> dict[str, float]:
    """How closely the exported policy follows the teacher on held-back steps, decoded as
    at run time: mean absolute cap error (fraction of hw max); placement agreement (share
    of threads on the teacher's CPU) and "as good" (or on a CPU as good); move recall and
    precision (threads the teacher moved that the policy moves, and the other way round);
    destination agreement (of the threads both move, share sent to the teacher's CPU)."""
    if not data.held:
        return {}
    outputs = run_onnx(model_bytes, data.held)
    cap_err: list[float] = []
    for h, (cap, _, _) in zip(data.held, outputs):
        known = np.isfinite(h.cap_y)
        cap_err.extend(np.abs(np.clip(cap[known], 0, 1) - h.cap_y[known]).tolist())
    return {"held_steps": float(len(data.held)),
            "cap_mae": float(np.mean(cap_err)) if cap_err else 0.0,
            **_placement_scores(data.held, outputs, move_threshold),
            "move_threshold": move_threshold}
