"""Factored directions: an objective's gradient kept as its per-token factors, measured without forming it.

For a parameter W used as y_s = W a_s, the objective's gradient over its batch of N' rows is
V = ∇_W L_u = Σ_s g'_s a'_sᵀ (g'_s = ∂L_u/∂y_s). A risk sample b's G-effect against it is

    ⟨G_b, V⟩ = Σ_{t∈b} g_tᵀ V a_t = Σ_{t∈b} Σ_s (g_t·g'_s)(a_t·a'_s)

— 2·N·N'·(I + O) FLOPs from the factors alone (the *factored* route), against 2·N'·I·O to form V (the
weight-gradient GEMM of the objective's backward) plus 2·N·I·O to contract it (the *dense* route). The factors
of every kind of parameter are defined in :mod:`geffect_fast.engine.factors`.

:class:`FactoredDirection` (``Direction.from_objective(..., factored=True)``) keeps these factors per parameter
use — taken from one backward of L_u with every covered weight frozen, so the objective's own weight-gradient
GEMMs are never run — with rows that carry no gradient dropped; K of them stack, with dense directions too
(``Direction.stack``). ``.dense()`` forms V. ``measure(route=...)`` chooses per parameter between forming V
("dense") and pairing each risk-side use with each objective use (:mod:`geffect_fast.ops.factored`), by the
cost model of :mod:`geffect_fast.engine.routes`. Both routes are exact: they sum the same products in another
order (float64: equal to ~1e-15 relative).

Single process only (a DDP/FSDP direction is the ranks' averaged gradient: pass ``.dense()``, averaged).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..capture import NotPerSampleError
from ..engine import Collector, FactoredEntry, FactorUse, module_map, opened, plan_taps, unwrap
from ..engine.run import backward
from ..groups import Grouping
from ..objectives import ObjectiveFn, objective_loss, objective_name, resolve
from .base import KINDS, DirectionBase


class FactoredDirection(DirectionBase):
    """K named directions over a model's parameters, each parameter's entry a :class:`FactoredEntry` (factor
    uses, and a dense part for directions that came dense). See the module docstring."""

    kind = "factored"
    _remedy = "set requires_grad=False"

    def __init__(self, entries: Mapping[str, FactoredEntry], names: Sequence[str], zero: Iterable[str] = ()):
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names) or not all(self.names):
            raise ValueError(f"direction names must be unique and non-empty, got {self.names}")
        for key, e in entries.items():
            if e.K != len(self.names):
                raise ValueError(f"entry {key!r} holds {e.K} directions, not {len(self.names)}")
        self._e = dict(entries)
        self.zero = frozenset(zero) - set(self._e)

    # -- constructors ------------------------------------------------------------------------------------
    @classmethod
    def from_objective(
        cls,
        model: nn.Module,
        objective: ObjectiveFn | str,
        batch: Any,
        ref_model: nn.Module | None = None,
        name: str | None = None,
        mode: str = "eval",
    ) -> FactoredDirection:
        """The factors of v = ∇θ L_u(batch) (``Direction.from_objective(..., factored=True)``).

        One forward and one backward of L_u with every covered parameter frozen: each tapped layer hands over
        its output gradient and input (ids, x̂), rows without gradient dropped; parameters the taps cannot
        factor (no adapter, or used outside their module) get their dense gradient from the same backward.
        The model's ``.grad``, flags, mode and RNG state are left as they were."""
        objective = resolve(objective)
        name = objective_name(objective, name)
        factors, dense, zero = _capture(model, objective, batch, ref_model, name, mode)
        if not factors and not dense:
            raise ValueError(f"objective {name!r} does not depend on the model's trainable parameters")
        named = dict(model.named_parameters())
        entries = {}
        for n, uses in factors.items():
            p = named[n]
            entries[n] = FactoredEntry(p.shape, p.dtype, p.device, 1, [FactorUse(0, L, R) for L, R in uses])
        for n, g in dense.items():
            p = named[n]
            entries[n] = FactoredEntry(p.shape, p.dtype, p.device, 1, dense=g[None], dense_k=(0,))
        return cls(entries, [name], zero)

    @classmethod
    def _stack(cls, directions: Mapping[str, DirectionBase]) -> FactoredDirection:
        names = cls.stack_names(directions)
        K = len(names)
        entries: dict[str, FactoredEntry] = {}
        for key in sorted(set().union(*(d.keys() for d in directions.values()))):
            parts = cls.entry_parts(directions, key)
            shapes = [tuple(p.shape) if isinstance(p, FactoredEntry) else tuple(p.shape[1:]) for _, p, _ in parts]
            for (_, _, dname), shape in zip(parts, shapes):
                if shape != shapes[0]:
                    raise ValueError(f"{key!r}: direction {dname!r} has shape {shape}, others {shapes[0]}")
            fact = next((p for _, p, _ in parts if isinstance(p, FactoredEntry)), None)
            first = parts[0][1]
            uses: list[FactorUse] = []
            dense: list[Tensor] = []
            dense_k: list[int] = []
            for o, p, _ in parts:
                if isinstance(p, FactoredEntry):
                    uses.extend(u.shifted(o) for u in p.uses)
                    if p.dense is not None:
                        dense.append(p.dense)
                        dense_k.extend(k + o for k in p.dense_k)
                else:
                    dense.append(p)
                    dense_k.extend(range(o, o + p.shape[0]))
            dense_t = None
            if dense:
                dt = dense[0].dtype
                for t in dense[1:]:
                    dt = torch.promote_types(dt, t.dtype)
                dense_t = torch.cat([t.to(device=first.device, dtype=dt) for t in dense])
            pdt = fact.param_dtype if fact is not None else first.dtype
            entries[key] = FactoredEntry(shapes[0], pdt, first.device, K, uses, dense_t, dense_k)
        zero = set.intersection(*(set(d.zero) for d in directions.values()))
        return cls(entries, names, zero)

    # -- access ------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._e)

    def entry(self, key: str) -> FactoredEntry:
        return self._e[key]

    @property
    def nbytes(self) -> int:
        """Bytes held by the factors and dense parts (shared tensors counted once per use)."""
        return sum(e.nbytes for e in self._e.values())

    def dense(self) -> DirectionBase:
        """The same K directions with every entry formed, V = Σ_s L_s R_sᵀ (float32 at least), as a Direction."""
        tensors = {k: e.dense_tensor() for k, e in self._e.items()}
        return KINDS["dense"](tensors, names=self.names, zero=self.zero)

    def _select(self, i: int) -> FactoredDirection:
        entries = {k: e.select([i]) for k, e in self._e.items()}
        zero = set(self.zero) | {k for k, e in entries.items() if e.is_zero()}
        return FactoredDirection({k: e for k, e in entries.items() if not e.is_zero()}, [self.names[i]], zero)

    def __repr__(self) -> str:
        uses = sum(len(e.uses) for e in self._e.values())
        return (
            f"FactoredDirection(names={list(self.names)}, entries={len(self._e)}, uses={uses}, "
            f"MB={self.nbytes / 2**20:.1f}, zero={len(self.zero)})"
        )

    # -- binding to a model ------------------------------------------------------------------------------
    def _entry_shape(self, e: FactoredEntry) -> tuple[int, ...]:
        return tuple(e.shape)

    def _check_entry(self, key: str, canonical: str, e: FactoredEntry, p: nn.Parameter) -> bool:
        if e.dense is not None and not bool(torch.isfinite(e.dense).all()):
            raise ValueError(f"direction has NaN or inf in {key!r}")
        return not e.is_zero()


