"""Layer kind -> adapter. Adapters register by module type, or by structure for classes that are only
known by their shape (HF's RMSNorm classes, GPT-2's ``Conv1D``), so users can add their own layers::

    from geffect_fast.capture import Adapter, register

    @register(MyLayer)
    class MyLayerAdapter(Adapter):
        def attach(self, module, slots, session): ...
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .base import Adapter

_BY_TYPE: dict[type, Adapter] = {}
_RECOGNISERS: list[Callable[[nn.Module], Adapter | None]] = []
_VERSION = [0]  #: bumped by every registration: plans made before it are stale


def version() -> int:
    """How many registrations have happened (a plan cached under another number is stale)."""
    return _VERSION[0]


def register(*module_types: type[nn.Module]) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: use this adapter for modules of exactly these types (and subclasses that keep the
    type's ``forward``). A later registration for the same type replaces the earlier one."""
    if not module_types:
        raise ValueError("register() needs at least one module type")

    def deco(cls: type[Adapter]) -> type[Adapter]:
        inst = cls()
        for t in module_types:
            _BY_TYPE[t] = inst
        _VERSION[0] += 1
        return cls

    return deco


def register_recogniser(fn: Callable[[nn.Module], Adapter | None]) -> Callable[[nn.Module], Adapter | None]:
    """Register ``fn(module) -> Adapter | None`` for layers recognised by structure rather than type."""
    _RECOGNISERS.append(fn)
    _VERSION[0] += 1
    return fn


def find_adapter(module: nn.Module) -> Adapter | None:
    """The adapter for ``module``, or None when no registered rule covers it."""
    mtype = type(module)
    for cls in mtype.__mro__:
        ad = _BY_TYPE.get(cls)
        if ad is None:
            continue
        if cls is mtype or ad.covers_subclass_forward or mtype.forward is cls.forward:
            return ad
        break  # a subclass with a forward of its own: the type rule does not know what it computes
    for rec in _RECOGNISERS:
        ad = rec(module)
        if ad is not None:
            return ad
    return None
