"""What a tap's factors feed — one consumer per parameter, chosen when the plan is made.

* :class:`DenseDot` — the G-effect of a direction V: ⟨G_b, V⟩ = Σ_{t∈b} L_tᵀ V R_t by the ops (``linear_dot``,
  ``embedding_dot``, ``norm_dot``; fused per layer kind, weight and bias in one call), [K, B] per parameter;
* :class:`FactorPair` — the same against a factored direction (:mod:`geffect_fast.engine.factors`): its dense
  part by the ops, each objective use paired with the risk rows by :func:`geffect_fast.ops.factored.pair_use`;
* :class:`Collector` — an objective's factors per parameter, rows without gradient dropped (factored
  directions); :class:`Keep` — every factor as it comes, with its segments (pairwise, the objective's side);
* :class:`PairMeet` — pairwise G-effects: a risk batch's factors against the kept objective factors of the
  same parameter, by the ghost or the materialised method (:func:`geffect_fast.ops.pairwise.pairwise`);
* :class:`Projector` — Kronecker sketches of per-sample gradients (:mod:`geffect_fast.sketch`).

Each reads what the pass holds from ``self.session`` (set by the plan): the batch's B, the directions ``V`` in
slot order, the ops (unchecked kernels), the accumulation dtype; contributions to G-effects go to
``session.pending`` as (group column, [K, B]).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..capture import CaptureSession, Consumer, Slot, Tap
from ..distributed import gather_async, is_dtensor
from ..ops import pairwise as pw
from ..ops.contract import Seg, acc_dtype
from ..ops.factored import keep_rows, nonzero_rows, pair_use
from ..ops.pairwise import is_ids
from .factors import FactoredEntry


def _flat(v: Tensor) -> Tensor:
    """A vector parameter's stacked direction as [K, d] (Cohere's [heads, head_dim] norm weights flattened)."""
    return v if v.ndim == 2 else v.reshape(v.shape[0], -1)


class DenseDot(Consumer):
    """out[k, b] = ⟨G_b, V_k⟩ for each slot, by the session's ops; V = ``session.V[slot.index]`` [K, *shape]
    (``[:, slot.part]`` for one expert's slice of a stacked parameter)."""

    session: CaptureSession
    takes_parts = True

    def linear(self, w: Slot | None, b: Slot | None, a: Tensor, g: Tensor, seg: Seg, transposed: bool) -> None:
        s = self.session
        V = s.V
        vw = None
        if w is not None:
            vw = V[w.index]
            if w.part is not None:
                vw = vw[:, w.part]
            if transposed:  # Conv1D stores W as [i, o]: the op takes [K, o, i]
                vw = vw.transpose(1, 2)
        vb = None if b is None else V[b.index]
        if vb is not None and b.part is not None:
            vb = vb[:, b.part]
        ow, ob = s.ops.linear_dot(a if vw is not None else None, g, vw, seg, s.B, vb)
        if ow is not None:
            s.pending.append((w.group, ow))
        if ob is not None:
            s.pending.append((b.group, ob))

    def embedding(self, w: Slot, ids: Tensor, g: Tensor, seg: Seg, pad: int | None) -> None:
        s = self.session
        s.pending.append((w.group, s.ops.embedding_dot(ids, g, s.V[w.index], seg, s.B, pad)))

    def norm(self, w: Slot | None, b: Slot | None, xhat: Tensor, g: Tensor, seg: Seg) -> None:
        s = self.session
        V = s.V
        vw = None if w is None else _flat(V[w.index])
        vb = None if b is None else _flat(V[b.index])
        ow, ob = s.ops.norm_dot(xhat, g, vw, vb, seg, s.B)
        if ow is not None:
            s.pending.append((w.group, ow))
        if ob is not None:
            s.pending.append((b.group, ob))

    def factors(self, slot: Slot, L: Tensor, R: Tensor, seg: Seg, pad: int | None) -> None:
        """Any other layer kind: Σ_t L_tᵀ V R_t with V viewed as [K, d_L, d_R] (``embedding_dot`` for ids)."""
        s = self.session
        v = s.V[slot.index]
        dR = R.shape[1]
        if is_ids(L):
            out = s.ops.embedding_dot(L, R, v.reshape(v.shape[0], -1, dR), seg, s.B, pad)
        else:
            out = s.ops.linear_dot(R, L, v.reshape(v.shape[0], L.shape[1], dR), seg, s.B)[0]
        s.pending.append((slot.group, out))


class Gathered:
    """The directions of a pass where some are sharded DTensors (FSDP2), as ``session.V``: an entry is
    all-gathered when a tap asks for it — a collective, so only inside the backward, where every rank reaches
    the same layer in the same order — and, as FSDP does for parameters, the gathers of the module's other
    slots and of the module before it (next in the backward) are started ahead, asynchronously. At most two
    modules' directions are alive; the caller frees what it gets."""

    def __init__(self, V: list[Any], taps: list[Tap]):
        self.V = V
        mods = [t for t in taps if any(is_dtensor(V[s.index]) for s in t.slots.values())]
        self._slots = [[s.index for s in t.slots.values()] for t in mods]
        self._module_of = {i: j for j, idx in enumerate(self._slots) for i in idx}
        self._inflight: dict[int, Any] = {}
        self._done: set[int] = set()

    def reset(self) -> None:
        """Before each batch's backward: every entry to be gathered again."""
        self._inflight.clear()
        self._done.clear()

    def __getitem__(self, i: int) -> Tensor:
        v = self.V[i]
        if not is_dtensor(v):
            return v
        j = self._module_of[i]
        self._start(j)
        if j > 0:
            self._start(j - 1)
        t = self._inflight.pop(i, None)
        if t is None:  # used again in this backward (a module called twice): gather once more
            t = gather_async(v)
        self._done.add(i)
        return t.wait() if hasattr(t, "wait") else t

    def _start(self, j: int) -> None:
        for i in self._slots[j]:
            if is_dtensor(self.V[i]) and i not in self._inflight and i not in self._done:
                self._inflight[i] = gather_async(self.V[i])


class FactorPair(Consumer):
    """⟨G_b, V_k⟩ for a :class:`FactoredEntry` ``session.V[slot.index]``: its dense part by the session's ops, each
    factor use paired with the risk rows that carry gradient, never forming V (the factored route)."""

    session: CaptureSession

    def factors(self, slot: Slot, L: Tensor, R: Tensor, seg: Seg, pad: int | None) -> None:
        s = self.session
        e: FactoredEntry = s.V[slot.index]
        B, ops = s.B, s.ops
        ids = is_ids(L)
        acc = torch.promote_types(s.acc, acc_dtype(R, None if ids else L))
        out = torch.zeros(e.K, B, dtype=acc, device=R.device)
        if e.dense is not None:
            Vd = e.dense.reshape(len(e.dense_k), -1, R.shape[1])
            c = ops.embedding_dot(L, R, Vd, seg, B, pad) if ids else ops.linear_dot(R, L, Vd, seg, B)[0]
            out[list(e.dense_k)] += c.to(acc)
        if e.uses:
            L2, R2, seg2 = nonzero_rows(L, R, seg, B, pad)
            if R2.shape[0]:
                for u in e.uses:
                    out[u.k] += pair_use(L2, R2, seg2, B, u.L, u.R, u.table() if u.ids else None, ops, acc)
        s.pending.append((slot.group, out))


#: the objective's rows without gradient are dropped (the rest copied) when they are at least this share of a use
DROP_SHARE = 0.125


class Collector(Consumer):
    """An objective's factors per parameter (``uses[name]``: one (L, R) per use), rows with no gradient dropped
    where they are at least :data:`DROP_SHARE` of the use's rows (fewer are not worth copying the rest for).

    Dropping rows copies the rest; a tensor handed over for several uses (the input shared by q/k/v) is copied
    once per distinct row set: copies are remembered by the source's storage while the capture runs (the
    sources are held meanwhile, so no freed address can be reused by another tensor)."""

    def __init__(self) -> None:
        self.uses: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._copies: list[tuple[Tensor, Tensor, Tensor]] = []  # (source, kept rows, copy)

    def factors(self, slot: Slot, L: Tensor, R: Tensor, seg: Seg, pad: int | None) -> None:
        L, R = L.detach(), R.detach()
        keep, finite = keep_rows(L, R, pad, DROP_SHARE)
        if not finite:
            raise ValueError(f"the objective's gradient is not finite (NaN or inf) at {slot.name!r}")
        if not bool(keep.any()):
            return
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            L, R = self._rows(L, keep, idx), self._rows(R, keep, idx)
        self.uses.setdefault(slot.name, []).append((L, R))

    def _rows(self, x: Tensor, keep: Tensor, idx: Tensor) -> Tensor:
        for src, kept, copy in self._copies:
            if (
                src.data_ptr() == x.data_ptr()
                and src.shape == x.shape
                and src.stride() == x.stride()
                and src.dtype == x.dtype
                and torch.equal(kept, keep)
            ):
                return copy
        copy = x.index_select(0, idx)
        self._copies.append((x, keep, copy))
        return copy


class Keep(Consumer):
    """Every factor as it comes, with its row -> sample map and padding id: ``kept[name]`` one (L, R, seg, pad)
    per use (the objective's side of pairwise G-effects)."""

    session: CaptureSession

    def __init__(self) -> None:
        self.kept: dict[str, list[tuple[Tensor, Tensor, Seg, int | None]]] = defaultdict(list)

    def factors(self, slot: Slot, L: Tensor, R: Tensor, seg: Seg, pad: int | None) -> None:
        self.kept[slot.name].append((L.detach(), R.detach(), seg, pad))


class PairMeet(Consumer):
    """E[group, i, j] += ⟨G_i, G'_j⟩ for a risk batch's factors against the kept objective factors of the same
    parameter (every pair of uses, so tied weights are exact), by ``method`` ("auto", "ghost", "materialise").
    Set ``E`` [G, B, B_obj] before each risk batch; ``methods`` records the method each pair of uses took."""

    session: CaptureSession

    def __init__(self, kept: Mapping[str, list], B_obj: int, vocab: Mapping[str, int], method: str):
        self.kept, self.B_obj, self.vocab, self.method = kept, B_obj, vocab, method
        self.E: Tensor | None = None
        self.methods: dict[str, str] = {}

    def factors(self, slot: Slot, L: Tensor, R: Tensor, seg: Seg, pad: int | None) -> None:
        B = self.session.B
        for k, (L2, R2, seg2, pad2) in enumerate(self.kept.get(slot.name, [])):
            e, how = pw.pairwise(
                L, R, seg, B, L2, R2, seg2, self.B_obj, method=self.method, vocab=self.vocab[slot.name],
                pad=pad if pad is not None else pad2,
            )  # fmt: skip
            self.E[slot.group] += e.double()
            self.methods[f"{slot.name}[{k}]"] = how


class Projector(Consumer):
    """Kronecker sketches: ``out[name]`` += Σ_{t∈b} (P_L L_t)(P_R R_t)ᵀ per sample, [B, k_L, k_R], with the
    projections ``project(name, side, d, device, dtype)`` and the backend's fused ``segment_outer``."""

    session: CaptureSession

    def __init__(self, shape: Callable[[str], tuple[int, int]], project: Callable, segment_outer: Callable):
        self.shape, self.project, self.segment_outer = shape, project, segment_outer
        self.out: dict[str, Tensor] = {}

    def factors(self, slot: Slot, L: Tensor, R: Tensor, seg: Seg, pad: int | None) -> None:
        dL, dR = self.shape(slot.name)
        dt = torch.float64 if R.dtype == torch.float64 else torch.float32
        p_l = self.project(slot.name, "L", dL, R.device).to(dt)
        p_r = self.project(slot.name, "R", dR, R.device).to(dt)
        s = pw.project(L, R, seg, self.session.B, p_l, p_r, pad, segment_outer_op=self.segment_outer)
        name = slot.name
        self.out[name] = self.out[name] + s if name in self.out else s


__all__ = [
    "DROP_SHARE",
    "Collector",
    "DenseDot",
    "FactorPair",
    "Gathered",
    "Keep",
    "PairMeet",
    "Projector",
]
