"""Instance-level G-effect matrices: E[i, j] = ⟨∇ℓ_i, ∇ℓ^obj_j⟩ per group, exact.

ℓ_i is risk sample i's mean token NLL; ℓ^obj_j is forget sample j's share of the objective,
L_u = Σ_j ℓ^obj_j (:meth:`geffect_fast.objectives.Objective.per_sample`), so each row sums to that sample's
per-instance G-effect: Σ_j E[i, j] = ⟨∇ℓ_i, ∇L_u⟩. "Which forget sample harms which retain sample."

Two backward passes, no per-sample gradient stored whole:

1. the objective batch: every covered layer hands over the factors of its per-sample gradient
   G'_j = Σ_{s∈j} L'_s R'_sᵀ (a layer's input and output gradient; ids for embeddings), which are kept;
2. each risk batch: in every layer's backward hook the risk factors meet the kept objective factors of the
   same parameter (every pair of uses, so tied weights are exact) and ⟨G_i, G'_j⟩ is formed by the ghost
   route Σ_{t,s}(L_t·L'_s)(R_t·R'_s) or by materialising G per sample, whichever the cost model of
   :func:`geffect_fast.ops.pairwise.costs` says is cheaper — in tiles, never a whole Gram matrix.

Memory: the objective batch's layer inputs and output gradients (about what one ordinary backward of that
batch keeps), plus one tile.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import groups as groups_mod
from .api import _layout, _Plan, input_device, unwrap
from .capture import CaptureSession, UnsupportedModuleError
from .distributed import refuse_sharded
from .loss import check_batch, forward_logits, sample_nll
from .objectives import Objective, split_batch
from .ops import pairwise as pw
from .ops import resolve
from .state import preserved


@dataclass
class PairwiseResult:
    """``matrix[risk]``: float64 [n_groups, B_risk, B_obj]; ``total(risk)`` sums the groups."""

    groups: tuple[str, ...]
    matrix: dict[str, Tensor]
    #: (parameter, risk use, objective use) -> route taken ("ghost" or "materialise")
    routes: dict[str, str] = field(default_factory=dict)

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


def _trainable_plan(model: nn.Module, grouping: groups_mod.Grouping) -> _Plan:
    """A capture plan over every trainable parameter (the direction's values are not used)."""
    everything = dict(model.named_parameters())
    named = {n: p for n, p in everything.items() if p.requires_grad}
    if not named:
        raise ValueError("no parameter of the model requires grad: nothing to pair")
    return _Plan(_layout(model, everything), {n: p.detach()[None] for n, p in named.items()}, grouping)


def _session(model, plan, device) -> CaptureSession:
    return CaptureSession(plan.plans, plan.roots, resolve("reference", device), 1, 1, torch.float64)


def measure_pairwise(
    model: nn.Module,
    objective: Objective,
    objective_batch: Any,
    risks: Mapping[str, Mapping[str, Tensor]],
    groups: groups_mod.GroupSpec = "block",
    ref_model: nn.Module | None = None,
    route: str = "auto",
    mode: str = "eval",
) -> PairwiseResult:
    """E[i, j] = ⟨∇ℓ_i, ∇ℓ^obj_j⟩ per group, for every risk set (see the module docstring).

    ``route``: "auto" (per parameter use pair, by the cost model), "ghost" or "materialise" (for dense
    factors; one-hot embedding factors always go by the ghost route).
    """
    if route not in ("auto", "ghost", "materialise"):
        raise ValueError(f"unknown route {route!r}; use auto, ghost or materialise")
    model = unwrap(model)
    refuse_sharded(model, "measure_pairwise")
    device = input_device(model)
    forget, _, idk = split_batch(objective_batch)
    obj_rows = idk if idk is not None else forget
    check_batch(obj_rows, "objective batch", device)
    if isinstance(risks, Mapping) and "input_ids" in risks:
        risks = {"risk": risks}
    for name, b in risks.items():
        check_batch(b, name, device)
    named = dict(model.named_parameters())
    grouping = groups_mod.assign(model, groups, list(named))
    plan = _trainable_plan(model, grouping)
    if plan.uncovered:
        n, why = next(iter(plan.uncovered.items()))
        raise UnsupportedModuleError(f"pairwise G-effects need every trainable parameter covered: {n}: {why}")
    B_obj = obj_rows["input_ids"].shape[0]
    kept: dict[str, list[tuple[Tensor, Tensor, Tensor, int | None]]] = defaultdict(list)
    routes: dict[str, str] = {}
    matrices: dict[str, Tensor] = {}
    with preserved(model, ref_model, mode=mode):
        for p in named.values():
            p.requires_grad_(False)
        with _session(model, plan, device) as session:
            # 1. the objective's factors
            session.factor_sink = lambda slot, L, R, seg, pad: kept[slot.name].append(
                (L.detach(), R.detach(), seg, pad)
            )
            session.start(B_obj, device, obj_rows["input_ids"].shape[1])
            per = objective.per_sample(model, objective_batch, ref_model)
            if per.shape != (B_obj,):
                raise ValueError(f"objective {objective.name!r}: per_sample gave {tuple(per.shape)}, not [{B_obj}]")
            if not bool(torch.isfinite(per.detach()).all()):
                raise ValueError(f"objective {objective.name!r} is not finite on the objective batch")
            per.sum().backward()
            session.check_outside_uses()
            # 2. each risk batch against them
            for rname, batch in risks.items():
                B = batch["input_ids"].shape[0]
                E = torch.zeros(len(grouping), B, B_obj, dtype=torch.float64, device=device)

                def pair(slot, L, R, seg, pad, E=E, B=B):
                    for k, (L2, R2, seg2, pad2) in enumerate(kept.get(slot.name, [])):
                        vocab = named[slot.name].shape[0]
                        e, how = pw.pairwise(
                            L,
                            R,
                            seg,
                            B,
                            L2,
                            R2,
                            seg2,
                            B_obj,
                            route=route,
                            vocab=vocab,
                            pad=pad if pad is not None else pad2,
                        )
                        E[slot.group] += e.double()
                        routes[f"{slot.name}[{k}]"] = how

                session.factor_sink = pair
                session.start(B, device, batch["input_ids"].shape[1])
                ell, n = sample_nll(forward_logits(model, batch), batch["labels"])
                if not bool(torch.isfinite(ell.detach()).all()):
                    raise ValueError(f"risk set {rname!r}: the risk is not finite")
                (ell * (n > 0)).sum().backward()
                session.check_outside_uses()
                matrices[rname] = E.cpu()
    return PairwiseResult(groups=tuple(grouping.names), matrix=matrices, routes=routes)
