"""``measure()``: the measuring pass of docs/design.md §2.

For each risk batch: one forward, the per-token NLL, and one backward of the sum of the per-sample mean
NLLs, L = Σ_b ℓ_b, with every parameter frozen. Each covered layer's output carries a tap; in backward the
tap contracts the layer's output gradient g (whose row t is ∂ℓ_b/∂y_t for the sample b that owns token t)
with the direction, per sample and per group, and lets g go. Aggregates follow exactly from the
per-instance values: ⟨∇R, v⟩ = Σ_b c_b e_b. No
per-sample gradient is formed, no weight gradient is computed, and nothing of size O(B·|θ|) exists: the
cost is about one ordinary forward+backward of the batch.

``measure`` runs in four phases, each the one home of its errors:

1. **check inputs** (:func:`_check_inputs`): options, batches, the direction against the model, the model
   itself (a causal LM, not made under inference mode, no inference mode around the call);
2. **plan** (:func:`_plan`): which module taps which parameter, which parameters go by autograd, the op
   backend and accumulation dtype;
3. **one pass per risk set** (:func:`_passes`): forward, backward, the taps' per-sample values; what only a
   pass can reveal — a covered parameter used outside its module, rows that cannot be attributed to
   samples, a non-finite risk or backward — is an error here (with ``strict=False``, the parameters the
   taps cannot measure are re-planned to autograd and the passes rerun);
4. **combine** (:func:`_combine`): totals, per-instance values and the union over ranks, as a Result.

The model comes back as it was: ``.grad``, ``requires_grad``, train/eval mode, hooks, ``forward`` and RNG
state. A second thread measuring the same model waits for the first (``state.model_lock``).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import distributed as dist_mod
from . import groups as groups_mod
from .capture import CaptureSession, ModulePlan, NotPerSampleError, Slot, UnsupportedModuleError, find_adapter, registry
from .direction import Direction
from .factored import ROUTES, FactoredDirection, FactoredEntry, Routing, pair_sink, plan_routes
from .loss import (
    REDUCTIONS,
    check_batch,
    check_causal_lm,
    forward_logits,
    label_counts,
    reduction_weights,
    token_nll,
)
from .ops import resolve
from .ops.dispatch import Backend
from .result import UNCOVERED, Result
from .state import MODES, check_not_inference, model_lock, preserved


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    *_, inner = dist_mod.wrappers(model)
    return inner


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embedding module (HF ``get_input_embeddings``), or None where it has none."""
    get_in = getattr(model, "get_input_embeddings", None)
    if not callable(get_in):
        return None
    try:
        emb = get_in()
    except (AttributeError, NotImplementedError):  # pragma: no cover - models without one
        return None
    return emb if isinstance(emb, nn.Module) else None


def input_device(model: nn.Module) -> torch.device:
    """Device of the model's input embeddings (where batches must live)."""
    emb = input_embeddings(model)
    if emb is not None and isinstance(getattr(emb, "weight", None), torch.Tensor):
        return emb.weight.device
    for p in model.parameters():
        return p.device
    raise ValueError("the model has no parameters")


@dataclass
class _Layout:
    """What the module tree says, whatever the direction: every parameter's uses (module name, module, local
    name), each owning module's adapter, the embedding modules and the input embedding, and the groupings
    asked for so far. Walking the tree and matching adapters was most of a small call's host time (~15 ms of
    a 40 ms B = 1 call on a 10M Llama, CPU); :func:`_layout` keeps one per model and reuses it while the tree
    — every parameter and module object — and the adapter registry are the same."""

    key: tuple
    owners: dict[str, list[tuple[str, nn.Module, str]]]
    adapters: dict[int, Any]  #: id(module) -> its adapter (None: no rule covers it)
    embeddings: list[nn.Module]
    input_embedding: nn.Module | None
    groupings: dict[Any, groups_mod.Grouping]


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()


