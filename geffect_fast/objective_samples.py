"""Per-sample G-effects of an objective's own samples: e_{k,j,g} = ⟨∇ℓ^obj_j, v_k⟩ over group g, exact.

ℓ^obj_j is forget sample j's share of the objective, L_u = Σ_j ℓ^obj_j
(:meth:`geffect_fast.objectives.Objective.per_sample`; the objective's retain term is not part of it), and v_k a
dense direction — typically the gradient of a risk, v = ∇R(D): then e_j = ⟨∇ℓ^obj_j, ∇R⟩ says how much forget
sample j's share of the update moves R (a step −η∇L_u changes R by about −η Σ_j e_j). It is the column sum of
the pairwise matrix (:func:`geffect_fast.measure_pairwise`) for R = Σ_i ℓ_i, at the cost of one pass instead of
two with pairwise contractions; the ``samples`` policy of :class:`geffect_fast.Guide` reads it.

One pass of the engine: the objective's forward (its reference model's too, without taps), one backward of
Σ_j ℓ^obj_j with every parameter frozen; each covered layer's output gradient is contracted per sample and group
with v by :class:`~geffect_fast.engine.consumers.DenseDot`, as :func:`geffect_fast.measure` does for the NLL.
Every sample's rows carry only its own ℓ^obj_j's gradient (an objective's per-sample share depends on that
sample's rows alone), so the per-sample values are exact. Cost: about one forward+backward of the objective
batch; no per-sample gradient is formed. Every trainable parameter with a nonzero direction must be covered by
the taps (there is no per-sample autograd fallback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import groups as groups_mod
from .capture import UnsupportedModuleError
from .directions import Direction, DirectionBase
from .distributed import refuse_sharded
from .engine import DenseDot, backward, module_map, opened, plan_taps, start_batch, unwrap
from .loss import check_batch, packed_samples
from .objectives import Objective, forget_part, resolve, sample_losses, split_batch
from .ops import resolve as resolve_ops


@dataclass(frozen=True)
class ObjectiveEffects:
    """``values[k, j, g]`` = ⟨∇ℓ^obj_j, v_k⟩ over group g (float64, CPU); ``directions`` the K names, ``groups``
    the G names."""

    directions: tuple[str, ...]
    groups: tuple[str, ...]
    values: Tensor

    def total(self, direction: str | None = None) -> Tensor:
        """[B]: e_j summed over the groups, for direction ``direction`` (the only one when None)."""
        return self.values[self._k(direction)].sum(-1)

    def by_group(self, direction: str | None = None) -> dict[str, Tensor]:
        """{group: [B]} for direction ``direction``."""
        v = self.values[self._k(direction)]
        return {g: v[:, i] for i, g in enumerate(self.groups)}

    def _k(self, direction: str | None) -> int:
        if direction is None:
            if len(self.directions) != 1:
                raise ValueError(f"name one of the directions {self.directions}")
            return 0
        return self.directions.index(direction)


def objective_effects(
    model: nn.Module,
    objective: Objective | str,
    batch: Any,
    direction: DirectionBase | Mapping[str, Tensor],
    groups: groups_mod.GroupSpec = "block",
    ref_model: nn.Module | None = None,
    backend: str = "auto",
    mode: str = "eval",
) -> ObjectiveEffects:
    """e[k, j, g] = ⟨∇ℓ^obj_j, v_k⟩ per group for every forget sample j of ``batch`` (see the module docstring).

    ``objective``: a built-in objective or its name, or one with ``per_sample(model, batch, ref_model)`` -> [B];
    ``batch``: the objective's batch (a forget batch, or ``{"forget": ..., "retain": ..., "idk": ...}``);
    ``direction``: a dense :class:`Direction` or a mapping parameter name -> tensor.
    """
    objective = resolve(objective)
    if not callable(getattr(objective, "per_sample", None)):
        raise TypeError(
            "objective_effects needs each forget sample's share of the objective: a built-in objective or one with "
            f"a per_sample(model, batch, ref_model) method, not {objective!r}"
        )
    objective = forget_part(objective)  # the retain term is no forget sample's share
    if isinstance(direction, DirectionBase) and direction.factored:
        raise TypeError("objective_effects takes a dense direction; pass the factored direction's .dense()")
    if not isinstance(direction, DirectionBase):
        direction = Direction(direction)
    model = unwrap(model)
    refuse_sharded(model, "objective_effects")
    mm = module_map(model)
    mm.check_materialised()
    forget, _, idk = split_batch(batch)
    rows = idk if idk is not None else forget
    check_batch(rows, "objective batch", mm.device)
    if packed_samples(rows) is not None:
        raise ValueError("the objective batch is packed (several samples per row): pass it unpacked")
    V = direction.bind(mm.named, mm.trainable())
    if not V:
        raise ValueError("the direction is zero on every parameter: every G-effect would be 0")
    grouping = mm.grouping(groups)
    dot = DenseDot()
    plan = plan_taps(mm, dict.fromkeys(V, dot), grouping)
    if plan.uncovered:
        n, why = next(iter(plan.uncovered.items()))
        raise UnsupportedModuleError(f"objective_effects needs every parameter of the direction covered: {n}: {why}")
    dir_dtype, acc = mm.pass_dtypes(v.dtype for v in V.values())
    ops = resolve_ops(backend, mm.device, mm.act_dtype, dir_dtype)
    B = rows["input_ids"].shape[0]
    with opened(mm, plan, mode, ref_model=ref_model) as session:
        session.V = [V[n] for n in plan.order]
        session.ops = ops.unchecked
        session.K, session.G, session.device, session.acc = direction.k, len(grouping), mm.device, acc
        try:
            start_batch(model, session, rows)
            per = sample_losses(objective, model, batch, ref_model, B)
            if not per.requires_grad:
                raise RuntimeError("the objective does not depend on any tapped layer: no gradient can flow")
            backward(per.sum(), mm.device.type)
            session.check_outside_uses()
            out = session.result().double().cpu()
        finally:
            session.V = []  # the direction is the caller's: not kept with the plan
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"objective {objective.name!r}: the backward is not finite (NaN or inf) on this batch")
    return ObjectiveEffects(tuple(direction.names), tuple(grouping.names), out)


__all__ = ["ObjectiveEffects", "objective_effects"]
