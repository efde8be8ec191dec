"""Directions v: what the risk gradient is dotted with. e = ⟨∇θ R, v⟩ (docs/design.md §1).

A :class:`Direction` holds K named directions over a model's parameters, each parameter's entry stacked
as a tensor [K, *param.shape]. Sources:

* :meth:`Direction.from_grads` — the gradients currently in ``.grad`` (after a user's own backward);
* :meth:`Direction.from_objective` — v = ∇θ L_u for an unlearning objective ``(model, batch, ref) -> loss``;
  the paper's G-effect;
* :meth:`Direction.from_update` — v = (θ_before − θ_after)/lr, the step an optimiser really took, so that
  R(θ_after) − R(θ_before) ≈ −lr·⟨∇R, v⟩ holds as for plain gradient descent;
* a mapping name -> tensor (``Direction({...})``);
* :meth:`Direction.stack` — several named directions, measured in one pass.

Parameters known to have a zero direction (frozen, or unused by the objective) are recorded by name
rather than stored, and cost nothing to measure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Container, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .distributed import is_dtensor, local_part
from .state import preserved

if TYPE_CHECKING:  # pragma: no cover
    from .factored import FactoredDirection

#: wrapper path components that do not change which parameter a name refers to
_WRAPPER_PARTS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

Objective = Callable[[nn.Module, Any, "nn.Module | None"], Tensor]


def canonical_key(key: str, names: Mapping[str, Any]) -> str | None:
    """The name in ``names`` that ``key`` refers to, allowing for DDP/compile/FSDP wrapper prefixes."""
    if key in names:
        return key
    stripped = key
    for part in _WRAPPER_PARTS:
        stripped = stripped.replace(part, "")
    if stripped in names:
        return stripped
    return None


class Direction:
    """K named directions over a model's parameters.

    ``Direction(tensors, name="direction")`` takes a mapping parameter name -> tensor of the parameter's
    shape (one direction; not copied), and ``Direction(tensors, names=[...])`` a mapping to stacked tensors
    [K, *shape]. ``zero`` lists parameters whose direction is zero.
    """

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

    # -- constructors ------------------------------------------------------------------------------------
    @classmethod
    def from_grads(cls, model: nn.Module, name: str = "grad") -> Direction:
        """v = the ``.grad`` of every parameter that requires grad (copied; None counts as zero)."""
        tensors, zero = {}, []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                zero.append(n)
            else:
                tensors[n] = p.grad.detach().clone()
        if not tensors:
            raise ValueError("no parameter has a .grad: run a backward pass first")
        return cls(tensors, name, zero=zero)

    @classmethod
    def from_objective(
        cls,
        model: nn.Module,
        objective: Objective,
        batch: Any,
        ref_model: nn.Module | None = None,
        name: str | None = None,
        mode: str = "eval",
        factored: bool = False,
    ) -> Direction | FactoredDirection:
        """v = ∇θ L_u(batch) for ``objective(model, batch, ref_model) -> scalar loss``.

        Taken over the parameters that require grad. The model's ``.grad``, flags, mode and RNG state are
        left as they were; ``mode`` ("eval" by default, so dropout does not randomise v) is used meanwhile.

        ``factored=True`` returns a :class:`~geffect_fast.factored.FactoredDirection` instead: per tapped layer
        the objective's per-token output gradients and inputs (ids for embeddings, x̂ for norms), from a backward
        with every covered weight frozen — v itself is never formed (``.dense()`` forms it), and ``measure()``
        contracts it by its factors where that is cheaper (see :mod:`geffect_fast.factored`).
        """
        name = objective_name(objective, name)
        if factored:
            from .factored import FactoredDirection

            return FactoredDirection.from_objective(model, objective, batch, ref_model, name, mode)
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
    def stack(cls, directions: Mapping[str, Direction | FactoredDirection]) -> Direction | FactoredDirection:
        """Several named directions measured in one pass (K = total count). A direction with K > 1 contributes
        its own names prefixed with its key (``key.name``). With a factored direction among them the stack is a
        :class:`~geffect_fast.factored.FactoredDirection` (the dense ones kept dense)."""
        if not directions:
            raise ValueError("stack() needs at least one direction")
        from .factored import FactoredDirection

        if any(isinstance(d, FactoredDirection) for d in directions.values()):
            return FactoredDirection.stack(directions)
        names: list[str] = []
        for key, d in directions.items():
            if not isinstance(d, Direction):
                raise TypeError(f"stack() takes Directions, got {type(d).__name__} for {key!r}")
            names.extend([key] if d.k == 1 else [f"{key}.{n}" for n in d.names])
        keys = set().union(*(d._v.keys() for d in directions.values()))
        tensors = {}
        for k in sorted(keys):
            ref = next(d._v[k] for d in directions.values() if k in d._v)
            parts = []
            for key, d in directions.items():
                if k in d._v:
                    t = d._v[k]
                    if t.shape[1:] != ref.shape[1:]:
                        raise ValueError(
                            f"{k!r}: direction {key!r} has shape {tuple(t.shape[1:])}, others {tuple(ref.shape[1:])}"
                        )
                    parts.append(t.to(device=ref.device, dtype=torch.promote_types(t.dtype, ref.dtype)))
                elif k in d.zero:
                    parts.append(torch.zeros((d.k, *ref.shape[1:]), dtype=ref.dtype, device=ref.device))
                else:
                    raise KeyError(f"direction {key!r} has no entry for {k!r}, which others have")
            dt = parts[0].dtype
            for p in parts[1:]:
                dt = torch.promote_types(dt, p.dtype)
            tensors[k] = torch.cat([p.to(dt) for p in parts])
        zero = set.intersection(*(set(d.zero) for d in directions.values()))
        return cls(tensors, names=names, zero=zero)

    # -- access ------------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Number of directions."""
        return len(self.names)

    def keys(self) -> list[str]:
        return list(self._v)

    def items(self):
        return self._v.items()

    def tensor(self, key: str) -> Tensor:
        """The stacked entry [K, *shape] of parameter ``key``."""
        return self._v[key]

    def __getitem__(self, name: str) -> Direction:
        """One direction by name, as a Direction of its own (a view, not a copy)."""
        if name not in self.names:
            raise KeyError(f"no direction {name!r}; have {', '.join(self.names)}")
        i = self.names.index(name)
        return Direction({k: t[i : i + 1] for k, t in self._v.items()}, names=[name], zero=self.zero)

    def to(self, *args, **kwargs) -> Direction:
        """A copy with every entry moved/cast like ``Tensor.to``."""
        return Direction({k: t.to(*args, **kwargs) for k, t in self._v.items()}, names=self.names, zero=self.zero)

    def __repr__(self) -> str:
        n = sum(t[0].numel() for t in self._v.values())
        return f"Direction(names={list(self.names)}, entries={len(self._v)}, numel={n}, zero={len(self.zero)})"

    # -- binding to a model ------------------------------------------------------------------------------
    def bind(self, params: Mapping[str, nn.Parameter], trainable: Iterable[str]) -> dict[str, Tensor]:
        """Check the direction against a model and return {canonical name: [K, *shape]} for the parameters
        whose direction is nonzero.

        Raises for an entry naming no parameter, a wrong shape, dtype or device, a non-finite value, or a
        trainable parameter (``requires_grad``) that the direction does not mention. Whether an entry is finite
        and nonzero is remembered between calls only while the tensor is unchanged (same version counter).
        """
        out: dict[str, Tensor] = {}
        mentioned: set[str] = set()
        for key in self.zero:
            c = canonical_key(key, params)
            if c is not None:
                mentioned.add(c)
        for key, t in self._v.items():
            c = canonical_key(key, params)
            if c is None:
                raise KeyError(f"direction entry {key!r} names no parameter of the model")
            p = params[c]
            mentioned.add(c)
            if t.shape[1:] != p.shape:
                raise ValueError(f"direction for {c!r} has shape {tuple(t.shape[1:])}, the parameter {tuple(p.shape)}")
            if not t.is_floating_point() or (t.dtype != p.dtype and t.dtype not in (torch.float32, torch.float64)):
                raise TypeError(
                    f"direction for {c!r} is {t.dtype} but the parameter is {p.dtype} "
                    "(use its dtype, float32 or float64)"
                )
            if t.device != p.device:
                raise ValueError(f"direction for {c!r} is on {t.device} but the parameter is on {p.device}")
            # a sharded entry is checked on this rank's shard, with no collective (ranks may fail here alone),
            # and counts as nonzero: whether it is zero is a fact about every rank's shard
            local = local_part(t)
            stamp = (-1, -1) if local.is_inference() else (local._version, local.data_ptr())  # -1: no counter
            seen = None if stamp[0] < 0 else self._checked.get(key)
            if seen is not None and seen[:2] == stamp:
                nz = seen[2]
            else:  # first bind, or the tensor changed in place since: check again
                if not bool(torch.isfinite(local).all()):
                    raise ValueError(f"direction has NaN or inf in {key!r}")
                nz = True if is_dtensor(t) else bool(t.any())
                self._checked[key] = (*stamp, nz)
            if nz:
                out[c] = t
        remedy = "give them an entry, list them in Direction(..., zero=[...]), or set requires_grad=False"
        check_complete(trainable, mentioned, remedy)
        return out


