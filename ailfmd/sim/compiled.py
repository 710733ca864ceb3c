"""Compiled kernels of the tick's hot paths (numba), the same arithmetic as the numpy path.

A busy tick is dozens of numpy calls on arrays of 64 cores or a few dozen threads, each
costing more in call overhead than in arithmetic, and the DTM sub-steps are ten small
matrix-vector steps in a row. Each function here fuses one phase into a single compiled
call. They perform the numpy path's operations in the same order, element by element;
sums over many elements (matrix-vector products, energy) are accumulated in another order
than BLAS and numpy's pairwise sums, and ``exp`` comes from another library, so results
agree with the numpy path to rounding (docs/simulator.md §8 says how closely).

``jit.load()`` hands this module out when numba is installed and the numpy path is not
asked for (``AILFMD_SIM_COMPILED=0``). Without numba it still imports (every module of
the package does), its functions then plain Python that nothing calls. The daemon never
needs numba.

Matrices are passed transposed where that lets the inner loop run over contiguous memory
with one accumulator per output element, which vectorises without fast-math (no sum is
reassociated by the compiler).
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np

try:
    import numba
except (ImportError, OSError):
    # Optional (extra "fast"); OSError: an install whose LLVM library does not load. The
    # simulator then runs its numpy path (jit.load() returns None).
    numba = None


def _jit(fn: Callable) -> Callable:
    """``numba.njit`` with an on-disk cache when one can be written.

    Compiling every kernel takes a few seconds; the cache makes that once per machine.
    numba caches in ``__pycache__`` next to this file, or under the user's cache
    directory (``~/.cache/numba``) when the package is read-only, ``NUMBA_CACHE_DIR``
    overriding both; it checks that the place is writable before choosing it, and with no
    writable place it refuses to cache: the kernels are then compiled in every process.
    A package imported from a zip archive is not cached (numba does not check that
    place before writing).
    """
    if numba is None:
        return fn
    if os.path.isfile(fn.__code__.co_filename):
        try:
            return numba.njit(cache=True)(fn)
        except (RuntimeError, OSError):  # no writable cache location
            pass
    return numba.njit(cache=False)(fn)


# ---------------------------------------------------------------------- modal products
# The two products of every exact thermal step, written out so numba fuses them with the
# loop around them; the summation order is fixed (and the same in every kernel).

@_jit
def _heat_input(modal_input_t: np.ndarray, power_w: np.ndarray, out: np.ndarray) -> None:
    """``out = power_w @ modal_input_t``: the modes' heat input."""
    m, n = out.shape[0], power_w.shape[0]
    for k in range(m):
        out[k] = 0.0
    for i in range(n):
        p = power_w[i]
        for k in range(m):
            out[k] += modal_input_t[i, k] * p


@_jit
def _readout(readout_t: np.ndarray, modes: np.ndarray, out: np.ndarray) -> None:
    """``out = modes @ readout_t``: the cores' temperature rises from the modes."""
    m, n = modes.shape[0], out.shape[0]
    for i in range(n):
        out[i] = 0.0
    for k in range(m):
        zk = modes[k]
        for i in range(n):
            out[i] += readout_t[k, i] * zk


# ---------------------------------------------------------------------- DTM sub-steps

