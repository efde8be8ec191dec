"""Per-layer capture: one file per layer kind, each registering its adapter (Opacus ``grad_sample`` style).

- :mod:`.linear` — ``nn.Linear``, HF ``Conv1D``, Falcon's ``FalconLinear``
- :mod:`.embedding` — ``nn.Embedding`` and subclasses (token, learned position, scaled)
- :mod:`.norm` — ``nn.LayerNorm``, ``nn.RMSNorm``, HF ``*RMSNorm`` classes (incl. Gemma's (1 + γ)), Cohere's
  ``CohereLayerNorm``
- :mod:`.moe` — HF fused MoE experts (one slice per expert, rows followed from the gather) and top-k routers, per sample

Tied parameters (lm_head = embedding) are tapped at each use; the contributions add, by linearity.
"""

from . import embedding, linear, moe, norm  # noqa: F401  (registration side effects)
from .base import (
    Adapter,
    Consumer,
    NotPerSampleError,
    PassState,
    Slot,
    Tap,
    UnsupportedModuleError,
    first_input,
    tap,
)
from .registry import find_adapter, register, register_recogniser
from .session import CaptureSession

__all__ = [
    "Adapter",
    "CaptureSession",
    "Consumer",
    "NotPerSampleError",
    "PassState",
    "Slot",
    "Tap",
    "UnsupportedModuleError",
    "find_adapter",
    "first_input",
    "register",
    "register_recogniser",
    "tap",
]