def _layout(model: nn.Module, named: Mapping[str, nn.Parameter]) -> _Layout:
    """``model``'s :class:`_Layout`, from the cache when its tree is unchanged (one walk of the modules)."""
    modules = list(model.named_modules())
    key = (
        tuple((n, id(p)) for n, p in named.items()),
        tuple((mname, id(m)) for mname, m in modules),
        registry.version(),
    )
    cached = _LAYOUTS.get(model)
    if cached is not None and cached.key == key:
        return cached
    pname = {id(p): n for n, p in named.items()}
    owners: dict[str, list[tuple[str, nn.Module, str]]] = {}
    adapters: dict[int, Any] = {}
    for mname, m in modules:
        own = m._parameters
        for local, p in own.items():
            if p is None or id(p) not in pname:
                continue
            owners.setdefault(pname[id(p)], []).append((mname, m, local))
            if id(m) not in adapters:
                adapters[id(m)] = find_adapter(m)
    embeddings = [m for _, m in modules if isinstance(m, nn.Embedding)]
    layout = _Layout(key, owners, adapters, embeddings, input_embeddings(model), {})
    _LAYOUTS[model] = layout
    return layout


def _grouping(model: nn.Module, layout: _Layout, spec: groups_mod.GroupSpec, names: list[str]) -> groups_mod.Grouping:
    """``groups_mod.assign`` once per layout and spec (a callable spec is assumed to be a pure function)."""
    try:
        hash(spec)
    except TypeError:  # pragma: no cover - an unhashable callable: nothing to key it by
        return groups_mod.assign(model, spec, names)
    g = layout.groupings.get(spec)
    if g is None:
        g = layout.groupings[spec] = groups_mod.assign(model, spec, names)
    return g


class _Plan:
    """Which module each nonzero-direction parameter is tapped in, and which are left uncovered.

    ``forced`` names parameters known not to be measurable by their taps (found by an earlier pass), with
    the reason; they are uncovered like parameters without an adapter.
    """

    def __init__(
        self,
        layout: _Layout,
        V: dict[str, Tensor],
        grouping: groups_mod.Grouping,
        forced: Mapping[str, str] | None = None,
    ):
        reasons: dict[str, str] = {}
        why_of: dict[int, str | None] = {}
        owners = {n: uses for n, uses in layout.owners.items() if n in V}
        for n, uses in owners.items():
            for mname, m, local in uses:
                ad = layout.adapters[id(m)]
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
        #: parameter -> why it is not covered (every use of a parameter must be covered for it to be)
        self.uncovered: dict[str, str] = reasons
        self.plans: list[ModulePlan] = []
        by_module: dict[int, ModulePlan] = {}
        for n, uses in owners.items():
            if n in reasons:
                continue
            for mname, m, local in uses:
                plan = by_module.get(id(m))
                if plan is None:
                    plan = by_module[id(m)] = ModulePlan(mname, m, layout.adapters[id(m)])
                    self.plans.append(plan)
                plan.slots[local] = Slot(n, V[n], grouping.of[n])
        tapped = set(by_module)
        roots = [m for m in layout.embeddings if id(m) not in tapped]
        emb = layout.input_embedding
        if emb is not None and id(emb) not in tapped and all(emb is not r for r in roots):
            roots.append(emb)
        #: modules whose output becomes a leaf requiring grad (so gradients flow with frozen parameters)
        self.roots: list[nn.Module] = roots


@dataclass
class _Call:
    """What the check phase established: the call, validated."""

    model: nn.Module
    comm: dist_mod.Comm | None
    direction: Direction
    risks: dict[str, Mapping[str, Tensor]]
    named: dict[str, nn.Parameter]
    V: dict[str, Tensor]  #: canonical name -> [K, *shape], nonzero entries only
    grouping: groups_mod.Grouping
    layout: _Layout
    reduction: str
    mode: str
    per_instance: bool
    device: torch.device
    sharded: bool  #: FSDP2: collectives run inside the backward (gradient reduce-scatter, direction gathers)
    route: str  #: "taps" or "sharded" (FSDP2 aggregates)
    routing: Routing | None = None  #: a factored direction's route per parameter (V holds its FactoredEntry
    #: where the route is "factored", the formed V where it is "dense")


@dataclass
class _Weights:
    """The reduction weights' ingredients, from the labels alone (before any forward)."""

    n: dict[str, Tensor]  #: risk -> [B] labelled tokens of this rank's samples
    pooled: dict[str, float]  #: risk -> the union's pool size D
    sizes: dict[str, list[int]]  #: risk -> every rank's B