@_jit
def substep_tick(modes: np.ndarray, throttled: np.ndarray, temps_c: np.ndarray,
                 leakage2_w: np.ndarray, dynamic2_w: np.ndarray, busy: np.ndarray,
                 per_step: bool, matters: np.ndarray, decay: np.ndarray,
                 modal_input_t: np.ndarray, readout_t: np.ndarray, consts: np.ndarray,
                 states: np.ndarray, rises: np.ndarray, modes_out: np.ndarray,
                 throttle_count: np.ndarray, time_frac: np.ndarray, busy_frac: np.ndarray,
                 z: np.ndarray, q: np.ndarray, p_free: np.ndarray, p_slow: np.ndarray,
                 power: np.ndarray, temps_out: np.ndarray) -> tuple[float, int, float, int, bool]:
    """A tick in DTM sub-steps and what it did: ``SubSteps.resolve`` in one call.

    ``consts``: beta, leakage reference (°C), constant tile power (W), ambient (°C), DTM
    threshold (°C), threshold and release as rises over ambient, sub-step length (s).
    ``busy``: per sub-step (``per_step``) or one row for the whole tick. Writes the relay
    states (row 0 at the start), core rises after each sub-step, the final modes, the
    end temperatures, throttle counts, the fraction of the tick and of the busy time each
    core spent throttled. Returns energy (J), time above the threshold (s), peak (°C),
    throttle events and whether a relay that matters flipped.
    """
    beta, ref_c, constant_w, ambient_c, threshold_c, thr_rise, rel_rise, h_s = (
        consts[0], consts[1], consts[2], consts[3], consts[4], consts[5], consts[6], consts[7])
    n_sub, n = rises.shape
    m = decay.shape[0]
    for i in range(n):
        heat = math.exp(beta * (temps_c[i] - ref_c))
        idle0 = leakage2_w[0, i] * heat + constant_w
        idle1 = leakage2_w[1, i] * heat + constant_w
        p_free[i] = idle0
        p_slow[i] = idle1
        states[0, i] = throttled[i]
    for k in range(m):
        z[k] = modes[k]
    energy_w = 0.0
    for j in range(n_sub):
        row = j if per_step else 0
        for i in range(n):
            if states[j, i]:
                p = busy[row, i] * dynamic2_w[1, i] + p_slow[i]
            else:
                p = busy[row, i] * dynamic2_w[0, i] + p_free[i]
            energy_w += p
            if j == 0:
                power[i] = p
            elif p != power[i]:
                # The heat input changes only where a relay flipped or a core's busy
                # fraction changed: update it by those columns, not the whole product.
                dp = p - power[i]
                power[i] = p
                for k in range(m):
                    q[k] += modal_input_t[i, k] * dp
        if j == 0:
            _heat_input(modal_input_t, power, q)
        for k in range(m):
            z[k] = z[k] * decay[k] + q[k]
        _readout(readout_t, z, rises[j])
        for i in range(n):
            r = rises[j, i]
            states[j + 1, i] = r >= rel_rise if states[j, i] else r >= thr_rise
    for k in range(m):
        modes_out[k] = z[k]
    events = 0
    active = False
    above_steps = 0
    peak_c = -math.inf
    for j in range(n_sub):
        hottest = -math.inf
        for i in range(n):
            if rises[j, i] > hottest:
                hottest = rises[j, i]
            before, after = states[j, i], states[j + 1, i]
            if before != after:
                if after:
                    events += 1
                    throttle_count[i] += 1
                if matters[i]:
                    active = True
        hottest_c = hottest + ambient_c
        if hottest_c >= threshold_c:
            above_steps += 1
        if hottest_c > peak_c:
            peak_c = hottest_c
    for i in range(n):
        temps_out[i] = rises[n_sub - 1, i] + ambient_c
        during = 0
        for j in range(n_sub):
            if states[j, i]:
                during += 1
        time_frac[i] = during / n_sub
    if per_step:
        for i in range(n):
            total = 0.0
            slowed = 0.0
            for j in range(n_sub):
                total += busy[j, i]
                if states[j, i]:
                    slowed += busy[j, i]
            busy_frac[i] = slowed / total if total > 0 else time_frac[i]
    else:
        for i in range(n):
            busy_frac[i] = time_frac[i]
    return energy_w * h_s, above_steps * h_s, peak_c, events, active


# ---------------------------------------------------------------------- look-ahead

@_jit
def _knot_time(speed: np.ndarray, cur: np.ndarray, cum: np.ndarray, i: int, knot: int) -> float:
    """Time for thread ``i`` to reach pool index ``knot`` (``Timing.knot_times``)."""
    return (speed[0, i] * (cum[0, knot] - cur[0, i]) + speed[1, i] * (cum[1, knot] - cur[1, i])
            + speed[2, i] * (cum[2, knot] - cur[2, i]))


