"""Factored directions: an objective's gradient kept as its per-token factors, measured without forming it.

For a parameter W used as y_s = W a_s, the objective's gradient over its batch of N' rows is
V = ∇_W L_u = Σ_s g'_s a'_sᵀ (g'_s = ∂L_u/∂y_s). A risk sample b's G-effect against it is

    ⟨G_b, V⟩ = Σ_{t∈b} g_tᵀ V a_t = Σ_{t∈b} Σ_s (g_t·g'_s)(a_t·a'_s)

— 2·N·N'·(I + O) FLOPs from the factors alone (the *factored* route), against 2·N'·I·O to form V (the
weight-gradient GEMM of the objective's backward) plus 2·N·I·O to contract it (the *dense* route). Every
covered parameter has such factors, G = Σ_s L_s R_sᵀ with one factor per side of the weight, as
:mod:`geffect_fast.ops.pairwise` defines them: ``nn.Linear`` L = g', R = a'; HF ``Conv1D`` L = a', R = g';
embeddings L = the one-hot rows of the ids, R = g'; a bias L = g', R = 1; a norm's γ L = g' ⊙ x̂', R = 1.

:class:`FactoredDirection` (``Direction.from_objective(..., factored=True)``) keeps these factors per parameter
use — taken from one backward of L_u with every covered weight frozen, so the objective's own weight-gradient
GEMMs are never run — with rows that carry no gradient dropped; K of them stack, with dense directions too
(``Direction.stack``). ``.dense()`` forms V. ``measure()`` chooses per parameter between

* ``"dense"``: form V from the factors (Σ_s L_s R_sᵀ, once per call) and contract it as for any direction;
* ``"factored"``: pair each risk-side use with each objective use, never forming V. Dense × dense factors by
  :func:`geffect_fast.ops.pairwise.factor_pairwise` (tiles of tokens: no N × N' matrix of a whole batch);
  embeddings (one-hot × one-hot) through the rows of V the objective's ids touch (Σ_s over equal ids first:
  the same sum, (N + N')·d work), and a tied head's cross terms (an embedding use against a head use) through
  the columns or rows that the other side's ids select, in tiles;

by the cost model :func:`route_costs` (FLOPs and bytes of each route from N, N', the factor widths I and O, K
and the element size; seconds on this device from :data:`MACHINES`), or as ``route=`` forces. Both routes are
exact: they sum the same products in another order (float64: equal to ~1e-15 relative).

Single process only (a DDP/FSDP direction is the ranks' averaged gradient: pass ``.dense()``, averaged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import groups as groups_mod
from .capture import CaptureSession, NotPerSampleError, Slot
from .capture.embedding import EmbeddingAdapter
from .direction import Direction, canonical_key, check_complete, objective_loss, objective_name
from .ops import pairwise as pw
from .ops import resolve
from .ops.contract import Seg, acc_dtype, seg_tensor, segment_sum
from .ops.dispatch import Backend
from .state import preserved

ROUTES = ("auto", "dense", "factored")

#: transient bytes of one tile of the cross-term products (the dense × dense tiles are pairwise.TILE_BYTES)
TILE_BYTES = 8 << 20


def _is_ids(x: Tensor) -> bool:
    return x.dtype in (torch.int32, torch.int64)


def _acc_of(dtype: torch.dtype) -> torch.dtype:
    """Where a factor of ``dtype`` is accumulated (and a dense V formed): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- the factors ------------------------------------------------------------------------------------------
@dataclass
class FactorUse:
    """Direction ``k``'s share Σ_s L_s R_sᵀ of a parameter's gradient from one use (one module call of the
    objective's forward). ``L`` is [n, d_L] or, for an embedding, the ids [n] (one-hot rows of the table's
    width); ``R`` is [n, d_R]; d_L·d_R is the parameter's size. Rows carry a nonzero gradient (the others,
    padding and positions after the last label, are dropped when captured; ids at ``padding_idx`` too)."""

    k: int
    L: Tensor
    R: Tensor
    _table: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def ids(self) -> bool:
        return _is_ids(self.L)

    @property
    def n(self) -> int:
        return self.R.shape[0]

    @property
    def nbytes(self) -> int:
        return self.L.numel() * self.L.element_size() + self.R.numel() * self.R.element_size()

    def table(self) -> tuple[Tensor, Tensor]:
        """(U, T) for an ids use: the distinct ids U [u] (sorted) and the rows of V they hold, T[j] = Σ_{s: x_s =
        U_j} R_s [u, d_R], in the accumulation dtype. Kept (a use is measured against every risk set)."""
        if self._table is None:
            U, inv = torch.unique(self.L.long(), sorted=True, return_inverse=True)
            T = torch.zeros(U.shape[0], self.R.shape[1], dtype=_acc_of(self.R.dtype), device=self.R.device)
            self._table = (U, T.index_add_(0, inv, self.R.to(T.dtype)))
        return self._table

    def shifted(self, by: int) -> FactorUse:
        return FactorUse(self.k + by, self.L, self.R, self._table)


