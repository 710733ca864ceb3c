"""The runtime of learned policies: loads what the trainer wrote, refuses what it must not run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ailfmd.lab.run import Scenario, run_scenario
from ailfmd.policy.onnx_policy import OnnxPolicy, PolicyFileError
from ailfmd.service.config import PolicySettings
from ailfmd.service.policies import UnavailablePolicy, load_policy
from ailfmd.sim.chip import load_chip
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.workload import load_workload
from ailfmd.train.model import set_metadata

NOBODY_UID = 65534


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)
    return dst


def test_loads_the_trained_policy_and_decides_on_the_simulator(quick_training) -> None:
    out, _ = quick_training
    policy = OnnxPolicy(out / "policy.onnx", service=False)
    assert policy.feature_schema == "ailfmd.features/2"
    chip = load_chip("3d-64")  # trained on the tiny chip: the model sizes itself to any chip
    plat = SimPlatform(chip, load_workload("decode-heavy"), seed=0, duration_s=2.0)
    policy.reset(plat.topology(), plat.capabilities())
    plat.advance(0.3)
    obs = plat.observe()
    decision = policy.decide(obs)
    ladder = set(int(f) for f in plat.engine.levels.freq_khz)
    assert set(decision.action.freq_cap_khz.values()) <= ladder
    # Every managed thread ends up on exactly one CPU, no two on the same one.
    placed = {}
    for tid, sample in obs.threads.items():
        cpus = decision.action.affinity.get(sample.ref, sample.affinity)
        assert len(cpus) == 1, (tid, cpus)
        placed[tid] = next(iter(cpus))
    assert len(set(placed.values())) == len(placed)
    assert all(r.source == "policy:onnx" for r in decision.reasons)
    assert decision.info["inference_ms"] > 0


def test_new_and_crowded_threads_are_placed_on_cpus_of_their_own(quick_training) -> None:
    from dataclasses import replace

    out, _ = quick_training
    policy = OnnxPolicy(out / "policy.onnx", service=False)
    plat = SimPlatform(load_chip("3d-64"), load_workload("prefill-heavy"), seed=0, duration_s=2.0)
    policy.reset(plat.topology(), plat.capabilities())
    plat.advance(0.8)
    obs = plat.observe()
    tids = sorted(obs.threads)
    assert len(tids) >= 3
    # One thread never ran (no CPU yet); two others share one CPU.
    threads = dict(obs.threads)
    threads[tids[0]] = replace(threads[tids[0]], last_cpu=None)
    threads[tids[2]] = replace(threads[tids[2]], last_cpu=threads[tids[1]].last_cpu)
    decision = policy.decide(replace(obs, threads=threads))
    placed = {r.tid: next(iter(c)) for r, c in decision.action.affinity.items()}
    assert tids[0] in placed and tids[2] in placed
    cpus = [placed.get(t, threads[t].last_cpu) for t in tids]
    assert len(set(cpus)) == len(cpus), "every thread on a CPU of its own"
    why = {r.target: r.detail for r in decision.reasons if r.kind == "placement"}
    assert "destination score" in why[f"thread {tids[0]}"]


def test_runs_a_whole_scenario(quick_training) -> None:
    out, _ = quick_training
    sc = Scenario(load_chip("tiny"), load_workload("tiny-test"), 5, 2.0)
    result = run_scenario(sc, OnnxPolicy(out / "policy.onnx", service=False))
    assert result.metrics.requests_completed > 0
    assert result.refused_actions == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_file_is_refused_with_its_name(quick_training, tmp_path: Path, damage: str) -> None:
    out, _ = quick_training
    good = (out / "policy.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes({"garbage": os.urandom(4096), "truncated": good[: len(good) // 2], "empty": b""}[damage])
    os.chmod(bad, 0o644)
    with pytest.raises(PolicyFileError) as e:
        OnnxPolicy(bad, service=False)
    assert str(bad) in str(e.value)


def _card_changed(trained: Path, dst: Path, updates: dict) -> Path:
    """The trained policy with ``updates`` merged into its metadata, written 0644 at ``dst``."""
    dst.write_bytes(set_metadata((trained / "policy.onnx").read_bytes(), updates))
    os.chmod(dst, 0o644)
    return dst


def test_another_feature_schema_is_refused(quick_training, tmp_path: Path) -> None:
    other = _card_changed(quick_training[0], tmp_path / "old.onnx", {"feature_schema": "ailfmd.features/0"})
    with pytest.raises(PolicyFileError, match=r"feature schema 'ailfmd.features/0'.*ailfmd.features/2"):
        OnnxPolicy(other, service=False)


@pytest.mark.parametrize("threshold", [1.5, -0.1, "high"])
def test_a_move_threshold_that_is_no_probability_is_refused(quick_training, tmp_path: Path, threshold) -> None:
    bad = _card_changed(quick_training[0], tmp_path / "bad-threshold.onnx", {"decoding": {"move_threshold": threshold}})
    with pytest.raises(PolicyFileError, match=f"move threshold {threshold!r}"):
        OnnxPolicy(bad, service=False)


def test_an_older_policy_format_is_refused(quick_training, tmp_path: Path) -> None:
    old = _card_changed(quick_training[0], tmp_path / "format1.onnx", {"format": "ailfmd.policy/1"})
    with pytest.raises(PolicyFileError, match=r"policy format 'ailfmd.policy/1'; this ailfmd reads 'ailfmd.policy/2'"):
        OnnxPolicy(old, service=False)


def test_an_onnx_model_that_is_no_policy_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "plain.onnx"
    path.write_bytes(model.SerializeToString())
    os.chmod(path, 0o644)
    with pytest.raises(PolicyFileError, match="not an ailfmd policy"):
        OnnxPolicy(path, service=False)


def test_unsafe_permissions_are_refused(quick_training, tmp_path: Path) -> None:
    out, _ = quick_training
    path = _copy(out / "policy.onnx", tmp_path / "p.onnx")
    os.chmod(path, 0o666)
    with pytest.raises(PolicyFileError, match="writable by group or others"):
        OnnxPolicy(path, service=False)
    os.chmod(path, 0o644)
    OnnxPolicy(path, service=True if os.geteuid() == 0 else False)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_service_only_loads_root_owned_policies(quick_training, tmp_path: Path) -> None:
    out, _ = quick_training
    path = _copy(out / "policy.onnx", tmp_path / "p.onnx")
    os.chown(path, NOBODY_UID, NOBODY_UID)
    with pytest.raises(PolicyFileError, match=f"owned by uid {NOBODY_UID}, not root"):
        OnnxPolicy(path, service=True)
    with pytest.raises(PolicyFileError, match="neither root nor this user"):
        OnnxPolicy(path, service=False)


def test_the_daemon_loads_it_and_falls_back_on_a_bad_file(quick_training, tmp_path: Path) -> None:
    out, _ = quick_training
    good = _copy(out / "policy.onnx", tmp_path / "good.onnx")
    loaded = load_policy(PolicySettings(kind="onnx", path=good))
    assert isinstance(loaded.policy, OnnxPolicy)
    assert loaded.info.feature_schema == "ailfmd.features/2"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    os.chmod(bad, 0o644)
    loaded = load_policy(PolicySettings(kind="onnx", path=bad))
    assert isinstance(loaded.policy, UnavailablePolicy)
    assert str(bad) in loaded.policy.reason


def test_nan_from_the_model_is_an_error_not_an_action(quick_training, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    out, _ = quick_training
    model = onnx.load(str(out / "policy.onnx"))
    for init in model.graph.initializer:
        if init.name == "cap/b0":
            init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, np.nan,
                                                          dtype=np.float32), "cap/b0"))
    path = tmp_path / "nan.onnx"
    path.write_bytes(model.SerializeToString())
    os.chmod(path, 0o644)
    policy = OnnxPolicy(path, service=False)
    plat = SimPlatform(load_chip("tiny"), load_workload("tiny-test"), seed=0, duration_s=1.0)
    policy.reset(plat.topology(), plat.capabilities())
    with pytest.raises(Exception, match="NaN"):
        policy.decide(plat.observe())


@pytest.mark.parametrize("machine", ["xeon-2s-ht", "vm-bare"])
def test_decides_on_a_real_linux_layout(quick_training, machine: str, machine_sys, tmp_path: Path) -> None:
    """Trained on the simulator, run on a Linux fixture tree with a real multi-threaded
    process: the masks carry what Linux cannot measure, and the decision is well formed."""
    import time

    from childproc import THREADS_CHILD, child_process

    from ailfmd.platform.linux.platform import LinuxPlatform
    from ailfmd.platform.linux.targets import TargetSelector

    out, _ = quick_training
    policy = OnnxPolicy(out / "policy.onnx", service=False)
    with child_process(THREADS_CHILD, "") as (proc, words):
        plat = LinuxPlatform(sysfs_root=machine_sys(machine), run_dir=tmp_path / "run",
                             targets=TargetSelector(pids=(proc.pid,)))
        try:
            policy.reset(plat.topology(), plat.capabilities())
            policy.decide(plat.observe())
            time.sleep(0.02)
            obs = plat.observe()
            decision = policy.decide(obs)
        finally:
            plat.close()
    tids = {int(w) for w in words}
    assert tids <= set(obs.threads)
    online = set(plat.topology().online_cpus)
    for ref, cpus in decision.action.affinity.items():
        assert len(cpus) == 1 and cpus <= online
    for cpu, khz in decision.action.freq_cap_khz.items():
        st = obs.cpus[cpu]
        assert st.hw_min_khz <= khz <= st.hw_max_khz
    if machine == "vm-bare":  # no cpufreq: nothing to cap
        assert decision.action.freq_cap_khz == {}


def test_the_shipped_policy_loads_and_matches_this_ailfmd() -> None:
    """policies/default.onnx is what the package installs and tools/run.sh runs: a change
    of the feature schema or the policy contract without retraining fails here."""
    path = Path(__file__).resolve().parents[2] / "policies" / "default.onnx"
    policy = OnnxPolicy(path, service=False)
    meta = policy.metadata
    # Randomised cooling on the stacked die; the flat 2d-64 stays held out.
    assert meta["trained_on"]["chips"] == ["3d-64", "3d-64-cool", "3d-64-amb35"]
    assert {"bc", "dagger"} <= set(meta["scores"])
    assert len(meta["rounds"]) >= 2 and meta["rounds"][-1]["data"]["learner_steps"] > 0
    sc = Scenario(load_chip("3d-64"), load_workload("prefill-heavy"), 900, 2.0)
    result = run_scenario(sc, policy)
    assert result.refused_actions == 0 and result.metrics.requests_arrived > 0
    assert (Path(__file__).resolve().parents[2] / "policies" / "default.md").read_text().startswith("# Model card")


def test_without_onnxruntime_the_daemon_falls_back(quick_training, tmp_path: Path) -> None:
    """Debian has no onnxruntime: loading must fail with a reason, never crash the daemon.
    A child interpreter where importing onnxruntime fails, as on a plain Debian box."""
    import subprocess
    import sys

    out, _ = quick_training
    good = _copy(out / "policy.onnx", tmp_path / "good.onnx")
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "onnxruntime.py").write_text("raise ImportError('No module named onnxruntime')\n")
    code = ("from pathlib import Path\nfrom ailfmd.service.config import PolicySettings\n"
            "from ailfmd.service.policies import load_policy\n"
            f"p = load_policy(PolicySettings(kind='onnx', path=Path({str(good)!r})))\n"
            "print(type(p.policy).__name__, '|', p.policy.reason)\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("UnavailablePolicy |") and "onnxruntime" in res.stdout


def test_the_daemon_reads_temperatures_against_its_configured_limit(machine_sys, tmp_path: Path) -> None:
    """On a fixture Xeon whose coretemp sensors report a maximum of 86 °C, the daemon's
    learned policy measures temperatures from ``[safety] limit_c`` where that is lower,
    from the sensors' maximum where it is higher, and follows a reload."""
    import dataclasses

    from ailfmd.service.config import DaemonConfig
    from ailfmd.service.daemon import Daemon

    shipped = _copy(Path(__file__).resolve().parents[2] / "policies" / "default.onnx", tmp_path / "p.onnx")
    base = DaemonConfig()

    def config(limit_c: float) -> DaemonConfig:
        return dataclasses.replace(
            base,
            daemon=dataclasses.replace(base.daemon, run_dir=tmp_path / "run", mode="observe"),
            platform=dataclasses.replace(base.platform, kind="linux", sysfs_root=machine_sys("xeon-2s-ht")),
            policy=dataclasses.replace(base.policy, kind="onnx", path=shipped),
            safety=dataclasses.replace(base.safety, limit_c=limit_c, critical_c=limit_c + 10.0),
            metrics=dataclasses.replace(base.metrics, enabled=False),
            control=dataclasses.replace(base.control, socket=tmp_path / "c.sock"),
        )

    d = Daemon(config(75.0), env={})
    try:
        policy = d.policy.policy
        assert isinstance(policy, OnnxPolicy)
        d.loop.tick()
        assert d.loop.last is not None and d.loop.last.fallback is None, d.loop.last.fallback
        obs = d.loop.last.observation
        fs = policy.scores(obs)[0]
        temps = np.array([obs.cpus[c].temp.temp_c for c in fs.cpus])
        assert fs.limit_c.tolist() == [75.0] * len(fs.cpus)
        np.testing.assert_allclose(fs.core_features[:, 0], (temps - 40.0) / 35.0, rtol=1e-6)
        # A higher configured limit does not lift the sensors' 86 °C.
        conf = tmp_path / "ailfmd.toml"
        conf.write_text(f'[policy]\nkind = "onnx"\npath = "{shipped}"\n'
                        f'[safety]\nlimit_c = 95.0\ncritical_c = 99.0\n')
        d.reload(str(conf))
        reloaded = d.policy.policy
        assert isinstance(reloaded, OnnxPolicy) and reloaded is not policy
        reloaded.reset(d.platform.topology(), d.platform.capabilities())
        assert reloaded.scores(obs)[0].limit_c.tolist() == [86.0] * len(fs.cpus)
    finally:
        d.platform.close()