@_jit
def plan_tick(seg: np.ndarray, done: np.ndarray, step_end: np.ndarray, penalty_s: np.ndarray,
              start: np.ndarray, divisor: np.ndarray, clock_mhz: np.ndarray, core: np.ndarray,
              llc_s: np.ndarray, dram_ns: float, cum: np.ndarray, rate: np.ndarray,
              length: np.ndarray, seg_kernel: np.ndarray, seg_mpki: np.ndarray, widest: int,
              starts: np.ndarray, end_seg: np.ndarray, tick_s: float, reverse: bool,
              speed: np.ndarray, cur: np.ndarray, rem: np.ndarray, t_end: np.ndarray,
              dram_t: np.ndarray, busy: np.ndarray, after: np.ndarray, release: np.ndarray,
              dominant: np.ndarray, kernel: np.ndarray, mpki: np.ndarray,
              dram_kernel: np.ndarray, utilisation: np.ndarray) -> None:
    """The general tick's look-ahead at DRAM latency ``dram_ns``: ``LookAhead.speeds``,
    ``timing``, ``busy_s``, ``dominant_segments``, then ``CoreView.core_kernels`` and each
    core's utilisation, in one call.

    ``start``: each thread's start in the tick (zeros when all start at its beginning;
    adding a zero start or penalty changes no bit). ``reverse``: a time-shared core shows
    its threads in turn (the last row written wins).
    """
    n = seg.shape[0]
    n_cores = kernel.shape[0]
    dram_s = 1e-9 * dram_ns
    for t in range(n):
        g, e = seg[t], step_end[t]
        u = divisor[t] * 1e-6 / clock_mhz[t]
        speed[0, t] = u
        speed[1, t] = divisor[t] * llc_s[t]
        speed[2, t] = divisor[t] * dram_s
        acc = start[t] + penalty_s[t]
        for r in range(3):
            c = cum[r, g] + done[t] * rate[r, g]
            cur[r, t] = c
            rem[r, t] = cum[r, e] - c
            acc = acc + speed[r, t] * rem[r, t]
        t_end[t] = acc
        dram_t[t] = speed[2, t] * rem[2, t]
    # Barriers: each request's slowest thread releases the others.
    n_req = starts.shape[0]
    for b in range(n_req):
        lo = starts[b]
        hi = starts[b + 1] if b + 1 < n_req else n
        slowest = t_end[lo]
        for t in range(lo + 1, hi):
            if t_end[t] > slowest:
                slowest = t_end[t]
        for t in range(lo, hi):
            release[t] = slowest
    for t in range(n):
        later = release[t] < tick_s and step_end[t] != end_seg[t]
        after[t] = (tick_s - release[t]) * later
        busy[t] = min(t_end[t], tick_s) - start[t] + after[t]
    # Dominant segments.
    for t in range(n):
        g, e = seg[t], step_end[t]
        base = start[t] + penalty_s[t]
        avail = max(tick_s - base, 0.0)
        tpi = speed[0, t] * rate[0, g] + speed[1, t] * rate[1, g] + speed[2, t] * rate[2, g]
        in_current = min((length[g] - done[t]) * tpi, avail)
        out = e if after[t] > in_current else g
        if in_current < avail and g < e:
            prev = 0.0
            best, longest = 0, -np.inf
            for k in range(widest):
                reached = min(_knot_time(speed, cur, cum, t, min(g + k + 1, e)), avail)
                spent = reached if k == 0 else reached - prev
                prev = reached
                if spent > longest:
                    best, longest = k, spent
            out = e if after[t] > longest else min(g + best, e)
        dominant[t] = -1 if out == e and e == end_seg[t] else out
    # Each core's kernel and MPKI, and the kernels the DRAM queue sees.
    for c in range(n_cores):
        kernel[c] = 0
        mpki[c] = 0.0
        dram_kernel[c] = 0
        utilisation[c] = 0.0
    running = np.zeros(n_cores, dtype=np.bool_)
    for i in range(n):
        t = n - 1 - i if reverse else i
        d = dominant[t]
        if d >= 0:
            kernel[core[t]] = seg_kernel[d]
            mpki[core[t]] = seg_mpki[d]
            if busy[t] >= 0.5 * tick_s:
                running[core[t]] = True
    for c in range(n_cores):
        if running[c]:
            dram_kernel[c] = kernel[c]
    for t in range(n):
        utilisation[core[t]] += busy[t] / divisor[t]
    for c in range(n_cores):
        utilisation[c] = min(utilisation[c], tick_s) / tick_s