def _capture(
    model: nn.Module, objective: ObjectiveFn, batch: Any, ref_model: nn.Module | None, name: str, mode: str
) -> tuple[dict[str, list[tuple[Tensor, Tensor]]], dict[str, Tensor], list[str]]:
    """One backward of L_u with the covered weights frozen: (factors per parameter, dense gradients of the
    parameters the taps cannot factor — no adapter, or a use outside the module —, trainable parameters with
    no gradient)."""
    mm = module_map(unwrap(model))
    trainable = list(mm.trainable())
    if not trainable:
        raise ValueError("no parameter of the model requires grad: nothing to differentiate")
    everything = Grouping(("all",), {n: 0 for n in mm.names})
    forced: dict[str, str] = {}
    while True:
        collect = Collector()
        plan = plan_taps(mm, dict.fromkeys(trainable, collect), everything, forced)
        by_autograd = [n for n in trainable if n in plan.uncovered]
        with opened(mm, plan, mode, autograd=by_autograd, ref_model=ref_model) as session:
            session.start_pooled()
            loss = objective_loss(mm.model, objective, batch, ref_model, name)
            backward(loss.reshape(()), mm.device.type)
            del loss
            try:
                session.check_outside_uses()
            except NotPerSampleError as e:  # their taps saw part of the gradient: take it from autograd
                forced.update(e.params)
                continue
            dense = {n: mm.named[n].grad.detach() for n in by_autograd if mm.named[n].grad is not None}
        zero = [n for n in trainable if n not in collect.uses and n not in dense]
        return collect.uses, dense, zero


KINDS["factored"] = FactoredDirection

__all__ = ["FactoredDirection"]
