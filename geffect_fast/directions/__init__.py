"""Directions v: what the risk gradient is dotted with, e = ⟨∇θ R, v⟩ (docs/design.md §1).

* :mod:`.base` — the protocol both kinds share (binding to a model, selection by name, stacking);
* :mod:`.dense` — :class:`Direction`, each parameter's entry a stacked tensor [K, *shape];
* :mod:`.factored` — :class:`FactoredDirection`, an objective's gradient kept as its per-token factors.
"""

from .base import KINDS, DirectionBase, canonical_key, check_complete
from .dense import Direction
from .factored import FactoredDirection

__all__ = ["KINDS", "Direction", "DirectionBase", "FactoredDirection", "canonical_key", "check_complete"]
