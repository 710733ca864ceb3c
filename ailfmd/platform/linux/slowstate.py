"""The slowly changing part of the machine's state: cpufreq limits and throttle counters.

Policy limits, governors and EPP change rarely (an operator, another manager, or our own
capped write, which is read back), and the thermal-throttle counters only count up. They
are re-read in ``parts`` slices, one slice per epoch, so every epoch costs the same and
each file is re-read every ``parts`` epochs.

A slice is first re-read raw, one ``pread`` per file into a list compared with the
slice's previous raw read in one step; only when that differs (or a read fails) are its
records rebuilt through the careful readers, which name every error. The current
frequency in a :class:`FreqPolicy` is the one the epoch's frequency sweep read, so no
file is read twice in an epoch.
"""

from __future__ import annotations

import os

from ailfmd.errors import SysfsError
from ailfmd.platform.base import FreqPolicy, ThrottleCounts
from ailfmd.platform.linux import cpufreq
from ailfmd.platform.linux.hotfiles import HotFiles

_THROTTLE_FILES = ("core_throttle_count", "package_throttle_count")


class _Slice:
    """One ``parts``-th of the policies and throttle CPUs, and its last raw read."""

    __slots__ = ("policies", "throttle_cpus", "fds", "raw")

    def __init__(self, policies: list[int], throttle_cpus: list[int]) -> None:
        self.policies = policies
        self.throttle_cpus = throttle_cpus
        self.fds: list[int] = []
        self.raw: list[bytes] | None = None  # None: rebuild the records at the next read


class SlowState:
    """Policies (``policies``, in discovery order) and throttle counters (``throttle``,
    by CPU), refreshed one slice per :meth:`refresh` call.

    ``version`` changes whenever a record does, so a caller can tell "nothing changed"
    with one comparison; ``limits_version`` only when something other than a policy's
    current frequency did (limits, governor, EPP, errors, throttle counters). Records
    that read the same as before are kept (same objects).
    """

    def __init__(
        self,
        hot: HotFiles,
        statics: tuple[cpufreq.PolicyStatic, ...],
        throttle_cpus: tuple[int, ...],
        parts: int,
    ) -> None:
        if parts < 1:
            raise ValueError(f"parts must be at least 1, got {parts}")
        self.hot = hot
        self.parts = parts
        self.readers = [cpufreq.PolicyReader(hot, st) for st in statics]
        self.throttle_cpus = throttle_cpus
        self.policies: tuple[FreqPolicy, ...] | None = None
        self.throttle: dict[int, ThrottleCounts | None] = {}
        self.version = 0
        self.limits_version = 0
        self._slices = [
            _Slice(list(range(p, len(statics), parts)), list(throttle_cpus[p::parts])) for p in range(parts)
        ]

    # ------------------------------------------------------------------ reading
    def refresh(self, part: int | None, cur_khz: list[int | None]) -> None:
        """Re-read slice ``part`` (``None``: every slice, and rebuild every record).

        ``cur_khz`` is this epoch's ``scaling_cur_freq`` per policy (None where that
        read failed), which goes into the refreshed policies' ``cur_khz``.
        """
        if self.policies is None or part is None:
            self.policies = tuple(r.read() for r in self.readers)
            for c in self.throttle_cpus:
                self.throttle[c] = cpufreq.read_throttle(self.hot, c)
            for s in self._slices:
                self._resolve(s)
                s.raw = self._read_raw(s)
            self._changed()
            return
        s = self._slices[part]
        raw = self._read_raw(s)
        if raw is not None and raw == s.raw:
            self._update_cur(s, cur_khz)
            return
        self._rebuild(s)
        self._resolve(s)
        # Read again after rebuilding: a file that changed in between then differs next
        # time and is rebuilt again, so the records never lag behind a stale raw read.
        s.raw = raw if raw is None else self._read_raw(s)

    def _read_raw(self, s: _Slice) -> list[bytes] | None:
        pread = os.pread
        try:
            return [pread(fd, 4096, 0) for fd in s.fds]
        except OSError:
            return None  # the careful readers say which file and why

    def _resolve(self, s: _Slice) -> None:
        """The descriptors of the slice's files as HotFiles holds them now (it drops one
        whose device went away and reopens it on the next careful read)."""
        fds: list[int] = []
        for i in s.policies:
            r = self.readers[i]
            r._resolve()
            fds.extend(fd for fd in r._fds if fd >= 0)
        for c in s.throttle_cpus:
            for name in _THROTTLE_FILES:
                try:
                    fds.append(self.hot._fd(f"{cpufreq.CPU_DIR}/cpu{c}/thermal_throttle/{name}"))
                except SysfsError:
                    pass  # absent: read_throttle reports None for it
        s.fds = fds

    def _rebuild(self, s: _Slice) -> None:
        old = self.policies
        assert old is not None
        pols: list[FreqPolicy] | None = None
        for i in s.policies:
            new = self.readers[i].read()
            if new is not old[i] and new != old[i]:
                if pols is None:
                    pols = list(old)
                pols[i] = new
        if pols is not None:
            self.policies = tuple(pols)
            self._changed()
        throttle = self.throttle
        for c in s.throttle_cpus:
            new_t = cpufreq.read_throttle(self.hot, c)
            if c not in throttle or new_t != throttle[c]:
                throttle[c] = new_t
                self._changed()

    def _update_cur(self, s: _Slice, cur_khz: list[int | None]) -> None:
        """Limits read the same: only the current frequency may be new."""
        old = self.policies
        assert old is not None
        pols: list[FreqPolicy] | None = None
        careful = False
        for i in s.policies:
            cur = cur_khz[i] if i < len(cur_khz) else None
            p = old[i]
            if cur == p.cur_khz:
                continue
            if cur is None or not 0 < cur <= cpufreq.MAX_PLAUSIBLE_KHZ or p.cur_khz is None:
                new = self.readers[i].read()  # names the error, or clears an old one
                careful = True
                # A careful read may have dropped a descriptor of a device that went away:
                # the next visit re-reads the slice through the readers.
                s.raw = None
            else:
                new = self.readers[i].with_cur(cur)
            if new is not p:
                if pols is None:
                    pols = list(old)
                pols[i] = new
        if pols is not None:
            self.policies = tuple(pols)
            self.version += 1
            if careful:
                self.limits_version += 1  # a careful re-read may have found more than a frequency

    def _changed(self) -> None:
        self.version += 1
        self.limits_version += 1

    def invalidate(self) -> None:
        """Something wrote the files behind these records: the next :meth:`refresh`
        re-reads everything."""
        self.policies = None

    def replace_policy(self, i: int, policy: FreqPolicy) -> None:
        """After a write that was read back: the policy as it is now."""
        if self.policies is not None and i < len(self.policies):
            pols = list(self.policies)
            pols[i] = policy
            self.policies = tuple(pols)
            self.readers[i].adopt(policy)
            # The slice's last raw read predates the write: it must not vouch for the record.
            self._slices[i % self.parts].raw = None
            self._changed()
