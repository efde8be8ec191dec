"""G-effect-guided unlearning: read the G-effects of the step about to be taken and steer it.

    guide = gf.Guide(model, probes={"unlearn": forget_batch, "retain": retain_batch},
                     policies=("stop", "layers", "samples"), log="run/guide.jsonl")
    for batch in loader:
        loss = guide.weighted(objective, batch, ref)    # Σ_j w_j ℓ^obj_j (plain L_u without "samples")
        loss.backward()
        if not guide.step(optimizer):                   # measure, scale groups, optimizer.step(), log
            break
        optimizer.zero_grad()

Sign convention (as everywhere here): e_R = ⟨∇R, v⟩ and a step θ − η·v changes R by about −η·e_R, so an
unlearning G-effect e_u < 0 raises the forget NLL (wanted) and a retaining G-effect e_r < 0 raises the retain
NLL (harm). v is the gradient in ``.grad`` when :meth:`Guide.step` is entered (after accumulation and any
clipping): the paper's G-effect, ``Tracker(direction="gradient")``. With Adam the step taken is not along
v; the rules below read the gradient's G-effects as the signal, not as a prediction of ΔR.

What is measured: the probe gradients d_u = ∇R_u and d_r = ∇R_r, R the mean token NLL of each probe set
(``gf.risk``, ``measure``'s default reduction), one ordinary forward+backward of each probe batch, kept as one
stacked [2, *shape] tensor per trainable parameter (2·|θ| of memory). Every G-effect the policies read is a dot
with them: the gradient's e_{R,g} = ⟨d_R, v⟩ over group g (``stop``, ``layers``: no further pass) and each forget
sample's ⟨d_R, ∇ℓ^obj_j⟩ (``samples``: one pass of :func:`~geffect_fast.objective_effects`). ``every=k``
measures d at θ of every k-th step and reuses it for the k − 1 steps between (``every=1``, the default: the exact
G-effects at θ of each step; k > 1: e_R = ⟨∇R(θ_s), v_t⟩ with s the last step measured, a first-order
approximation that gets worse as θ moves — the cost of the probes divided by k).

Policies (each on its own or combined; ``e_{R,g}`` the G-effect of group g, ``e_R = Σ_g e_{R,g}``):

``"layers"``: H = {g : e_{r,g} < 0} (groups whose gradient harms retention), cost c_g = −e_{r,g} /
max(−e_{u,g}, ε) for g ∈ H, τ = the ``quantile``-quantile of {c_g : g ∈ H} (linear interpolation); every
g ∈ H with c_g ≥ τ has its ``.grad`` multiplied by ``factor`` before ``optimizer.step()``. Knobs:
``quantile=0.75``, ``factor=0.0``, ``eps=1e-12``. ``scale="grad"`` (default) scales the gradient, which is
what SGD steps along; Adam normalises it per coordinate, so a factor ≠ 0 barely changes Adam's step and a
factor 0 removes only the fresh gradient — the group still moves by its momentum, m/(√v + ε).
``scale="update"`` scales the step itself: the chosen groups' parameters are set to θ_before + factor·Δθ
after ``optimizer.step()`` (exact for any optimiser; costs a copy of those groups' parameters per step;
the optimiser's state still saw the unscaled gradient).

``"stop"``: from the G-effects of the step about to be taken (after ``layers``' scaling: e_R = Σ_g s_g
e_{R,g}), the marginal unlearning per unit retention cost ρ = max(−e_u, 0) / max(−e_r, ε) when e_r < 0
(ρ = ∞ when the step does not harm retention). Stop when ρ < ``threshold`` for ``patience`` consecutive
steps, or when the forget NLL (R on the unlearn probe at the current θ) is ≥ ``target_forget_nll``. The
step that triggers it is not taken; :meth:`Guide.step` returns False (and keeps returning False). Knobs:
``threshold=1.0`` (stop once a step would raise the retain NLL more than the forget NLL), ``patience=2``,
``target_forget_nll=None``. ``anneal=a`` (a in (0, 1)): where the ratio rule fires, multiply every parameter
group's learning rate by a, take the step and count again, instead of stopping (the target still stops). A
scheduler that sets the learning rate each step (``transformers.Trainer``'s) overrides it: there, anneal has no
lasting effect.

Cost of ``stop``/``layers`` per step: one forward+backward of each probe batch every ``every`` steps, and two
dots with the gradient — plus, with ``scale="update"``, a copy of the scaled groups' parameters.

``"samples"``: in :meth:`Guide.weighted`, the G-effects of each forget sample j's share of the objective on the
probe risks, u_j = ⟨∇R_u, ∇ℓ^obj_j⟩ and h_j = ⟨∇R_r, ∇ℓ^obj_j⟩ (:func:`~geffect_fast.objective_effects`, exact
per sample). Benefit b_j = max(−u_j, 0), harm c_j = max(−h_j, 0), efficiency s_j = b_j / (b_j + c_j) (0 where
b_j + c_j = 0), w_j = clip(s_j / mean_k s_k, lo, hi) (all 1 where every s_j = 0), and the loss is
Σ_j w_j ℓ^obj_j (+ the objective's retain term, unweighted). The weights are detached. s_j does not change when
sample j's gradient is scaled by a positive factor: the rule reads the direction of each sample's gradient, not
its size. Knobs: ``clip=(0.0, 3.0)``. Cost per call: one tap pass of the objective batch (about one
forward+backward), beside the loss's own forward+backward, and the probe gradients when due.

``"project"``: after ``optimizer.step()``, per group g, the step taken Δθ_g (any optimiser: what it did) becomes
Δθ_g − max(⟨d_r,g, Δθ_g⟩, 0) / ‖d_r,g‖² · d_r,g: the step's first-order change of the retain probe's NLL,
⟨d_r,g, Δθ_g⟩, is made 0 in every group where it would rise; what is left of the forgetting is the part of the
step not along the retain gradient (gradient projection, per group). Applied after ``layers``' scaling. Knobs:
none. Cost: a copy of the trainable parameters per step (θ before the step) and three dots per parameter; the
optimiser's state saw the unprojected gradient. Logged: ``projected`` = {group: ‖removed‖ / ‖Δθ_g‖}.

Decisions (``guide.decisions``, and one JSON line per step in ``log``): ``step``, ``lr``, ``forget_nll``,
``retain_nll`` (at θ before the step), ``e_unlearn``, ``e_retain`` (after scaling), ``ratio`` (ρ; null when
∞), ``scaled_groups`` ({group: factor}), ``annealed`` (why the learning rate was cut, or null),
``sample_weights`` (the weights of the last :meth:`weighted` call before this step, or null), ``taken``
(whether the optimiser stepped), ``stop``, ``reason``, ``probe_age`` (steps since the probe gradients were
measured: 0 when at θ of this step), ``projected`` ({group: share removed}, ``project``), ``seconds`` (the
guide's own time this step, weighting and projection included).
``forget_nll`` and ``retain_nll`` are those of the probe measurement (null on the steps that reuse it; the
``target_forget_nll`` test runs on measured steps only).
``probe_batch=n`` measures each probe set n rows per forward+backward (the gradients added: the same ∇R, in
bounded memory; a packed probe batch goes whole).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import distributed as dist_mod
from . import groups as groups_mod
from . import logs
from .directions import Direction
from .engine import unwrap
from .loss import has_labels, packed_samples, pool_size, risk, row_chunks, sample_counts, weighted_chunks
from .objective_samples import objective_effects
from .objectives import forget_part, resolve
from .state import preserved

POLICIES = ("stop", "layers", "samples", "project")
#: what ``Guide`` runs unless told: the three policies of issue 22 (``project`` is opt-in)
DEFAULT_POLICIES = ("stop", "layers", "samples")
SCALES = ("grad", "update")


def parse_policies(policies: str | Sequence[str]) -> tuple[str, ...]:
    """``"stop,layers"`` or ``("stop", "layers")`` -> the policies in their canonical order (unknown refused)."""
    names = [p.strip() for p in policies.split(",")] if isinstance(policies, str) else list(policies)
    names = [p for p in names if p]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise ValueError(f"unknown guide policies {bad or names}; use one or more of {', '.join(POLICIES)}")
    return tuple(p for p in POLICIES if p in names)


def layer_scales(
    e_unlearn: Mapping[str, float], e_retain: Mapping[str, float], quantile: float, factor: float, eps: float
) -> dict[str, float]:
    """The ``layers`` rule: {group: factor} for the harmful groups (e_r,g < 0) whose cost −e_r,g/max(−e_u,g, ε)
    is at least the ``quantile``-quantile of the harmful groups' costs."""
    cost = {g: -e / max(-e_unlearn[g], eps) for g, e in e_retain.items() if e < 0}
    if not cost:
        return {}
    tau = float(torch.quantile(torch.tensor(list(cost.values()), dtype=torch.float64), quantile))
    return {g: float(factor) for g, c in cost.items() if c >= tau}


