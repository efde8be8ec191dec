"""Linear maps: ``torch.nn.Linear`` (y = a Wᵀ + b, W [o, i]), Hugging Face GPT-2 ``Conv1D`` (y = a W + b,
W stored [i, o]) and Falcon's ``FalconLinear`` (an ``nn.Linear`` whose forward computes the same
y = a Wᵀ + b as ``a @ W.T + b``).

Per sample b the weight gradient is G_b = Σ_{t∈b} g_t a_tᵀ; it is never formed. The tap contracts it with
the direction at once: ⟨G_b, V⟩ = Σ_{t∈b} g_tᵀ V a_t and ⟨Σ_{t∈b} g_t, v_bias⟩ (ops ``linear_dot``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import Adapter, Slot, first_input, tap
from .registry import register, register_recogniser


class _LinearLike(Adapter):
    param_names = ("weight", "bias")
    gives_factors = True
    #: whether the weight is stored transposed ([i, o], as Conv1D does)
    transposed = False

    def attach(self, module, slots: dict[str, Slot], session):
        sw, sb = slots.get("weight"), slots.get("bias")

        def backward(g: Tensor, saved: Sequence[Tensor]) -> None:
            o = g.shape[-1]
            seg = session.rows(g, o, module)
            a = saved[0] if saved else None
            a2 = None if a is None else a.reshape(-1, a.shape[-1])
            g2 = g.reshape(-1, o)
            if a2 is not None and a2.dtype != g2.dtype:  # autocast: the layer ran in half, its input is wider
                dt = torch.promote_types(a2.dtype, g2.dtype)
                a2, g2 = a2.to(dt), g2.to(dt)
            # slots whose factors are wanted: G_b = Σ g aᵀ (Linear) or Σ a gᵀ (Conv1D); bias: Σ g
            fw = sw is not None and session.wants_factors(sw)
            fb = sb is not None and session.wants_factors(sb)
            if fw:
                session.factor_sink(sw, *((a2, g2) if self.transposed else (g2, a2)), seg, None)
            if fb:
                session.factor_sink(sb, g2, g2.new_ones(g2.shape[0], 1), seg, None)
            cw, cb = (None if fw else sw), (None if fb else sb)  # contracted here
            if cw is None and cb is None:
                return
            vw = None
            if cw is not None:
                vw = session.direction(cw)
                vw = vw.transpose(1, 2) if self.transposed else vw  # [K, o, i]
            vb = None if cb is None else session.direction(cb)
            out_w, out_b = session.ops.linear_dot(a2 if vw is not None else None, g2, vw, seg, session.B, vb)
            session.add(cw, out_w)
            session.add(cb, out_b)

        def on_output(mod, args, kwargs, out):
            a = first_input(args, kwargs, "input")
            session.check_rows(a, mod)
            return tap(out, backward, *((a,) if sw is not None else ()))

        return [session.on_output(module, on_output)]


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