@_jit
def throttled_base_speed(frac: np.ndarray, core: np.ndarray, f_hi_ghz: np.ndarray,
                         dominant: np.ndarray, seg: np.ndarray, rate: np.ndarray,
                         llc_ns: np.ndarray, dram_ns: float, f_lo_ghz: float,
                         divisor: np.ndarray, start: np.ndarray, penalty_s: np.ndarray,
                         rem: np.ndarray, speed1: np.ndarray, dram_t: np.ndarray,
                         u_out: np.ndarray, t_end_out: np.ndarray) -> None:
    """``LookAhead.throttled_clock`` and ``Timing.with_base_speed`` in one call: each
    thread's seconds per base cycle at the clock that matches its throttled/free mix, and
    when it then reaches its barrier."""
    for t in range(core.shape[0]):
        theta = frac[core[t]]
        f_hi = f_hi_ghz[t]
        g = dominant[t] if dominant[t] >= 0 else seg[t]
        base = rate[0, g]
        stall_ns = llc_ns[t] * rate[1, g] + dram_ns * rate[2, g]
        if base > 0 and theta > 0:
            ips = (1.0 - theta) / (base / f_hi + stall_ns) + theta / (base / f_lo_ghz + stall_ns)
            clock = base / (1.0 / ips - stall_ns) * 1e3
        else:
            clock = (f_hi + (f_lo_ghz - f_hi) * theta) * 1e3
        u = divisor[t] * 1e-6 / clock
        u_out[t] = u
        t_end_out[t] = start[t] + penalty_s[t] + u * rem[0, t] + speed1[t] * rem[1, t] + dram_t[t]


@_jit
def busy_profile(start: np.ndarray, has_start: bool, t_end: np.ndarray, release: np.ndarray,
                 after_s: np.ndarray, divisor: np.ndarray, utilisation: np.ndarray,
                 core: np.ndarray, edges: np.ndarray, out: np.ndarray) -> bool:
    """``substeps.busy_profile`` into ``out`` (sub-steps x cores); False, with ``out``
    untouched, when every thread runs all tick (the busy fraction is the utilisation)."""
    n = t_end.shape[0]
    n_sub = edges.shape[0] - 1
    dt = edges[n_sub]
    whole = np.empty(n, dtype=np.bool_)
    n_whole = 0
    for t in range(n):
        w = t_end[t] >= dt
        if has_start:
            w = w and start[t] <= 0.0
        whole[t] = w
        n_whole += w
    if n_whole == n:
        return False
    n_cores = utilisation.shape[0]
    full = np.zeros(n_cores)
    for t in range(n):
        if whole[t]:
            full[core[t]] += 1.0 / divisor[t]
    acc = np.zeros((n_sub, n_cores))
    h = dt / n_sub
    upto = np.empty(n_sub + 1)
    for t in range(n):
        if whole[t]:
            continue
        end = min(t_end[t], dt)
        for k in range(n_sub + 1):
            upto[k] = min(edges[k], end)
            if has_start:
                upto[k] -= min(edges[k], start[t])
            if after_s[t] > 0:
                upto[k] += max(edges[k] - release[t], 0.0)
        scale = h * divisor[t]
        for k in range(n_sub):
            acc[k, core[t]] += (upto[k + 1] - upto[k]) / scale
    for k in range(n_sub):
        for c in range(n_cores):
            out[k, c] = min(full[c] + acc[k, c], 1.0)
    return True


# ---------------------------------------------------------------------- cores

@_jit
def activity(kernel: np.ndarray, mpki: np.ndarray, dram_ns: float, f_mhz: np.ndarray,
             kt_activity: np.ndarray, kt_base_cpi: np.ndarray, kt_mlp: np.ndarray,
             llc_hit_apki: np.ndarray, llc_latency_ns: np.ndarray, stall_fraction: float,
             out: np.ndarray) -> None:
    """``CoreView.activity`` for each row of clocks ``f_mhz`` (rows x cores) into ``out``."""
    for r in range(f_mhz.shape[0]):
        for c in range(kernel.shape[0]):
            k = kernel[c]
            apki = llc_hit_apki[k] + mpki[c]
            base = kt_base_cpi[k]
            cpi = base + f_mhz[r, c] * 1e-6 / kt_mlp[k] * (apki * llc_latency_ns[c] + mpki[c] * dram_ns)
            out[r, c] = kt_activity[k] * (stall_fraction + (1.0 - stall_fraction) * base / cpi)


