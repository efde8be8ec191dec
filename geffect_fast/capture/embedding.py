"""Embedding tables: ``torch.nn.Embedding`` and its subclasses (learned position embeddings such as OPT's,
scaled word embeddings such as Gemma's).

For y_t = E[x_t] the per-sample gradient of E is Σ_{t∈b} g_t e_{x_t}ᵀ; its dot with V is the gather-dot
Σ_{t∈b} g_t · V[x_t] (ops ``embedding_dot``), with tokens at ``padding_idx`` adding nothing, as torch
gives that row no gradient.

Subclasses compute their ids (OPT: from the attention mask, plus an offset) or scale the result (Gemma:
by √d) inside their own ``forward``. So the tap is placed on the inner ``F.embedding`` call — caught by a
``TorchFunctionMode`` live only while the module runs — where ids and output are exactly the table's.
Position ids shared by the batch ([1, T]) are expanded to the batch so that each sample gets its own
gradient.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .base import Adapter, NotPerSampleError, PassState, Tap
from .registry import register


class _EmbeddingCall(TorchFunctionMode):
    """Taps the ``F.embedding`` call on one table while its module's forward runs."""

    def __init__(self, weight: nn.Parameter, on_call):
        super().__init__()
        self.weight = weight
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.embedding:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is self.weight:
                ids = args[0] if args else kwargs["input"]
                return self.on_call(ids, out)
        return out


@register(nn.Embedding)
class EmbeddingAdapter(Adapter):
    param_names = ("weight",)
    covers_subclass_forward = True
    around = True

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if getattr(module, "max_norm", None) is not None:
            return "max_norm renormalises the table in place during forward"
        if getattr(module, "scale_grad_by_freq", False):
            return "scale_grad_by_freq scales gradients by batch-wide token counts, so no per-sample gradient exists"
        return None

    def bind(self, tap: Tap, state: PassState):
        module = tap.module
        slot = tap.slots["weight"]
        parts = [(c, sl["weight"]) for c, sl in tap.parts]
        padding_idx = module.padding_idx

        def backward(g: Tensor, seg, saved: Sequence[Tensor]) -> None:
            (ids,) = saved
            d = g.shape[-1]
            ids1, g2 = ids.reshape(-1), g.reshape(-1, d)
            for c, w in parts:
                c.embedding(w, ids1, g2, seg, padding_idx)

        def on_call(ids: Tensor, y: Tensor) -> Tensor:
            B = state.B
            if not state.pooled:
                if ids.ndim >= 2 and ids.shape[0] == 1 and B > 1:  # ids shared by the batch: one copy per sample
                    ids = ids.expand(B, *ids.shape[1:])
                    y = y.expand(B, *y.shape[1:])
                elif ids.ndim < 2 or ids.shape[0] != B:
                    why = (
                        f"embedding {state.module_name(module)!r} was called with ids of shape {tuple(ids.shape)}, "
                        f"which cannot be split into the batch's {B} samples"
                    )
                    raise NotPerSampleError(why + " (pass [B, T] or [1, T] ids)", {slot.name: why})
            seg = state.rows(y, y.shape[-1], module)
            if not y.requires_grad:
                y = y.detach().requires_grad_(True)
            return state.apply(y, backward, seg, ids)

        def around(inner, args, kwargs):
            # the mode is live only inside the module's own forward, and always left (KeyboardInterrupt too)
            with _EmbeddingCall(module.weight, on_call):  # read now: FSDP2 swaps in the unsharded table
                return inner(*args, **kwargs)

        return around
