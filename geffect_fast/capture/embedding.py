"""Embedding tables: ``torch.nn.Embedding`` and its subclasses (learned position embeddings such as OPT's,
scaled word embeddings such as Gemma's).

For y_t = E[x_t] the per-sample gradient of E is Σ_{t∈b} g_t e_{x_t}ᵀ; its dot with V is the gather-dot
Σ_{t∈b} g_t · V[x_t] (ops ``embedding_dot``), with tokens at ``padding_idx`` adding nothing, as torch
gives that row no gradient.

Subclasses compute their ids (OPT: from the attention mask, plus an offset) or scale the result (Gemma:
by √d) inside their own ``forward``. So the tap is placed on the inner ``F.embedding`` call — caught by a
:class:`~geffect_fast.capture.base.FunctionalTap` live only while the module runs — where ids, padding id and
output are exactly the call's: a subclass that passes no ``padding_idx`` (HF's ``IdeficsDecoupledEmbedding``)
gives that row its gradient, and the tap counts it. Any other use of the table inside the forward (``weight[ids]``,
a transformed table) is refused, never silently left out; so is a call with ``max_norm`` or
``scale_grad_by_freq``. Position ids shared by the batch ([1, T]) are expanded to the batch so that each sample
gets its own gradient — right where the model broadcasts the rows over the batch (adds them to the token
embeddings), as models do. Where it does otherwise the expansion is found out, never measured wrongly: a model
that takes one row of the expanded output (``pos(ids)[0]``) leaves the other rows without gradient although
their samples have labels (an error after the backward), and one that repeats or concatenates it over the batch
fails its forward (an error naming the embedding, instead of torch's size mismatch); ``strict=False`` measures
the table by autograd then.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, FunctionalTap, NotPerSampleError, PassState, Tap
from .registry import register


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


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
        backwards: dict[tuple[int | None, bool], object] = {}

        def backward_for(pad: int | None, shared: bool):
            def backward(g: Tensor, seg, saved: Sequence[Tensor]) -> None:
                (ids,) = saved
                d = g.shape[-1]
                if shared:  # the rows were one output shared by the batch: each row must carry its own gradient
                    state.watch_shared(g, module, tap)
                ids1, g2 = ids.reshape(-1), g.reshape(-1, d)
                for c, w in parts:
                    c.embedding(w, ids1, g2, seg, pad)

            return backwards.setdefault((pad, shared), backward)

        def refuse(why: str) -> None:
            raise NotPerSampleError(f"embedding {state.module_name(module)!r}: {why}", {slot.name: why})

        def handle(y: Tensor, args: tuple, kwargs: dict) -> Tensor:
            ids = _arg(args, kwargs, 0, "input")
            table = _arg(args, kwargs, 1, "weight")
            pad = _arg(args, kwargs, 2, "padding_idx")
            if _arg(args, kwargs, 3, "max_norm") is not None:
                refuse("F.embedding is called with max_norm, which renormalises the table in place")
            if _arg(args, kwargs, 5, "scale_grad_by_freq", False):
                refuse("F.embedding is called with scale_grad_by_freq: gradients scaled by batch-wide token counts")
            if pad is not None and pad < 0:
                pad += table.shape[0]
            R = state.R
            shared = False
            if not state.pooled and R > 1:
                if ids.ndim >= 2 and ids.shape[0] == 1:  # ids shared by the batch: one copy per row
                    ids = ids.expand(R, *ids.shape[1:])
                    y = y.expand(R, *y.shape[1:])
                    shared = True
                    state.expanded.append((module, tap))
                elif ids.ndim < 2:
                    refuse(
                        f"called with ids of shape {tuple(ids.shape)}, which cannot be split into the batch's {R} "
                        "rows (pass [B, T] or [1, T] ids)"
                    )
            seg = state.rows(y, y.shape[-1], module)
            if not y.requires_grad:
                y = y.detach().requires_grad_(True)
            return state.apply(y, backward_for(pad, shared), seg, ids)

        def around(inner, args, kwargs):
            table = module._parameters["weight"]  # as the forward sees it: the guard's alias, FSDP2's unsharded table

            def known(ft, func, a, kw):
                return handle if func is F.embedding and ft.origin(_arg(a, kw, 1, "weight")) is table else None

            # the mode is live only inside the module's own forward, and always left (KeyboardInterrupt too)
            with FunctionalTap({id(table): slot.name}, known, state.module_name(module)):
                return inner(*args, **kwargs)

        return around
