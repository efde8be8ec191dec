"""Dense directions: each parameter's entry a stacked tensor [K, *param.shape]. e = ⟨∇θ R, v⟩ (docs/design.md §1).

Sources:

* :meth:`Direction.from_grads` — the gradients currently in ``.grad`` (after a user's own backward);
* :meth:`Direction.from_objective` — v = ∇θ L_u for an unlearning objective ``(model, batch, ref) -> loss``;
  the paper's G-effect (``factored=True``: kept as the objective's factors, see
  :mod:`geffect_fast.directions.factored`);
* :meth:`Direction.from_update` — v = (θ_before − θ_after)/lr, the step an optimiser really took, so that
  R(θ_after) − R(θ_before) ≈ −lr·⟨∇R, v⟩ holds as for plain gradient descent;
* a mapping name -> tensor (``Direction({...})``);
* :meth:`Direction.stack` — several named directions, measured in one pass.

Parameters known to have a zero direction (frozen, or unused by the objective) are recorded by name
rather than stored, and cost nothing to measure.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..distributed import is_dtensor, local_part
from ..objectives import ObjectiveFn, objective_loss, objective_name, resolve
from ..state import preserved
from .base import KINDS, DirectionBase

_VERSION = attrgetter("_version")
_DATA_PTR = Tensor.data_ptr


class Direction(DirectionBase):
    """K named directions over a model's parameters.

    ``Direction(tensors, name="direction")`` takes a mapping parameter name -> tensor of the parameter's
    shape (one direction; not copied), and ``Direction(tensors, names=[...])`` a mapping to stacked tensors
    [K, *shape]. ``zero`` lists parameters whose direction is zero.
    """

    kind = "dense"

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        name: str = "direction",
        *,
        names: Sequence[str] | None = None,
        zero: Iterable[str] = (),
    ):
        if names is None:
            self.names: tuple[str, ...] = (name,)
            self._v = {k: _as_tensor(k, t).unsqueeze(0) for k, t in tensors.items()}
        else:
            self.names = tuple(names)
            self._v = {k: _as_tensor(k, t) for k, t in tensors.items()}
            for k, t in self._v.items():
                if t.dim() == 0 or t.shape[0] != len(self.names):
                    raise ValueError(
                        f"direction entry {k!r} must be stacked [{len(self.names)}, ...], got {tuple(t.shape)}"
                    )
        if len(set(self.names)) != len(self.names) or not all(self.names):
            raise ValueError(f"direction names must be unique and non-empty, got {self.names}")
        self.zero = frozenset(zero) - set(self._v)
        #: entry -> (version counter, storage address, nonzero): the checks of :meth:`bind`, redone when the
        #: tensor is changed in place (its version counter moves) or replaced
        self._checked: dict[str, tuple[int, int, bool]] = {}
        #: the last bind's result, reused while the model's parameters, its trainable set and every entry's
        #: version counter and storage are the same (see :meth:`bind`)
        self._bound: tuple | None = None

    # -- constructors ------------------------------------------------------------------------------------
    @classmethod
    def from_grads(cls, model: nn.Module, name: str = "grad", copy: bool = True, when: str = "first") -> Direction:
        """v = the ``.grad`` of every parameter that requires grad (None counts as zero): copied, or with
        ``copy=False`` the gradients themselves (for a v used and dropped before anything changes them). ``when``
        ends the error's advice ("run a backward pass first")."""
        tensors, zero = {}, []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                zero.append(n)
            else:
                tensors[n] = p.grad.detach().clone() if copy else p.grad.detach()
        if not tensors:
            raise ValueError(f"no parameter has a .grad: run a backward pass {when}")
        return cls(tensors, name, zero=zero)

    @classmethod
    def from_objective(
        cls,
        model: nn.Module,
        objective: ObjectiveFn | str,
        batch: Any,
        ref_model: nn.Module | None = None,
        name: str | None = None,
        mode: str = "eval",
        factored: bool = False,
    ) -> DirectionBase:
        """v = ∇θ L_u(batch) for ``objective(model, batch, ref_model) -> scalar loss``, or an objective's name
        (``"npo"``, ``"npo+kl"``: :func:`geffect_fast.objectives.resolve`).

        Taken over the parameters that require grad. The model's ``.grad``, flags, mode and RNG state are
        left as they were; ``mode`` ("eval" by default, so dropout does not randomise v) is used meanwhile.

        ``factored=True`` returns a :class:`~geffect_fast.directions.factored.FactoredDirection` instead: per
        tapped layer the objective's per-token output gradients and inputs (ids for embeddings, x̂ for norms),
        from a backward with every covered weight frozen — v itself is never formed (``.dense()`` forms it), and
        ``measure()`` contracts it by its factors where that is cheaper.
        """
        objective = resolve(objective)
        name = objective_name(objective, name)
        if factored:
            return KINDS["factored"].from_objective(model, objective, batch, ref_model, name, mode)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("no parameter of the model requires grad: nothing to differentiate")
        with preserved(model, ref_model, mode=mode), torch.enable_grad():  # inside a user's no_grad too
            loss = objective_loss(model, objective, batch, ref_model, name)
            loss.reshape(()).backward()
            tensors, zero = {}, []
            for n, p in trainable:
                if p.grad is None:
                    zero.append(n)
                else:
                    tensors[n] = p.grad.detach()
        return cls(tensors, name, zero=zero)

    @classmethod
    def from_update(
        cls,
        before: nn.Module | Mapping[str, Tensor],
        after: nn.Module | Mapping[str, Tensor],
        lr: float,
        name: str = "update",
    ) -> Direction:
        """v = (θ_before − θ_after) / lr, so that the step was θ_after = θ_before − lr·v.

        ``before``/``after`` are models or state dicts. Differences are taken in at least float32, so bf16
        steps are exact. Entries that did not change are recorded as zero, not stored.
        """
        if not lr or lr != lr:
            raise ValueError(f"lr must be a nonzero number, got {lr}")
        b = _params_of(before)
        a = _params_of(after)
        if set(b) != set(a):
            only = sorted(set(b) ^ set(a))[:5]
            raise KeyError(f"before and after have different entries, e.g. {only}")
        tensors, zero = {}, []
        for k, tb in b.items():
            ta = a[k]
            if tb.shape != ta.shape:
                raise ValueError(f"{k!r}: before {tuple(tb.shape)} vs after {tuple(ta.shape)}")
            if not tb.is_floating_point():
                continue
            dt = torch.promote_types(tb.dtype, torch.float32)
            d = (tb.detach().to(dt) - ta.detach().to(device=tb.device, dtype=dt)) / lr
            if bool(d.any()):
                tensors[k] = d
            else:
                zero.append(k)
        if not tensors:
            raise ValueError("before and after are identical: the update is zero")
        return cls(tensors, name, zero=zero)

    @classmethod
    def _stack(cls, directions: Mapping[str, DirectionBase]) -> Direction:
        names = cls.stack_names(directions)
        tensors = {}
        for k in sorted(set().union(*(d.keys() for d in directions.values()))):
            parts = cls.entry_parts(directions, k)
            ref = parts[0][1]
            stacked = []
            for dname, d in directions.items():
                t = next((e for o, e, n in parts if n == dname), None)
                if t is None:
                    t = torch.zeros((d.k, *ref.shape[1:]), dtype=ref.dtype, device=ref.device)
                elif t.shape[1:] != ref.shape[1:]:
                    raise ValueError(
                        f"{k!r}: direction {dname!r} has shape {tuple(t.shape[1:])}, others {tuple(ref.shape[1:])}"
                    )
                stacked.append(t.to(device=ref.device))
            dt = stacked[0].dtype
            for t in stacked[1:]:
                dt = torch.promote_types(dt, t.dtype)
            tensors[k] = torch.cat([t.to(dt) for t in stacked])
        zero = set.intersection(*(set(d.zero) for d in directions.values()))
        return cls(tensors, names=names, zero=zero)

    # -- access ------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._v)

    def items(self):
        return self._v.items()

    def entry(self, key: str) -> Tensor:
        return self._v[key]

    def tensor(self, key: str) -> Tensor:
        """The stacked entry [K, *shape] of parameter ``key``."""
        return self._v[key]

    def _select(self, i: int) -> Direction:
        return Direction({k: t[i : i + 1] for k, t in self._v.items()}, names=[self.names[i]], zero=self.zero)

    def to(self, *args, **kwargs) -> Direction:
        """A copy with every entry moved/cast like ``Tensor.to``."""
        return Direction({k: t.to(*args, **kwargs) for k, t in self._v.items()}, names=self.names, zero=self.zero)

    def __repr__(self) -> str:
        n = sum(t[0].numel() for t in self._v.values())
        return f"Direction(names={list(self.names)}, entries={len(self._v)}, numel={n}, zero={len(self.zero)})"

    # -- binding to a model ------------------------------------------------------------------------------
    def _entry_shape(self, e: Tensor) -> tuple[int, ...]:
        return tuple(e.shape[1:])

    def _check_entry(self, key: str, canonical: str, t: Tensor, p: nn.Parameter) -> bool:
        if not t.is_floating_point() or (t.dtype != p.dtype and t.dtype not in (torch.float32, torch.float64)):
            raise TypeError(
                f"direction for {canonical!r} is {t.dtype} but the parameter is {p.dtype} "
                "(use its dtype, float32 or float64)"
            )
        # a sharded entry is checked on this rank's shard, with no collective (ranks may fail here alone),
        # and counts as nonzero: whether it is zero is a fact about every rank's shard
        local = local_part(t)
        stamp = (-1, -1) if local.is_inference() else (local._version, local.data_ptr())  # -1: no counter
        seen = None if stamp[0] < 0 else self._checked.get(key)
        if seen is not None and seen[:2] == stamp:
            return seen[2]
        if not bool(torch.isfinite(local).all()):  # first bind, or the tensor changed in place since: again
            raise ValueError(f"direction has NaN or inf in {key!r}")
        nz = True if is_dtensor(t) else bool(t.any())
        self._checked[key] = (*stamp, nz)
        return nz

    def bind(self, params: Mapping[str, nn.Parameter], trainable: Iterable[str]) -> dict[str, Tensor]:
        """:meth:`DirectionBase.bind`, remembered: called again with the same ``params`` and ``trainable`` objects
        (a model's :class:`~geffect_fast.engine.modulemap.ModuleMap` keeps them while the model is unchanged)
        and with every entry's version counter and storage as they were, the last result is returned after
        reading those two per entry (in C loops); any in-place change or replaced tensor checks again."""
        b = self._bound
        if b is not None and b[0] is params and b[1] is trainable:
            ts = b[2]
            if list(map(_VERSION, ts)) == b[3] and list(map(_DATA_PTR, ts)) == b[4]:
                return b[5]
        out = super().bind(params, trainable)
        ts = list(self._v.values())
        if all(not is_dtensor(t) and not t.is_inference() for t in ts):
            self._bound = (params, trainable, ts, list(map(_VERSION, ts)), list(map(_DATA_PTR, ts)), out)
        return out


def _as_tensor(key: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"direction entry {key!r} must be a tensor, got {type(t).__name__}")
    return t.detach()


def _params_of(x: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(x, nn.Module):
        return {n: p for n, p in x.named_parameters()}
    if isinstance(x, Mapping):
        return dict(x)
    raise TypeError(f"expected a model or a state dict, got {type(x).__name__}")


KINDS["dense"] = Direction

__all__ = ["Direction"]
