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

Fidelity: the measured ΔR = R(θ_after) − R(θ_before) on each probe set, beside the first-order prediction
−lr·e and, with ``curvature=True``, the second-order one −lr·e + ½·lr²·vᵀ∇²R v (one Hessian-vector
product per probe set, by double backward). At small steps both track the measured ΔR (AdamW at lr 1e-4 on
a tiny GPT-2: within 1%, the second order closer); at large ones neither does — one SGD step of GA at
lr 0.2 on a tiny Llama overshoots by ~70% at first order and further at second (tests/test_tracker.py).
``compare={"GA": objective, ...}`` also measures, at the same θ
and in the same pass, the G-effects of other objectives' gradients on ``compare_batch`` (their ΔR is
predicted, not measured: they were not taken). In one process they are factored directions
(``Direction.from_objective(..., factored=True)``): per layer, ``measure()`` contracts their factors or forms
their V, whichever its cost model predicts is faster; the taken direction stays dense.

Under DDP (pass the DDP-wrapped model; each rank gives its own probe batches): the directions are the
ranks' common ones (DDP's averaged gradient, the same update), compare directions are averaged over ranks
as DDP would average them, and every probe quantity — G-effects, R, measured ΔR and the curvature term —
is the one of the union of the ranks' probe batches; every rank gets the same records. FSDP2-sharded models
are refused (use :func:`geffect_fast.measure` with ``Direction.from_grads`` in the loop).

Records (kept in ``tracker.records`` and, with ``log=``, appended to a JSONL file): ``step``,
``objective`` (``name``, default the direction kind; or a compare name), ``kind`` ("gradient", "update" or
"compare"), ``risk``, ``total``,
``groups``, ``cumulative`` (sum of ``total`` over the measured steps), ``lr``, ``loss`` (R at θ_before),
``train_loss``, ``predicted_dR``, ``predicted_dR_2nd``, ``measured_dR``, ``prediction`` (what predicted_dR
= −lr·e predicts: "optimiser step" for the update direction, "plain SGD step" of size lr along v otherwise — with
Adam not the step taken), and ``per_instance`` when asked.
With ``every=k`` only every k-th step is measured and cumulative sums run over the measured steps.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from . import distributed as dist_mod
from .api import measure, unwrap
from .direction import Direction
from .loss import label_counts, pool_size, risk, risk_parts
from .objectives import Objective
from .result import Result
from .state import preserved

DIRECTIONS = ("gradient", "update")


