"""``measure()``: G-effects e = ⟨∇R, v⟩ per group and per instance, as one pass of the engine per risk set
(docs/design.md §2).

For each risk batch: one forward, the per-token NLL, and one backward of the sum of the per-sample mean
NLLs, L = Σ_b ℓ_b, with every parameter frozen. Each covered layer's output carries a tap; in backward the
tap hands the layer's factors to the :class:`~geffect_fast.engine.consumers.DenseDot` (or, for a factored
direction's parameters on the factored route, :class:`~geffect_fast.engine.consumers.FactorPair`), which
contracts the layer's output gradient g (whose row t is ∂ℓ_b/∂y_t for the sample b that owns token t) with
the direction, per sample and per group, and lets g go. Aggregates follow exactly from the per-instance values:
⟨∇R, v⟩ = Σ_b c_b e_b. No per-sample gradient is formed, no weight gradient is computed, and nothing of size
O(B·|θ|) exists: the cost is about one ordinary forward+backward of the batch.

``measure`` runs in four phases, each the one home of its errors:

1. **check inputs** (:func:`_check_inputs`): options, batches, the direction against the model, the model
   itself (a causal LM, not made under inference mode, no inference mode around the call);
2. **plan** (:func:`_plan`): the engine's plan (which module taps which parameter, and what its factors feed —
   kept in the model's map and re-armed while the tree and the direction's layout are unchanged), which
   parameters go by autograd, the op kernels and the accumulation dtype;
3. **one pass per risk set** (:func:`_passes`): forward, backward, the taps' per-sample values; what only a
   pass can reveal — a covered parameter used outside its module, rows that cannot be attributed to
   samples, a non-finite risk or backward — is an error here (with ``strict=False``, the parameters the
   taps cannot measure are re-planned to autograd and the passes rerun). Nothing is read on the host between
   the start of a forward and the end of its backward;
4. **combine** (:func:`_combine`): totals, per-instance values and the union over ranks, as a Result.

The model comes back as it was: ``.grad``, ``requires_grad``, train/eval mode, hooks, ``forward`` and RNG
state. A second thread measuring the same model waits for the first (``state.model_lock``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import distributed as dist_mod
from . import groups as groups_mod
from .capture import CaptureSession, NotPerSampleError, UnsupportedModuleError
from .directions import Direction, DirectionBase
from .engine import (
    DenseDot,
    FactoredEntry,
    FactorPair,
    Gathered,
    ModuleMap,
    Plan,
    check_packing,
    module_map,
    opened,
    plan_taps,
    risk_backward,
    unwrap,
)
from .engine.routes import ROUTES, Routing, plan_routes
from .loss import (
    REDUCTIONS,
    check_batch,
    check_causal_lm,
    packed_samples,
    packed_spans,
    reduction_weights,
    sample_counts,
)
from .ops import resolve
from .ops.dispatch import Backend
from .result import UNCOVERED, Result
from .state import MODES, model_lock

#: how a call reaches its aggregates (``Result.meta["strategy"]``): the taps on every rank's own batch, or, for
#: FSDP2 aggregates, each rank's shard of the ordinary (sharded) gradient dotted with its shard of v
STRATEGIES = ("taps", "sharded")
#: plans kept per model (the map drops them all when the model's tree changes)
PLANS_PER_MODEL = 8


@dataclass
class _Call:
    """What the check phase established: the call, validated."""

    mm: ModuleMap
    comm: dist_mod.Comm | None
    direction: DirectionBase
    risks: dict[str, Mapping[str, Tensor]]
    V: dict[str, Any]  #: canonical name -> [K, *shape] (or a FactoredEntry), nonzero entries only
    grouping: groups_mod.Grouping
    groups: groups_mod.GroupSpec
    reduction: str
    mode: str
    per_instance: bool
    sharded: bool  #: FSDP2: collectives run inside the backward (gradient reduce-scatter, direction gathers)
    strategy: str  #: one of STRATEGIES
    packed: dict[str, Tensor | None]  #: risk -> its packed samples [B, T] (loss.packed_samples), or None
    routing: Routing | None = None  #: a factored direction's route per parameter (V holds its FactoredEntry
    #: where the route is "factored", the formed V where it is "dense")

    @property
    def model(self) -> nn.Module:
        return self.mm.model


@dataclass
class _Weights:
    """The reduction weights' ingredients, from the labels alone (before any forward)."""

    n: dict[str, Tensor]  #: risk -> [B] labelled tokens of this rank's samples
    pooled: dict[str, float]  #: risk -> the union's pool size D
    sizes: dict[str, list[int]]  #: risk -> every rank's B


