"""``measure()``: the measuring pass of DESIGN.md §2.

For each risk batch: one forward, the per-token NLL, and one backward of the sum of the per-sample mean
NLLs, L = Σ_b ℓ_b, with every parameter frozen. Each covered layer's output carries a tap; in backward the
tap contracts the layer's output gradient g (whose row t is ∂ℓ_b/∂y_t for the sample b that owns token t)
with the direction, per sample and per group, and lets g go. Aggregates follow exactly from the
per-instance values: ⟨∇R, v⟩ = Σ_b c_b e_b. No
per-sample gradient is formed, no weight gradient is computed, and nothing of size O(B·|θ|) exists: the
cost is about one ordinary forward+backward of the batch.

The model comes back as it was: ``.grad``, ``requires_grad``, train/eval mode, hooks and RNG state.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import distributed as dist_mod
from . import groups as groups_mod
from .capture import CaptureSession, ModulePlan, Slot, UnsupportedModuleError, find_adapter
from .direction import Direction
from .loss import REDUCTIONS, check_batch, forward_logits, label_counts, reduction_weights, token_nll
from .ops import resolve
from .result import UNCOVERED, Result
from .state import MODES, preserved


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


class _Plan:
    """Which module each nonzero-direction parameter is tapped in, and which are left uncovered."""

    def __init__(self, model: nn.Module, V: dict[str, Tensor], grouping: groups_mod.Grouping):
        pname = {id(p): n for n, p in model.named_parameters()}
        owners: dict[str, list[tuple[str, nn.Module, str]]] = {}
        modules = list(model.named_modules())
        for mname, m in modules:
            for local, p in m.named_parameters(recurse=False):
                n = pname[id(p)]
                if n in V:
                    owners.setdefault(n, []).append((mname, m, local))
        adapters: dict[int, Any] = {}
        reasons: dict[str, str] = {}
        for n, uses in owners.items():
            for mname, m, local in uses:
                if id(m) not in adapters:
                    ad = find_adapter(m)
                    why = None if ad is None else ad.unsupported_reason(m)
                    adapters[id(m)] = (ad, why)
                ad, why = adapters[id(m)]
                if ad is None:
                    reasons[n] = f"{mname or '<model>'} ({type(m).__name__}) has no adapter"
                elif why is not None:
                    reasons[n] = f"{mname} ({type(m).__name__}): {why}"
                elif local not in ad.param_names:
                    reasons[n] = f"{mname} ({type(m).__name__}): its adapter does not cover {local!r}"
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
                    plan = by_module[id(m)] = ModulePlan(mname, m, adapters[id(m)][0])
                    self.plans.append(plan)
                plan.slots[local] = Slot(n, V[n], grouping.of[n])
        tapped = set(by_module)
        roots = [m for _, m in modules if isinstance(m, nn.Embedding) and id(m) not in tapped]
        emb = input_embeddings(model)
        if emb is not None and id(emb) not in tapped and all(emb is not r for r in roots):
            roots.append(emb)
        #: modules whose output becomes a leaf requiring grad (so gradients flow with frozen parameters)
        self.roots: list[nn.Module] = roots


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
) -> Result:
    """G-effects e = ⟨∇θ R(D), v⟩ of each risk set D, per group and per instance, in one backward per set.

    Args:
        model: a causal LM (Hugging Face or alike: ``model(input_ids=..., attention_mask=...)`` -> logits);
            may be wrapped in DDP or sharded with FSDP2 (``fully_shard``).
        direction: a :class:`Direction` (K directions), or a mapping parameter name -> tensor. Under FSDP2
            its entries may be sharded DTensors (e.g. from ``Direction.from_grads``) or whole tensors.
        risks: ``{name: batch}``, or a single batch (then named ``"risk"``). A batch is a dict with
            ``input_ids``, ``labels`` (−100 ignored, shifted as in HF) and optionally ``attention_mask``.
        groups: ``"block"``, ``"paper"``, ``"module"`` or ``fn(param_name) -> group`` (see
            :mod:`geffect_fast.groups`).
        per_instance: keep e_b = ⟨∇ℓ_b, v⟩ per sample (they are computed anyway; this keeps them).
        reduction: ``"token_mean"`` (R pools tokens over the batch, as the paper's code and HF's loss) or
            ``"sample_mean"`` (R averages the per-sample means).
        backend: op backend, ``"auto"`` or a name from :func:`geffect_fast.backends`.
        strict: raise for a parameter with a nonzero direction that no adapter covers (default); if False,
            such parameters form the group ``uncovered``, computed by ordinary autograd (aggregate only).
        mode: ``"eval"`` (default: dropout off, so per-sample gradients are not random), ``"train"`` (what
            training sees; HF applies gradient checkpointing only in train mode) or ``"keep"``.
            The model's own mode is restored afterwards.
        process_group: ``"auto"`` (a DDP wrapper's group or an FSDP2 mesh's group, when torch.distributed
            is initialised), a ProcessGroup, or None (this rank alone). Across a group each rank passes its
            own batches and every rank gets the result over their union, as one process would compute it
            (see :mod:`geffect_fast.distributed`).
        timeout: seconds a rank waits for the others at each agreement point before raising.

    Returns:
        :class:`Result`; see :mod:`geffect_fast.result` for its shape.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    group = dist_mod.resolve_group(model, process_group)
    model = unwrap(model)
    comm = None if group is None else dist_mod.Comm(group, timeout)
    sharded = dist_mod.sharded_mesh(model) is not None
    # FSDP2 aggregates come from the sharded gradient itself; per-instance values need the taps
    route = "sharded" if sharded and not per_instance else "taps"
    if not isinstance(direction, Direction):
        if not isinstance(direction, Mapping):
            raise TypeError(
                f"direction must be a Direction or a mapping name -> tensor, got {type(direction).__name__}"
            )
        direction = Direction(direction)
    if isinstance(risks, Mapping) and "input_ids" in risks:
        risks = {"risk": risks}
    if not isinstance(risks, Mapping) or not risks:
        raise ValueError("risks must be a non-empty dict {name: batch} (or one batch)")

    # one agreement for every local check (there is no collective among them): the same call on every rank,
    # so the same collectives follow in the same order
    with dist_mod.phase(comm, "checking the inputs") as agreement:
        device = input_device(model)
        for rname, batch in risks.items():
            check_batch(batch, rname, device)
        named = dict(model.named_parameters())
        trainable = [n for n, p in named.items() if p.requires_grad]
        V = direction.bind(named, trainable)
        if not V:
            raise ValueError("the direction is zero on every parameter: every G-effect would be 0")
        grouping = groups_mod.assign(model, groups, list(named))
        if route == "sharded":
            plans, roots, uncovered = [], [], []
            autograd = {n: grouping.of[n] for n in V}  # every parameter, from its sharded gradient
        else:
            plan = _Plan(model, V, grouping)
            if plan.uncovered and strict:
                items = [f"{n}: {why}" for n, why in list(plan.uncovered.items())[:5]]
                more = f" (and {len(plan.uncovered) - 5} more)" if len(plan.uncovered) > 5 else ""
                raise UnsupportedModuleError(
                    "these parameters have a nonzero direction but no adapter covers them: "
                    + "; ".join(items)
                    + more
                    + ". Register an adapter (geffect_fast.capture.register) or pass strict=False to measure "
                    "them by ordinary autograd in group 'uncovered' (aggregate only)."
                )
            plans, roots, uncovered = plan.plans, plan.roots, list(plan.uncovered)
            autograd = {n: len(grouping.names) for n in uncovered}
        # the local shard of v that each autograd parameter's (possibly sharded) gradient is dotted with
        V_auto = {n: dist_mod.shard_of(V[n], named[n]) if dist_mod.is_dtensor(named[n]) else V[n] for n in autograd}
        emb = input_embeddings(model)
        act_dtype = (
            emb.weight.dtype
            if isinstance(getattr(emb, "weight", None), torch.Tensor)
            else next(p.dtype for p in named.values() if p.is_floating_point())
        )
        dir_dtype = functools.reduce(torch.promote_types, {v.dtype for v in V.values()})
        ops = resolve(backend, device, act_dtype, dir_dtype)
        K = direction.k
        f64 = any(p.dtype == torch.float64 for p in named.values()) or any(v.dtype == torch.float64 for v in V.values())
        acc = torch.float64 if f64 else torch.float32
        group_names = tuple(grouping.names) + ((UNCOVERED,) if uncovered else ())
        agreement.check = dist_mod.fingerprint(
            tuple(risks), direction.names, group_names, sorted(V), reduction, route, mode
        )
    G = len(group_names)

    # union weights: known from the labels before any forward
    n_local = {r: label_counts(b["labels"]).cpu() for r, b in risks.items()}
    pooled, sizes = dist_mod.union_counts(comm, n_local, reduction)
    parts: dict[str, dist_mod.Part] = {}
    with preserved(model, mode=mode):
        for p in named.values():
            p.requires_grad_(False)
        for n in autograd:
            named[n].requires_grad_(True)
        with CaptureSession(plans, roots, ops, K, G, acc) as session:
            for rname, batch in risks.items():
                B = batch["input_ids"].shape[0]
                n = n_local[rname]
                c = reduction_weights(n, pooled[rname], reduction)  # within the union of the ranks' batches
                with dist_mod.phase(comm, f"measuring risk set {rname!r}"):
                    session.start(B, device)
                    nll, _ = token_nll(forward_logits(model, batch), batch["labels"])
                    # Backpropagate L = Σ_b s_b ℓ_b. With s_b = 1 each tap's gradient rows are exactly those of
                    # the sample's own ℓ_b, as a per-sample backward would give them (bit for bit where the
                    # model rounds through lower precision). Parameters measured by autograd need ∇R itself
                    # from the same backward, so then s_b = c_b and L = R (this rank's part of it).
                    s = c.clone() if autograd else (n > 0).double()
                    w = (s.to(nll.device) / n.clamp_min(1).to(nll.device)).to(nll.dtype)
                    L = (nll * w[:, None]).sum()
                    if not bool(torch.isfinite(L.detach())):
                        raise ValueError(
                            f"risk set {rname!r}: the risk is not finite ({L.item()}); check the model and batch"
                        )
                    if not L.requires_grad:
                        raise RuntimeError(
                            "the risk does not depend on any tapped layer: no gradient can flow (is the model's "
                            "input embedding an nn.Embedding?)"
                        )
                    ell = (nll.detach().sum(1) / n.clamp_min(1).to(device=nll.device, dtype=nll.dtype)).double().cpu()
                    del nll
                    if comm is not None and sharded:  # FSDP's backward collectives follow: all must get there
                        comm.agree(f"running the forward of risk set {rname!r}")
                    L.backward()
                    del L
                    out = session.out.double().cpu()  # [K, B, G]: s_b · e_b
                    e = torch.where(
                        s[None, :, None] > 0, out / s.clamp_min(1e-300)[None, :, None], torch.zeros_like(out)
                    )
                    totals = (e * c[None, :, None]).sum(1)  # Σ_b c_b e_b
                    if autograd:
                        if uncovered:
                            totals[:, -1] = 0
                            e[:, :, -1] = float("nan")
                        for pn, col in autograd.items():
                            p = named[pn]
                            if p.grad is not None:
                                g = dist_mod.local_part(p.grad).reshape(1, -1).to(V_auto[pn].dtype)
                                dot = (V_auto[pn].reshape(K, -1) @ g.T).squeeze(1).double().cpu()
                                totals[:, col] += dist_mod.reduce_scale(p) * dot
                                p.grad = None
                parts[rname] = dist_mod.Part(totals, float((ell * c).sum()), n, c, None if route == "sharded" else e)
                del ell
    if comm is not None:
        parts = dist_mod.combine(comm, parts, sizes, K, G)
    return Result(
        directions=direction.names,
        risks=tuple(risks),
        groups=group_names,
        reduction=reduction,
        group_totals={r: p.totals for r, p in parts.items()},
        instances={r: p.e for r, p in parts.items()} if per_instance else None,
        weights={r: p.c for r, p in parts.items()},
        n_tokens={r: p.n for r, p in parts.items()},
        losses={r: p.loss for r, p in parts.items()},
        uncovered=tuple(uncovered),
        meta={
            "backend": ops.name,
            "mode": mode,
            "dtype": str(acc).replace("torch.", ""),
            "route": route,
            "world_size": 1 if comm is None else comm.world,
        },
    )
