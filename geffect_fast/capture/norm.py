"""Normalisation layers: ``torch.nn.LayerNorm`` (weight and bias), ``torch.nn.RMSNorm``, and the RMSNorm
classes of Hugging Face models (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, GemmaRMSNorm, …), recognised
by structure.

With x̂_t the normalised input — (a_t − μ_t)/√(σ²_t + ε) for LayerNorm, a_t/√(mean(a_t²) + ε) for RMSNorm —
the layer computes γ ⊙ x̂_t (+ β), or (1 + γ) ⊙ x̂_t in Gemma's form. In every form the per-sample
gradient of γ is Σ_{t∈b} g_t ⊙ x̂_t and that of β is Σ_{t∈b} g_t (ops ``norm_dot``). x̂ is recomputed from
the saved input during backward, at the precision the layer itself uses: torch's layers compute in the
input dtype (float32 for bf16/fp16 here), Hugging Face's RMSNorms in float32 whatever the input dtype.

A class recognised only by structure is checked on its first call: its output must equal γ ⊙ x̂ or
(1 + γ) ⊙ x̂ of its input, or the pass stops with an error naming it, rather than return wrong numbers.
The check also picks the precision of x̂ (float32, or float64 for a float64 layer that computes in it), and
looks at finite rows only (a row that is NaN or inf in the forward says nothing about the layer's form; a
layer with no finite row at all is an error naming it). The verdict is kept per module, forward function
and dtypes, so later passes skip the check (about 1 ms and a device sync per norm per pass). Cohere's
``CohereLayerNorm`` (a LayerNorm without bias, computed in float32, weight [d] or [heads, head_dim] with the
statistics over the last dim) is recognised and checked the same way.
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, NotPerSampleError, PassState, Tap, UnsupportedModuleError, first_input
from .registry import register, register_recogniser

#: relative tolerance of the structural check, by the coarser of the output dtype and the precision of x̂
_CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}
_CHECK_RTOL_LOW = 3e-2  # bf16 / fp16


def _rtol(*dtypes: torch.dtype) -> float:
    return max(_CHECK_RTOL.get(d, _CHECK_RTOL_LOW) for d in dtypes)


#: module -> {(its forward, input, output and weight dtypes): the precision of x̂ its check found}
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.dtype]] = weakref.WeakKeyDictionary()


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _NormAdapter(Adapter):
    param_names = ("weight", "bias")
    around = True
    #: check the module's output against γ ⊙ x̂ on its first call in a pass
    verify = False

    def normalized_dims(self, module: nn.Module) -> int:
        return 1

    def precisions(self, a: Tensor) -> tuple[torch.dtype, ...]:
        """Candidate precisions of x̂ for input ``a``, the default first."""
        return (_acc(a),)

    def xhat(self, module: nn.Module, a: Tensor, prec: torch.dtype) -> Tensor:
        """x̂ of input ``a``, computed in ``prec``, returned in the accumulation dtype of ``a``."""
        raise NotImplementedError

    def bind(self, tap: Tap, state: PassState):
        module = tap.module
        has_w = "weight" in tap.slots
        parts = [(c, sl.get("weight"), sl.get("bias")) for c, sl in tap.parts]
        nd = self.normalized_dims(module)
        d = 1
        for s in module.weight.shape if module.weight is not None else module.bias.shape:
            d *= s
        # the structural check's verdict (the precision of x̂) is kept per module, forward and dtypes across passes:
        # it holds while the code does
        verified = _VERIFIED.setdefault(module, {}) if self.verify else {}
        wdtype = module.weight.dtype if module.weight is not None else None
        own = type(module).forward
        backwards: dict[torch.dtype | None, Callable] = {}

        def backward_in(prec: torch.dtype | None) -> Callable:
            """The tap's backward with x̂ computed in ``prec`` (None: the layer's default for its input)."""

            def backward(g: Tensor, seg, saved: Sequence[Tensor]) -> None:
                g2 = g.reshape(-1, d)
                if has_w:
                    a = saved[0]
                    xh = self.xhat(module, a, prec or self.precisions(a)[0]).reshape(-1, d)
                    if g2.dtype != xh.dtype:
                        g2 = g2.to(torch.promote_types(g2.dtype, xh.dtype))
                else:
                    xh = g2  # no weight direction: x̂ is not read
                for c, w, b in parts:
                    c.norm(w, b, xh, g2, seg)

            return backwards.setdefault(prec, backward)

        plain = backward_in(None)

        def around(inner, args, kwargs):
            out = inner(*args, **kwargs)
            if not isinstance(out, Tensor):
                raise UnsupportedModuleError(
                    f"norm {state.module_name(module)!r} returned {type(out).__name__}, not a tensor"
                )
            a = args[0] if args else first_input(args, kwargs, "hidden_states")
            fn = plain
            func = getattr(inner, "__func__", inner)
            if self.verify or func is not own:  # a structural class, or a forward set on the instance: checked
                key = (func, a.dtype, out.dtype, wdtype)
                try:
                    prec = verified[key]
                except KeyError:
                    try:
                        prec = verified[key] = self._verify(module, a, out, state.module_name(module))
                    except UnsupportedModuleError as e:  # the parameters by autograd under strict=False
                        raise NotPerSampleError(str(e), {sl.name: str(e) for sl in tap.slots.values()}) from None
                fn = backwards.get(prec) or backward_in(prec)
            seg = state.rows(out.flatten(-nd) if nd > 1 else out, d, module)
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            return state.apply(out, fn, seg, a) if has_w else state.apply(out, fn, seg)

        return around

    #: what a structurally recognised class is taken for, in the check's error message
    kind = "a normalisation layer"

    def _verify(self, module: nn.Module, a: Tensor, out: Tensor, name: str) -> torch.dtype:
        """Check out == γ⊙x̂ or (1+γ)⊙x̂ on the finite rows; return the precision of x̂ that matches best."""
        best, best_err, best_tol = None, float("inf"), 0.0
        nd = max(1, module.weight.dim())
        with torch.no_grad():
            if a.shape != out.shape:
                raise UnsupportedModuleError(
                    f"module {name!r} ({type(module).__name__}) returned shape {tuple(out.shape)} for an input of "
                    f"shape {tuple(a.shape)}: not {self.kind}; register an adapter with geffect_fast.capture.register"
                )
            finite = (torch.isfinite(a) & torch.isfinite(out)).flatten(-nd).all(-1)  # per row
            if not bool(finite.any()):
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}) saw NaN or inf in every row of its input or output: "
                    "the model's forward is not finite on this batch (check the weights and the batch)"
                )
            keep = finite.reshape(*finite.shape, *([1] * nd))
            for p in self.precisions(a):
                xh = self.xhat(module, a, p)
                w = module.weight.to(xh.dtype)
                y = out.to(xh.dtype)
                scale = torch.where(keep, y, 0).abs().max().clamp_min(torch.finfo(xh.dtype).tiny)
                b = getattr(module, "bias", None)
                b = b.to(xh.dtype) if isinstance(b, Tensor) else 0
                err = min(
                    (torch.where(keep, y - (w * xh + b), 0).abs().max() / scale).item(),
                    (torch.where(keep, y - ((1 + w) * xh + b), 0).abs().max() / scale).item(),
                )
                tol = _rtol(out.dtype, p)
                if best is None or err / tol < best_err / best_tol:  # the precision that fits best, for its dtype
                    best, best_err, best_tol = p, err, tol
        if best_err > best_tol:
            raise UnsupportedModuleError(
                f"module {name!r} ({type(module).__name__}) looks like {self.kind} but its output is neither "
                f"γ⊙x̂ nor (1+γ)⊙x̂ of its input (relative error {best_err:.2e}); register an adapter for it "
                "with geffect_fast.capture.register (or restore its own forward, if one was set on the instance)"
            )
        return best


@register(nn.LayerNorm)
class LayerNormAdapter(_NormAdapter):
    """``torch.nn.LayerNorm`` with ``elementwise_affine`` (weight, and bias unless ``bias=False``)."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return None if module.elementwise_affine else "LayerNorm without affine parameters has nothing to measure"

    def normalized_dims(self, module: nn.Module) -> int:
        return len(module.normalized_shape)

    def xhat(self, module: nn.Module, a: Tensor, prec: torch.dtype) -> Tensor:
        return F.layer_norm(a.to(prec), module.normalized_shape, None, None, module.eps)