@dataclass
class _PassPlan:
    """What the plan phase decided."""

    plans: list[ModulePlan]
    roots: list[nn.Module]
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
    direction: Direction | Mapping[str, Tensor],
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
            :class:`~geffect_fast.factored.FactoredDirection` (``Direction.from_objective(..., factored=True)``,
            one process): per parameter its factors are contracted as they are, or V is formed first, whichever
            :func:`geffect_fast.factored.route_costs` predicts is faster (see ``route``).
        risks: ``{name: batch}``, or a single batch (then named ``"risk"``). A batch is a dict with
            ``input_ids``, ``labels`` (−100 ignored, shifted as in HF) and optionally ``attention_mask``.
        groups: ``"block"``, ``"paper"``, ``"module"`` or ``fn(param_name) -> group`` (see
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
    group = dist_mod.resolve_group(model, process_group)
    model = unwrap(model)
    comm = None if group is None else dist_mod.Comm(group, timeout)
    with model_lock(model):  # another thread's pass on this model finishes first (its flags are not ours)
        # one agreement for every local check (there is no collective among them): the same call on every rank,
        # so the same collectives follow in the same order
        with dist_mod.phase(comm, "checking the inputs") as agreement:
            call = _check_inputs(model, comm, direction, risks, groups, per_instance, reduction, mode, route)
            _route(call, route)
            plan = _plan(call, backend, strict)
            agreement.check = dist_mod.fingerprint(
                tuple(call.risks),
                call.direction.names,
                plan.group_names,
                sorted(call.V),
                reduction,
                call.route,
                mode,
            )
        weights = _weights(call)
        plan, parts = _passes(call, plan, weights, backend, strict)
        return _combine(call, plan, weights, parts)


# -- phase 1 ----------------------------------------------------------------------------------------------
def _check_inputs(
    model: nn.Module,
    comm: dist_mod.Comm | None,
    direction: Direction | Mapping[str, Tensor],
    risks: Any,
    groups: groups_mod.GroupSpec,
    per_instance: bool,
    reduction: str,
    mode: str,
    route: str = "auto",
) -> _Call:
    """Every check that needs no pass: options, the model, the batches, the direction, the grouping."""
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
    check_not_inference(model)
    check_causal_lm(model)
    if isinstance(direction, FactoredDirection):
        if comm is not None or dist_mod.sharded_mesh(model) is not None:
            raise NotImplementedError(
                "a factored direction is measured by one process (its factors are this rank's objective batch); "
                "pass its .dense() (averaged over the ranks, as DDP averages gradients)"
            )
    elif route == "factored":
        raise ValueError("route='factored' needs a factored direction: Direction.from_objective(..., factored=True)")
    elif not isinstance(direction, Direction):
        if not isinstance(direction, Mapping):
            raise TypeError(
                f"direction must be a Direction or a mapping name -> tensor, got {type(direction).__name__}"
            )
        direction = Direction(direction)
    if isinstance(risks, Mapping) and "input_ids" in risks:
        risks = {"risk": risks}
    if not isinstance(risks, Mapping) or not risks:
        raise ValueError("risks must be a non-empty dict {name: batch} (or one batch)")
    device = input_device(model)
    for rname, batch in risks.items():
        check_batch(batch, rname, device)
    # a batch made under inference mode (a tokenizer call inside it) is copied out: ids cannot be saved for
    # backward otherwise, and the copy is exact
    risks = {
        r: {k: (v.clone() if isinstance(v, Tensor) and v.is_inference() else v) for k, v in b.items()}
        for r, b in risks.items()
    }
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    V = direction.bind(named, trainable)
    if not V:
        raise ValueError("the direction is zero on every parameter: every G-effect would be 0")
    layout = _layout(model, named)
    grouping = _grouping(model, layout, groups, list(named))
    sharded = dist_mod.sharded_mesh(model) is not None
    # FSDP2 aggregates come from the sharded gradient itself; per-instance values need the taps
    route = "sharded" if sharded and not per_instance else "taps"
    return _Call(
        model, comm, direction, risks, named, V, grouping, layout, reduction, mode, per_instance, device, sharded, route
    )


# -- phase 2 ----------------------------------------------------------------------------------------------
def _route(call: _Call, route: str) -> None:
    """A factored direction's route per parameter (:func:`geffect_fast.factored.plan_routes`): V is formed here,
    once for every risk set, where it is "dense"; the factors stay where it is "factored"."""
    if not isinstance(call.direction, FactoredDirection):
        return
    call.routing = plan_routes(call.V, call.layout, call.risks, route, call.device)
    call.V = {n: v.dense_tensor() if call.routing.routes[n] == "dense" else v for n, v in call.V.items()}


def _plan(call: _Call, backend: str, strict: bool, forced: Mapping[str, str] | None = None) -> _PassPlan:
    """Taps, autograd parameters, op backend and accumulation dtype. ``forced``: parameters an earlier pass
    found the taps cannot measure (``strict=False`` re-plans them to autograd)."""
    named, V, grouping = call.named, call.V, call.grouping
    if call.route == "sharded":
        plans, roots, uncovered = [], [], {}
        autograd = {n: grouping.of[n] for n in V}  # every parameter, from its sharded gradient
    else:
        plan = _Plan(call.layout, V, grouping, forced)
        if plan.uncovered and strict:
            items = [f"{n}: {why}" for n, why in list(plan.uncovered.items())[:5]]
            more = f" (and {len(plan.uncovered) - 5} more)" if len(plan.uncovered) > 5 else ""
            raise UnsupportedModuleError(
                "these parameters have a nonzero direction but no adapter can measure them per sample: "
                + "; ".join(items)
                + more
                + ". Register an adapter (geffect_fast.capture.register) or pass strict=False to measure "
                "them by ordinary autograd in group 'uncovered' (aggregate only)."
            )
        plans, roots, uncovered = plan.plans, plan.roots, plan.uncovered
        autograd = {n: len(grouping.names) for n in uncovered}
    # the local shard of v that each autograd parameter's (possibly sharded) gradient is dotted with
    V_auto = {
        n: V[n].dense_tensor()
        if isinstance(V[n], FactoredEntry)  # found uncovered by a pass (strict=False): formed for autograd
        else dist_mod.shard_of(V[n], named[n])
        if dist_mod.is_dtensor(named[n])
        else V[n]
        for n in autograd
    }
    emb = call.layout.input_embedding
    act_dtype = (
        emb.weight.dtype
        if isinstance(getattr(emb, "weight", None), torch.Tensor)
        else next(p.dtype for p in named.values() if p.is_floating_point())
    )
    dir_dtype = functools.reduce(torch.promote_types, {v.dtype for v in call.V.values()})
    ops = resolve(backend, call.device, act_dtype, dir_dtype)
    f64 = any(p.dtype == torch.float64 for p in named.values()) or any(v.dtype == torch.float64 for v in V.values())
    acc = torch.float64 if f64 else torch.float32
    group_names = tuple(grouping.names) + ((UNCOVERED,) if uncovered else ())
    return _PassPlan(plans, roots, uncovered, autograd, V_auto, ops, acc, group_names)


def _weights(call: _Call) -> _Weights:
    """Union weights: known from the labels before any forward (one gather of pool sizes across ranks)."""
    n = {r: label_counts(b["labels"]).cpu() for r, b in call.risks.items()}
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


def _run(call: _Call, plan: _PassPlan, weights: _Weights) -> dict[str, dist_mod.Part]:
    """Every risk set's pass with one plan; the model's state, hooks and forwards restored afterwards."""
    named, comm, K = call.named, call.comm, call.direction.k
    parts: dict[str, dist_mod.Part] = {}
    with preserved(call.model, mode=call.mode), torch.enable_grad():
        for p in named.values():
            p.requires_grad_(False)
        for n in plan.autograd:
            named[n].requires_grad_(True)
        guard = call.route == "taps"
        with CaptureSession(plan.plans, plan.roots, plan.ops, K, plan.G, plan.acc, guard=guard) as session:
            factored = frozenset(s.name for p in plan.plans for s in p.slots.values() if isinstance(s.v, FactoredEntry))
            if factored:  # their taps hand over the factors, paired with the direction's (factored.pair_sink)
                session.factor_sink = pair_sink(session)
                session.factor_slots = factored
            for rname, batch in call.risks.items():
                n = weights.n[rname]
                c = reduction_weights(n, weights.pooled[rname], call.reduction)  # within the union
                with dist_mod.phase(comm, f"measuring risk set {rname!r}"):
                    parts[rname] = _one_pass(call, plan, session, rname, batch, n, c)
    return parts


def _one_pass(
    call: _Call,
    plan: _PassPlan,
    session: CaptureSession,
    rname: str,
    batch: Mapping[str, Tensor],
    n: Tensor,
    c: Tensor,
) -> dist_mod.Part:
    """Forward, backward and the per-sample values of one risk set: this rank's :class:`Part` of it."""
    named, comm, K = call.named, call.comm, call.direction.k
    B, T = batch["input_ids"].shape
    session.start(B, call.device, T)
    nll, _ = token_nll(forward_logits(call.model, batch), batch["labels"])
    # Backpropagate L = Σ_b s_b ℓ_b. With s_b = 1 each tap's gradient rows are exactly those of the sample's own
    # ℓ_b, as a per-sample backward would give them (bit for bit where the model rounds through lower
    # precision). Parameters measured by autograd need ∇R itself from the same backward, so then s_b = c_b and
    # L = R (this rank's part of it).
    s = c.clone() if plan.autograd else (n > 0).double()
    w = (s.to(nll.device) / n.clamp_min(1).to(nll.device)).to(nll.dtype)
    L = (nll * w[:, None]).sum()
    if not bool(torch.isfinite(L.detach())):
        raise ValueError(f"risk set {rname!r}: the risk is not finite ({L.item()}); check the model and batch")
    if not L.requires_grad:
        raise RuntimeError(
            "the risk does not depend on any tapped layer: no gradient can flow (is the model's input embedding "
            "an nn.Embedding?)"
        )
    ell = (nll.detach().sum(1) / n.clamp_min(1).to(device=nll.device, dtype=nll.dtype)).double().cpu()
    del nll
    if comm is not None and call.sharded:  # the backward's collectives follow: every rank must get there
        comm.agree(f"running the forward of risk set {rname!r}")
    L.backward()
    del L
    session.check_outside_uses()
    out = session.result().double().cpu()  # [K, B, G]: s_b · e_b
    if not bool(torch.isfinite(out).all()):
        bad = [plan.group_names[g] for g in range(out.shape[-1]) if not bool(torch.isfinite(out[..., g]).all())]
        raise ValueError(
            f"risk set {rname!r}: the backward is not finite (NaN or inf) in group(s) {bad}, although the risk "
            "is: the model's activations or gradients are not finite on this batch (e.g. Hugging Face's eager "
            "attention in float64 at left-padded positions; use attn_implementation='sdpa')"
        )
    e = torch.where(s[None, :, None] > 0, out / s.clamp_min(1e-300)[None, :, None], torch.zeros_like(out))
    totals = (e * c[None, :, None]).sum(1)  # Σ_b c_b e_b
    if plan.autograd:
        if plan.uncovered:
            totals[:, -1] = 0
            e[:, :, -1] = float("nan")
        for pn, col in plan.autograd.items():
            p = named[pn]
            if p.grad is not None:
                g = dist_mod.local_part(p.grad).reshape(1, -1).to(plan.V_auto[pn].dtype)
                dot = (plan.V_auto[pn].reshape(K, -1) @ g.T).squeeze(1).double().cpu()
                totals[:, col] += dist_mod.reduce_scale(p) * dot
                p.grad = None
    return dist_mod.Part(totals, float((ell * c).sum()), n, c, None if call.route == "sharded" else e)


# -- phase 4 ----------------------------------------------------------------------------------------------
def _combine(call: _Call, plan: _PassPlan, weights: _Weights, parts: dict[str, dist_mod.Part]) -> Result:
    """The union over ranks (if any), as a :class:`Result`."""
    if call.comm is not None:
        parts = dist_mod.combine(call.comm, parts, weights.sizes, call.direction.k, plan.G)
    meta = {
        "backend": plan.ops.name,
        "mode": call.mode,
        "dtype": str(plan.acc).replace("torch.", ""),
        "route": call.route,
        "world_size": 1 if call.comm is None else call.comm.world,
    }
    if call.routing is not None:
        meta["direction_routes"] = dict(call.routing.kinds)
        meta["route_costs"] = dict(call.routing.predicted)
    return Result(
        directions=call.direction.names,
        risks=tuple(call.risks),
        groups=plan.group_names,
        reduction=call.reduction,
        group_totals={r: p.totals for r, p in parts.items()},
        instances={r: p.e for r, p in parts.items()} if call.per_instance else None,
        weights={r: p.c for r, p in parts.items()},
        n_tokens={r: p.n for r, p in parts.items()},
        losses={r: p.loss for r, p in parts.items()},
        uncovered=tuple(plan.uncovered),
        meta=meta,
    )