@dataclass
class _PassPlan:
    """What the plan phase decided."""

    plan: Plan | None  #: the engine's plan (None on the sharded strategy: no taps)
    uncovered: dict[str, str]  #: measured by autograd in group UNCOVERED, with the reason
    autograd: dict[str, int]  #: parameter -> group column of its autograd dot
    V_auto: dict[str, Tensor]  #: the (local shard of the) direction each autograd gradient is dotted with
    ops: Backend
    acc: torch.dtype
    group_names: tuple[str, ...]

    @property
    def G(self) -> int:
        return len(self.group_names)


def measure(
    model: nn.Module,
    direction: DirectionBase | Mapping[str, Tensor],
    risks: Mapping[str, Mapping[str, Tensor]] | Mapping[str, Tensor],
    groups: groups_mod.GroupSpec = "block",
    per_instance: bool = False,
    reduction: str = "token_mean",
    backend: str = "auto",
    strict: bool = True,
    mode: str = "eval",
    process_group: Any = "auto",
    timeout: float = 600.0,
    route: str = "auto",
) -> Result:
    """G-effects e = ⟨∇θ R(D), v⟩ of each risk set D, per group and per instance, in one backward per set.

    Args:
        model: a causal LM (Hugging Face or alike: ``model(input_ids=..., attention_mask=...)`` -> logits);
            may be wrapped in DDP or sharded with FSDP2 (``fully_shard``). Masked LMs and encoder-decoders are
            refused.
        direction: a :class:`Direction` (K directions), or a mapping parameter name -> tensor. Under FSDP2
            its entries may be sharded DTensors (e.g. from ``Direction.from_grads``) or whole tensors. Or a
            :class:`~geffect_fast.directions.factored.FactoredDirection` (``Direction.from_objective(...,
            factored=True)``, one process): per parameter its factors are contracted as they are, or V is formed
            first, whichever :func:`geffect_fast.engine.routes.route_costs` predicts is faster (see ``route``).
        risks: ``{name: batch}``, or a single batch (then named ``"risk"``). A batch is a dict with
            ``input_ids``, ``labels`` (−100 ignored, shifted as in HF) and optionally ``attention_mask``.
        groups: ``"block"``, ``"paper"``, ``"thirds"``, ``"module"`` or ``fn(param_name) -> group`` (see
            :mod:`geffect_fast.groups`).
        per_instance: keep e_b = ⟨∇ℓ_b, v⟩ per sample (they are computed anyway; this keeps them).
        reduction: ``"token_mean"`` (R pools tokens over the batch, as the paper's code and HF's loss) or
            ``"sample_mean"`` (R averages the per-sample means).
        backend: op backend, ``"auto"`` or a name from :func:`geffect_fast.backends`.
        strict: raise for a parameter with a nonzero direction that the taps cannot measure per sample — no
            adapter covers it, it is used outside its module's forward, or its module's rows cannot be
            attributed to samples (default); if False, such parameters form the group ``uncovered``,
            computed by ordinary autograd (aggregate only).
        mode: ``"eval"`` (default: dropout off, so per-sample gradients are not random), ``"train"`` (what
            training sees; HF applies gradient checkpointing only in train mode) or ``"keep"``.
            The model's own mode is restored afterwards.
        process_group: ``"auto"`` (a DDP wrapper's group or an FSDP2 mesh's group, when torch.distributed
            is initialised), a ProcessGroup, or None (this rank alone). Across a group each rank passes its
            own batches and every rank gets the result over their union, as one process would compute it
            (see :mod:`geffect_fast.distributed`).
        timeout: seconds a rank waits for the others at each agreement point before raising.
        route: for a factored direction: ``"auto"`` (per parameter, by the cost model), ``"dense"`` (form V for
            every parameter) or ``"factored"`` (never form V where the taps can factor the parameter).
            ``Result.meta["direction_routes"]`` says what each layer kind took (``"mixed"`` where its parameters
            differ), ``meta["route_costs"]`` the model's predicted seconds of each. A dense direction takes
            ``"auto"`` or ``"dense"``.

    Works inside ``torch.no_grad()`` (the pass enables grad for itself) and under ``torch.autocast`` (the
    forward is the autocast one; the taps accumulate in float32/float64); refused inside
    ``torch.inference_mode()``.

    Returns:
        :class:`Result`; see :mod:`geffect_fast.result` for its shape.
    """
    inner = unwrap(model)
    with model_lock(inner):  # another thread's pass on this model finishes first (its flags are not ours)
        mm = module_map(inner)
        group = dist_mod.resolve_group(model, process_group, mm.mesh)
        comm = None if group is None else dist_mod.Comm(group, timeout)
        # one agreement for every local check (there is no collective among them): the same call on every rank,
        # so the same collectives follow in the same order
        with dist_mod.phase(comm, "checking the inputs") as agreement:
            call = _check_inputs(mm, comm, direction, risks, groups, per_instance, reduction, mode, route)
            _route(call, route)
            plan = _plan(call, backend, strict)
            if comm is not None:
                agreement.check = dist_mod.fingerprint(
                    tuple(call.risks),
                    call.direction.names,
                    plan.group_names,
                    sorted(call.V),
                    reduction,
                    call.strategy,
                    mode,
                )
        weights = _weights(call)
        plan, parts = _passes(call, plan, weights, backend, strict)
        return _combine(call, plan, weights, parts)


