"""Mixture-of-experts layers of Hugging Face models (Mixtral, Qwen2-MoE, ...): fused ``*Experts`` and
``*TopKRouter`` modules. Refused, with the reason — never measured wrongly.

* **Fused experts** hold every expert's weights in one 3-D parameter ([E, out, in]: ``gate_up_proj``,
  ``down_proj``) and run expert e, inside one forward, on the tokens its router sent it, ``x[token_idx]``:
  rows in routing order, drawn from every sample. The per-sample gradient of expert e's weights,
  Σ_{t∈b routed to e} g_{t,e} x_tᵀ, needs the gradient at each expert's own output inside that forward; the
  module's output (the experts' weighted sum per token) does not carry it.
* **Top-k routers** compute ``F.linear(x, weight)`` and, inside the same forward, the top-k weights from it;
  they return (logits, top-k weights, indices), so the gradient reaches the weight through a tensor their
  output does not expose.

With ``strict=False`` both go to the group ``uncovered`` and are measured by ordinary autograd (exact in
aggregate); every other layer of the model (attention, shared experts, norms, embeddings) stays per
instance. A model whose experts are ``nn.Linear`` modules run on ``x[idx]`` is caught at run time instead
(``CaptureSession.check_rows``).
"""

from __future__ import annotations

from torch import nn

from .base import Adapter
from .registry import register_recogniser


class _Refused(Adapter):
    """Claims a module only to say why it cannot be measured per sample."""

    param_names = ()

    def __init__(self, reason: str):
        self.reason = reason

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return self.reason


_EXPERTS = _Refused(
    "fused MoE experts: each expert runs on the tokens its router sent it (x[token_idx]) through one 3-D weight "
    "indexed per expert, inside a single forward, so no tap on the module's output sees a per-expert gradient; "
    "pass strict=False to measure them by ordinary autograd (aggregate only)"
)
_ROUTER = _Refused(
    "MoE top-k router: its weight reaches the loss through the top-k weights it computes inside its own forward, "
    "not through the logits it returns; pass strict=False to measure it by ordinary autograd (aggregate only)"
)


@register_recogniser
def _recognise_moe(module: nn.Module) -> Adapter | None:
    name = type(module).__name__
    params = list(module.parameters(recurse=False))
    if name.endswith("Experts") and any(p.dim() == 3 for p in params):
        return _EXPERTS
    if name.endswith("TopKRouter") and params:
        return _ROUTER
    return None
