"""geffect_fast: exact per-instance, per-layer G-effects of LLM unlearning objectives.

import geffect_fast as gf
v = gf.Direction.from_objective(model, objective, forget_batch)
res = gf.measure(model, v, {"unlearn": forget_batch, "retain": retain_batch}, per_instance=True)
print(res)
"""

from . import capture, data, groups, objectives, ops
from ._version import __version__
from .api import measure
from .directions import Direction, FactoredDirection
from .loss import risk
from .ops import backends
from .pairwise import PairwiseResult, measure_pairwise
from .result import Result
from .sketch import Sketch, Sketcher
from .tracker import Tracker

__all__ = [
    "Direction",
    "FactoredDirection",
    "PairwiseResult",
    "Result",
    "Sketch",
    "Sketcher",
    "Tracker",
    "__version__",
    "backends",
    "capture",
    "data",
    "groups",
    "measure",
    "measure_pairwise",
    "objectives",
    "ops",
    "risk",
]
