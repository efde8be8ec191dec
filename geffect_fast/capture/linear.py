"""Linear maps: ``torch.nn.Linear`` (y = a Wᵀ + b, W [o, i]), Hugging Face GPT-2 ``Conv1D`` (y = a W + b,
W stored [i, o]) and Falcon's ``FalconLinear`` (an ``nn.Linear`` whose forward computes the same
y = a Wᵀ + b as ``a @ W.T + b``).

Per sample b the weight gradient is G_b = Σ_{t∈b} g_t a_tᵀ; it is never formed. The tap contracts it with
the direction at once: ⟨G_b, V⟩ = Σ_{t∈b} g_tᵀ V a_t and ⟨Σ_{t∈b} g_t, v_bias⟩ (ops ``linear_dot``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, FunctionalTap, PassState, Tap, first_input, linear_rows
from .registry import register, register_recogniser


class _LinearLike(Adapter):
    param_names = ("weight", "bias")
    #: whether the weight is stored transposed ([i, o], as Conv1D does)
    transposed = False

    def _backward(self, tap: Tap):
        """The tap's backward: the layer's input a and output gradient g, as 2-D rows, to each consumer."""
        transposed = self.transposed
        parts = [(c, sl.get("weight"), sl.get("bias")) for c, sl in tap.parts]
        o = tap.module.weight.shape[1 if transposed else 0]  # output features

        def backward(g: Tensor, seg, saved: Sequence[Tensor]) -> None:
            a2, g2 = linear_rows(g, o, saved)
            for c, w, b in parts:
                c.linear(w, b, a2, g2, seg, transposed)

        return backward

    def bind(self, tap: Tap, state: PassState):
        module = tap.module
        has_w = "weight" in tap.slots
        o = module.weight.shape[1 if self.transposed else 0]
        backward = self._backward(tap)

        def on_output(args, kwargs, out):
            a = args[0] if args else first_input(args, kwargs, "input")
            if a.ndim == 2:
                state.check_rows(a, module)
            seg = state.rows(out, o, module)
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            return state.apply(out, backward, seg, a) if has_w else state.apply(out, backward, seg)

        return on_output

    def bind_foreign(self, tap: Tap, state: PassState):
        """A forward set on the instance: the tap sits on its ``F.linear(x, W, b)`` call (``torch.addmm(b, x, W)``
        for Conv1D), any other use of W or b refused (:class:`~geffect_fast.capture.base.FunctionalTap`)."""
        module = tap.module
        o = module.weight.shape[1 if self.transposed else 0]
        with_bias = self._backward(tap)
        weight_only = self._backward(Tap(tap.name, module, self, tap.slots, _without(tap.parts, "bias")))
        has_w, has_b = "weight" in tap.slots, "bias" in tap.slots
        addmm = self.transposed

        def handler(W: Tensor, b: Tensor | None):
            def handle(out: Tensor, args: tuple, kwargs: dict) -> Tensor:
                x = args[1] if addmm else (args[0] if args else kwargs["input"])
                passed = (args[0] if args else kwargs.get("input")) if addmm else _arg(args, kwargs, 2, "bias")
                fn = with_bias if has_b and passed is not None and ft_box[0].origin(passed) is b else weight_only
                if x.ndim == 2:
                    state.check_rows(x, module)
                seg = state.rows(out, o, module)
                if not out.requires_grad:
                    out = out.detach().requires_grad_(True)
                return state.apply(out, fn, seg, x) if has_w else state.apply(out, fn, seg)

            return handle

        def around(inner, args, kwargs):
            params = module._parameters  # as the forward sees them: the guard's aliases
            W, b = params.get("weight"), params.get("bias")
            watched = {id(params[k]): s.name for k, s in tap.slots.items()}
            handle = handler(W, b)
            ft_box[0] = ft = FunctionalTap(watched, None, state.module_name(module))

            def known(ft, func, a, kw):
                if addmm:
                    return handle if func is torch.addmm and len(a) > 2 and ft.origin(a[2]) is W else None
                return handle if func is F.linear and ft.origin(_arg(a, kw, 1, "weight")) is W else None

            ft.known = known
            with ft:
                return inner(*args, **kwargs)

        ft_box: list = [None]
        return around


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _without(parts, local: str):
    return [(c, {k: v for k, v in sl.items() if k != local}) for c, sl in parts]


@register(nn.Linear)
class LinearAdapter(_LinearLike):
    """``torch.nn.Linear`` (also LoRA's A and B, which are plain ``nn.Linear``)."""


class Conv1DAdapter(_LinearLike):
    """Hugging Face ``Conv1D`` (GPT-2, GPT): a linear map with its weight stored [in, out]."""

    transposed = True


_CONV1D = Conv1DAdapter()


_LINEAR = LinearAdapter()


@register_recogniser
def _recognise_conv1d(module: nn.Module) -> Adapter | None:
    t = type(module)
    if t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and hasattr(module, "nf"):
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[1] == module.nf:
            return _CONV1D
    return None


@register_recogniser
def _recognise_falcon_linear(module: nn.Module) -> Adapter | None:
    """Falcon's ``FalconLinear(nn.Linear)``: its own forward is ``input @ weight.T (+ bias)``, nn.Linear's map."""
    t = type(module)
    if t.__name__ == "FalconLinear" and t.__module__.startswith("transformers.") and isinstance(module, nn.Linear):
        return _LINEAR
    return None
