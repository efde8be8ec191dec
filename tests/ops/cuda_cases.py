"""The memory layouts the cuda backend's vector and scalar paths are tested on, shared by tests/ops/test_cuda.py
(on a GPU) and tests/ops/cuda_emulation/worker.py (the host emulation, on CPU tensors)."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (layout, whether the vector path runs): contiguous rows; rows padded to 256 elements with a width that
# leaves a tail after the vector steps; a view one element into a wider tensor and an odd width (both force
# the scalar path); and contiguous rows with the scalar path forced
LAYOUTS = [
    ("aligned", True),
    ("padded-tail", True),
    ("offset-view", False),
    ("odd-width", False),
    ("forced-scalar", False),
]


def view(shape: tuple[int, ...], dtype: torch.dtype, layout: str, gen: torch.Generator, dev="cpu") -> torch.Tensor:
    """A tensor of ``shape`` (the last dim the feature width C, 192 or 203) on ``dev``, laid out per ``layout``."""
    *lead, C = shape
    if layout == "padded-tail":
        return torch.randn(*lead, 256, generator=gen).to(dtype).to(dev)[..., :C]
    if layout == "offset-view":
        return torch.randn(*lead, C + 1, generator=gen).to(dtype).to(dev)[..., 1:]
    return torch.randn(*lead, C, generator=gen).to(dtype).to(dev)


def width(layout: str) -> int:
    """192: whole vector steps at every E (2, 4, 8); 203: a tail at every E."""
    return 203 if layout in ("padded-tail", "odd-width") else 192


def nan(shape, dtype: torch.dtype, dev="cpu") -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=dev)


def acc(dtype: torch.dtype) -> torch.dtype:
    """Where a dtype's values are accumulated: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
