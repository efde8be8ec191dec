"""geffect_fast: exact per-instance, per-layer G-effects of LLM unlearning objectives.

import geffect_fast as gf
v = gf.Direction.from_objective(model, objective, forget_batch)
res = gf.measure(model, v, {"unlearn": forget_batch, "retain": retain_batch}, per_instance=True)
print(res)

The public names are imported on first use (PEP 562), so that ``import geffect_fast`` — and ``geffect-fast --help``
— does not import torch; ``gf.measure`` and the others behave as plain attributes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> (module, attribute); attribute None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "Direction": (".directions", "Direction"),
    "FactoredDirection": (".directions", "FactoredDirection"),
    "Guide": (".guide", "Guide"),
    "PairwiseResult": (".pairwise", "PairwiseResult"),
    "Result": (".result", "Result"),
    "Sketch": (".sketch", "Sketch"),
    "Sketcher": (".sketch", "Sketcher"),
    "Tracker": (".tracker", "Tracker"),
    "backends": (".ops", "backends"),
    "capture": (".capture", None),
    "data": (".data", None),
    "groups": (".groups", None),
    "measure": (".api", "measure"),
    "measure_pairwise": (".pairwise", "measure_pairwise"),
    "objective_effects": (".objective_samples", "objective_effects"),
    "ObjectiveEffects": (".objective_samples", "ObjectiveEffects"),
    "objectives": (".objectives", None),
    "ops": (".ops", None),
    "risk": (".loss", "risk"),
}

__all__ = [
    "Direction",
    "FactoredDirection",
    "Guide",
    "ObjectiveEffects",
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
    "objective_effects",
    "objectives",
    "ops",
    "risk",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'geffect_fast' has no attribute {name!r}") from None
    mod = importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from . import capture, data, groups, objectives, ops
    from .api import measure
    from .directions import Direction, FactoredDirection
    from .guide import Guide
    from .loss import risk
    from .objective_samples import ObjectiveEffects, objective_effects
    from .ops import backends
    from .pairwise import PairwiseResult, measure_pairwise
    from .result import Result
    from .sketch import Sketch, Sketcher
    from .tracker import Tracker