# -- phase 1 ----------------------------------------------------------------------------------------------
def _check_options(route: str, reduction: str, mode: str) -> None:
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; use one of {', '.join(ROUTES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "measure() needs autograd, which torch.inference_mode() turns off; call it outside inference_mode "
            "(inside torch.no_grad() is fine)"
        )


def _as_direction(direction: Any, mm: ModuleMap, comm: dist_mod.Comm | None, route: str) -> DirectionBase:
    if isinstance(direction, DirectionBase):
        if direction.factored and (comm is not None or mm.mesh is not None):
            raise NotImplementedError(
                "a factored direction is measured by one process (its factors are this rank's objective batch); "
                "pass its .dense() (averaged over the ranks, as DDP averages gradients)"
            )
        if route == "factored" and not direction.factored:
            raise ValueError(
                "route='factored' needs a factored direction: Direction.from_objective(..., factored=True)"
            )
        return direction
    if route == "factored":
        raise ValueError("route='factored' needs a factored direction: Direction.from_objective(..., factored=True)")
    if not isinstance(direction, Mapping):
        raise TypeError(f"direction must be a Direction or a mapping name -> tensor, got {type(direction).__name__}")
    return Direction(direction)


def _as_risks(risks: Any, mm: ModuleMap) -> dict[str, Mapping[str, Tensor]]:
    if isinstance(risks, Mapping) and "input_ids" in risks:
        risks = {"risk": risks}
    if not isinstance(risks, Mapping) or not risks:
        raise ValueError("risks must be a non-empty dict {name: batch} (or one batch)")
    out = {}
    for rname, batch in risks.items():
        check_batch(batch, rname, mm.device)
        # a batch made under inference mode (a tokenizer call inside it) is copied out: ids cannot be saved for
        # backward otherwise, and the copy is exact
        if any(isinstance(v, Tensor) and v.is_inference() for v in batch.values()):
            batch = {k: (v.clone() if isinstance(v, Tensor) and v.is_inference() else v) for k, v in batch.items()}
        out[rname] = batch
    return out


def _check_inputs(
    mm: ModuleMap,
    comm: dist_mod.Comm | None,
    direction: Any,
    risks: Any,
    groups: groups_mod.GroupSpec,
    per_instance: bool,
    reduction: str,
    mode: str,
    route: str = "auto",
) -> _Call:
    """Every check that needs no pass: options, the model, the batches, the direction, the grouping."""
    _check_options(route, reduction, mode)
    mm.check_materialised()
    mm.check_not_inference()
    check_causal_lm(mm.model)
    direction = _as_direction(direction, mm, comm, route)
    risks = _as_risks(risks, mm)
    V = direction.bind(mm.named, mm.trainable())
    if not V:
        raise ValueError("the direction is zero on every parameter: every G-effect would be 0")
    grouping = mm.grouping(groups)
    sharded = mm.mesh is not None
    # FSDP2 aggregates come from the sharded gradient itself; per-instance values need the taps
    strategy = "sharded" if sharded and not per_instance else "taps"
    packed = {r: packed_samples(b) for r, b in risks.items()}
    for r, p in packed.items():
        if p is not None:
            check_packing(mm, mm.model, risks[r], p)
    return _Call(
        mm, comm, direction, risks, V, grouping, groups, reduction, mode, per_instance, sharded, strategy, packed
    )


# -- phase 2 ----------------------------------------------------------------------------------------------
def _route(call: _Call, route: str) -> None:
    """A factored direction's route per parameter (:func:`geffect_fast.engine.routes.plan_routes`): V is formed
    here, once for every risk set, where it is "dense"; the factors stay where it is "factored"."""
    if not call.direction.factored:
        return
    call.routing = plan_routes(call.V, call.mm, call.risks, route, call.mm.device)
    call.V = {n: v.dense_tensor() if call.routing.routes[n] == "dense" else v for n, v in call.V.items()}


def _taps_plan(call: _Call, forced: Mapping[str, str]) -> Plan:
    """The engine's plan for this call's parameters, from the model's map when one was made for the same
    parameters, consumers, grouping and known-uncovered set (re-armed for every pass at no further cost)."""
    mm = call.mm
    factored = tuple(n for n, v in call.V.items() if isinstance(v, FactoredEntry)) if call.direction.factored else ()
    guard = call.strategy == "taps" and not call.sharded
    key = (tuple(call.V), factored, call.groups, tuple(forced.items()), guard)
    try:
        hash(key)
    except TypeError:  # pragma: no cover - an unhashable groups callable: nothing to key it by
        key = None
    plan = mm.plans.get(key) if key is not None else None
    if plan is None or plan.session.broken:
        dot, pair = DenseDot(), FactorPair()
        fset = set(factored)
        consumers = {n: (pair if n in fset else dot) for n in call.V}
        plan = plan_taps(mm, consumers, call.grouping, forced, guard=guard)
        if key is not None:
            if len(mm.plans) >= PLANS_PER_MODEL:
                mm.plans.pop(next(iter(mm.plans)))
            mm.plans[key] = plan
    return plan


def _plan(call: _Call, backend: str, strict: bool, forced: Mapping[str, str] | None = None) -> _PassPlan:
    """Taps, autograd parameters, op backend and accumulation dtype. ``forced``: parameters an earlier pass
    found the taps cannot measure (``strict=False`` re-plans them to autograd)."""
    V, grouping, mm = call.V, call.grouping, call.mm
    if call.strategy == "sharded":
        plan, uncovered = None, {}
        split = [n for n in V if n in grouping.parts]
        if split:
            raise ValueError(
                f"per-expert groups (groups='module' splits {split[0]!r} by expert) are not measured for sharded "
                "parameters yet; use groups='block' or a callable"
            )
        autograd = {n: grouping.of[n] for n in V}  # every parameter, from its sharded gradient
    else:
        plan = _taps_plan(call, forced or {})
        uncovered = plan.uncovered
        if uncovered and strict:
            items = [f"{n}: {why}" for n, why in list(uncovered.items())[:5]]
            more = f" (and {len(uncovered) - 5} more)" if len(uncovered) > 5 else ""
            raise UnsupportedModuleError(
                "these parameters have a nonzero direction but no adapter can measure them per sample: "
                + "; ".join(items)
                + more
                + ". Register an adapter (geffect_fast.capture.register) or pass strict=False to measure "
                "them by ordinary autograd in group 'uncovered' (aggregate only)."
            )
        autograd = {n: len(grouping.names) for n in uncovered}
    # the local shard of v that each autograd parameter's (possibly sharded) gradient is dotted with
    named = mm.named
    V_auto = {
        n: V[n].dense_tensor()
        if isinstance(V[n], FactoredEntry)  # found uncovered by a pass (strict=False): formed for autograd
        else dist_mod.shard_of(V[n], named[n])
        if dist_mod.is_dtensor(named[n])
        else V[n]
        for n in autograd
    }
    dir_dtype, acc = mm.pass_dtypes(v.dtype for v in V.values())
    ops = resolve(backend, mm.device, mm.act_dtype, dir_dtype)
    group_names = tuple(grouping.names) + ((UNCOVERED,) if uncovered else ())
    return _PassPlan(plan, uncovered, autograd, V_auto, ops, acc, group_names)


def _weights(call: _Call) -> _Weights:
    """Union weights: known from the labels before any forward (one gather of pool sizes across ranks)."""
    n = {r: sample_counts(b, call.packed[r]).cpu() for r, b in call.risks.items()}
    pooled, sizes = dist_mod.union_counts(call.comm, n, call.reduction)
    return _Weights(n, pooled, sizes)


# -- phase 3 ----------------------------------------------------------------------------------------------
def _passes(
    call: _Call, plan: _PassPlan, weights: _Weights, backend: str, strict: bool
) -> tuple[_PassPlan, dict[str, dist_mod.Part]]:
    """One pass per risk set, under the model's preserved state and with grad enabled. With ``strict=False``
    (one process), parameters a pass finds its taps cannot measure are re-planned to autograd and every
    pass runs again; the plan that produced the parts is returned with them."""
    while True:
        try:
            parts = _run(call, plan, weights)
        except NotPerSampleError as e:
            if strict or not set(e.params) - set(plan.uncovered):  # nothing new to re-plan: no progress possible
                raise
            if call.comm is not None:
                raise NotPerSampleError(
                    f"{e} — under a process group strict=False cannot fall back to autograd after a pass has "
                    "started; give these parameters a zero direction",
                    e.params,
                ) from None
            plan = _plan(call, backend, strict, {**plan.uncovered, **e.params})
            continue
        return plan, parts


def _run(call: _Call, pp: _PassPlan, weights: _Weights) -> dict[str, dist_mod.Part]:
    """Every risk set's pass with one plan; the model's state, hooks and forwards restored afterwards."""
    mm = call.mm
    plan = pp.plan if pp.plan is not None else _no_taps(mm)
    pp.plan = plan
    parts: dict[str, dist_mod.Part] = {}
    with opened(mm, plan, call.mode, autograd=tuple(pp.autograd)) as session:
        V = [call.V[n] for n in plan.order]
        gathered = Gathered(V, plan.taps) if call.sharded and plan.taps else None
        session.V = gathered if gathered is not None else V
        session.ops = pp.ops.unchecked
        session.K, session.G, session.acc, session.device = call.direction.k, pp.G, pp.acc, mm.device
        try:
            for rname, batch in call.risks.items():
                n = weights.n[rname]
                c = reduction_weights(n, weights.pooled[rname], call.reduction)  # within the union
                if gathered is not None:
                    gathered.reset()
                with dist_mod.phase(call.comm, f"measuring risk set {rname!r}"):
                    parts[rname] = _one_pass(call, pp, rname, batch, n, c)
        finally:
            session.V = []  # the directions are the caller's: not kept with the cached plan
    return parts


def _no_taps(mm: ModuleMap) -> Plan:
    """The plan of the sharded strategy: no taps and no roots (the direction's parameters require grad: an
    ordinary backward)."""
    return Plan([], [], {}, [], CaptureSession([], [], guard=False))


def _one_pass(
    call: _Call, pp: _PassPlan, rname: str, batch: Mapping[str, Tensor], n: Tensor, c: Tensor
) -> dist_mod.Part:
    """Forward, backward and the per-sample values of one risk set: this rank's :class:`Part` of it."""
    mm, comm, K = call.mm, call.comm, call.direction.k
    session = pp.plan.session
    # Backpropagate L = Σ_b s_b ℓ_b. With s_b = 1 each tap's gradient rows are exactly those of the sample's own
    # ℓ_b, as a per-sample backward would give them (bit for bit where the model rounds through lower
    # precision). Parameters measured by autograd need ∇R itself from the same backward, so then s_b = c_b and
    # L = R (this rank's part of it).
    s = c.clone() if pp.autograd else (n > 0).double()
    dev = mm.device
    n1 = n.clamp_min(1)
    w = (s / n1).to(dev)
    before = None
    if comm is not None and call.sharded:  # the backward's collectives follow: every rank must get there

        def before(L: Tensor) -> None:
            _check_risk(rname, L)
            comm.agree(f"running the forward of risk set {rname!r}")

    packed = call.packed[rname]
    packed = None if packed is None else packed.to(dev)
    out, summed, L = risk_backward(call.model, session, batch, w, dev.type, before, packed)
    _check_risk(rname, L)  # the host reads the pass's results only now, after the backward
    session.check_outside_uses()
    ell = (summed / n1.to(device=summed.device, dtype=summed.dtype)).double().cpu()
    out = out.double().cpu()  # [K, B, G]: s_b · e_b
    if not bool(torch.isfinite(out).all()):
        bad = [pp.group_names[g] for g in range(out.shape[-1]) if not bool(torch.isfinite(out[..., g]).all())]
        raise ValueError(
            f"risk set {rname!r}: the backward is not finite (NaN or inf) in group(s) {bad}, although the risk "
            "is: the model's activations or gradients are not finite on this batch (e.g. Hugging Face's eager "
            "attention in float64 at left-padded positions; use attn_implementation='sdpa')"
        )
    e = torch.where(s[None, :, None] > 0, out / s.clamp_min(1e-300)[None, :, None], torch.zeros_like(out))
    totals = (e * c[None, :, None]).sum(1)  # Σ_b c_b e_b
    if pp.autograd:
        _autograd_columns(call, pp, totals, e, K)
    return dist_mod.Part(totals, float((ell * c).sum()), n, c, None if call.strategy == "sharded" else e)


def _check_risk(rname: str, L: Tensor) -> None:
    Lv = float(L)
    if not math.isfinite(Lv):
        raise ValueError(f"risk set {rname!r}: the risk is not finite ({Lv}); check the model and batch")


def _autograd_columns(call: _Call, pp: _PassPlan, totals: Tensor, e: Tensor, K: int) -> None:
    """The parameters measured by ordinary autograd: ⟨∇R, v⟩ from their ``.grad`` into their columns (then
    cleared); the uncovered group has no per-instance values (NaN)."""
    if pp.uncovered:
        totals[:, -1] = 0
        e[:, :, -1] = float("nan")
    named = call.mm.named
    for pn, col in pp.autograd.items():
        p = named[pn]
        if p.grad is not None:
            g = dist_mod.local_part(p.grad).reshape(1, -1).to(pp.V_auto[pn].dtype)
            dot = (pp.V_auto[pn].reshape(K, -1) @ g.T).squeeze(1).double().cpu()
            totals[:, col] += dist_mod.reduce_scale(p) * dot
            p.grad = None


# -- phase 4 ----------------------------------------------------------------------------------------------
def _combine(call: _Call, pp: _PassPlan, weights: _Weights, parts: dict[str, dist_mod.Part]) -> Result:
    """The union over ranks (if any), as a :class:`Result`."""
    if call.comm is not None:
        parts = dist_mod.combine(call.comm, parts, weights.sizes, call.direction.k, pp.G)
    meta = {
        "backend": pp.ops.name,
        "mode": call.mode,
        "dtype": str(pp.acc).replace("torch.", ""),
        "strategy": call.strategy,
        "world_size": 1 if call.comm is None else call.comm.world,
    }
    if call.routing is not None:
        meta["direction_routes"] = dict(call.routing.kinds)
        meta["route_costs"] = dict(call.routing.predicted)
    samples = {r: packed_spans(p) for r, p in call.packed.items() if p is not None}
    if samples:
        #: risk -> [row, first position, end position) of each packed sample, in order (a packed batch's samples)
        meta["samples"] = samples
    return Result(
        directions=call.direction.names,
        risks=tuple(call.risks),
        groups=pp.group_names,
        reduction=call.reduction,
        group_totals={r: p.totals for r, p in parts.items()},
        instances={r: p.e for r, p in parts.items()} if call.per_instance else None,
        weights={r: p.c for r, p in parts.items()},
        n_tokens={r: p.n for r, p in parts.items()},
        losses={r: p.loss for r, p in parts.items()},
        uncovered=tuple(pp.uncovered),
        meta=meta,
    )
