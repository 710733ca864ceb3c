"""DTM sub-steps: a tick re-run in steps of ``dtm_resolution_s`` with every relay live.

Each core's power switches between its free and its throttled value as its relay says,
and each step is the exact modal step of ``ThermalModel`` for the sub-step size (the
core read-out taken once from its public ``from_modes``; temperatures inside the loop are
rises over ambient, compared with thresholds shifted alike).

Two steppers give the same sequence of relay states and temperatures: ``SubStepper``
writes every result in place into buffers it owns and picks each core's power and next
threshold by masked copies (no arithmetic on them), ``ReferenceStepper`` is the plain
loop, kept as the cross-check (``Engine(..., reference=True)``). Under DTM the relays of
the hottest busy cores chatter at the sub-step period (throttled one step, free the
next), so a sub-stepped tick has a flip in almost every sub-step: the loop cannot be
shortened by splitting the tick at the first crossing only, and its cost is the fixed
cost of the sub-steps.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import numpy as np

from ailfmd.sim.chip import Chip
from ailfmd.sim.governor import Dtm
from ailfmd.sim.power import PowerModel
from ailfmd.sim.thermal import ThermalModel

StepResult = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class PowerTable:
    """The PowerModel's coefficients per V/f level, read once through its public API,
    for the DTM sub-steps: tile power = constant + activity x dynamic(level) +
    leakage(level) x exp(beta (T - T_ref))."""

    def __init__(self, power: PowerModel, chip: Chip, freq_mhz: np.ndarray) -> None:
        ref_c = chip.power.leakage_ref_c
        self.dynamic_w_per_activity = power.dynamic_w(1.0, freq_mhz)
        self.leakage_w_at_ref = power.leakage_w(ref_c, freq_mhz)
        self.constant_w = float(power.idle_tile_power_w(ref_c, freq_mhz[0]) - self.leakage_w_at_ref[0])
        self.beta = chip.power.leakage_temp_coeff_per_c
        self.ref_c = ref_c

    def heat_factor(self, temps_c: np.ndarray) -> np.ndarray:
        return np.exp(self.beta * (temps_c - self.ref_c))


class _Modal:
    """What both steppers need: the sub-step propagator and the relay thresholds."""

    def __init__(self, dtm: Dtm, thermal: ThermalModel, n_cores: int, n_sub: int, h_s: float) -> None:
        prop = thermal.propagator(h_s)
        self.n_sub = n_sub
        self.h_s = h_s
        self.decay = prop.decay
        self.modal_input = prop.modal_input
        eye = np.eye(thermal.n_nodes)
        self.readout = np.ascontiguousarray((thermal.from_modes(eye) - thermal.ambient_c)[:n_cores])
        self.ambient_c = thermal.ambient_c
        self.threshold_rise = dtm.threshold_c - thermal.ambient_c
        self.release_rise = dtm.release_c - thermal.ambient_c


class ReferenceStepper(_Modal):
    """The plain sub-step loop (the cross-check of ``SubStepper``)."""

    def run(self, modes: np.ndarray, throttled: np.ndarray, p_free_w: np.ndarray,
            p_throttled_w: np.ndarray) -> StepResult:
        """Sub-steps with per-core power ``p_free_w`` or ``p_throttled_w`` (per core, or
        sub-steps x cores), as each relay says. Returns the final modal state, core
        temperature rises after each sub-step, relay states (row 0: at the start, row
        j + 1: after sub-step j) and the power of each sub-step."""
        n_sub, n = self.n_sub, len(throttled)
        p_free_w = np.broadcast_to(p_free_w, (n_sub, n))
        p_throttled_w = np.broadcast_to(p_throttled_w, (n_sub, n))
        rises = np.empty((n_sub, n))
        power = np.empty((n_sub, n))
        states = np.empty((n_sub + 1, n), dtype=bool)
        states[0] = throttled
        for j in range(n_sub):
            power[j] = np.where(throttled, p_throttled_w[j], p_free_w[j])
            modes = self.decay * modes + self.modal_input @ power[j]
            rises[j] = self.readout @ modes
            throttled = np.where(throttled, rises[j] >= self.release_rise, rises[j] >= self.threshold_rise)
            states[j + 1] = throttled
        return modes, rises, states, power


class SubStepper(_Modal):
    """The sub-step loop with every result written in place into buffers it owns.

    The arrays returned by :meth:`run` are those buffers: valid until the next call.
    """

    def __init__(self, dtm: Dtm, thermal: ThermalModel, n_cores: int, n_sub: int, h_s: float) -> None:
        super().__init__(dtm, thermal, n_cores, n_sub, h_s)
        self._rises = np.empty((n_sub, n_cores))
        self._power = np.empty((n_sub, n_cores))
        self._states = np.empty((n_sub + 1, n_cores), dtype=bool)
        # Row views made once: indexing a row costs as much as the arithmetic on it.
        self._rise_rows = list(self._rises)
        self._power_rows = list(self._power)
        self._state_rows = list(self._states)
        self._state_bytes = [row.view(np.uint8) for row in self._states]
        self._limits = np.array([self.threshold_rise, self.release_rise])  # by relay state
        self._z = np.empty(len(self.decay))
        self._q = np.empty(len(self.decay))

    def run(self, modes: np.ndarray, throttled: np.ndarray, p_free_w: np.ndarray,
            p_throttled_w: np.ndarray) -> StepResult:
        """As :meth:`ReferenceStepper.run`."""
        n_sub = self.n_sub
        if p_free_w.ndim == 1:
            free, slow = (p_free_w,) * n_sub, (p_throttled_w,) * n_sub
        else:
            free, slow = list(p_free_w), list(p_throttled_w)
        z, q = self._z, self._q
        z[...] = modes
        states = self._state_rows
        states[0][...] = throttled
        limit = self._limits.take(self._state_bytes[0])
        mi, readout, decay = self.modal_input, self.readout, self.decay
        dot, copyto, multiply, add, ge = np.dot, np.copyto, np.multiply, np.add, np.greater_equal
        take, state_bytes = self._limits.take, self._state_bytes
        j = 0
        for p, r in zip(self._power_rows, self._rise_rows):
            p[...] = free[j]
            copyto(p, slow[j], "same_kind", states[j])
            dot(mi, p, q)
            multiply(z, decay, z)
            add(z, q, z)
            dot(readout, z, r)
            j += 1
            ge(r, limit, states[j])
            limit = take(state_bytes[j])
        return z.copy(), self._rises, self._states, self._power


def busy_profile(start: np.ndarray | None, t_end: np.ndarray, release: np.ndarray, after_s: np.ndarray,
                 divisor: np.ndarray, utilisation: np.ndarray, core: np.ndarray,
                 onehot: np.ndarray, edges: np.ndarray, n_cores: int) -> np.ndarray:
    """Each core's busy fraction per DTM sub-step (sub-steps x cores), so that heat is
    made while threads run; just ``utilisation`` if every thread runs all tick.

    A thread runs over ``[start, t_end]`` and, if its barrier releases inside the tick,
    over ``[release, tick end]``; a time-shared thread uses 1/divisor of it. ``edges``
    are the sub-step boundaries from 0 to the tick length; ``start`` None: every thread
    there from the tick's beginning.
    """
    dt = edges[-1]
    n_sub = len(edges) - 1
    whole = t_end >= dt
    if start is not None:
        whole &= start <= 0.0
    if np.count_nonzero(whole) == len(whole):
        return utilisation
    part = (~whole).nonzero()[0]
    # Busy time of each thread from the tick start up to each sub-step edge.
    upto = np.minimum(edges, np.minimum(t_end[part], dt)[:, None])
    if start is not None:
        upto -= np.minimum(edges, start[part, None])
    later = after_s[part] > 0
    if np.count_nonzero(later):
        upto[later] += np.maximum(edges - release[part[later], None], 0.0)
    per_step = (upto[:, 1:] - upto[:, :-1]) / ((dt / n_sub) * divisor[part, None])
    full = np.bincount(core[whole], 1.0 / divisor[whole], n_cores)
    return np.minimum(full + per_step.T @ onehot[part], 1.0)


class SubSteps:
    """Resolves a tick in DTM sub-steps: each core's free and throttled power, the relay
    loop, and what the tick did (energy, time above the threshold, peak, events)."""

    def __init__(self, dtm: Dtm, thermal: ThermalModel, table: PowerTable, n_cores: int,
                 tick_s: float, n_sub: int, reference: bool = False,
                 compiled: ModuleType | None = None) -> None:
        h_s = tick_s / n_sub
        kind = ReferenceStepper if reference else SubStepper
        self.stepper = kind(dtm, thermal, n_cores, n_sub, h_s)
        self.table = table
        self.n_sub = n_sub
        self.h_s = h_s
        self.edges = np.linspace(0.0, tick_s, n_sub + 1)
        # Relay states of the last sub-stepped tick (row 0: at its start, row j + 1: after
        # sub-step j); valid until the next one.
        self.states = np.zeros((n_sub + 1, n_cores), dtype=bool)
        # Constants as 0-d arrays: an array operand costs numpy less than a Python float.
        self._c = SimpleNamespace(
            beta=np.array(table.beta), ref_c=np.array(table.ref_c), constant_w=np.array(table.constant_w),
            ambient_c=np.array(thermal.ambient_c), threshold_c=np.array(dtm.threshold_c),
            n_sub=np.array(float(n_sub)))
        self._kernel = None if compiled is None or reference else compiled.substep_tick
        if self._kernel is not None:
            self._compiled_buffers(dtm, thermal, n_cores)

    def _compiled_buffers(self, dtm: Dtm, thermal: ThermalModel, n_cores: int) -> None:
        """Constants and buffers of the compiled sub-step kernel, made once."""
        s = self.stepper
        n_sub, n_modes = self.n_sub, len(s.decay)
        self._consts = np.array([self.table.beta, self.table.ref_c, self.table.constant_w,
                                 thermal.ambient_c, dtm.threshold_c, s.threshold_rise,
                                 s.release_rise, self.h_s])
        self._decay = np.ascontiguousarray(s.decay)
        self._modal_input_t = np.ascontiguousarray(s.modal_input.T)  # cores x modes
        self._readout_t = np.ascontiguousarray(s.readout.T)  # modes x cores
        self._rises = np.empty((n_sub, n_cores))
        self._work = [np.empty(n_modes), np.empty(n_modes), np.empty(n_cores), np.empty(n_cores),
                      np.empty(n_cores)]

    def resolve(self, st, ck, dynamic2_w: np.ndarray, busy: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, int]]:
        """Re-run the tick of ``st`` (an ``EngineState``) in DTM sub-steps.

        ``dynamic2_w`` is each core's dynamic power at full activity share for its free
        (row 0) and throttled (row 1) operating point (``ck``, the state's ``Clocks``);
        ``busy`` is each core's
        busy fraction per sub-step (sub-steps x cores), or per tick (cores) when every
        core is busy alike throughout. Power = idle part (leakage at the start-of-tick
        temperature) + busy fraction x dynamic power. Updates the state's temperatures,
        relays and throttle counts, and remembers whether a relay that matters flipped
        (then the next tick goes straight to sub-steps: DTM keeps oscillating). Returns per
        core the fraction of the tick spent throttled and the fraction of its busy time
        spent throttled (what slows its threads), and the tick's energy, time above DTM,
        peak and throttle events.
        """
        if self._kernel is not None:
            return self._resolve_compiled(st, ck, dynamic2_w, busy)
        c = self._c
        idle = ck.leakage2_w * np.exp(c.beta * (st.temps_c - c.ref_c))
        idle += c.constant_w
        if busy.ndim == 1:
            p_free, p_slow = busy * dynamic2_w + idle
        else:
            p_free = busy * dynamic2_w[0]
            p_free += idle[0]
            p_slow = busy * dynamic2_w[1]
            p_slow += idle[1]
        modes, rises, states, power = self.stepper.run(st.modes, st.throttled, p_free, p_slow)
        self.states[...] = states
        during, after = states[:-1], states[1:]
        flips = during != after
        rising = flips & after
        flips &= ck.matters
        st.dtm_active = np.count_nonzero(flips) > 0
        events = int(np.count_nonzero(rising))
        if events:
            st.throttle_count += np.add.reduce(rising, axis=0)
        st.throttled = states[-1].copy()
        st.modes = modes
        st.temps_c = rises[-1] + c.ambient_c
        hottest_c = np.maximum.reduce(rises, axis=1)
        hottest_c += c.ambient_c
        time_frac = np.add.reduce(during, axis=0) / c.n_sub
        if busy.ndim == 1:
            busy_frac = time_frac
        else:
            busy_total = np.add.reduce(busy, axis=0)
            busy_frac = np.divide(np.add.reduce(during * busy, axis=0), busy_total,
                                  out=time_frac.copy(), where=busy_total > 0)
        h = self.h_s
        account = (float(np.add.reduce(power, axis=None)) * h,
                   int(np.count_nonzero(hottest_c >= c.threshold_c)) * h,
                   float(np.maximum.reduce(hottest_c)), events)
        return time_frac, busy_frac, account

    def _resolve_compiled(self, st, ck, dynamic2_w: np.ndarray, busy: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, int]]:
        """:meth:`resolve` in one compiled call (``compiled.substep_tick``)."""
        per_step = busy.ndim == 2
        n = len(st.throttled)
        modes = np.empty_like(st.modes)
        temps = np.empty(n)
        time_frac = np.empty(n)
        busy_frac = np.empty(n)
        z, q, p_free, p_slow, power = self._work
        energy_j, above_s, peak_c, events, active = self._kernel(
            st.modes, st.throttled, st.temps_c, ck.leakage2_w, dynamic2_w,
            busy if per_step else busy.reshape(1, n), per_step, ck.matters, self._decay,
            self._modal_input_t, self._readout_t, self._consts, self.states, self._rises, modes,
            st.throttle_count, time_frac, busy_frac, z, q, p_free, p_slow, power, temps)
        st.dtm_active = active
        st.throttled = self.states[-1].copy()
        st.modes = modes
        st.temps_c = temps
        return time_frac, busy_frac, (energy_j, above_s, peak_c, events)