class FactoredEntry:
    """One parameter's K directions: a dense part (directions ``dense_k``, [len(dense_k), *shape]) and factor
    uses for the others (a direction may have several uses: tied weights, a module called twice, an objective
    that runs the model on two batches)."""

    def __init__(
        self,
        shape: Sequence[int],
        param_dtype: torch.dtype,
        device: torch.device,
        K: int,
        uses: Iterable[FactorUse] = (),
        dense: Tensor | None = None,
        dense_k: Sequence[int] = (),
    ):
        self.shape = torch.Size(shape)
        self.param_dtype = param_dtype
        self.device = torch.device(device)
        self.K = K
        self.uses = list(uses)
        self.dense = dense
        self.dense_k = tuple(dense_k)
        if (dense is None) != (not self.dense_k) or (dense is not None and dense.shape[0] != len(self.dense_k)):
            raise ValueError("a dense part needs one direction index per row")
        if any(not 0 <= k < K for k in (*self.dense_k, *(u.k for u in self.uses))):
            raise ValueError(f"direction indices must lie in [0, {K})")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of V formed from this entry: the parameter's, widened to at least float32."""
        dts = [self.param_dtype, torch.float32] + ([self.dense.dtype] if self.dense is not None else [])
        out = dts[0]
        for d in dts[1:]:
            out = torch.promote_types(out, d)
        return out

    @property
    def nbytes(self) -> int:
        d = 0 if self.dense is None else self.dense.numel() * self.dense.element_size()
        return d + sum(u.nbytes for u in self.uses)

    def is_zero(self) -> bool:
        return not self.uses and (self.dense is None or not bool(self.dense.any()))

    def dense_tensor(self) -> Tensor:
        """V [K, *shape]: the dense part, plus Σ_s L_s R_sᵀ of every use (an index_add for ids) — the
        weight-gradient GEMMs the factored objective backward skipped, N'·d_L·d_R multiply-adds per use."""
        dt = self.dtype
        V = torch.zeros(self.K, self.shape.numel(), dtype=dt, device=self.device)
        if self.dense is not None:
            V[list(self.dense_k)] = self.dense.reshape(len(self.dense_k), -1).to(dt)
        for u in self.uses:
            dR = u.R.shape[1]
            Vk = V[u.k].view(-1, dR)
            if u.ids:
                Vk.index_add_(0, u.L.long(), u.R.to(dt))
            else:
                Vk.addmm_(u.L.T.to(dt), u.R.to(dt))
        return V.reshape(self.K, *self.shape)

    def select(self, ks: Sequence[int]) -> FactoredEntry:
        """The entry of directions ``ks`` (re-indexed 0, 1, … in that order)."""
        where = {k: i for i, k in enumerate(ks)}
        uses = [FactorUse(where[u.k], u.L, u.R, u._table) for u in self.uses if u.k in where]
        rows = [i for i, k in enumerate(self.dense_k) if k in where]
        dense = None if not rows or self.dense is None else self.dense[rows]
        return FactoredEntry(
            self.shape, self.param_dtype, self.device, len(ks), uses, dense, [where[self.dense_k[i]] for i in rows]
        )


# -- capturing an objective's factors ---------------------------------------------------------------------
#: the objective's rows without gradient are dropped (the rest copied) when they are at least this share of a use
DROP_SHARE = 0.125


