"""The simulated 3D S-NUCA many-core: the twin that trains and judges policies.

Chips are data files (``ailfmd/sim/chips/*.toml``, schema in ``docs/chips.md``) loaded
by :mod:`ailfmd.sim.chip`. :mod:`ailfmd.sim.thermal` is a HotSpot-style compact RC
network solved exactly between decision points, :mod:`ailfmd.sim.power` turns activity,
V/f and temperature into watts per tile.
"""