@register(nn.RMSNorm)
class TorchRMSNormAdapter(_NormAdapter):
    """``torch.nn.RMSNorm`` (ε = finfo(dtype).eps when None, as torch does)."""

    param_names = ("weight",)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return None if module.elementwise_affine else "RMSNorm without affine parameters has nothing to measure"

    def normalized_dims(self, module: nn.Module) -> int:
        return len(module.normalized_shape)

    def xhat(self, module: nn.Module, a: Tensor, prec: torch.dtype) -> Tensor:
        eps = module.eps if module.eps is not None else torch.finfo(a.dtype).eps
        return F.rms_norm(a.to(prec), module.normalized_shape, None, eps)


_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon", "layer_norm_eps", "rms_norm_eps")


class HFRMSNormAdapter(_NormAdapter):
    """RMSNorm classes found by structure: a class named ``*RMSNorm`` with one 1-D ``weight`` and an ε
    attribute. Gemma's (1 + γ) form has the same γ-gradient. Verified on first use."""

    param_names = ("weight",)
    verify = True
    kind = "an RMSNorm"

    @staticmethod
    def eps(module: nn.Module) -> float:
        for attr in _EPS_ATTRS:
            v = getattr(module, attr, None)
            if isinstance(v, (int, float)):
                return float(v)
        raise UnsupportedModuleError(f"{type(module).__name__} has no epsilon attribute")

    def precisions(self, a: Tensor) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.float64) if a.dtype == torch.float64 else (torch.float32,)

    def xhat(self, module: nn.Module, a: Tensor, prec: torch.dtype) -> Tensor:
        x = a.to(prec)
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps(module))).to(_acc(a))


