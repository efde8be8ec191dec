"""The pass: every entry point (``measure``, ``measure_pairwise``, ``Sketcher``, factored directions, the
``Tracker`` through ``measure``) runs its backward passes inside :func:`opened`.

:func:`opened` borrows the model: its state is preserved (``.grad``, ``requires_grad``, train/eval mode, RNG —
restored also on error, and never hiding the error), every parameter is frozen but those measured by ordinary
autograd, grad is enabled (inside a user's ``no_grad`` too) and the plan's taps are armed. With every
parameter frozen no weight-gradient GEMM runs; the taps see each layer's output gradient and hand its factors
to the plan's consumers. :func:`risk_backward` is the risk set's forward and backward with nothing read on the
host between them: the per-sample NLL and the finite check stay on the device until the caller reads them
after the backward, so a GPU can queue the backward while the forward still runs.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..capture import CaptureSession
from ..loss import IGNORE_INDEX, forward_logits, per_sample_sums, per_token, token_nll
from ..state import preserved
from .modulemap import ModuleMap
from .plan import Plan


@contextmanager
def opened(
    mm: ModuleMap,
    plan: Plan,
    mode: str,
    autograd: tuple[str, ...] | list[str] = (),
    ref_model: nn.Module | None = None,
) -> Iterator[CaptureSession]:
    """The plan's session, armed, on the model of ``mm`` borrowed as the module docstring says. ``autograd``:
    parameters that keep requiring grad (their ``.grad`` is the aggregate gradient after a backward);
    ``ref_model``: a second model whose state is preserved too (an objective's frozen reference)."""
    mm.check_not_inference(trainable_only=True)
    known = ref_model is None  # the map knows the model's parameters and modules: no walk of the tree
    mm.claim()
    try:
        with (
            preserved(
                mm.model,
                ref_model,
                mode=mode,
                params=mm.params if known else None,
                modules=mm.modules if known else None,
            ),
            torch.enable_grad(),
        ):
            for p in mm.params:
                p.requires_grad = False
            named = mm.named
            for n in autograd:
                named[n].requires_grad = True
            session = plan.session
            session.arm()
            try:
                yield session
            finally:
                session.disarm()
    finally:
        mm.release()


def backward(loss: Tensor, device_type: str) -> None:
    """``loss.backward()``, with autocast off where a user's autocast is on: the taps' contractions must not drop
    to half precision (autocast does not apply to backward ops; a checkpointed forward recomputed in the
    backward restores its own autocast state)."""
    ctx = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()
    with ctx:
        loss.backward()


def start_batch(
    model: nn.Module, session: CaptureSession, batch: Mapping[str, Tensor], packed: Tensor | None = None
) -> None:
    """``session.start`` for ``batch`` [B, T] (``packed``: its packed samples, ``loss.packed_samples``, on the
    model's device); where B = T > 1 and a tapped module's row layout is not known yet (batch first and time first
    look alike), a probe first: one forward without grad on the batch cut to T − 1 positions, each tapped module's
    output shape telling its layout (kept in the model's map)."""
    B, T = batch["input_ids"].shape
    if B == T > 1 and any(id(t.module) not in session.layouts for t in session.taps):
        probe_layouts(model, session, batch)
    session.start(B, T, packed, labelled=(batch["labels"][:, 1:] != IGNORE_INDEX).any(1))


def forward(model: nn.Module, session: CaptureSession, batch: Mapping[str, Tensor]) -> Tensor:
    """The model's logits on ``batch`` through the armed taps (a forward that fails because a tap expanded an
    output shared by the batch is an error naming that embedding: ``CaptureSession.failed_forward``)."""
    try:
        return forward_logits(model, batch)
    except RuntimeError as e:
        err = session.failed_forward(e)
        if err is e:
            raise
        raise err from e


def check_packing(mm, model: nn.Module, batch: Mapping[str, Tensor], packed: Tensor) -> None:
    """Packed samples are measured as samples only if the model keeps them apart (builds a block-causal mask from the
    position ids, as Hugging Face's models do without an attention mask): one forward without grad with one packed
    sample's tokens reordered must leave every other sample's logits as they were. The verdict is kept in the
    model's map; a model that mixes packed samples is refused with the reason."""
    if mm.packing is None:
        ids = batch["input_ids"]
        flat = packed.reshape(-1).to(ids.device)
        sizes = torch.bincount(flat)
        j = int((sizes > 1).nonzero()[0]) if bool((sizes > 1).any()) else 0
        where = (flat == j).nonzero().squeeze(1)
        other = ids.reshape(-1).clone()
        other[where] = other[where.flip(0)]
        with preserved(model, mode="eval", params=mm.params, modules=mm.modules), torch.no_grad():  # no dropout
            a = forward_logits(model, batch)
            b = forward_logits(model, {**batch, "input_ids": other.reshape(ids.shape)})
        keep = (flat != j).reshape(ids.shape)
        a, b = a[keep], b[keep]
        mm.packing = bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max().clamp_min(1))))
    if not mm.packing:
        raise ValueError(
            "the batch is packed (several samples per row), but the model attends across the packed samples (it "
            "builds no block-causal mask from the position ids), so they are not samples of their own: pass them "
            "unpacked, or with an attention mask (the row is then the sample)"
        )


