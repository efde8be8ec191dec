"""The plan of a pass: which module taps which parameter and what its factors feed.

:func:`plan_taps` takes a model's :class:`~geffect_fast.engine.modulemap.ModuleMap` and, per parameter to
measure, the :class:`~geffect_fast.capture.Consumer` its factors feed; every use of the parameter (tied weights:
each module that holds it) gets a :class:`~geffect_fast.capture.Slot` in its module's
:class:`~geffect_fast.capture.Tap`. A parameter is *uncovered* when one of its uses has no adapter, an adapter
that refuses the module or does not cover that parameter, or when an earlier pass found its taps cannot
measure it (``forced``): it is then measured by autograd (``strict=False``) or refused. Modules whose output
must become a leaf that requires grad (the embeddings that are not tapped, and the input embedding) are the
plan's *roots*. The plan's :class:`~geffect_fast.capture.CaptureSession` is built once with it: a plan kept
in the model's map (``ModuleMap.plans``) is re-armed for every pass at no further cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import nn

from ..capture import CaptureSession, Consumer, Slot, Tap
from ..groups import Grouping
from .modulemap import ModuleMap


@dataclass(eq=False)
class Plan:
    taps: list[Tap]
    roots: list[nn.Module]
    uncovered: dict[str, str]  #: parameter -> why its taps cannot measure it
    order: list[str]  #: the covered parameters by Slot.index (the order of ``session.V``)
    session: CaptureSession


def uncovered_reasons(mm: ModuleMap, names, forced: Mapping[str, str] | None = None) -> dict[str, str]:
    """Parameter -> why the taps cannot measure it, for those of ``names`` that some use leaves uncovered."""
    reasons: dict[str, str] = {}
    why_of: dict[int, str | None] = {}
    for n in names:
        for mname, m, local in mm.owners.get(n, ()):
            ad = mm.adapters[id(m)]
            if id(m) not in why_of:
                why_of[id(m)] = None if ad is None else ad.unsupported_reason(m)
            why = why_of[id(m)]
            if ad is None:
                reasons[n] = f"{mname or '<model>'} ({type(m).__name__}) has no adapter"
            elif why is not None:
                reasons[n] = f"{mname} ({type(m).__name__}): {why}"
            elif local not in ad.param_names:
                reasons[n] = f"{mname} ({type(m).__name__}): its adapter does not cover {local!r}"
    for n, why in (forced or {}).items():
        reasons.setdefault(n, why)
    return reasons


def plan_taps(
    mm: ModuleMap,
    consumers: Mapping[str, Consumer],
    grouping: Grouping,
    forced: Mapping[str, str] | None = None,
    guard: bool = True,
) -> Plan:
    """Tap every use of each parameter in ``consumers`` (parameter -> what its factors feed), grouped by
    ``grouping``; ``forced``: parameters known not to be measurable by their taps, with the reason. ``guard``:
    watch the covered parameters for uses outside their modules (off where parameters are sharded)."""
    uncovered = uncovered_reasons(mm, consumers, forced)
    for n, c in consumers.items():
        if n not in uncovered and not c.takes_parts:
            for mname, m, _ in mm.owners.get(n, ()):
                if mm.adapters[id(m)].sliced:
                    uncovered[n] = (
                        f"{mname} ({type(m).__name__}) hands over its parameters one expert slice at a time, and "
                        f"{type(c).__name__} takes whole parameters (G-effects of a dense direction take slices)"
                    )
    taps: list[Tap] = []
    by_module: dict[int, Tap] = {}
    order: list[str] = []
    for n, c in consumers.items():
        if n in uncovered:
            continue
        index = len(order)
        order.append(n)
        for mname, m, local in mm.owners.get(n, ()):
            t = by_module.get(id(m))
            if t is None:
                t = by_module[id(m)] = Tap(mname, m, mm.adapters[id(m)])
                taps.append(t)
            slot = t.slots[local] = Slot(n, local, grouping.of[n], index, part_groups=grouping.parts.get(n))
            part = next((p for p in t.parts if p[0] is c), None)
            if part is None:
                part = (c, {})
                t.parts.append(part)
            part[1][local] = slot
    roots = [m for m in mm.embeddings if id(m) not in by_module]
    emb = mm.input_embedding
    if emb is not None and id(emb) not in by_module and all(emb is not r for r in roots):
        roots.append(emb)
    session = CaptureSession(taps, roots, guard)
    session.layouts = mm.layouts
    for c in {id(c): c for c in consumers.values()}.values():
        c.session = session
    return Plan(taps, roots, uncovered, order, session)


__all__ = ["Plan", "plan_taps", "uncovered_reasons"]
