"""``fastat.ops``, the public fused operations (SPEC section 2): the names of :mod:`fastat.at.ops`.

Other diffusion codebases import this module (``from fastat import ops``); the definitions live in the
library core, ``fastat/at/ops.py``.
"""

from fastat.at.ops import *  # noqa: F403
from fastat.at.ops import __all__  # noqa: F401
