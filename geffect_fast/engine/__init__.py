"""The pass engine: the one place a pass is planned and run, whatever it computes.

* :mod:`.model` — the module inside wrappers, its input embeddings, where batches go;
* :mod:`.modulemap` — what a model's tree says (parameters, their uses and adapters), kept per model while the
  tree is unchanged, with the plans made for it;
* :mod:`.plan` — which module taps which parameter, and the consumer each parameter's factors feed;
* :mod:`.consumers` — the consumers: the dense dot with V, the factored pairing, the factor collectors, the
  pairwise meeting, the sketch projection;
* :mod:`.factors` and :mod:`.routes` — a direction kept as an objective's factors, and the cost model that picks
  each parameter's route;
* :mod:`.run` — a pass: the model borrowed (state preserved, parameters frozen, taps armed), forward, backward.

``measure``, ``measure_pairwise``, ``Sketcher``, ``Direction.from_objective`` and ``Tracker`` are thin entry
points over it.
"""

from .consumers import Collector, DenseDot, FactorPair, Gathered, Keep, PairMeet, Projector
from .factors import FactoredEntry, FactorUse
from .model import input_device, input_embeddings, unwrap
from .modulemap import ModuleMap, module_map
from .plan import Plan, plan_taps, uncovered_reasons
from .run import backward, check_packing, forward, opened, risk_backward, start_batch

__all__ = [
    "Collector",
    "DenseDot",
    "FactorPair",
    "FactorUse",
    "FactoredEntry",
    "Gathered",
    "Keep",
    "ModuleMap",
    "PairMeet",
    "Plan",
    "Projector",
    "backward",
    "check_packing",
    "forward",
    "input_device",
    "input_embeddings",
    "module_map",
    "opened",
    "plan_taps",
    "risk_backward",
    "start_batch",
    "uncovered_reasons",
    "unwrap",
]
