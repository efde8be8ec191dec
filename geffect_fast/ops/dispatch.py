"""Backend selection for the kernel ops.

A backend is a module that implements the contract of :mod:`geffect_fast.ops.reference`
(``linear_dot``, ``embedding_dot``, ``norm_dot``). ``resolve("auto", device)`` picks the best usable one
for a device; naming a backend that cannot run raises a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from . import reference


@dataclass(frozen=True)
class Backend:
    """One implementation of the op contract."""

    name: str
    module: ModuleType
    #: device -> None if usable there, else the reason it is not
    unusable_reason: Callable[[torch.device], str | None]

    @property
    def linear_dot(self):
        return self.module.linear_dot

    @property
    def embedding_dot(self):
        return self.module.embedding_dot

    @property
    def norm_dot(self):
        return self.module.norm_dot


_REGISTRY: dict[str, Backend] = {
    "reference": Backend("reference", reference, lambda device: None),
}
#: preference order of ``backend="auto"``
_AUTO_ORDER: tuple[str, ...] = ("reference",)


def available() -> list[str]:
    """Names of every known backend."""
    return list(_REGISTRY)


def backends(device: str | torch.device = "cpu") -> dict[str, dict[str, object]]:
    """``{name: {"built": bool, "usable": bool, "reason": str}}`` for ``device``."""
    dev = torch.device(device)
    out: dict[str, dict[str, object]] = {}
    for name, b in _REGISTRY.items():
        reason = b.unusable_reason(dev)
        out[name] = {"built": True, "usable": reason is None, "reason": reason or ""}
    return out


def resolve(name: str, device: torch.device) -> Backend:
    """The backend to use for ``name`` ("auto" or a registered name) on ``device``."""
    if name == "auto":
        for cand in _AUTO_ORDER:
            b = _REGISTRY[cand]
            if b.unusable_reason(device) is None:
                return b
        raise RuntimeError(f"no usable op backend for device {device}")  # pragma: no cover - reference always runs
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(['auto', *_REGISTRY])}")
    b = _REGISTRY[name]
    reason = b.unusable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
    return b
