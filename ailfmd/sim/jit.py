"""Choosing between the compiled kernels (``compiled.py``, numba) and the numpy path.

The compiled kernels are used when numba can be imported; the numpy path stays the
reference and the fallback (numba is an optional extra, ``pip install ailfmd[fast]``).
``AILFMD_SIM_COMPILED=0`` in the environment, or ``Engine(..., compiled=False)``, forces
the numpy path, for comparisons and tests.
"""

from __future__ import annotations

import os
from types import ModuleType

ENV_VAR = "AILFMD_SIM_COMPILED"


def load(want: bool | None = None) -> ModuleType | None:
    """The compiled kernels' module, or None for the numpy path.

    ``want``: True requires them (ImportError without numba), False refuses them, None
    uses them when numba is importable unless ``AILFMD_SIM_COMPILED=0``.
    """
    if want is False:
        return None
    if want is None and os.environ.get(ENV_VAR, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    from ailfmd.sim import compiled

    if compiled.numba is None:
        if want:
            raise ImportError("the compiled simulator kernels need numba: pip install 'ailfmd[fast]'")
        return None
    return compiled