@_jit
def loaded_dram_latency_ns(kernel: np.ndarray, mpki: np.ndarray, f_mhz: np.ndarray,
                           executes: np.ndarray, base_cpi: np.ndarray, mlp: np.ndarray,
                           bytes_per_miss: np.ndarray, llc_hit_apki: np.ndarray,
                           llc_latency_ns: np.ndarray, idle_ns: float, service_ns: float,
                           bandwidth_gbps: float, max_iter: int, tol: float) -> float:
    """``CoreView.dram_latency`` without its memo: ``PerfModel.loaded_dram_latency_ns``
    (the queue fixed point of ``PerfModel._solve_queue``) over the cores that reach DRAM."""
    n = kernel.shape[0]
    a = np.empty(n)
    b = np.empty(n)
    c = np.empty(n)
    m = 0
    for i in range(n):
        k = kernel[i]
        if k == 0:
            continue
        f = f_mhz[i] * 1e-3
        x = mpki[i]
        demand = f * (x * 1e-3 * bytes_per_miss[k])
        if not (executes[k] and demand > 0):
            continue
        inv_mlp = 1.0 / mlp[k]
        apki = llc_hit_apki[k] + x
        a[m] = base_cpi[k] + apki * 1e-3 * llc_latency_ns[i] * f * inv_mlp
        b[m] = x * 1e-3 * f * inv_mlp
        c[m] = demand
        m += 1
    if m == 0:
        return idle_ns
    lo, hi = 0.0, 1.0
    s = 0.0
    for i in range(m):
        s += c[i] * (1.0 / (a[i] + b[i] * idle_ns))
    rho = min(s / bandwidth_gbps, 0.5)
    for _ in range(max_iter):
        gap = 1.0 - rho
        latency = idle_ns + service_ns * rho / (2.0 * gap)
        s = 0.0
        slope = 0.0
        for i in range(m):
            inv = 1.0 / (a[i] + b[i] * latency)
            s += c[i] * inv
            slope += c[i] * b[i] * (inv * inv)
        h = s / bandwidth_gbps - rho
        if h > 0:
            lo = rho
        else:
            hi = rho
        if abs(h) < tol or hi - lo < tol:
            break
        dh = -slope * service_ns / (2.0 * gap * gap) / bandwidth_gbps - 1.0
        step = rho - h / dh
        rho = step if lo < step < hi else 0.5 * (lo + hi)
    gap = 1.0 - rho
    return idle_ns + service_ns * rho / (2.0 * gap)


# ---------------------------------------------------------------------- progress

@_jit
def timing_rows(rows: np.ndarray, s: np.ndarray, speed_all: np.ndarray, seg: np.ndarray,
                done: np.ndarray, step_end: np.ndarray, penalty_s: np.ndarray, cum: np.ndarray,
                rate: np.ndarray, g: np.ndarray, d: np.ndarray, e: np.ndarray, pen: np.ndarray,
                speed: np.ndarray, cur: np.ndarray, t_end: np.ndarray) -> bool:
    """``LookAhead.timing`` of ``rows`` starting at ``s`` (the further passes of a tick);
    returns whether any of them still owes a migration warm-up."""
    any_pen = False
    for i in range(rows.shape[0]):
        row = rows[i]
        gi, ei = seg[row], step_end[row]
        g[i], d[i], e[i], pen[i] = gi, done[row], ei, penalty_s[row]
        any_pen = any_pen or pen[i] != 0.0
        acc = s[i] + pen[i]
        for r in range(3):
            speed[r, i] = speed_all[r, row]
            c = cum[r, gi] + d[i] * rate[r, gi]
            cur[r, i] = c
            acc = acc + speed[r, i] * (cum[r, ei] - c)
        t_end[i] = acc
    return any_pen