_HF_RMSNORM = HFRMSNormAdapter()


@register_recogniser
def _recognise_rmsnorm(module: nn.Module) -> Adapter | None:
    if not type(module).__name__.lower().endswith("rmsnorm"):
        return None
    params = dict(module.named_parameters(recurse=False))
    w = params.get("weight")
    if set(params) != {"weight"} or w.dim() != 1:
        return None
    if not any(isinstance(getattr(module, a, None), (int, float)) for a in _EPS_ATTRS):
        return None
    return _HF_RMSNORM


class CohereLayerNormAdapter(HFRMSNormAdapter):
    """Cohere's ``CohereLayerNorm``: y = γ ⊙ (a − μ)/√(σ² + ε) in float32, no bias; γ is [d], or [heads, d_head]
    for its QK norm (statistics over the last dim only). Verified on first use, as the RMSNorms are."""

    kind = "a LayerNorm without bias"

    def normalized_dims(self, module: nn.Module) -> int:
        return module.weight.dim()

    def xhat(self, module: nn.Module, a: Tensor, prec: torch.dtype) -> Tensor:
        x = a.to(prec)
        c = x - x.mean(-1, keepdim=True)  # the module's own arithmetic, so x̂ rounds as its does
        return (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.eps(module))).to(_acc(a))


_COHERE_LAYERNORM = CohereLayerNormAdapter()


@register_recogniser
def _recognise_cohere_layernorm(module: nn.Module) -> Adapter | None:
    t = type(module)
    if t.__name__ != "CohereLayerNorm" or not t.__module__.startswith("transformers."):
        return None
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"weight"} or not isinstance(getattr(module, "variance_epsilon", None), (int, float)):
        return None
    return _COHERE_LAYERNORM