def stop_ratio(e_unlearn: float, e_retain: float, eps: float) -> float:
    """ρ = max(−e_u, 0) / max(−e_r, ε) where the step harms retention (e_r < 0), else ∞."""
    if e_retain >= 0:
        return math.inf
    return max(-e_unlearn, 0.0) / max(-e_retain, eps)


def sample_weights(u: Tensor, h: Tensor, clip: tuple[float, float]) -> Tensor:
    """The ``samples`` rule: w_j = clip(s_j / mean s, lo, hi), s_j = b_j/(b_j + c_j), b = max(−u, 0),
    c = max(−h, 0); all ones where every s_j is 0."""
    b = (-u.double()).clamp(min=0)
    c = (-h.double()).clamp(min=0)
    tot = b + c
    s = torch.where(tot > 0, b / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(tot))
    if float(s.sum()) == 0.0:
        return torch.ones_like(s)
    return (s / s.mean()).clamp(clip[0], clip[1])


class Guide:
    def __init__(
        self,
        model: nn.Module,
        probes: Mapping[str, Mapping[str, Tensor]],
        policies: str | Sequence[str] = DEFAULT_POLICIES,
        groups: Any = "block",
        threshold: float = 1.0,
        patience: int = 2,
        target_forget_nll: float | None = None,
        anneal: float | None = None,
        quantile: float = 0.75,
        factor: float = 0.0,
        scale: str = "grad",
        clip: tuple[float, float] = (0.0, 3.0),
        eps: float = 1e-12,
        log: str | Path | None = None,
        backend: str = "auto",
        mode: str = "eval",
        every: int = 1,
        probe_batch: int | None = None,
    ):
        self.policies = parse_policies(policies)
        missing = {"unlearn", "retain"} - set(probes)
        if missing:
            raise ValueError(f"Guide needs probes 'unlearn' (forget data) and 'retain'; missing {sorted(missing)}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if patience < 1 or not 0.0 <= quantile <= 1.0 or clip[0] > clip[1] or eps <= 0:
            raise ValueError("need patience >= 1, 0 <= quantile <= 1, clip=(lo, hi) with lo <= hi and eps > 0")
        if probe_batch is not None and (not isinstance(probe_batch, int) or probe_batch < 1):
            raise ValueError(f"probe_batch must be a number of rows >= 1 (or None: whole), got {probe_batch!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a whole number of steps >= 1, got {every!r}")
        if anneal is not None and not 0.0 < anneal < 1.0:
            raise ValueError(f"anneal must be a factor in (0, 1) (or None: stop), got {anneal}")
        if dist_mod.resolve_group(model, "auto") is not None:
            raise NotImplementedError("Guide is single-process for now: the model is wrapped in DDP or sharded (FSDP2)")
        self.model = unwrap(model)
        self.probes = {"unlearn": probes["unlearn"], "retain": probes["retain"]}
        self.groups = groups
        self.threshold, self.patience, self.target_forget_nll = float(threshold), int(patience), target_forget_nll
        #: None: the ratio rule stops; a factor: it multiplies the learning rate by it instead (and starts counting
        #: again)
        self.anneal = anneal
        self.quantile, self.factor, self.scale = float(quantile), float(factor), scale
        self.clip = (float(clip[0]), float(clip[1]))
        self.eps = float(eps)
        self.backend, self.mode = backend, mode
        #: measure the probe gradients at θ of every ``every``-th step (1: every step, exact)
        self.every = every
        #: rows of a probe set per forward+backward (None: the whole set at once); the gradient is pooled exactly
        self.probe_batch = probe_batch
        #: one dict per step() call (see the module docstring)
        self.decisions: list[dict[str, Any]] = []
        self.n_steps = 0
        self.stopped = False
        self.streak = 0  #: consecutive steps with ρ < threshold
        self.log_path = logs.empty_log(log, "guide")
        self._weights: list[float] | None = None
        self._weight_seconds = 0.0
        self._pending: dict[str, Any] | None = None
        self._grouping: groups_mod.Grouping | None = None
        #: the probe gradients [∇R_u, ∇R_r] per trainable parameter, the step they were measured at, their NLLs
        self._d: dict[str, Tensor] | None = None
        self._d_at = -1
        self._d_nll: dict[str, float] = {}

    # -- the loop ----------------------------------------------------------------------------------------
    def weighted(self, objective: Any, batch: Any, ref_model: nn.Module | None = None) -> Tensor:
        """The objective's loss with each forget sample weighted by the ``samples`` rule: Σ_j w_j ℓ^obj_j (+ its
        retain term); without the ``samples`` policy, the objective's loss itself."""
        objective = resolve(objective)
        if "samples" not in self.policies:
            return objective(self.model, batch, ref_model)
        if not callable(getattr(objective, "per_sample", None)):
            raise TypeError(f"the samples policy needs an objective with per_sample(), not {objective!r}")
        t0 = time.perf_counter()
        forget_only = forget_part(objective)
        d = Direction(self.probe_grads(), names=("unlearn", "retain"))
        E = objective_effects(self.model, forget_only, batch, d, self.groups, ref_model, self.backend, self.mode)
        w = sample_weights(E.total("unlearn"), E.total("retain"), self.clip)
        self._weights = [float(x) for x in w]
        self._weight_seconds += time.perf_counter() - t0
        per = forget_only.per_sample(self.model, batch, ref_model)
        loss = (w.to(device=per.device, dtype=per.dtype) * per).sum()
        if forget_only is not objective:
            loss = loss + objective.retain_loss(self.model, batch, ref_model)
        return loss

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Measure the gradient's G-effects, scale the chosen groups, take ``optimizer.step()`` unless the stop
        rule fires, log the decision; returns whether to go on. On an error nothing is changed: ``.grad`` and
        the guide's state are as before the call."""
        go = self.begin(optimizer)
        try:
            if go:
                optimizer.step()
        except BaseException:
            self.abort()
            raise
        self.end()
        return go

    def begin(self, optimizer: torch.optim.Optimizer) -> bool:
        """Before ``optimizer.step()``: measure, decide, scale ``.grad``; returns whether to take the step."""
        if self._pending is not None:
            raise RuntimeError("Guide.begin() called twice without end() or abort()")
        t0 = time.perf_counter()
        dec: dict[str, Any] = {
            "step": self.n_steps + 1,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "sample_weights": self._weights,
            **dict.fromkeys(("forget_nll", "retain_nll", "e_unlearn", "e_retain", "ratio")),
            "scaled_groups": {},
            "annealed": None,
            "probe_age": None,
            "projected": {},
        }
        reason, streak = ("stopped earlier" if self.stopped else None), self.streak
        if not self.stopped and {"stop", "layers", "project"} & set(self.policies):
            eu, er = self.effects()
            dec["probe_age"] = self.n_steps - self._d_at
            if dec["probe_age"] == 0:
                dec["forget_nll"], dec["retain_nll"] = self._d_nll["unlearn"], self._d_nll["retain"]
            if "layers" in self.policies:
                dec["scaled_groups"] = layer_scales(eu, er, self.quantile, self.factor, self.eps)
            s = dec["scaled_groups"]
            dec["e_unlearn"] = sum(s.get(g, 1.0) * e for g, e in eu.items())
            dec["e_retain"] = sum(s.get(g, 1.0) * e for g, e in er.items())
            ratio = stop_ratio(dec["e_unlearn"], dec["e_retain"], self.eps)
            dec["ratio"] = None if math.isinf(ratio) else ratio
            if "stop" in self.policies:
                streak = streak + 1 if ratio < self.threshold else 0
                reason = self._stop_reason(dec, streak)
        lrs = None
        if reason is not None and self.anneal is not None and reason.startswith("ratio"):
            lrs = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.anneal
            dec["annealed"], reason, streak = f"{reason}: lr × {self.anneal:g}", None, 0
        dec["stop"], dec["reason"], dec["taken"] = reason is not None, reason, reason is None
        theta = None
        if reason is None and "project" in self.policies:
            theta = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        saved = self._apply(dec["scaled_groups"], theta) if reason is None else []
        dec["seconds"] = time.perf_counter() - t0 + self._weight_seconds
        self._pending = {
            "decision": dec,
            "saved": saved,
            "streak": streak,
            "lrs": lrs,
            "optimizer": optimizer,
            "theta": theta,
        }
        return reason is None

    def end(self) -> dict[str, Any]:
        """After ``optimizer.step()`` (or in its place when begin() said stop): finish and log the decision."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("Guide.end() without begin()")
        dec = pending["decision"]
        t0 = time.perf_counter()
        if self.scale == "update" and dec["taken"]:
            with torch.no_grad():
                for p, factor, before, _ in pending["saved"]:
                    p.copy_(before + factor * (p - before))
        if pending["theta"] is not None:
            dec["projected"] = self._project(pending["theta"])
        dec["seconds"] += time.perf_counter() - t0
        self.n_steps += 1
        self.streak = pending["streak"]
        self.stopped = self.stopped or dec["stop"]
        self._weights, self._weight_seconds = None, 0.0
        self.decisions.append(dec)
        logs.append(self.log_path, [dec])
        return dec

    def abort(self) -> None:
        """Undo begin(): the scaled gradients come back as they were (the guide's state was not advanced)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        with torch.no_grad():
            for p, _, _, grad in pending["saved"]:
                if grad is not None:
                    p.grad.copy_(grad)
        if pending["lrs"] is not None:  # an annealing undone
            for g, lr in zip(pending["optimizer"].param_groups, pending["lrs"]):
                g["lr"] = lr

    # -- what is measured --------------------------------------------------------------------------------
    def probe_grads(self) -> dict[str, Tensor]:
        """{parameter: [∇R_u, ∇R_r] stacked [2, *shape]} over the trainable parameters, R the mean token NLL of
        each probe set: measured at θ now when ``every`` steps have passed since the last time (or never), else
        the last measurement. Two ordinary forward+backward passes (``mode``'s train/eval mode); the model's
        ``.grad``, flags, mode and RNG state are left as they were."""
        if self._d is not None and self.n_steps - self._d_at < self.every:
            return self._d
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no parameter of the model requires grad: there is no update to guide")
        self._d = None  # the last measurement's memory goes before the next is made
        d = {n: torch.zeros((2, *p.shape), dtype=p.dtype, device=p.device) for n, p in named}
        nll = {}
        with preserved(self.model, mode=self.mode), torch.enable_grad():
            for k, key in enumerate(("unlearn", "retain")):
                nll[key] = self._probe_grad(key, named, d, k)
        self._d, self._d_at, self._d_nll = d, self.n_steps, nll
        return d

    def _probe_grad(self, key: str, named: list[tuple[str, nn.Parameter]], d: dict[str, Tensor], k: int) -> float:
        """d[·][k] = ∇R of probe set ``key`` (R its mean token NLL, ``probe_batch`` rows per backward, pooled
        exactly: :func:`~geffect_fast.loss.weighted_chunks`); returns R."""
        batch = self.probes[key]
        if not has_labels(batch):
            raise ValueError(f"the {key!r} probe has no labelled token: its NLL is undefined")
        # a packed batch's keys are not all per row (cu_seq_lens): it goes whole
        size = None if packed_samples(batch) is not None else self.probe_batch
        D = pool_size(sample_counts(batch, packed_samples(batch)).cpu(), "token_mean")
        params = [p for _, p in named]
        total = 0.0
        for w, chunk in weighted_chunks(row_chunks(batch, size), D, "token_mean"):
            R = risk(self.model, chunk)
            if not bool(torch.isfinite(R.detach())):
                raise ValueError(f"probe set {key!r}: the risk is not finite ({R.item()})")
            total += w * float(R.detach())
            for (n, _), g in zip(named, torch.autograd.grad(R * w, params, allow_unused=True)):
                if g is not None:
                    d[n][k].add_(g)
        return total

    def effects(self) -> tuple[dict[str, float], dict[str, float]]:
        """The gradient's G-effects per group, e_{R,g} = Σ_{p∈g} ⟨d_R[p], p.grad⟩ for R = unlearn and retain
        (d from :meth:`probe_grads`; a parameter without ``.grad`` adds 0), as ({group: e_u,g}, {group: e_r,g})."""
        d = self.probe_grads()
        grouping = self.grouping()
        named = dict(self.model.named_parameters())
        dots, cols = [], []
        for n, D in d.items():
            g = named[n].grad
            if g is None:
                continue
            acc = torch.float64 if D.dtype == torch.float64 else torch.float32
            dots.append(D.reshape(2, -1).to(acc) @ g.detach().reshape(-1).to(acc))
            cols.append(grouping.of[n])
        if not dots:
            raise ValueError("no parameter has a .grad: run a backward pass before guide.step()")
        e = torch.zeros(2, len(grouping.names), dtype=torch.float64)
        e.index_add_(1, torch.tensor(cols), torch.stack(dots, 1).double().cpu())
        eu, er = e.tolist()
        return dict(zip(grouping.names, eu)), dict(zip(grouping.names, er))

    def _project(self, theta: Mapping[str, Tensor]) -> dict[str, float]:
        """The ``project`` rule on the step just taken (θ − θ_before); returns {group: ‖removed‖ / ‖Δθ_g‖} for
        the groups projected."""
        d, grouping = self.probe_grads(), self.grouping()
        named = dict(self.model.named_parameters())
        G = len(grouping.names)
        stats = torch.zeros(3, G, dtype=torch.float64)  # ⟨d_r, Δ⟩, ‖d_r‖², ‖Δ‖² per group
        cols, rows = [], []
        with torch.no_grad():
            for n, before in theta.items():
                delta = named[n].detach() - before
                dr = d[n][1]
                acc = torch.float64 if dr.dtype == torch.float64 else torch.float32
                x, y = dr.reshape(-1).to(acc), delta.reshape(-1).to(acc)
                rows.append(torch.stack([x @ y, x @ x, y @ y]))
                cols.append(grouping.of[n])
            stats.index_add_(1, torch.tensor(cols), torch.stack(rows, 1).double().cpu())
            coef = torch.where((stats[0] > 0) & (stats[1] > 0), stats[0] / stats[1].clamp_min(1e-300), 0.0)
            for n in theta:
                c = float(coef[grouping.of[n]])
                if c > 0:
                    named[n].sub_(c * d[n][1].to(named[n].dtype))
        return {
            grouping.names[g]: float(coef[g] * stats[1, g].sqrt() / stats[2, g].sqrt())
            for g in range(G)
            if coef[g] > 0 and stats[2, g] > 0
        }

    # -- pieces ------------------------------------------------------------------------------------------
    def _stop_reason(self, dec: Mapping[str, Any], streak: int) -> str | None:
        target = self.target_forget_nll
        if target is not None and dec["forget_nll"] is not None and dec["forget_nll"] >= target:
            return f"forget NLL {dec['forget_nll']:.4g} >= target {target:.4g}"
        if streak >= self.patience:
            return f"ratio {dec['ratio']:.4g} < threshold {self.threshold:.4g} for {streak} step(s)"
        return None

    def grouping(self) -> groups_mod.Grouping:
        """The groups the decisions name (``groups``), over the model's parameters."""
        if self._grouping is None:
            names = [n for n, _ in self.model.named_parameters()]
            grouping = groups_mod.assign(self.model, self.groups, names)
            if grouping.parts:
                raise ValueError("the guide cannot measure or scale groups that split a parameter (groups='module' "
                                 "on stacked experts); use groups='block' or a callable")  # fmt: skip
            self._grouping = grouping
        return self._grouping

    def group_of(self) -> dict[str, str]:
        """Parameter name -> its group."""
        grouping = self.grouping()
        return {n: grouping.names[i] for n, i in grouping.of.items()}

    def _apply(
        self, scales: Mapping[str, float], theta: Mapping[str, Tensor] | None = None
    ) -> list[tuple[nn.Parameter, float, Tensor | None, Tensor | None]]:
        """Scale the chosen groups' ``.grad`` (scale="grad") or copy their parameters (scale="update"; from
        ``theta``, the project rule's copy of θ, where there is one); returns (parameter, factor, θ_before or None,
        the gradient before scaling or None) for end() and abort()."""
        if not scales:
            return []
        of = self.group_of()
        saved = []
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                factor = scales.get(of.get(n))
                if factor is None or not p.requires_grad:
                    continue
                if self.scale == "update":
                    saved.append((p, factor, theta[n] if theta is not None else p.detach().clone(), None))
                elif p.grad is not None:
                    saved.append((p, factor, None, p.grad.detach().clone()))
                    p.grad.mul_(factor)
        return saved

    def summary(self) -> str:
        """One line per step: the decision in words."""
        lines = []
        for d in self.decisions:
            scaled = ", ".join(f"{g}×{f:g}" for g, f in d["scaled_groups"].items()) or "-"
            ratio = "inf" if d["ratio"] is None else f"{d['ratio']:.3g}"
            lines.append(
                f"step {d['step']}: ratio {ratio}, scaled {scaled}" + (f"; STOP: {d['reason']}" if d["stop"] else "")
            )
        return "\n".join(lines)
