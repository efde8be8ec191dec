"""The TOFU protocol in small: fine-tune a model until it knows a QA set, then unlearn a forget split with an
objective while a :class:`~geffect_fast.tracker.Tracker` records the G-effects of every step.

Used by ``geffect-fast demo``/``run`` and by ``benchmarks/objectives_synthetic.py``; each function also
works on its own with any HF causal LM and batches from :mod:`geffect_fast.data`.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..guide import Guide
from ..loss import IGNORE_INDEX, forward_logits, risk
from ..objectives import Objective, resolve
from ..tracker import Tracker

#: the op backend the commands measure with on a CPU. The native CPU kernels (``auto``'s choice for embedding_dot
#: and norm_dot) split a batch's tokens over OpenMP threads and add the per-thread parts of each sample, so the last
#: bits of a G-effect follow the thread count — which the commands size to the free cores — and the order threads
#: finish in; the reference ops give the same bits at any thread count (a test runs the quick demo at 1 and 2
#: threads) and cost no more at the sizes the commands measure (the demo's 100-sample probe pass: 2.5–2.7 s
#: reference against 2.8–3.1 s auto, at a load of 4.5 on 2 cores)
CPU_BACKEND = "reference"


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    On CPU, a pass's activations and logits are tensors of a few MB each, below glibc's (dynamic) mmap threshold, so
    they come from the heap; freed, they stay in the process (and fragment it), and the resident size ratchets up
    pass after pass — a run's RSS grew by ~1.7 GB per measured step of SmolLM2 that way. Trimming between steps keeps
    it near what is alive."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    trim(0)


def batches(batch: Mapping[str, Tensor], size: int, generator: torch.Generator) -> list[dict[str, Tensor]]:
    """A shuffled split of ``batch`` into mini-batches of ``size`` rows."""
    B = batch["input_ids"].shape[0]
    perm = torch.randperm(B, generator=generator)
    return [{k: v[perm[i : i + size]] for k, v in batch.items()} for i in range(0, B, size)]


@torch.no_grad()
def answer_accuracy(model: nn.Module, batch: Mapping[str, Tensor], chunk: int = 64) -> dict[str, float]:
    """Teacher-forced answer accuracy: ``token`` = share of answer tokens whose argmax is right; ``exact`` =
    share of samples whose every answer token is right (greedy decoding would reproduce the answer)."""
    was = model.training
    model.eval()
    right = total = exact = n = 0
    try:
        for i in range(0, batch["input_ids"].shape[0], chunk):
            sub = {k: v[i : i + chunk] for k, v in batch.items()}
            pred = forward_logits(model, sub)[:, :-1].argmax(-1)
            lab = sub["labels"][:, 1:]
            mask = lab != IGNORE_INDEX
            ok = (pred == lab) & mask
            right += int(ok.sum())
            total += int(mask.sum())
            exact += int((ok.sum(1) == mask.sum(1)).sum())
            n += sub["input_ids"].shape[0]
    finally:
        model.train(was)
    return {"token": right / max(1, total), "exact": exact / max(1, n)}


def finetune(
    model: nn.Module,
    data: Mapping[str, Tensor],
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    on_batch: Callable[[float], None] | None = None,
) -> list[float]:
    """Plain AdamW fine-tuning on ``data`` (the TOFU "learn the facts" stage); returns the mean loss of each
    epoch. ``progress(epoch, epochs, loss)`` is called after every epoch, ``on_batch(loss)`` after every batch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, epochs * _n_batches(data, batch_size)), pct_start=0.1
    )
    model.train()
    losses = []
    for ep in range(epochs):
        tot = 0.0
        mbs = batches(data, batch_size, g)
        for mb in mbs:
            loss = risk(model, mb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach())
            if on_batch is not None:
                on_batch(float(loss.detach()))
        losses.append(tot / len(mbs))
        release_memory()
        if progress is not None:
            progress(ep + 1, epochs, losses[-1])
    model.eval()
    return losses


def _n_batches(data: Mapping[str, Tensor], size: int) -> int:
    return (data["input_ids"].shape[0] + size - 1) // size


