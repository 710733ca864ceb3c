"""The shield on the simulated chip: a policy gone mad cannot overheat it."""

from __future__ import annotations

from ailfmd.control.loop import ControlLoop
from ailfmd.control.shield import SafetyShield, ShieldConfig
from ailfmd.policy.baselines import get_baseline
from ailfmd.sim.chip import load_chip
from ailfmd.sim.platform import SimPlatform
from ailfmd.sim.workload import load_workload
from randompolicy import RandomActions

DURATION_S = 8.0
EPOCH_S = 0.1


def run(policy, shield: bool, seed: int = 3) -> tuple[float, float, int]:
    """(peak temp, time above DTM, shield interventions) over the run; the landing caps
    each epoch's record reports are checked against the shield's own."""
    chip = load_chip("3d-64")
    plat = SimPlatform(chip, load_workload("decode-heavy"), seed=seed, duration_s=DURATION_S)
    # Without the shield: a limit it can never reach, so it never acts.
    off = ShieldConfig(limit_c=200.0, margin_c=1.0, critical_c=300.0, follow_sensor_limits=False)
    cfg = ShieldConfig() if shield else off
    loop = ControlLoop(plat, policy, get_baseline("linux"), SafetyShield(cfg, plat.topology()), mode="enforce")
    interventions = 0
    landing: list[float | None] = []
    for _ in range(int(DURATION_S / EPOCH_S)):
        rec = loop.tick()
        assert rec.landing_fraction == loop.shield.landing_fraction
        # Each CPU's limit as the shield took it: the chip's 80 °C DTM (the simulated
        # sensors report it, below the default 85 °C) or the 200 °C of "no shield".
        assert rec.cpu_limits_c is loop.shield.last_limits_c and rec.cpu_limits_c.keys() == rec.observation.cpus.keys()
        assert {lim for lim, _ in rec.cpu_limits_c.values()} == ({80.0} if shield else {200.0})
        landing.append(rec.landing_fraction)
        interventions += len(rec.shield)
        plat.advance(EPOCH_S)
    m = plat.metrics()
    if shield:
        # Random placements land threads on idle cores all the time; some run hot.
        assert min(landing) < 1.0
    return m.peak_temp_c, m.time_above_dtm_s, interventions


def test_random_policy_under_the_shield_is_no_worse_than_linux() -> None:
    chip = load_chip("3d-64")
    peak_r, above_r, n_shield = run(RandomActions(7, p_max=0.6, last_cpus=16), shield=True)
    peak_l, above_l, _ = run(get_baseline("linux"), shield=False)
    assert n_shield > 0, "the shield must have acted on this hot workload"
    assert peak_r < chip.dtm.critical_c
    assert above_r <= above_l, f"time above DTM {above_r:.3f} s with random+shield vs {above_l:.3f} s for linux"


def test_without_the_shield_random_actions_are_worse() -> None:
    """The test above would be vacuous if random actions were harmless on their own."""
    _, above_raw, _ = run(RandomActions(7, p_max=0.6, last_cpus=16), shield=False)
    _, above_shielded, _ = run(RandomActions(7, p_max=0.6, last_cpus=16), shield=True)
    assert above_raw > above_shielded
