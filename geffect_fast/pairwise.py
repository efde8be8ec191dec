"""Instance-level G-effect matrices: E[i, j] = ⟨∇ℓ_i, ∇ℓ^obj_j⟩ per group, exact.

ℓ_i is risk sample i's mean token NLL; ℓ^obj_j is forget sample j's share of the objective,
L_u = Σ_j ℓ^obj_j (:meth:`geffect_fast.objectives.Objective.per_sample`), so each row sums to that sample's
per-instance G-effect: Σ_j E[i, j] = ⟨∇ℓ_i, ∇L_u⟩. "Which forget sample harms which retain sample."

Two passes of the engine, no per-sample gradient stored whole:

1. the objective batch: every covered layer hands over the factors of its per-sample gradient
   G'_j = Σ_{s∈j} L'_s R'_sᵀ (a layer's input and output gradient; ids for embeddings), which are kept
   (:class:`~geffect_fast.engine.consumers.Keep`);
2. each risk batch: in every layer's backward the risk factors meet the kept objective factors of the same
   parameter (every pair of uses, so tied weights are exact; :class:`~geffect_fast.engine.consumers.PairMeet`)
   and ⟨G_i, G'_j⟩ is formed by the ghost method Σ_{t,s}(L_t·L'_s)(R_t·R'_s) or by materialising G per sample,
   whichever the cost model of :func:`geffect_fast.ops.pairwise.costs` says is cheaper — in tiles, never a
   whole Gram matrix.

Memory: the objective batch's layer inputs and output gradients (about what one ordinary backward of that
batch keeps), plus one tile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import groups as groups_mod
from .capture import UnsupportedModuleError
from .distributed import refuse_sharded
from .engine import (
    Keep,
    ModuleMap,
    PairMeet,
    backward,
    check_packing,
    forward,
    module_map,
    opened,
    plan_taps,
    start_batch,
    unwrap,
)
from .loss import check_batch, packed_samples, sample_nll
from .objectives import Objective, resolve, sample_losses, split_batch

#: how a pair of uses is contracted: "auto" (the cheaper by the cost model), "ghost" or "materialise"
METHODS = ("auto", "ghost", "materialise")


@dataclass
class PairwiseResult:
    """``matrix[risk]``: float64 [n_groups, B_risk, B_obj]; ``total(risk)`` sums the groups."""

    groups: tuple[str, ...]
    matrix: dict[str, Tensor]
    #: "parameter[k]" (its k-th objective use) -> the method the pair took ("ghost" or "materialise")
    methods: dict[str, str] = field(default_factory=dict)

    def total(self, risk: str) -> Tensor:
        return self.matrix[risk].sum(0)

    def by_group(self, risk: str) -> dict[str, Tensor]:
        return {g: self.matrix[risk][k] for k, g in enumerate(self.groups)}

    def most_harmful(self, risk: str = "retain", n: int = 5) -> list[tuple[int, float]]:
        """Up to ``n`` objective samples j with Σ_i E[i, j] < 0, most negative first: the ones whose unlearning
        gradient raises the risk set's NLL (a step −η·∇ℓ^obj_j changes it by about −η·Σ_i E[i, j] > 0). Samples
        that help (Σ_i E[i, j] ≥ 0) are never listed, so fewer than ``n`` come back when fewer harm."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        col = self.total(risk).sum(0)
        order = torch.argsort(col)
        return [(int(j), float(col[j])) for j in order[:n] if col[j] < 0]


def trainable_or_raise(mm: ModuleMap, what: str) -> list[str]:
    """The model's trainable parameters (a clear error where there is none: nothing to ``what``)."""
    trainable = list(mm.trainable())
    if not trainable:
        raise ValueError(f"no parameter of the model requires grad: nothing to {what}")
    return trainable


def measure_pairwise(
    model: nn.Module,
    objective: Objective | str,
    objective_batch: Any,
    risks: Mapping[str, Mapping[str, Tensor]],
    groups: groups_mod.GroupSpec = "block",
    ref_model: nn.Module | None = None,
    method: str = "auto",
    mode: str = "eval",
) -> PairwiseResult:
    """E[i, j] = ⟨∇ℓ_i, ∇ℓ^obj_j⟩ per group, for every risk set (see the module docstring).

    ``method``: "auto" (per pair of parameter uses, by the cost model), "ghost" or "materialise" (for dense
    factors; one-hot embedding factors always go by the ghost method).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use auto, ghost or materialise")
    objective = resolve(objective)
    if not callable(getattr(objective, "per_sample", None)):
        raise TypeError(
            "measure_pairwise needs each forget sample's share of the objective: a built-in objective (a name "
            "such as 'npo', or objectives.get(...)) or one with a per_sample(model, batch, ref_model) method, "
            f"not {objective!r}"
        )
    model = unwrap(model)
    refuse_sharded(model, "measure_pairwise")
    mm = module_map(model)
    forget, _, idk = split_batch(objective_batch)
    obj_rows = idk if idk is not None else forget
    check_batch(obj_rows, "objective batch", mm.device)
    if packed_samples(obj_rows) is not None:
        raise ValueError(
            "the objective batch is packed (several samples per row): objectives give one value per row, so its "
            "columns would not be samples; pass it unpacked (risk batches may be packed)"
        )
    if isinstance(risks, Mapping) and "input_ids" in risks:
        risks = {"risk": risks}
    for name, b in risks.items():
        check_batch(b, name, mm.device)
    grouping = mm.grouping(groups)
    trainable = trainable_or_raise(mm, "pair")
    keep = Keep()
    plan = plan_taps(mm, dict.fromkeys(trainable, keep), grouping)
    if plan.uncovered:
        n, why = next(iter(plan.uncovered.items()))
        raise UnsupportedModuleError(f"pairwise G-effects need every trainable parameter covered: {n}: {why}")
    B_obj = obj_rows["input_ids"].shape[0]
    dev = mm.device.type
    with opened(mm, plan, mode, ref_model=ref_model) as session:  # 1. the objective's factors
        start_batch(model, session, obj_rows)
        per = sample_losses(objective, model, objective_batch, ref_model, B_obj)
        backward(per.sum(), dev)
        session.check_outside_uses()
    vocab = {n: mm.named[n].shape[0] for n in trainable}
    meet = PairMeet(keep.kept, B_obj, vocab, method)
    plan = plan_taps(mm, dict.fromkeys(trainable, meet), grouping)
    matrices: dict[str, Tensor] = {}
    with opened(mm, plan, mode) as session:  # 2. each risk batch against them
        for rname, batch in risks.items():
            packed = packed_samples(batch)
            if packed is not None:
                check_packing(mm, model, batch, packed)
                packed = packed.to(mm.device)
            B = batch["input_ids"].shape[0] if packed is None else int(packed[-1, -1]) + 1
            meet.E = torch.zeros(len(grouping), B, B_obj, dtype=torch.float64, device=mm.device)
            start_batch(model, session, batch, packed)
            ell, n = sample_nll(forward(model, session, batch), batch["labels"], packed)
            loss = (ell * (n > 0)).sum()
            backward(loss, dev)
            if not bool(torch.isfinite(loss.detach())):
                raise ValueError(f"risk set {rname!r}: the risk is not finite")
            session.check_outside_uses()
            matrices[rname] = meet.E.cpu()
    return PairwiseResult(groups=tuple(grouping.names), matrix=matrices, methods=meet.methods)
