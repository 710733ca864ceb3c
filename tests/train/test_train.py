"""``ailfm train`` end to end on the tiny chip: BC, DAgger, resume, export check, scores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ailfmd.errors import AilfmError
from ailfmd.lab.cli import main as ailfm
from ailfmd.lab.run import Scenario, run_scenario
from ailfmd.policy.onnx_policy import OnnxPolicy
from ailfmd.sim.chip import load_chip
from ailfmd.sim.workload import load_workload
from ailfmd.train.dagger import QUICK, train
from ailfmd.train.dataset import load_dataset
from ailfmd.train.model import TrainingError, fit_heads, export_onnx, verify_export
from ailfmd.train.recording import read_records
from randompolicy import RandomActions


def test_quick_training_writes_a_policy_card_and_scores(quick_training) -> None:
    out, summary = quick_training
    for name in ("config.json", "policy.onnx", "MODEL_CARD.md", "evaluation.json",
                 "models/round0.onnx", "models/round1.onnx", "models/round0.json"):
        assert (out / name).exists(), name
    meta = OnnxPolicy(out / "policy.onnx", service=False).metadata
    assert meta["trained_on"] == {"chips": ["tiny"], "workloads": ["tiny-test"]}
    assert meta["scores"] == json.loads(json.dumps(summary["overall"]))
    assert len(meta["data"]["sha256"]) == 64 and meta["trainer"].startswith("ailfm train")
    # Units and normalisation of every input travel with the file.
    assert meta["features"]["schema"] == "ailfmd.features/2"
    assert meta["features"]["constants"]["TEMP_SCALE_C"] == 35.0
    card = (out / "MODEL_CARD.md").read_text()
    assert "DAgger" in card and "| bc |" in card and "| dagger |" in card
    assert "ailfm train --out DIR --quick" in card


def test_the_trained_policy_beats_random(quick_training) -> None:
    out, _ = quick_training
    learned, rand = [], []
    for seed in (11, 12, 13):
        sc = Scenario(load_chip("tiny"), load_workload("tiny-test"), seed, 3.0)
        learned.append(run_scenario(sc, OnnxPolicy(out / "policy.onnx", service=False)).metrics)
        rand.append(run_scenario(sc, RandomActions(seed)).metrics)
    assert sum(m.requests_completed for m in learned) >= sum(m.requests_completed for m in rand)
    assert np.mean([m.mean_response_s for m in learned]) < np.mean([m.mean_response_s for m in rand])


def test_dagger_aggregates_learner_visited_states(quick_training) -> None:
    out, _ = quick_training
    r0 = json.loads((out / "models" / "round0.json").read_text())
    r1 = json.loads((out / "models" / "round1.json").read_text())
    assert r0["data"]["learner_steps"] == 0
    assert r0["round_wall_s"] > 0 and r1["round_wall_s"] > 0
    assert r1["data"]["episodes"] == 2 * r0["data"]["episodes"]
    assert r1["data"]["steps"] > r0["data"]["steps"]
    assert r1["data"]["learner_steps"] > 0
    # In round 1 the round-0 policy drove some epochs, and the oracle labelled them.
    acted = [r.meta["acted"] for f in (out / "data" / "round1").glob("*.rec")
             for r in read_records(f) if r.kind == "step"]
    assert "learner" in acted and "oracle" in acted
    runs = [r for f in (out / "data" / "round1").glob("*.rec") for r in read_records(f) if r.kind == "run"]
    assert all(r.meta["learner_sha256"] for r in runs)
    for f in (out / "data" / "round1").glob("*.rec"):
        for r in read_records(f):
            if r.kind == "step":
                assert np.isfinite(r.arrays["cap_target"]).all()


def test_the_export_equals_the_trained_model_and_a_tampered_one_is_caught(quick_training) -> None:
    import onnx
    from onnx import numpy_helper

    out, _ = quick_training
    data = load_dataset(sorted((out / "data").rglob("*.rec")))
    assert data.held, "some steps are held back"
    heads = fit_heads(data, QUICK.model, seed=0)
    model_bytes = export_onnx(heads, {})
    diff = verify_export(heads, model_bytes, data)
    assert max(diff["cap_max_abs_diff"], diff["move_max_abs_diff"], diff["pair_max_abs_diff"]) < 1e-4
    model = onnx.load_from_string(model_bytes)
    for init in model.graph.initializer:
        if init.name == "cap/b0":
            w = numpy_helper.to_array(init) + 0.5
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), "cap/b0"))
    with pytest.raises(TrainingError, match="differs from the trained model"):
        verify_export(heads, model.SerializeToString(), data)


def test_training_is_reproducible_and_resumes_after_an_interruption(quick_training, tmp_path: Path) -> None:
    out, _ = quick_training
    cfg = QUICK.__class__(**{**QUICK.__dict__, "rounds": 1, "eval_policies": ("linux",)})
    other = tmp_path / "again"
    train(cfg, other, jobs=2, progress=None)
    # Same seed, same data and the same weights, whatever the worker count.
    a = json.loads((out / "models" / "round1.json").read_text())["data"]["sha256"]
    b = json.loads((other / "models" / "round1.json").read_text())["data"]["sha256"]
    assert a == b
    assert (out / "models" / "round1.onnx").read_bytes() == (other / "models" / "round1.onnx").read_bytes()
    # Interrupt: the last model is gone and an episode of round 1 was cut mid-write.
    before = (other / "models" / "round1.onnx").read_bytes()
    (other / "models" / "round1.onnx").unlink()
    (other / "models" / "round1.json").unlink()
    (other / "policy.onnx").unlink()
    episode = sorted((other / "data" / "round1").glob("*.rec"))[0]
    size = episode.stat().st_size
    with open(episode, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(AilfmError, match="--resume"):
        train(cfg, other, jobs=1, progress=None)
    train(cfg, other, jobs=1, resume=True, progress=None)
    assert (other / "models" / "round1.onnx").read_bytes() == before
    assert episode.stat().st_size == size
    # A training directory moved elsewhere resumes with its own evaluation results.
    moved = tmp_path / "moved"
    other.rename(moved)
    (moved / "policy.onnx").unlink()
    train(cfg, moved, jobs=1, resume=True, progress=None)
    scores = json.loads((moved / "evaluation.json").read_text())["summary"]["overall"]
    assert scores["dagger"]["vs_best_baseline"] > 0
    other = moved
    # Resuming with other options is refused, naming what differs.
    changed = QUICK.__class__(**{**cfg.__dict__, "duration_s": 3.0})
    with pytest.raises(AilfmError, match="duration_s"):
        train(changed, other, jobs=1, resume=True, progress=None)


def test_no_data_is_a_named_error(tmp_path: Path) -> None:
    data = load_dataset([])
    with pytest.raises(TrainingError, match="no training steps"):
        fit_heads(data, QUICK.model, seed=0)


def test_ailfm_record_and_inspect(tmp_path: Path, capsys) -> None:
    rec = tmp_path / "ep.rec"
    assert ailfm(["record", "--chip", "tiny", "--workload", "tiny-test", "--duration", "1",
                  "--out", str(rec)]) == 0
    kinds = [r.kind for r in read_records(rec)]
    assert kinds[0] == "run" and kinds[-1] == "end" and kinds.count("step") == 10
    capsys.readouterr()
    assert ailfm(["inspect", str(rec), "--dump", "2"]) == 0
    text = capsys.readouterr().out
    assert "step" in text and "core_target" in text and '"kind": "run"' in text
    # A recording cut by a crash still inspects, and says so.
    with open(rec, "r+b") as f:
        f.truncate(rec.stat().st_size - 7)
    assert ailfm(["inspect", str(rec)]) == 0
    assert "torn" in capsys.readouterr().out


def test_ailfm_record_rejects_bad_options(tmp_path: Path, capsys) -> None:
    assert ailfm(["record", "--workload", "tiny-test", "--duration", "1", "--beta", "0.5",
                  "--out", str(tmp_path / "x.rec")]) == 2
    assert "--learner" in capsys.readouterr().err
    assert ailfm(["train", "--quick", "--out", str(tmp_path / "t"), "--workloads", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_card_names_the_command_that_reproduces_a_configuration() -> None:
    from dataclasses import replace

    from ailfmd.train.card import command_line
    from ailfmd.train.dagger import TrainConfig

    assert command_line(TrainConfig()) == "ailfm train --out DIR"
    assert command_line(replace(TrainConfig(), rounds=2, eval_seeds=(1, 2), duration_s=5.0)) == \
        "ailfm train --out DIR --duration 5 --rounds 2 --eval-seeds 1,2"
    assert "negatives = 3, set in code" in command_line(replace(TrainConfig(), negatives=3))


def test_the_card_says_which_simulator_path_reproduces_the_model(quick_training) -> None:
    from ailfmd.train.card import render_model_card
    from ailfmd.train.dagger import simulator_kernels

    out, summary = quick_training
    rounds = [json.loads((out / "models" / f"round{r}.json").read_text()) for r in range(QUICK.rounds + 1)]
    assert {info["simulator"] for info in rounds} == {simulator_kernels()}
    numpy_rounds = [{**info, "simulator": "numpy"} for info in rounds]
    card = render_model_card(QUICK, numpy_rounds, summary, 60.0)
    assert "    AILFMD_SIM_COMPILED=0 ailfm train --out DIR --quick" in card
    assert "numpy path" in card
    card = render_model_card(QUICK, [{**info, "simulator": "compiled"} for info in rounds], summary, 60.0)
    assert "    ailfm train --out DIR --quick" in card and "compiled kernels (numba)" in card


def test_the_bench_runs_a_learned_policy_file_beside_the_baselines(quick_training, tmp_path: Path) -> None:
    from ailfmd.lab import bench

    out, _ = quick_training
    cfg = bench.BenchConfig(chips=("tiny",), workloads=("tiny-test",), policies=("linux", str(out / "policy.onnx")),
                            seeds=(0,), duration_s=1.0, jobs=1, drain_s=5.0)
    rows, _ = bench.run_bench(cfg, progress=None)
    assert sorted(r["policy"] for r in rows) == ["learned:policy", "linux"]
    assert all(r["requests_in_flight"] == 0 for r in rows)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    os.chmod(bad, 0o644)
    with pytest.raises(AilfmError, match="bad.onnx"):
        bench.check(bench.BenchConfig(chips=("tiny",), workloads=("tiny-test",), policies=(str(bad),),
                                      seeds=(0,), duration_s=1.0))
