"""Leave the model exactly as it was: ``.grad`` tensors, ``requires_grad`` flags, train/eval mode of every
module, and the RNG state (CPU, and every initialised CUDA device), also when the body raises."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

MODES = ("eval", "train", "keep")


def _unique_params(models: tuple[nn.Module | None, ...]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for m in models:
        if m is None:
            continue
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@contextmanager
def preserved(*models: nn.Module | None, mode: str = "keep") -> Iterator[None]:
    """Snapshot, yield, restore.

    Inside the block every parameter's ``.grad`` is None (the originals are put back afterwards, untouched),
    so any gradient accumulated inside lands in fresh tensors. ``mode`` "eval" or "train" switches the
    models for the duration; "keep" leaves them as they are.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    params = _unique_params(models)
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    training = [(m, m.training) for model in models if model is not None for m in model.modules()]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        for p in params:
            p.grad = None
        if mode != "keep":
            for model in models:
                if model is not None:
                    model.train(mode == "train")
        yield
    finally:
        for p, g, f in zip(params, grads, flags):
            p.grad = g
            p.requires_grad_(f)
        for m, t in training:
            m.training = t
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