class _Collector:
    """The factor sink of the objective's backward: keeps each use's factors, rows with no gradient dropped
    where they are at least :data:`DROP_SHARE` of the use's rows (fewer are not worth copying the rest for).

    Dropping rows copies the rest; a tensor handed over for several uses (the input shared by q/k/v) is copied
    once per distinct row set: copies are remembered by the source's storage while the capture runs (the
    sources are held meanwhile, so no freed address can be reused by another tensor)."""

    def __init__(self) -> None:
        self.uses: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._copies: list[tuple[Tensor, Tensor, Tensor]] = []  # (source, kept rows, copy)

    def __call__(self, slot: Slot, L: Tensor, R: Tensor, seg: Seg, pad: int | None) -> None:
        L, R = L.detach(), R.detach()
        keep, finite = _keep(L, R, pad, DROP_SHARE)
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


def _capture(
    model: nn.Module, objective: Any, batch: Any, ref_model: nn.Module | None, name: str, mode: str
) -> tuple[dict[str, list[tuple[Tensor, Tensor]]], dict[str, Tensor], list[str]]:
    """One backward of L_u with the covered weights frozen: (factors per parameter, dense gradients of the
    parameters the taps cannot factor — no adapter, an adapter without factors, a use outside the module —,
    trainable parameters with no gradient)."""
    from .api import _layout, _Plan, input_device, unwrap

    model = unwrap(model)
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter of the model requires grad: nothing to differentiate")
    layout = _layout(model, named)
    grouping = groups_mod.Grouping(("all",), {n: 0 for n in named})
    forced: dict[str, str] = {}
    for n in trainable:
        for mname, m, _ in layout.owners.get(n, []):
            ad = layout.adapters[id(m)]
            if ad is not None and not ad.gives_factors:
                forced[n] = f"{mname} ({type(m).__name__}): its adapter gives no factors"
    device = input_device(model)
    acc = _acc_of(next((p.dtype for p in named.values() if p.is_floating_point()), torch.float32))
    while True:
        plan = _Plan(layout, {n: named[n].detach()[None] for n in trainable}, grouping, forced)
        by_autograd = [n for n in trainable if n in plan.uncovered]
        collect = _Collector()
        with preserved(model, ref_model, mode=mode), torch.enable_grad():
            for p in named.values():
                p.requires_grad_(False)
            for n in by_autograd:
                named[n].requires_grad_(True)
            with CaptureSession(plan.plans, plan.roots, resolve("reference", device), 1, 1, acc) as session:
                session.factor_sink = collect
                session.start_pooled(device)
                loss = objective_loss(model, objective, batch, ref_model, name)
                loss.reshape(()).backward()
                del loss
                try:
                    session.check_outside_uses()
                except NotPerSampleError as e:  # their taps saw part of the gradient: take it from autograd
                    forced.update(e.params)
                    continue
            dense = {n: named[n].grad.detach() for n in by_autograd if named[n].grad is not None}
        factors = collect.uses
        zero = [n for n in trainable if n not in factors and n not in dense]
        return factors, dense, zero