def check_complete(trainable: Iterable[str], mentioned: Container[str], remedy: str) -> None:
    """A KeyError naming the trainable parameters a direction has no entry for (the first five), with ``remedy``."""
    missing = [n for n in trainable if n not in mentioned]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(
            f"direction has no entry for trainable parameter(s) {missing[:5]}{more}; {remedy} on parameters "
            "outside the direction"
        )


def objective_name(objective: Objective, name: str | None = None) -> str:
    """``name``, or the objective's own ``name``/``__name__`` ("objective" for a lambda)."""
    if name is None:
        name = getattr(objective, "name", None) or getattr(objective, "__name__", None) or "objective"
        if name == "<lambda>":
            name = "objective"
    return name


def objective_loss(
    model: nn.Module, objective: Objective, batch: Any, ref_model: nn.Module | None, name: str
) -> Tensor:
    """L_u = ``objective(model, batch, ref_model)``, checked: a finite scalar that requires grad (clear errors for
    a batch without the keys the objective looks up)."""
    try:
        loss = objective(model, batch, ref_model)
    except KeyError as e:  # a bare KeyError('labels') from deep inside an objective says too little
        key = e.args[0] if e.args else None
        raise KeyError(
            f"objective {name!r} looked up {key!r}, which its batch does not have ({_describe(batch)}); "
            "a batch needs input_ids and labels (−100 = ignored), and objectives with a retain term take "
            "{'forget': batch, 'retain': batch}"
        ) from e
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"objective {name!r} must return a scalar tensor, got {type(loss).__name__}")
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"objective {name!r} is not finite ({loss.item()})")
    if not loss.requires_grad:
        raise ValueError(f"objective {name!r} does not depend on the model's trainable parameters")
    return loss


def _describe(batch: Any) -> str:
    """The keys of a batch, or of each part of an open-unlearning {'forget': ..., 'retain': ...} dict."""
    if not isinstance(batch, Mapping):
        return f"a {type(batch).__name__}"
    parts = [f"{k}: keys {', '.join(map(str, v))}" for k, v in batch.items() if isinstance(v, Mapping)]
    return "; ".join(parts) if parts else f"keys {', '.join(map(str, batch))}"


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