def probe_layouts(model: nn.Module, session: CaptureSession, batch: Mapping[str, Tensor]) -> None:
    """Record the row layout of every tapped module from a forward on ``batch`` cut to T − 1 positions (no grad:
    the armed taps pass it through), where its B and T differ: [B, ...] is batch first, [T − 1, B, ...] time
    first."""
    B, T = batch["input_ids"].shape
    T2 = T - 1

    def cut(v):
        return v[..., :T2] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[-1] == T else v

    seen: dict[int, tuple[int, ...]] = {}

    def record(m, args, out):
        if isinstance(out, Tensor):
            seen[id(m)] = tuple(out.shape)

    hooks = [t.module.register_forward_hook(record) for t in session.taps]
    try:
        with torch.no_grad():
            forward_logits(model, {k: cut(v) for k, v in batch.items()})
    finally:
        for h in hooks:
            h.remove()
    for key, shape in seen.items():
        if len(shape) >= 3 and shape[0] == B:  # T − 1 ≠ B: not time first
            session.layouts[key] = "batch"
        elif len(shape) >= 3 and shape[0] == T2 and shape[1] == B:
            session.layouts[key] = "time"


def risk_backward(
    model: nn.Module,
    session: CaptureSession,
    batch: Mapping[str, Tensor],
    w: Tensor,
    device_type: str,
    before_backward: Callable[[Tensor], None] | None = None,
    packed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One risk batch through the armed taps: forward, the per-token NLL, one backward of
    L = Σ_b w_b Σ_{t∈b} nll_t (``w`` [B] on the model's device). Returns, on the device and unread: the
    session's [K, B, G] contributions, each sample's summed NLL [B], and whether L is finite (a 0-d bool).
    ``before_backward(L)``: called between the forward and the backward (a distributed agreement point, which
    reads L first: a rank whose risk is not finite must stop every rank before the backward's collectives).
    ``packed``: a packed batch's samples (``w`` and the sums are then per packed sample)."""
    start_batch(model, session, batch, packed)
    nll, _ = token_nll(forward(model, session, batch), batch["labels"])
    L = (nll * per_token(w.to(nll.dtype), packed)).sum()
    summed = per_sample_sums(nll.detach(), packed)
    del nll
    if not L.requires_grad:
        raise RuntimeError(
            "the risk does not depend on any tapped layer: no gradient can flow (is the model's input embedding "
            "an nn.Embedding?)"
        )
    if before_backward is not None:
        before_backward(L.detach())
    backward(L, device_type)
    return session.result(), summed, L.detach()


__all__ = ["backward", "check_packing", "forward", "opened", "probe_layouts", "risk_backward", "start_batch"]