@_jit
def progress_pass(rows: np.ndarray, s: np.ndarray, t_end: np.ndarray, cur: np.ndarray,
                  speed: np.ndarray, g: np.ndarray, d: np.ndarray, e: np.ndarray,
                  pen: np.ndarray, req: np.ndarray, cum: np.ndarray, rate: np.ndarray,
                  length: np.ndarray, widest: int, tick_s: float, seg: np.ndarray,
                  done: np.ndarray, penalty_s: np.ndarray, active_s: np.ndarray,
                  sleeps: np.ndarray, block_starts: np.ndarray, block_release: np.ndarray
                  ) -> tuple[int, int, bool]:
    """``Progress._pass`` up to the released barriers, and ``_advance_within_step``:
    ``rows`` (timing arrays per row of ``rows``) run from ``s`` to the tick end or their
    barrier. ``g``, ``d`` and ``pen`` may be the state's own arrays (first pass): each
    row's values are read before its row is written.

    Writes each request block's first position and release time; returns the number of
    blocks, how many of them released inside the tick, and whether a thread changed
    segment (or reached its barrier).
    """
    k = rows.shape[0]
    n_blocks = 0
    for i in range(k):
        if i == 0 or req[rows[i]] != req[rows[i - 1]]:
            block_starts[n_blocks] = i
            n_blocks += 1
    for i in range(k):
        active_s[rows[i]] += min(t_end[i], tick_s) - s[i]
    reach = np.empty(k, dtype=np.bool_)
    asleep = np.empty(k, dtype=np.bool_)
    n_released = 0
    for b in range(n_blocks):
        lo = block_starts[b]
        hi = block_starts[b + 1] if b + 1 < n_blocks else k
        slowest = t_end[lo]
        for i in range(lo + 1, hi):
            if t_end[i] > slowest:
                slowest = t_end[i]
        block_release[b] = slowest
        released = slowest <= tick_s
        n_released += released
        for i in range(lo, hi):
            reach[i] = released or t_end[i] <= tick_s
            # The last thread of a released request does not sleep; the others did.
            asleep[i] = reach[i] and not (released and t_end[i] >= slowest)
    # A warm-up still owed by any thread that stays short of its barrier: threads that
    # cannot pay it off in the tick stay where they are.
    any_pen = False
    for i in range(k):
        if not reach[i] and pen[i] != 0.0:
            any_pen = True
    moved = False
    for i in range(k):
        row = rows[i]
        gi, ei, di, pi = g[i], e[i], d[i], pen[i]
        if reach[i]:
            if gi != ei:
                moved = True
                if asleep[i]:
                    sleeps[row] += 1
            seg[row] = ei
            done[row] = 0.0
            penalty_s[row] = 0.0
            continue
        budget = tick_s - s[i] - pi
        if any_pen:
            stalled = budget <= 0.0
            penalty_s[row] = pi - (tick_s - s[i]) if stalled else 0.0
            if stalled:
                continue
        tpi = speed[0, i] * rate[0, gi] + speed[1, i] * rate[1, gi] + speed[2, i] * rate[2, gi]
        now = di + budget / tpi
        if now > length[gi]:
            # It leaves its segment: find the last knot of its step it reaches.
            crossed = 0
            for j in range(widest):
                if _knot_time(speed, cur, cum, i, min(gi + j + 1, ei)) <= budget:
                    crossed += 1
            # numpy's tau[crossed - 1]: the last knot when none was reached.
            t_knot = _knot_time(speed, cur, cum, i, min(gi + (crossed if crossed else widest), ei))
            gn = gi + crossed
            tpi_n = speed[0, i] * rate[0, gn] + speed[1, i] * rate[1, gn] + speed[2, i] * rate[2, gn]
            now = min((budget - t_knot) / tpi_n, length[gn])
            seg[row] = gn
            moved = True
        done[row] = now
    return n_blocks, n_released, moved


