"""G-effects inside a training loop: per step, per group, cumulative, with a fidelity check.

    tracker = gf.Tracker(model, probes={"unlearn": forget_batch, "retain": retain_batch}, every=1,
                         direction="update", log="run/geffects.jsonl")
    for batch in loader:
        loss = objective(model, batch, ref)
        loss.backward()
        with tracker.step(optimizer, loss=loss):
            optimizer.step()
        optimizer.zero_grad()

Directions
----------
``"gradient"``: v = the gradient in ``.grad`` when ``step()`` is entered — after any clipping you did
before it, and after gradient accumulation. The first-order prediction ΔR ≈ −lr·e is what *plain SGD* at
the first parameter group's learning rate would do; with Adam it is not what the optimiser did.

``"update"``: v = (θ_before − θ_after)/lr, the step the optimiser really took (Adam/AdamW, momentum, weight
decay, per-group learning rates all included), so −lr·e is the first-order prediction of the real ΔR. The
tracker keeps one copy of the trainable parameters during the step and measures at θ_before by swapping
storages (no second copy).

Fidelity: the measured ΔR = R(θ_after) − R(θ_before) on each probe set (one more forward per probe set after
each measured step; ``measure_change=False`` skips it and leaves ``measured_dR`` None), beside the first-order
prediction −lr·e and, with ``curvature=True``, the second-order one −lr·e + ½·lr²·vᵀ∇²R v (one Hessian-vector
product per probe set, by double backward). At small steps both track the measured ΔR (AdamW at lr 1e-4 on a
tiny GPT-2: within 1%, the second order closer); at large ones neither does — one SGD step of GA at lr 0.2 on
a tiny Llama overshoots by ~70% at first order and further at second (tests/test_tracker.py). ``compare={"GA":
objective, ...}`` also measures, at the same θ and in the same pass, the G-effects of other objectives'
gradients on ``compare_batch`` (their ΔR is predicted, not measured: they were not taken). In one process
and without ``smooth`` they are factored directions (``Direction.from_objective(..., factored=True)``): per
layer, ``measure()`` contracts their factors or forms their V, whichever its cost model predicts is faster;
the taken direction stays dense.

Smoothed G-effects (``smooth=True``): the official G-effect code (``dataloader_ge.py``, ``*_gradient_fcn`` and
``gradient_*_effect``) reports ⟨ḡ_R, ḡ_u⟩ per group, where both gradients are smoothed separately,
ḡ ← 0.6·ḡ + 0.4·g (ḡ = g at the first call), ∇R on the forget (unlearning) or retain set and ∇L_u the
objective's gradient. With ``smooth=True`` every record also carries ``smoothed_total`` and
``smoothed_groups``: exactly that, with ḡ_R the smoothed ∇R of the record's probe set and ḡ_u the smoothed
direction, both updated once per measured step. The official code smooths over the mini-batches of one
pass at a saved checkpoint (its learning rate is 0) and prints every 4th value; here the smoothing runs over
the measured steps of the run, on fixed probe batches. It needs ∇R itself, so it costs one ordinary
backward per probe set (which then also gives the unsmoothed values, ⟨∇R, v⟩ per group: the tap pass of
:func:`measure` runs only for per-instance values) and keeps (probe sets + directions) × |θ| floats of state
(float32, float64 for float64 parameters) beside one transient ∇R. The unsmoothed pass stays the default.

Memory: ``probe_batch_size=k`` measures each probe set k rows at a time and pools the parts exactly (the risk
of a batch is Σ over its chunks of (D_chunk/D)·R_chunk, D the labelled tokens — or samples, for
``sample_mean``); the peak then holds one chunk's activations and logits instead of the whole probe's.

Under DDP (pass the DDP-wrapped model; each rank gives its own probe batches): the directions are the
ranks' common ones (DDP's averaged gradient, the same update), compare directions are averaged over ranks
as DDP would average them, and every probe quantity — G-effects, R, measured ΔR and the curvature term —
is the one of the union of the ranks' probe batches; every rank gets the same records. FSDP2-sharded models
are refused (use :func:`geffect_fast.measure` with ``Direction.from_grads`` in the loop); so are ``smooth``
and ``probe_batch_size`` under a process group (single-process options for now).

Records (kept in ``tracker.records`` and, with ``log=``, appended to a JSONL file): ``step``,
``objective`` (``name``: a label, or the objective being trained — ``name=gf.objectives.get("npo")`` or
``name="npo"`` labels the records "npo"; default the direction kind; or a compare name), ``kind`` ("gradient",
"update" or "compare"), ``risk``, ``total``,
``groups``, ``cumulative`` (sum of ``total`` over the measured steps), ``lr``, ``loss`` (R at θ_before),
``train_loss``, ``predicted_dR``, ``predicted_dR_2nd``, ``measured_dR``, ``prediction`` (what predicted_dR
= −lr·e predicts: "optimiser step" for the update direction, "plain SGD step" of size lr along v otherwise — with
Adam not the step taken), ``per_instance`` when asked, and ``smoothed_total``/``smoothed_groups`` with
``smooth=True``.
With ``every=k`` only every k-th step is measured and cumulative sums run over the measured steps.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from . import distributed as dist_mod
from . import groups as groups_mod
from . import logs
from .api import measure
from .directions import Direction
from .engine import unwrap
from .loss import (
    has_labels,
    packed_samples,
    pool_size,
    reduction_weights,
    risk,
    risk_parts,
    row_chunks,
    sample_counts,
    weighted_chunks,
)
from .objectives import Objective, objective_name, resolve
from .result import Result
from .state import preserved

DIRECTIONS = ("gradient", "update")
#: the official smoothing of both gradients, ḡ ← SMOOTHING·ḡ + (1 − SMOOTHING)·g (dataloader_ge.py)
SMOOTHING = 0.6


def _scalar(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


def _label(name: str | Objective | None, direction: str) -> str:
    """The taken direction's name in the records: ``name`` as given, the name of an objective passed as ``name``
    (``Tracker(..., name=npo)`` labels the records "NPO"), else the direction kind."""
    if name is None:
        return direction
    if isinstance(name, str):
        return name
    return objective_name(name)


class Tracker:
    def __init__(
        self,
        model: nn.Module,
        probes: Mapping[str, Mapping[str, Tensor]],
        every: int = 1,
        direction: str = "gradient",
        groups: Any = "block",
        per_instance: bool = False,
        log: str | Path | None = None,
        reduction: str = "token_mean",
        backend: str = "auto",
        mode: str = "eval",
        compare: Mapping[str, Objective | str] | None = None,
        compare_batch: Any = None,
        ref_model: nn.Module | None = None,
        curvature: bool = False,
        name: str | Objective | None = None,
        process_group: Any = "auto",
        timeout: float = 600.0,
        smooth: bool = False,
        probe_batch_size: int | None = None,
        measure_change: bool = True,
    ):
        _check_options(direction, every, probes, probe_batch_size)
        if compare and compare_batch is None:
            compare_batch = probes.get("unlearn", next(iter(probes.values())))
        group = _probe_group(model, process_group, smooth, probe_batch_size)
        #: the group probes are pooled over (DDP), or None; each rank passes its own probe batches
        self.process_group = group
        self.timeout = timeout
        self._comm = None if group is None else dist_mod.Comm(group, timeout)
        self.model = unwrap(model)
        self.probes = dict(probes)
        self.every = every
        self.direction = direction
        self.groups = groups
        self.per_instance = per_instance
        self.reduction = reduction
        self.backend = backend
        self.mode = mode
        self.compare = {k: resolve(obj) for k, obj in (compare or {}).items()}
        self.compare_batch = compare_batch
        self.ref_model = ref_model
        self.curvature = curvature
        self.smooth = bool(smooth)
        self.probe_batch_size = probe_batch_size
        #: whether R is measured again after each step (measured_dR, the fidelity check): one forward per probe
        self.measure_change = bool(measure_change)
        self._chunks = _chunked(self.probes, probe_batch_size)
        #: smoothed state: probe -> parameter -> ḡ_R, and direction name -> parameter -> ḡ_u
        self._gbar_R: dict[str, dict[str, Tensor]] = {}
        self._gbar_u: dict[str, dict[str, Tensor]] = {}
        self._n_smoothed = 0
        self._grouping: groups_mod.Grouping | None = None
        #: the name the taken direction has in the records (default: "gradient" or "update")
        self.name = _label(name, direction)
        if self.name in self.compare:
            raise ValueError(f"compare names must differ from the tracked direction's name {self.name!r}")
        self.n_steps = 0
        #: seconds the tracker itself took (begin + end) at each measured step: its cost beside training
        self.step_seconds: list[float] = []
        self.records: list[dict[str, Any]] = []
        self.cumulative: dict[tuple[str, str], float] = {}
        self.cumulative_groups: dict[tuple[str, str], dict[str, float]] = {}
        self.log_path = logs.empty_log(log, "tracker")
        self._pending: dict[str, Any] | None = None

    # -- the training-loop interface ---------------------------------------------------------------------
    @contextmanager
    def step(self, optimizer: torch.optim.Optimizer, loss: Any = None) -> Iterator[None]:
        """Wrap ``optimizer.step()``: measures before the step (gradient) or around it (update)."""
        self.begin(optimizer, loss)
        try:
            yield
        except BaseException:
            self._abort()
            raise
        self.end()

    def begin(self, optimizer: torch.optim.Optimizer, loss: Any = None) -> None:
        """Call right before ``optimizer.step()`` (``step()`` does it for you)."""
        self.n_steps += 1
        if (self.n_steps - 1) % self.every != 0:
            self._pending = None
            return
        t0 = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])
        if lr <= 0:
            raise ValueError(f"the optimiser's learning rate is {lr}; G-effect predictions need lr > 0")
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        pending: dict[str, Any] = {"lr": lr, "train_loss": _scalar(loss), "step": self.n_steps}
        # one process: compare directions stay factored, and measure() forms a layer's V only where that is
        # cheaper (geffect_fast.factored); under DDP they are averaged over the ranks, so formed; with smooth
        # they are formed too: ḡ_u and the dots with ∇R need every direction's V per parameter
        factored = self._comm is None and not self.smooth
        compare_dirs = {
            name: self._averaged(
                Direction.from_objective(
                    self.model, obj, self.compare_batch, ref_model=self.ref_model, name=name, factored=factored
                )
            )
            for name, obj in self.compare.items()
        }
        if self.direction == "gradient":
            # the .grad tensors themselves, no copy: v is used and dropped before the optimiser steps
            v = Direction.from_grads(self.model, self.name, copy=False, when="before tracker.step()")
            stacked = Direction.stack({self.name: v, **compare_dirs}) if compare_dirs else v
            pending["result"], pending["smoothed"] = self._measure_step(stacked)
            pending["vhv"] = self._vhv(v) if self.curvature else None
        else:
            pending["before"] = {n: p.detach().clone() for n, p in trainable.items()}
            pending["compare_dirs"] = compare_dirs
        pending["seconds"] = time.perf_counter() - t0
        self._pending = pending

    def end(self) -> list[dict[str, Any]]:
        """Call right after ``optimizer.step()``; returns this step's records (empty when not measured)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        t0 = time.perf_counter()
        lr = pending["lr"]
        if self.direction == "update":
            try:
                now = dict(self.model.named_parameters())
                v = Direction.from_update(pending["before"], {n: now[n] for n in pending["before"]}, lr, name=self.name)
            except ValueError:  # the optimiser skipped the step (e.g. non-finite gradients under AMP)
                return []
            dirs = {self.name: v, **pending["compare_dirs"]}
            stacked = Direction.stack(dirs) if len(dirs) > 1 else v
            with self._at(pending["before"]):
                pending["result"], pending["smoothed"] = self._measure_step(stacked)
                pending["vhv"] = self._vhv(v) if self.curvature else None
        after = self._risks() if self.measure_change else None
        self.step_seconds.append(pending["seconds"] + time.perf_counter() - t0)
        return self._record(pending, after)

    def _abort(self) -> None:
        self._pending = None

    # -- pieces ------------------------------------------------------------------------------------------
    def _measure_step(self, direction: Direction) -> tuple[Result, dict[str, dict[str, Any]] | None]:
        """The step's Result and, with ``smooth``, the smoothed G-effects {direction: {risk: (total, groups)}}."""
        if not self.smooth:
            return self._measure(direction), None
        grads, losses = self._risk_gradients(direction)
        res = self._measure(direction) if self.per_instance else self._from_gradients(direction, grads, losses)
        smoothed = self._smoothed(direction, grads)
        return res, smoothed

    def _measure(self, direction: Direction) -> Result:
        chunked = any(len(cs) > 1 for cs in self._chunks.values())
        risks = (
            {_chunk_name(r, i): c for r, cs in self._chunks.items() for i, c in enumerate(cs) if has_labels(c)}
            if chunked
            else self.probes
        )
        res = measure(
            self.model,
            direction,
            risks,
            groups=self.groups,
            per_instance=self.per_instance,
            reduction=self.reduction,
            backend=self.backend,
            mode=self.mode,
            process_group=self.process_group,
            timeout=self.timeout,
        )
        return self._pooled(res) if chunked else res

    def _pooled(self, res: Result) -> Result:
        """The Result of the whole probe sets from that of their chunks: R = Σ_chunks (D_chunk/D)·R_chunk, so
        every total, group value and loss pools with those weights; per-instance rows are concatenated."""
        K, G = len(res.directions), len(res.groups)
        totals, instances, weights, counts, losses = {}, {}, {}, {}, {}
        for r, cs in self._chunks.items():
            n = _counts(self.probes[r])
            D = pool_size(n, self.reduction)
            tot = torch.zeros(K, G, dtype=torch.float64)
            loss = 0.0
            rows = []
            for i, c in enumerate(cs):
                key = _chunk_name(r, i)
                if key not in res.group_totals:  # a chunk with no labelled token: weight 0, e_b = 0
                    rows.append(torch.zeros(K, c["input_ids"].shape[0], G, dtype=torch.float64))
                    continue
                w = float(pool_size(res.n_tokens[key], self.reduction)) / float(D)
                tot += w * res.group_totals[key]
                loss += w * res.losses[key]
                if res.instances is not None:
                    rows.append(res.instances[key])
            totals[r], losses[r], counts[r] = tot, loss, n
            weights[r] = reduction_weights(n, D, self.reduction)
            if res.instances is not None:
                instances[r] = torch.cat(rows, dim=1)
        return Result(
            directions=res.directions,
            risks=tuple(self.probes),
            groups=res.groups,
            reduction=self.reduction,
            group_totals=totals,
            instances=instances if res.instances is not None else None,
            weights=weights,
            n_tokens=counts,
            losses=losses,
            uncovered=res.uncovered,
            meta={**res.meta, "probe_batch_size": self.probe_batch_size},
        )

    def _risk_gradients(self, direction: Direction) -> tuple[dict[str, dict[str, Tensor]], dict[str, float]]:
        """∇R of every probe set over the direction's parameters (one ordinary backward per chunk, pooled with
        the chunks' weights D_chunk/D) and R itself. Parameters R does not depend on are left out (zero)."""
        named = dict(self.model.named_parameters())
        mentioned = set(direction.keys()) | set(direction.zero)
        keys = [n for n in named if n in mentioned]
        plist = [named[n] for n in keys]
        grads: dict[str, dict[str, Tensor]] = {}
        losses: dict[str, float] = {}
        with preserved(self.model, mode=self.mode):
            for p in named.values():
                p.requires_grad_(False)
            for p in plist:
                p.requires_grad_(True)
            for r, cs in self._chunks.items():
                D = pool_size(_counts(self.probes[r]), self.reduction)
                acc: dict[str, Tensor] = {}
                loss = 0.0
                for w, c in weighted_chunks(cs, D, self.reduction):
                    R = risk(self.model, c, self.reduction)
                    if not bool(torch.isfinite(R.detach())):
                        raise ValueError(f"probe set {r!r}: the risk is not finite ({R.item()})")
                    loss += w * float(R.detach())
                    for n, g in zip(keys, torch.autograd.grad(R * w, plist, allow_unused=True)):
                        if g is None:
                            continue
                        g = g.to(torch.promote_types(g.dtype, torch.float32))
                        if n in acc:
                            acc[n] += g
                        else:
                            acc[n] = g
                    del R
                grads[r], losses[r] = acc, loss
        return grads, losses

    def _grouping_of(self) -> groups_mod.Grouping:
        if self._grouping is None:
            self._grouping = groups_mod.assign(self.model, self.groups, [n for n, _ in self.model.named_parameters()])
        return self._grouping

    def _group_dots(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
        """[G] float64: Σ over each group's parameters of ⟨a_p, b_p⟩ (a parameter missing from either is 0)."""
        grouping = self._grouping_of()
        out = torch.zeros(len(grouping), dtype=torch.float64)
        for n, t in a.items():
            u = b.get(n)
            if u is None:
                continue
            cols = grouping.columns(n)
            if isinstance(cols, tuple):  # split per expert: one dot per slice
                for e, col in enumerate(cols):
                    out[col] += float(torch.sum(t[e] * u[e].to(t.dtype), dtype=torch.float64))
            else:
                out[cols] += float(torch.sum(t * u.to(t.dtype), dtype=torch.float64))
        return out

    def _from_gradients(
        self, direction: Direction, grads: Mapping[str, Mapping[str, Tensor]], losses: Mapping[str, float]
    ) -> Result:
        """The unsmoothed G-effects ⟨∇R, v⟩ per group from ∇R itself (the smoothed pass has it anyway)."""
        grouping = self._grouping_of()
        totals, weights, counts = {}, {}, {}
        for r, g in grads.items():
            totals[r] = torch.stack(
                [self._group_dots(g, {n: t[k] for n, t in direction.items()}) for k in range(direction.k)]
            )
            n = _counts(self.probes[r])
            counts[r] = n
            weights[r] = reduction_weights(n, pool_size(n, self.reduction), self.reduction)
        return Result(
            directions=direction.names,
            risks=tuple(self.probes),
            groups=grouping.names,
            reduction=self.reduction,
            group_totals=totals,
            instances=None,
            weights=weights,
            n_tokens=counts,
            losses=dict(losses),
            meta={"strategy": "risk gradient (smoothed tracker)", "mode": self.mode},
        )

    def _smoothed(
        self, direction: Direction, grads: Mapping[str, Mapping[str, Tensor]]
    ) -> dict[str, dict[str, tuple[float, dict[str, float]]]]:
        """Update ḡ_R (per probe) and ḡ_u (per direction) by ḡ ← 0.6·ḡ + 0.4·g (ḡ = g the first time; a
        parameter not yet seen counts as ḡ = 0), then ⟨ḡ_R, ḡ_u⟩ per group for every direction and probe."""
        first = self._n_smoothed == 0
        a, b = SMOOTHING, 1.0 - SMOOTHING

        def update(state: dict[str, Tensor], new: Mapping[str, Tensor], owned: bool) -> None:
            for n in list(state):
                if n not in new:
                    state[n].mul_(a)
            for n, g in new.items():
                if n in state:
                    state[n].mul_(a).add_(g.to(state[n].dtype), alpha=b)
                elif first:
                    state[n] = g if owned else g.clone()
                else:
                    state[n] = g * b

        for r, g in grads.items():
            update(self._gbar_R.setdefault(r, {}), g, owned=True)
        for k, name in enumerate(direction.names):
            new = {n: t[k].to(torch.promote_types(t.dtype, torch.float32)) for n, t in direction.items()}
            update(self._gbar_u.setdefault(name, {}), new, owned=False)
        self._n_smoothed += 1
        names = self._grouping_of().names
        out: dict[str, dict[str, tuple[float, dict[str, float]]]] = {}
        for name in direction.names:
            out[name] = {}
            for r in grads:
                dots = self._group_dots(self._gbar_R[r], self._gbar_u[name])
                out[name][r] = (float(dots.sum()), {g: float(x) for g, x in zip(names, dots)})
        return out

    def _averaged(self, d: Direction) -> Direction:
        """Under DDP, the mean over ranks of a direction each rank took on its own batch (as DDP averages
        gradients), so that every rank measures the same one."""
        if self._comm is None:
            return d
        comm = self._comm
        keys = sorted(d.keys())
        comm.agree("averaging a compare direction", check=dist_mod.fingerprint(d.names, keys))
        out = {}
        for k in keys:  # one parameter at a time: no flat copy of the whole direction
            t = d.tensor(k)
            mean = comm.sum(t, "averaging a compare direction") / comm.world
            out[k] = mean.to(device=t.device, dtype=t.dtype)
        return Direction(out, names=d.names, zero=d.zero)

    @contextmanager
    def _at(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        """Temporarily give the model the parameter values ``params`` by swapping storages (no copy)."""
        named = dict(self.model.named_parameters())
        swapped = []
        try:
            for n, t in params.items():
                p = named[n]
                saved = p.data
                p.data = t
                swapped.append((p, saved))
            yield
        finally:
            for p, saved in swapped:
                p.data = saved

    def _risks(self) -> dict[str, float]:
        """R of each probe set (pooled over the ranks' batches under DDP)."""
        with preserved(self.model, mode=self.mode), torch.no_grad():
            if self._comm is None and all(len(cs) == 1 for cs in self._chunks.values()):
                return {r: float(risk(self.model, b, self.reduction)) for r, b in self.probes.items()}
            if self._comm is None:
                out = {}
                for r, cs in self._chunks.items():
                    parts = [risk_parts(self.model, c, self.reduction) for c in cs if has_labels(c)]
                    out[r] = float(sum(S for S, _ in parts) / sum(D for _, D in parts))
                return out
            parts = torch.stack(
                [torch.stack(risk_parts(self.model, b, self.reduction)).cpu() for b in self.probes.values()]
            )
        total = self._comm.sum(parts, "measuring the probe risks")
        return {r: float(total[i, 0] / total[i, 1]) for i, r in enumerate(self.probes)}

    def _vhv(self, v: Direction) -> dict[str, float]:
        """vᵀ∇²R v per probe set, by one Hessian-vector product each (double backward)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        out = {}
        # the fused attention kernels have no double backward: use the math one for the HVP
        with preserved(self.model, mode=self.mode), sdpa_kernel(SDPBackend.MATH):
            names = [n for n, p in self.model.named_parameters() if p.requires_grad and n in v.keys()]
            params = dict(self.model.named_parameters())
            plist = [params[n] for n in names]
            vs = [v.tensor(n)[0].to(params[n].dtype) for n in names]
            for r, cs in self._chunks.items():
                D = pool_size(_counts(self.probes[r]), self.reduction)
                out[r] = 0.0
                # vᵀ∇²R v = Σ_chunks (D_chunk/D)·vᵀ∇²R_chunk v
                for w, c in weighted_chunks(cs, D, self.reduction):
                    R = risk(self.model, c, self.reduction)
                    grads = torch.autograd.grad(R, plist, create_graph=True, allow_unused=True)
                    dot = sum((g * t).sum() for g, t in zip(grads, vs) if g is not None)
                    hv = torch.autograd.grad(dot, plist, allow_unused=True)
                    out[r] += w * float(sum((h.double() * t.double()).sum() for h, t in zip(hv, vs) if h is not None))
        if self._comm is not None:  # R = Σ_r (D_r/D) R_r over ranks, so vᵀ∇²R v = Σ_r D_r·(vᵀ∇²R_r v) / D
            dens = [float(pool_size(_counts(b), self.reduction)) for b in self.probes.values()]
            x = torch.tensor([[d * out[r], d] for d, r in zip(dens, self.probes)], dtype=torch.float64)
            total = self._comm.sum(x, "pooling the curvature")
            out = {r: float(total[i, 0] / total[i, 1]) for i, r in enumerate(self.probes)}
        return out

    def _record(self, pending: dict[str, Any], after: dict[str, float] | None) -> list[dict[str, Any]]:
        res: Result = pending["result"]
        lr = pending["lr"]
        taken = self.name
        new = []
        for name in res.directions:
            sub = res[name]
            for r in res.risks:
                total = sub.total[r]
                key = (name, r)
                self.cumulative[key] = self.cumulative.get(key, 0.0) + total
                cg = self.cumulative_groups.setdefault(key, {})
                for g, val in sub.by_group[r].items():
                    cg[g] = cg.get(g, 0.0) + val
                is_taken = name == taken
                rec = {
                    "step": pending["step"],
                    "objective": name,
                    "kind": self.direction if is_taken else "compare",
                    "risk": r,
                    "total": total,
                    "groups": sub.by_group[r],
                    "cumulative": self.cumulative[key],
                    "lr": lr,
                    "loss": res.loss[r],
                    "train_loss": pending["train_loss"],
                    "predicted_dR": -lr * total,
                    "predicted_dR_2nd": None,
                    "measured_dR": (after[r] - res.loss[r]) if is_taken and after is not None else None,
                }
                if pending.get("smoothed") is not None:
                    rec["smoothed_total"], rec["smoothed_groups"] = pending["smoothed"][name][r]
                if is_taken and pending.get("vhv") is not None:
                    rec["predicted_dR_2nd"] = -lr * total + 0.5 * lr * lr * pending["vhv"][r]
                # what −lr·e predicts: the real step only for the update direction
                rec["prediction"] = "optimiser step" if rec["kind"] == "update" else "plain SGD step"
                if self.per_instance:
                    rec["per_instance"] = [[None if x != x else float(x) for x in row] for row in sub.per_instance[r]]
                new.append(rec)
        self.records.extend(new)
        logs.append(self.log_path, new)
        return new

    # -- reading -----------------------------------------------------------------------------------------
    @property
    def smoothed_state_bytes(self) -> int:
        """Bytes held by the smoothed state (ḡ_R per probe set and ḡ_u per direction; 0 without ``smooth``)."""
        stores = (*self._gbar_R.values(), *self._gbar_u.values())
        return sum(t.numel() * t.element_size() for store in stores for t in store.values())

    def fidelity(self) -> list[dict[str, Any]]:
        """Per measured step and probe: measured ΔR beside the first- (and second-) order predictions."""
        return [
            {k: r[k] for k in ("step", "risk", "measured_dR", "predicted_dR", "predicted_dR_2nd")}
            for r in self.records
            if r["measured_dR"] is not None
        ]

    def summary(self) -> str:
        """Cumulative G-effects per direction and probe, and the latest fidelity numbers."""
        lines = [f"{'objective':<14}{'risk':<10}{'cumulative':>14}{'last e':>14}{'last dR':>14}{'pred dR':>14}  of"]
        last: dict[tuple[str, str], dict[str, Any]] = {}
        for r in self.records:
            last[(r["objective"], r["risk"])] = r
        for (name, risk_name), r in last.items():
            md = "" if r["measured_dR"] is None else f"{r['measured_dR']:.3e}"
            lines.append(
                f"{name:<14}{risk_name:<10}{self.cumulative[(name, risk_name)]:>14.4e}{r['total']:>14.4e}"
                f"{md:>14}{r['predicted_dR']:>14.3e}  {r['prediction']}"
            )
        return "\n".join(lines)


def _check_options(direction: str, every: int, probes: Mapping[str, Any], probe_batch_size: int | None) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if not probes:
        raise ValueError("probes must name at least one risk set, e.g. {'unlearn': forget, 'retain': retain}")
    if probe_batch_size is not None and probe_batch_size < 1:
        raise ValueError(f"probe_batch_size must be >= 1 (or None), got {probe_batch_size}")


def _probe_group(model: nn.Module, process_group: Any, smooth: bool, probe_batch_size: int | None) -> Any:
    """The process group the probes are pooled over (DDP), or None; the options a group does not support refused."""
    group = dist_mod.resolve_group(model, process_group)
    if dist_mod.sharded_mesh(unwrap(model)) is not None:
        raise NotImplementedError(
            "Tracker does not support FSDP2-sharded models yet (the update direction swaps parameter storages "
            "and the curvature term needs a double backward); call geffect_fast.measure() with "
            "Direction.from_grads(model) in your loop instead"
        )
    if group is not None and (smooth or probe_batch_size is not None):
        raise NotImplementedError(
            "smooth=True and probe_batch_size are single-process options for now; under a process group leave "
            "them unset (or pass process_group=None to track this rank's probes alone)"
        )
    return group


def _chunked(probes: Mapping[str, Mapping[str, Tensor]], size: int | None) -> dict[str, list[dict[str, Tensor]]]:
    """Each probe set in chunks of ``size`` rows (:func:`~geffect_fast.loss.row_chunks`); chunk names must not clash
    with probes."""
    chunks = {r: row_chunks(b, size) for r, b in probes.items()}
    names = {_chunk_name(r, i) for r, cs in chunks.items() if len(cs) > 1 for i in range(len(cs))}
    if names & set(probes):
        raise ValueError(f"probe names must not look like chunk names {sorted(names & set(probes))}")
    return chunks


def _chunk_name(risk_name: str, i: int) -> str:
    return f"{risk_name}[{i}]"


def _counts(batch: Mapping[str, Tensor]) -> Tensor:
    """n_b per sample of a probe batch (per packed sample where its rows are packed), on the CPU."""
    return sample_counts(batch, packed_samples(batch)).cpu()