class FactoredDirection:
    """K named directions over a model's parameters, each parameter's entry a :class:`FactoredEntry` (factor
    uses, and a dense part for directions that came dense). See the module docstring."""

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
        objective: Any,
        batch: Any,
        ref_model: nn.Module | None = None,
        name: str | None = None,
        mode: str = "eval",
    ) -> FactoredDirection:
        """The factors of v = ∇θ L_u(batch) (see :meth:`Direction.from_objective`, ``factored=True``).

        One forward and one backward of L_u with every covered parameter frozen: each tapped layer hands over
        its output gradient and input (ids, x̂), rows without gradient dropped; parameters the taps cannot
        factor (no adapter, or used outside their module) get their dense gradient from the same backward.
        The model's ``.grad``, flags, mode and RNG state are left as they were."""
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
    def stack(cls, directions: Mapping[str, Direction | FactoredDirection]) -> FactoredDirection:
        """Several named directions, dense or factored, as one (names as :meth:`Direction.stack` gives them)."""
        if not directions:
            raise ValueError("stack() needs at least one direction")
        names: list[str] = []
        for key, d in directions.items():
            if not isinstance(d, (Direction, FactoredDirection)):
                raise TypeError(f"stack() takes Directions, got {type(d).__name__} for {key!r}")
            names.extend([key] if d.k == 1 else [f"{key}.{n}" for n in d.names])
        K = len(names)
        keys = sorted(set().union(*(d.keys() for d in directions.values())))
        entries: dict[str, FactoredEntry] = {}
        for key in keys:
            parts: list[tuple[int, FactoredEntry | Tensor, str]] = []  # (offset of the direction, its part, name)
            off = 0
            for dname, d in directions.items():
                if key in d.keys():
                    parts.append((off, d.entry(key) if isinstance(d, FactoredDirection) else d.tensor(key), dname))
                elif key not in d.zero:
                    raise KeyError(f"direction {dname!r} has no entry for {key!r}, which others have")
                off += d.k
            shapes = [tuple(p.shape) if isinstance(p, FactoredEntry) else tuple(p.shape[1:]) for _, p, _ in parts]
            for (_, _, dname), shape in zip(parts, shapes):
                if shape != shapes[0]:
                    raise ValueError(f"{key!r}: direction {dname!r} has shape {shape}, others {shapes[0]}")
            first = parts[0][1]
            fact = next((p for _, p, _ in parts if isinstance(p, FactoredEntry)), None)
            pdt = fact.param_dtype if fact is not None else first.dtype
            dev = first.device
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
                dense_t = torch.cat([t.to(device=dev, dtype=dt) for t in dense])
            entries[key] = FactoredEntry(shapes[0], pdt, dev, K, uses, dense_t, dense_k)
        zero = set.intersection(*(set(d.zero) for d in directions.values()))
        return cls(entries, names, zero)

    # -- access ------------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Number of directions."""
        return len(self.names)

    def keys(self) -> list[str]:
        return list(self._e)

    def entry(self, key: str) -> FactoredEntry:
        return self._e[key]

    @property
    def nbytes(self) -> int:
        """Bytes held by the factors and dense parts (shared tensors counted once per use)."""
        return sum(e.nbytes for e in self._e.values())

    def dense(self) -> Direction:
        """The same K directions with every entry formed, V = Σ_s L_s R_sᵀ (float32 at least)."""
        tensors = {k: e.dense_tensor() for k, e in self._e.items()}
        return Direction(tensors, names=self.names, zero=self.zero)

    def __getitem__(self, name: str) -> FactoredDirection:
        """One direction by name, as a FactoredDirection of its own (sharing the factors)."""
        if name not in self.names:
            raise KeyError(f"no direction {name!r}; have {', '.join(self.names)}")
        i = self.names.index(name)
        entries = {k: e.select([i]) for k, e in self._e.items()}
        zero = set(self.zero) | {k for k, e in entries.items() if e.is_zero()}
        return FactoredDirection({k: e for k, e in entries.items() if not e.is_zero()}, [name], zero)

    def __repr__(self) -> str:
        uses = sum(len(e.uses) for e in self._e.values())
        return (
            f"FactoredDirection(names={list(self.names)}, entries={len(self._e)}, uses={uses}, "
            f"MB={self.nbytes / 2**20:.1f}, zero={len(self.zero)})"
        )

    # -- binding to a model ------------------------------------------------------------------------------
    def bind(self, params: Mapping[str, nn.Parameter], trainable: Iterable[str]) -> dict[str, FactoredEntry]:
        """Check against a model (as :meth:`Direction.bind`) and return {canonical name: entry} for the
        parameters with a nonzero direction."""
        out: dict[str, FactoredEntry] = {}
        mentioned = {c for c in (canonical_key(k, params) for k in self.zero) if c is not None}
        for key, e in self._e.items():
            c = canonical_key(key, params)
            if c is None:
                raise KeyError(f"direction entry {key!r} names no parameter of the model")
            p = params[c]
            mentioned.add(c)
            if e.shape != p.shape:
                raise ValueError(f"direction for {c!r} has shape {tuple(e.shape)}, the parameter {tuple(p.shape)}")
            if e.device != p.device:
                raise ValueError(f"direction for {c!r} is on {e.device} but the parameter is on {p.device}")
            if e.dense is not None and not bool(torch.isfinite(e.dense).all()):
                raise ValueError(f"direction has NaN or inf in {key!r}")
            if not e.is_zero():
                out[c] = e
        check_complete(trainable, mentioned, "set requires_grad=False")
        return out