def _scalar(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


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
        compare: Mapping[str, Objective] | None = None,
        compare_batch: Any = None,
        ref_model: nn.Module | None = None,
        curvature: bool = False,
        name: str | None = None,
        process_group: Any = "auto",
        timeout: float = 600.0,
    ):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not probes:
            raise ValueError("probes must name at least one risk set, e.g. {'unlearn': forget, 'retain': retain}")
        if compare and compare_batch is None:
            compare_batch = probes.get("unlearn", next(iter(probes.values())))
        group = dist_mod.resolve_group(model, process_group)
        if dist_mod.sharded_mesh(unwrap(model)) is not None:
            raise NotImplementedError(
                "Tracker does not support FSDP2-sharded models yet (the update direction swaps parameter storages "
                "and the curvature term needs a double backward); call geffect_fast.measure() with "
                "Direction.from_grads(model) in your loop instead"
            )
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
        self.compare = dict(compare or {})
        self.compare_batch = compare_batch
        self.ref_model = ref_model
        self.curvature = curvature
        #: the name the taken direction has in the records (default: "gradient" or "update")
        self.name = name or direction
        if self.name in self.compare:
            raise ValueError(f"compare names must differ from the tracked direction's name {self.name!r}")
        self.n_steps = 0
        self.records: list[dict[str, Any]] = []
        self.cumulative: dict[tuple[str, str], float] = {}
        self.cumulative_groups: dict[tuple[str, str], dict[str, float]] = {}
        self.log_path = Path(log) if log is not None else None
        if self.log_path is not None:
            if self.log_path.is_file() and self.log_path.stat().st_size > 0:
                raise FileExistsError(
                    f"log file {self.log_path} exists and holds records (of an earlier run?); remove it or pass "
                    "another path — the tracker starts its log empty and will not overwrite it"
                )
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")
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
        lr = float(optimizer.param_groups[0]["lr"])
        if lr <= 0:
            raise ValueError(f"the optimiser's learning rate is {lr}; G-effect predictions need lr > 0")
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        pending: dict[str, Any] = {"lr": lr, "train_loss": _scalar(loss), "step": self.n_steps}
        # one process: compare directions stay factored, and measure() forms a layer's V only where that is
        # cheaper (geffect_fast.factored); under DDP they are averaged over the ranks, so formed
        factored = self._comm is None
        compare_dirs = {
            name: self._averaged(
                Direction.from_objective(
                    self.model, obj, self.compare_batch, ref_model=self.ref_model, name=name, factored=factored
                )
            )
            for name, obj in self.compare.items()
        }
        if self.direction == "gradient":
            v = Direction.from_grads(self.model, name=self.name)
            stacked = Direction.stack({self.name: v, **compare_dirs}) if compare_dirs else v
            pending["result"] = self._measure(stacked)
            pending["vhv"] = self._vhv(v) if self.curvature else None
        else:
            pending["before"] = {n: p.detach().clone() for n, p in trainable.items()}
            pending["compare_dirs"] = compare_dirs
        self._pending = pending

    def end(self) -> list[dict[str, Any]]:
        """Call right after ``optimizer.step()``; returns this step's records (empty when not measured)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
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
                pending["result"] = self._measure(stacked)
                pending["vhv"] = self._vhv(v) if self.curvature else None
        after = self._risks()
        return self._record(pending, after)

    def _abort(self) -> None:
        self._pending = None

    # -- pieces ------------------------------------------------------------------------------------------
    def _measure(self, direction: Direction) -> Result:
        return measure(
            self.model,
            direction,
            self.probes,
            groups=self.groups,
            per_instance=self.per_instance,
            reduction=self.reduction,
            backend=self.backend,
            mode=self.mode,
            process_group=self.process_group,
            timeout=self.timeout,
        )

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
            if self._comm is None:
                return {r: float(risk(self.model, b, self.reduction)) for r, b in self.probes.items()}
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
            for r, batch in self.probes.items():
                R = risk(self.model, batch, self.reduction)
                grads = torch.autograd.grad(R, plist, create_graph=True, allow_unused=True)
                dot = sum((g * t).sum() for g, t in zip(grads, vs) if g is not None)
                hv = torch.autograd.grad(dot, plist, allow_unused=True)
                out[r] = float(sum((h.double() * t.double()).sum() for h, t in zip(hv, vs) if h is not None))
        if self._comm is not None:  # R = Σ_r (D_r/D) R_r over ranks, so vᵀ∇²R v = Σ_r D_r·(vᵀ∇²R_r v) / D
            dens = [float(pool_size(label_counts(b["labels"]), self.reduction)) for b in self.probes.values()]
            x = torch.tensor([[d * out[r], d] for d, r in zip(dens, self.probes)], dtype=torch.float64)
            total = self._comm.sum(x, "pooling the curvature")
            out = {r: float(total[i, 0] / total[i, 1]) for i, r in enumerate(self.probes)}
        return out

    def _record(self, pending: dict[str, Any], after: dict[str, float]) -> list[dict[str, Any]]:
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
                    "measured_dR": (after[r] - res.loss[r]) if is_taken else None,
                }
                if is_taken and pending.get("vhv") is not None:
                    rec["predicted_dR_2nd"] = -lr * total + 0.5 * lr * lr * pending["vhv"][r]
                # what −lr·e predicts: the real step only for the update direction
                rec["prediction"] = "optimiser step" if rec["kind"] == "update" else "plain SGD step"
                if self.per_instance:
                    rec["per_instance"] = [[None if x != x else float(x) for x in row] for row in sub.per_instance[r]]
                new.append(rec)
        self.records.extend(new)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                for rec in new:
                    f.write(json.dumps(rec) + "\n")
        return new

    # -- reading -----------------------------------------------------------------------------------------
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