@_jit
def account_progress(active_s: np.ndarray, sleeps: np.ndarray, divisor: np.ndarray,
                     f_eff_mhz: np.ndarray, core: np.ndarray, shared: bool,
                     cfs_latency_s: float, cfs_min_s: float, tt_active_s: np.ndarray,
                     tt_run_s: np.ndarray, tt_cycles: np.ndarray, tt_switches: np.ndarray) -> None:
    """The per-thread time counters at the end of ``Progress.run``."""
    for t in range(active_s.shape[0]):
        run = active_s[t] / divisor[t]
        tt_active_s[t] += active_s[t]
        tt_run_s[t] += run
        tt_cycles[t] += f_eff_mhz[core[t]] * 1e6 * run
        tt_switches[t] += sleeps[t]
        if shared:
            slices = active_s[t] / max(cfs_latency_s / divisor[t], cfs_min_s) if divisor[t] > 1 else 0.0
            tt_switches[t] += slices


# ---------------------------------------------------------------------- steady ticks

@_jit
def steady_stays(seg_len: np.ndarray, done: np.ndarray, tpi_min: np.ndarray, need_s: float,
                 running: np.ndarray) -> bool:
    """``SteadyConstants.stays``: every running thread stays in its segment."""
    for t in range(done.shape[0]):
        if running[t] and (seg_len[t] - done[t]) * tpi_min[t] < need_s:
            return False
    return True


@_jit
def steady_progress(theta_core: np.ndarray, core: np.ndarray, run_ns: np.ndarray,
                    free: np.ndarray, gain: np.ndarray, dt_run: np.ndarray,
                    run_inc: np.ndarray, f_eff: np.ndarray, cycle_inc: np.ndarray,
                    switch_inc: np.ndarray, has_switches: bool, done: np.ndarray,
                    active_s: np.ndarray, run_s: np.ndarray, cycles: np.ndarray,
                    switches: np.ndarray) -> None:
    """The progress of a steady tick: one product per thread, and its time counters."""
    for t in range(done.shape[0]):
        c = core[t]
        done[t] += run_ns[t] * (free[t] + theta_core[c] * gain[t])
        active_s[t] += dt_run[t]
        run_s[t] += run_inc[t]
        cycles[t] += f_eff[c] * cycle_inc[t]
        if has_switches:
            switches[t] += switch_inc[t]


# ---------------------------------------------------------------------- whole-tick step

@_jit
def whole_step(modes: np.ndarray, power_w: np.ndarray, decay: np.ndarray,
               modal_input_t: np.ndarray, readout_t: np.ndarray, ambient_c: float,
               throttled: np.ndarray, temps_c: np.ndarray, matters: np.ndarray,
               threshold_c: float, release_c: float, check: bool, dt_s: float,
               modes_out: np.ndarray, temps_out: np.ndarray, new_throttled: np.ndarray,
               throttle_count: np.ndarray) -> tuple[bool, float, float, float, int]:
    """One exact thermal step over the tick (``ThermalModel.step_modes``); with ``check``,
    whether it needs DTM sub-steps (``Dtm.would_change``); if not, the relays after it
    and what the tick did (``Engine.account_step``).

    Returns (needs sub-steps, energy J, time above DTM s, peak °C, throttle events); the
    relays and throttle counts are written only when no sub-steps are needed.
    """
    m, n = decay.shape[0], power_w.shape[0]
    _heat_input(modal_input_t, power_w, modes_out)
    for k in range(m):
        modes_out[k] = decay[k] * modes[k] + modes_out[k]
    _readout(readout_t, modes_out, temps_out)
    for i in range(n):
        temps_out[i] += ambient_c
    if check:
        hot_before, hot_after = -np.inf, -np.inf
        for i in range(n):
            end = temps_out[i]
            flips = end < release_c if throttled[i] else end >= threshold_c
            if flips and matters[i]:
                return True, 0.0, 0.0, 0.0, 0
            hot_before = max(hot_before, temps_c[i])
            hot_after = max(hot_after, end)
        if (hot_before >= threshold_c) != (hot_after >= threshold_c):
            return True, 0.0, 0.0, 0.0, 0
    events = 0
    peak_c = -np.inf
    energy_w = 0.0
    for i in range(n):
        end = temps_out[i]
        new = end >= release_c if throttled[i] else end >= threshold_c
        new_throttled[i] = new
        if new and not throttled[i]:
            events += 1
            throttle_count[i] += 1
        peak_c = max(peak_c, end)
        energy_w += power_w[i]
    return False, energy_w * dt_s, dt_s if peak_c >= threshold_c else 0.0, peak_c, events