# -- the cost model -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """What a route's time is made of: ``flops`` (multiply-adds ×2 per second in a GEMM), ``bandwidth``
    (bytes per second of a streaming op) and ``call`` (seconds of fixed cost per op called)."""

    flops: float
    bandwidth: float
    call: float


#: per device type and accumulation class ("half" when the factors are bf16/fp16 on CUDA: tensor cores).
#: CPU: fitted to the 48 layer shapes of benchmarks/results/factored_cpu.md (one thread of an Intel Xeon: RMS
#: error of the predicted times 18%, the same choice as the measured faster route at every shape); only the
#: ratios matter for the choice. CUDA: H100/H200-class figures, provisional until benchmarks/gpu_check.sh
#: measures them.
MACHINES: dict[str, Machine] = {
    "cpu": Machine(flops=1.3e11, bandwidth=1e10, call=2e-5),
    "cuda": Machine(flops=4.5e13, bandwidth=3e12, call=8e-6),
    "cuda-half": Machine(flops=4e14, bandwidth=3e12, call=8e-6),
}


@dataclass(frozen=True)
class UseShape:
    """One use of a parameter in the cost model: factor widths d_L, d_R (d_L the table's rows for ids), rows,
    and for ids the distinct ids (None: as many as rows)."""

    ids: bool
    dL: int
    dR: int
    rows: int
    unique: int | None = None


def route_costs(
    obj: Sequence[UseShape],
    risk: Sequence[UseShape],
    risk_rows_all: Sequence[int],
    K: int,
    K_dense: int,
    itemsize: int,
    accsize: int,
    machine: Machine,
    calls: int = 1,
) -> dict[str, float]:
    """Predicted seconds of one parameter's two routes over a measure() call (every risk set).

    ``obj``: the objective uses (rows N' after dropping those without gradient); ``risk``: the risk-side uses,
    ``rows`` = N rows that can carry gradient (summed over the risk sets), ``risk_rows_all`` the rows each use's
    tap sees (B·T summed); ``K`` directions of which ``K_dense`` are dense already; ``calls``: risk sets.
    Per (risk use of N rows, objective use of N' rows), with I = d_R, O = d_L:

    * dense: form V once, 2·N'·I·O FLOPs and I·O·K elements written, then contract per risk use
      2·N·I·O·K FLOPs reading V (a gather of N rows for ids);
    * factored: 2·N·N'·(I + O) FLOPs and ~4·N·N' accumulator elements through memory per dense × dense pair,
      in tiles of ``pairwise.TILE_BYTES`` (each reading the other side's factors again); (N + N')·d for an
      embedding × embedding pair (rows of V at the objective's ids), N·U·d and N'·U·d for a tied head's
      cross terms (U distinct ids); dense directions of the entry contracted as in the dense route.

    Time = FLOPs / ``machine.flops`` + bytes / ``machine.bandwidth`` + op calls · ``machine.call``.
    """
    F, W, C = machine.flops, machine.bandwidth, machine.call
    b, a = itemsize, accsize
    side = max(16, int((pw.TILE_BYTES / (3 * a)) ** 0.5))

    def contract(r: UseShape, n_all: int, k: int) -> float:
        if k == 0:
            return 0.0
        if r.ids:
            return 2 * n_all * r.dR * k / F + n_all * r.dR * (b + k * a) / W + 2 * C * calls
        flops = 2.0 * n_all * r.dL * r.dR * k
        byts = k * r.dL * r.dR * a * calls + n_all * (r.dL + r.dR) * b + 2 * k * n_all * min(r.dL, r.dR) * a
        return flops / F + byts / W + 4 * C * calls

    # dense: form V (zeros, then each use), contract every risk use once
    form = K * obj[0].dL * obj[0].dR * a / W if obj else 0.0
    for u in obj:
        if u.ids:
            form += u.rows * u.dR / F + u.rows * u.dR * (b + 2 * a) / W + 2 * C
        else:
            form += 2.0 * u.rows * u.dL * u.dR / F + (u.rows * (u.dL + u.dR) * b + 2 * u.dL * u.dR * a) / W + 2 * C
    dense = form + sum(contract(r, n, K) for r, n in zip(risk, risk_rows_all))

    # factored: the dense part as above, then every (risk use, objective use) pair
    fact = 0.0
    for r, n_all in zip(risk, risk_rows_all):
        n = r.rows
        fact += contract(r, n_all, K_dense)
        fact += n_all * (r.dL + r.dR if not r.ids else r.dR) * b / W + n * (r.dL + r.dR) * b / W + 3 * C * calls
        for u in obj:
            m = u.rows
            if not r.ids and not u.ids:
                tiles = math.ceil(n / side) * math.ceil(m / side)
                flops = 2.0 * n * m * (r.dL + r.dR) + 4.0 * n * m
                byts = 4.0 * n * m * a + (math.ceil(n / side) * m + math.ceil(m / side) * n) * (r.dL + r.dR) * b
                fact += flops / F + byts / W + 6 * C * tiles
            elif r.ids and u.ids:
                fact += (m * u.dR + 2.0 * n * r.dR) / F + (m + n) * r.dR * (b + a) / W + 6 * C * calls
            elif u.ids:  # a dense risk use (a tied head) against the objective's ids: columns U of its L
                U = min(u.unique or m, r.dL)
                fact += (2.0 * n * U * r.dR + n * U) / F + (n * U * (b + a) + U * r.dR * a) / W + 4 * C * calls
            else:  # a risk embedding use against the objective's head use: rows of V at the risk ids
                U = min(n, u.dL)
                fact += (2.0 * m * U * u.dR + 2.0 * n * r.dR) / F + (m * U * b + U * u.dR * a) / W + 6 * C * calls
    return {"dense": dense, "factored": fact}


def machine_for(device: torch.device, dtype: torch.dtype) -> Machine:
    if device.type == "cuda":
        return MACHINES["cuda-half" if dtype in (torch.bfloat16, torch.float16) else "cuda"]
    return MACHINES.get(device.type, MACHINES["cpu"])


def active_rows(batch: Mapping[str, Tensor]) -> int:
    """Rows of a risk batch whose output gradient can be nonzero: attended positions up to each sample's last
    labelled logit (a causal LM's later positions and its padding get no gradient)."""
    labels = batch["labels"]
    B, T = labels.shape
    if T < 2:
        return 0
    lab = labels[:, 1:] != -100  # logit position p predicts labels[:, p + 1]
    pos = torch.arange(T - 1, device=labels.device).expand(B, -1)
    last = torch.where(lab, pos, torch.full_like(pos, -1)).amax(1)  # [B]
    upto = torch.arange(T, device=labels.device)[None, :] <= last[:, None]
    mask = batch.get("attention_mask")
    if mask is not None:
        upto = upto & (mask != 0)
    return int(upto.sum())


@dataclass
class Routing:
    """What :func:`plan_routes` decided: the route per parameter, per layer kind, and the predicted seconds."""

    routes: dict[str, str]
    kinds: dict[str, str]
    predicted: dict[str, float]


def _kind(uses: list[tuple[str, nn.Module, str]]) -> str:
    return "+".join(sorted({f"{type(m).__name__}.{local}" for _, m, local in uses}))


def plan_routes(
    entries: Mapping[str, FactoredEntry],
    layout: Any,
    risks: Mapping[str, Mapping[str, Tensor]],
    route: str,
    device: torch.device,
) -> Routing:
    """The route of every parameter with a factored entry: ``route`` "dense" or "factored" for all (where the
    taps can factor the parameter: every use's adapter gives factors), or "auto": the cheaper by
    :func:`route_costs`. ``layout`` is ``api._Layout`` (each parameter's uses and their adapters)."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; use one of {', '.join(ROUTES)}")
    rows = [active_rows(b) for b in risks.values()]
    rows_all = [int(b["input_ids"].numel()) for b in risks.values()]
    n_act, n_all = sum(rows), sum(rows_all)
    routes: dict[str, str] = {}
    by_kind: dict[str, set[str]] = {}
    predicted = {"dense": 0.0, "factored": 0.0, "chosen": 0.0}
    for name, e in entries.items():
        owners = layout.owners.get(name, [])
        adapters = [layout.adapters[id(m)] for _, m, _ in owners]
        can = bool(owners) and all(ad is not None and ad.gives_factors for ad in adapters)
        if not e.uses or not can:
            routes[name] = "dense"
        else:
            numel = e.shape.numel()
            obj = []
            for u in e.uses:
                dR = u.R.shape[1]
                obj.append(UseShape(u.ids, numel // dR, dR, u.n, None))
            risk = []
            for ad in adapters:  # the risk side's uses have the objective's factor shapes, per kind of adapter
                is_ids = isinstance(ad, EmbeddingAdapter)
                ref = next((u for u in obj if u.ids == is_ids), obj[0])
                dR = ref.dR if ref.ids == is_ids else (e.shape[-1] if len(e.shape) > 1 else 1)
                risk.append(UseShape(is_ids, numel // dR, dR, n_act))
            dt = next((u.R.dtype for u in e.uses), e.param_dtype)
            c = route_costs(
                obj,
                risk,
                [n_all] * len(risk),
                e.K,
                len(e.dense_k),
                torch.finfo(dt).bits // 8,
                torch.finfo(_acc_of(dt)).bits // 8,
                machine_for(device, dt),
                calls=len(risks),
            )
            predicted["dense"] += c["dense"]
            predicted["factored"] += c["factored"]
            if route == "auto":
                routes[name] = "factored" if c["factored"] < c["dense"] else "dense"
            else:
                routes[name] = route
            predicted["chosen"] += c[routes[name]]
        by_kind.setdefault(_kind(owners) if owners else "unowned", set()).add(routes[name])
    kinds = {k: v.pop() if len(v) == 1 else "mixed" for k, v in sorted(by_kind.items())}
    return Routing(routes, kinds, predicted)


# -- the factored route in a risk pass ---------------------------------------------------------------------
def _rows_nonzero(x: Tensor, share: float = 0.0) -> tuple[Tensor, bool]:
    """([n] bool: row t of x is nonzero, every row finite), from one fast reduction, the row norms ‖x_t‖₂: zero for a
    zero row, not finite for a row with NaN or inf (rows whose norm overflows are checked exactly). A nonzero row
    whose squares underflow also has norm 0 (all |x_tj| < 4e-23 in float32): it is dropped only where the largest
    row norm is ≥ 1e-10 (so it is below 1e-10 of it: beneath float32 rounding), else checked exactly.
    Where fewer than ``share`` of the rows have a zero norm, every row counts as nonzero."""
    s = torch.linalg.vector_norm(x, 2, dim=1)
    keep = s != 0
    n_zero = x.shape[0] - int(keep.sum())
    if n_zero and n_zero < share * x.shape[0]:
        keep.fill_(True)
    elif n_zero and not bool(s.max() >= 1e-10):  # a tiny gradient: underflow could hide whole rows
        zero = ~keep
        keep[zero] = x[zero].any(1)
    bad = ~torch.isfinite(s)
    finite = True
    if bool(bad.any()):  # NaN or inf in the row, or a finite row whose norm overflows
        finite = bool(torch.isfinite(x[bad]).all())
    return keep, finite


def _keep(L: Tensor, R: Tensor, pad: int | None, share: float = 0.0) -> tuple[Tensor, bool]:
    """([n] bool: the rows that carry gradient — L and R nonzero, ids other than ``pad`` —, all rows finite);
    ``share``: see :func:`_rows_nonzero` (ids at ``pad`` are always dropped)."""
    keep, finite = _rows_nonzero(R, share)
    if not _is_ids(L):
        kl, fl = _rows_nonzero(L, share)
        keep &= kl
        finite = finite and fl
    elif pad is not None:
        keep &= L != pad
    return keep, finite


def _nonzero_rows(L: Tensor, R: Tensor, seg: Seg, B: int, pad: int | None) -> tuple[Tensor, Tensor, Seg]:
    """The rows that carry gradient (:func:`_keep`), with their sample ids (a non-finite row is kept: the
    pass reports it)."""
    keep, finite = _keep(L, R, pad)
    if not finite or bool(keep.all()):
        return L, R, seg
    idx = keep.nonzero().squeeze(1)
    return L.index_select(0, idx), R.index_select(0, idx), seg_tensor(seg, R.shape[0], B, R.device).index_select(0, idx)


def _lookup(U: Tensor, ids: Tensor) -> Tensor:
    """Position of each id in the sorted ids ``U``, or len(U) where it is not there."""
    u = U.shape[0]
    if u == 0:
        return torch.full_like(ids, 0, dtype=torch.long)
    pos = torch.searchsorted(U, ids.long())
    hit = U[pos.clamp(max=u - 1)] == ids.long()
    return torch.where(hit, pos, torch.full_like(pos, u))


def _rows_per_tile(width: int, accsize: int) -> int:
    return max(1, TILE_BYTES // max(1, width * accsize))


def pair_use(L: Tensor, R: Tensor, seg: Seg, B: int, u: FactorUse, ops: Backend, acc: torch.dtype) -> Tensor:
    """[B]: Σ_{t∈b} ⟨L_t R_tᵀ, Σ_s L'_s R'_sᵀ⟩ for a risk use's rows (L, R, seg) against objective use ``u``, never
    forming the parameter-sized V. Rows are those that carry gradient (pad ids dropped)."""
    if not _is_ids(L) and not u.ids:  # Σ_t Σ_s (L_t·L'_s)(R_t·R'_s), in tiles of tokens
        return pw.factor_pairwise(L, R, seg, B, u.L, u.R, u.n, 1)[:, 0].to(acc)
    if _is_ids(L) and u.ids:  # Σ_t R_t · V[x_t], V's rows at the objective's ids only
        U, T = u.table()
        table = torch.cat([T, T.new_zeros(1, T.shape[1])])  # the last row: ids the objective never saw
        return ops.embedding_dot(_lookup(U, L), R, table[None], seg, B, None)[0].to(acc)
    if u.ids:  # a dense risk use (tied head, L = g over the vocab) against the objective's ids: columns U of L
        U, T = u.table()
        Tt = T.to(acc)
        tok = torch.empty(R.shape[0], dtype=acc, device=R.device)
        n = _rows_per_tile(U.shape[0] + T.shape[1], torch.finfo(acc).bits // 8)
        for t0 in range(0, R.shape[0], n):
            Lc = L[t0 : t0 + n].index_select(1, U).to(acc)  # [n, u]
            tok[t0 : t0 + n] = (Lc * (R[t0 : t0 + n].to(acc) @ Tt.T)).sum(1)
        return segment_sum(tok, seg, B)
    # a risk embedding use against the objective's dense use (a tied head, L' over the vocab): V's rows at the
    # risk ids, Σ_s L'_s[x] R'_s, in tiles of those rows
    Ur, inv = torch.unique(L.long(), sorted=True, return_inverse=True)
    rows = torch.empty(Ur.shape[0], u.R.shape[1], dtype=acc, device=R.device)
    Rp = u.R.to(acc)
    n = _rows_per_tile(u.n, torch.finfo(acc).bits // 8)
    for j0 in range(0, Ur.shape[0], n):
        rows[j0 : j0 + n] = u.L.index_select(1, Ur[j0 : j0 + n]).to(acc).T @ Rp
    return ops.embedding_dot(inv, R, rows[None], seg, B, None)[0].to(acc)


def pair_sink(session: CaptureSession) -> Callable[[Slot, Tensor, Tensor, Seg, int | None], None]:
    """The risk pass's factor sink for slots whose direction is a :class:`FactoredEntry`: its dense part
    contracted by the session's ops, each factor use paired by :func:`pair_use`; [K, B] added to the slot."""

    def sink(slot: Slot, L: Tensor, R: Tensor, seg: Seg, pad: int | None) -> None:
        e: FactoredEntry = slot.v
        B, ops = session.B, session.ops
        acc = torch.promote_types(session.acc, acc_dtype(R, None if _is_ids(L) else L))
        out = torch.zeros(e.K, B, dtype=acc, device=R.device)
        if e.dense is not None:
            Vd = e.dense.reshape(len(e.dense_k), -1, R.shape[1])
            if _is_ids(L):
                c = ops.embedding_dot(L, R, Vd, seg, B, pad)
            else:
                c = ops.linear_dot(R, L, Vd, seg, B)[0]
            out[list(e.dense_k)] += c.to(acc)
        if e.uses:
            L2, R2, seg2 = _nonzero_rows(L, R, seg, B, pad)
            if R2.shape[0]:
                for u in e.uses:
                    out[u.k] += pair_use(L2, R2, seg2, B, u, ops, acc)
        session.add(slot, out)

    return sink


__all__ = [
    "MACHINES",
    "ROUTES",
    "FactorUse",
    "FactoredDirection",
    "FactoredEntry",
    "Machine",
    "Routing",
    "UseShape",
    "active_rows",
    "pair_use",
    "plan_routes",
    "route_costs",
]