def unlearn(
    model: nn.Module,
    objective: Objective | str,
    forget: Mapping[str, Tensor],
    retain: Mapping[str, Tensor],
    steps: int,
    lr: float,
    ref_model: nn.Module | None = None,
    idk: Mapping[str, Tensor] | None = None,
    probes: Mapping[str, Mapping[str, Tensor]] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    on_tracker: Callable[[Tracker], None] | None = None,
    guide: Guide | None = None,
    **tracker_kwargs: Any,
) -> Tracker:
    """Unlearn ``forget`` with ``objective`` (an objective, or its name: ``"npo"``, ``"npo+kl"``) for ``steps``
    AdamW steps (retain data where the objective uses it), tracking G-effects on ``probes`` (default: the forget
    and retain sets) at each step. Returns the tracker: its records hold per-step, per-group and cumulative
    G-effects and the forget/retain risk before each step (``loss``) with the measured change, and
    ``direction_norm`` = ‖v‖ of the measured direction (the gradient's, or the update's v = Δθ/lr), which puts the
    G-effects of different objectives on one scale: e/‖v‖ is the rate at which R changes per unit of parameter
    distance moved along v. ``on_tracker(tracker)`` is called once it exists. On a CPU the tracker measures with
    :data:`CPU_BACKEND` unless ``backend=`` says otherwise.

    ``guide``: a :class:`~geffect_fast.guide.Guide` of ``model`` steers the steps: the loss is
    ``guide.weighted(...)``, the guide decides and scales ``.grad`` before the tracker's step (so a ``"gradient"``
    tracker measures the gradient the optimiser used), and the run ends at the first step the guide refuses —
    not taken, not tracked (the decisions are in ``guide.decisions``)."""
    objective = resolve(objective)
    if "backend" not in tracker_kwargs:
        tracker_kwargs["backend"] = CPU_BACKEND if next(model.parameters()).device.type == "cpu" else "auto"
    probes = probes or {"unlearn": forget, "retain": retain}
    tracker = Tracker(model, probes, ref_model=ref_model, **tracker_kwargs)
    update = tracker_kwargs.get("direction", "gradient") == "update"
    if on_tracker is not None:
        on_tracker(tracker)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    fb, rb = batches(forget, batch_size, g), batches(retain, batch_size, g)
    ib = batches(idk, batch_size, torch.Generator().manual_seed(seed)) if idk is not None else None
    model.train()
    for step in range(steps):
        inputs: dict[str, Any] = {"forget": fb[step % len(fb)], "retain": rb[step % len(rb)]}
        if ib is not None:
            inputs["idk"] = ib[step % len(ib)]
        loss = objective(model, inputs, ref_model) if guide is None else guide.weighted(objective, inputs, ref_model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        n_records = len(tracker.records)
        go, norm = _guided_step(tracker, opt, loss, guide, update)
        for rec in tracker.records[n_records:]:
            if rec["kind"] != "compare":
                rec["direction_norm"] = norm
        del loss
        release_memory()
        if progress is not None:
            progress(step + 1, steps)
        if not go:
            break
    model.eval()
    return tracker


def _guided_step(
    tracker: Tracker, opt: torch.optim.Optimizer, loss: Tensor, guide: Guide | None, update: bool
) -> tuple[bool, float | None]:
    """One tracked optimiser step, decided (and its gradient scaled) by ``guide`` first: (whether it was taken,
    ‖v‖ of the tracked direction — the gradient the optimiser used, or AdamW's update)."""
    go = True if guide is None else guide.begin(opt)
    norm = None
    try:
        if go:
            norm = None if update else grad_norm(tracker.model)
            with tracker.step(opt, loss=loss):
                opt.step()
            if update:
                norm = adamw_update_norm(opt)
    except BaseException:
        if guide is not None:
            guide.abort()
        raise
    if guide is not None:
        guide.end()
    return go, norm


_ROW = 8192


def _row_sums_sq(t: Tensor) -> list[float]:
    """Σ x² of ``t`` in float64 as partial sums over fixed rows of _ROW elements: each row is summed by one thread,
    so the partial sums — unlike ``t.square().sum()``, whose split follows the thread count — are the same at any
    thread count (the demo's results must not depend on how many cores were free)."""
    x = t.detach().reshape(-1).double().square()
    x = torch.nn.functional.pad(x, (0, (-x.numel()) % _ROW))
    return x.view(-1, _ROW).sum(1).tolist()


def _norm(tensors) -> float:
    return math.sqrt(math.fsum(v for t in tensors for v in _row_sums_sq(t)))


@torch.no_grad()
def grad_norm(model: nn.Module) -> float:
    """‖v‖ of the gradient direction: the 2-norm of every trainable parameter's ``.grad`` together (the vector the
    tracker measures with ``direction="gradient"``); the same bits at any thread count."""
    return _norm(p.grad for p in model.parameters() if p.requires_grad and p.grad is not None)


@torch.no_grad()
def adamw_update_norm(opt: torch.optim.Optimizer) -> float:
    """‖v‖ of the update direction v = (θ_before − θ_after)/lr of the AdamW step just taken, from the optimiser's
    state: v = m̂ / (√v̂ + ε) with m̂ = m/(1 − β₁ᵗ), v̂ = v/(1 − β₂ᵗ) (torch's AdamW without amsgrad; weight decay
    adds wd·θ_before, and :func:`unlearn` uses none)."""
    parts: list[float] = []
    for group in opt.param_groups:
        if group.get("amsgrad") or group.get("weight_decay", 0.0):
            raise ValueError("adamw_update_norm covers AdamW without amsgrad and weight decay (what unlearn uses)")
        b1, b2 = group["betas"]
        for p in group["params"]:
            st = opt.state.get(p)
            if not st or "exp_avg" not in st:
                continue
            t = float(st["step"])
            m_hat = st["exp_avg"].double() / (1 - b1**t)
            denom = (st["exp_avg_sq"].double() / (1 - b2**t)).sqrt() + group["eps"]
            parts += _row_sums_sq(m_hat / denom)
    return math.sqrt(math.fsum(parts))


def frozen_copy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A frozen, eval-mode copy (the reference model of NPO/TNPO/KL); ``inplace`` freezes ``model`` itself."""
    ref = (model if inplace else copy.deepcopy(model)).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def trainable_copy(model: nn.Module) -> nn.Module:
    """A copy of (a frozen) ``model`` with every parameter trainable, to unlearn from."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


def signs(records: Sequence[Mapping[str, Any]], objective: str) -> dict[str, float]:
    """Cumulative G-effect per risk set of ``objective``'s records (the last cumulative value)."""
    out: dict[str, float] = {}
    for r in records:
        if r["objective"] == objective:
            out[r["risk"]] = r["cumulative"]
    return out
