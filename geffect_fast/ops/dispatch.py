"""Backend selection for the kernel ops.

Backends implement the contract of :mod:`geffect_fast.ops.contract` (``reference.py`` is the spec):

==========  ==============================================  =====================================
name        what                                            runs on
==========  ==============================================  =====================================
reference   plain torch, tiled                              anything torch runs on
native      C++/OpenMP kernels (``csrc/cpu``)               CPU tensors
cuda        CUDA kernels (``csrc/cuda``)                    CUDA tensors
triton      Triton kernels (``ops/triton``)                 CUDA tensors; CPU under TRITON_INTERPRET=1
==========  ==============================================  =====================================

``resolve("auto", device, dtype, dir_dtype)`` picks per op from :data:`AUTO`, a table filled from
measurements (benchmarks/results/ops_cpu.md on CPU): the first backend in an op's list that is usable on
the device and supports both the activations' and the direction's dtype (a float64 direction on a float32
model goes past Triton). Naming a backend that cannot run raises a clear error.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from .contract import OPS

_MODULES = {
    "reference": "geffect_fast.ops.reference",
    "native": "geffect_fast.ops.native",
    "cuda": "geffect_fast.ops.cuda",
    "triton": "geffect_fast.ops.triton",
}

#: per device type and op, backends in order of preference (measured; see the module docstring)
AUTO: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {
        "linear_dot": ("reference",),
        "embedding_dot": ("native", "reference"),
        "norm_dot": ("native", "reference"),
        "segment_outer": ("native", "reference"),
    },
    # provisional until measured on a GPU (benchmarks/gpu_check.sh). linear_dot: the cuda backend is cuBLAS
    # + a fused epilogue (predictable: the GEMM's time plus one pass over P), Triton's fused kernel second
    "cuda": {
        "linear_dot": ("cuda", "triton", "reference"),
        "embedding_dot": ("cuda", "triton", "reference"),
        "norm_dot": ("cuda", "triton", "reference"),
        "segment_outer": ("cuda", "triton", "reference"),
    },
}
_DEFAULT_AUTO = {op: ("reference",) for op in OPS}


#: ops a backend may also give without their argument checks, as ``<op>_kernel`` (same arguments and results)
KERNEL_OPS = ("linear_dot", "embedding_dot", "norm_dot")


@dataclass(frozen=True)
class Backend:
    """The ops to use; ``name`` says which implementation serves each. ``kernels`` holds the same ops without
    their argument checks (``<op>_kernel`` where the backend has one, else the checked op): what the engine calls
    at every tap, once its plan has established what the checks would."""

    name: str
    linear_dot: Callable
    embedding_dot: Callable
    norm_dot: Callable
    segment_outer: Callable
    kernels: Backend | None = None

    @property
    def unchecked(self) -> Backend:
        """The ops without argument checks (this backend itself when it has none)."""
        return self.kernels if self.kernels is not None else self


def _module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def _op(name: str, op: str) -> Callable:
    mod = _module(name)
    return mod.get_op(op) if hasattr(mod, "get_op") else getattr(mod, op)


def _kernel(name: str, op: str) -> Callable:
    """Backend ``name``'s ``<op>_kernel`` (no argument checks), or its checked op where it has none."""
    if op in KERNEL_OPS:
        mod = _module(name)
        try:
            return mod.get_op(f"{op}_kernel") if hasattr(mod, "get_op") else getattr(mod, f"{op}_kernel")
        except AttributeError:
            pass
    return _op(name, op)


def _backend(label: str, chosen: dict[str, str]) -> Backend:
    """The Backend serving each op from the backend ``chosen[op]``, with its unchecked kernels."""
    kernels = Backend(label, *(_kernel(chosen[op], op) for op in OPS))
    return Backend(label, *(_op(chosen[op], op) for op in OPS), kernels=kernels)


@functools.cache
def _reason(name: str, device: torch.device, *dtypes: torch.dtype | None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` with these dtypes (None: it can). Kept per process: what
    is built and which devices exist do not change while it runs (asking the CUDA runtime costs a call)."""
    mod = _module(name)
    why = mod.unusable_reason(device)
    for dtype in dtypes:
        if why is None and dtype is not None and not mod.supports(dtype):
            why = f"the {name} backend does not support {dtype}"
    return why


def available() -> list[str]:
    """Names of every known backend."""
    return list(_MODULES)


def backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, dict[str, object]]:
    """``{name: {"built": bool, "usable": bool, "reason": str, "auto_ops": [op, ...]}}`` for every backend on
    ``device``: whether it is compiled in, whether it can run here (and if not, why), and the ops that
    ``backend="auto"`` gives it here for activations and directions of ``dtype`` (every op goes to exactly one
    backend)."""
    dev = torch.device(device)
    picks = _auto_picks(dev, dtype, dtype)
    out: dict[str, dict[str, object]] = {}
    for name in _MODULES:
        mod = _module(name)
        built, why = mod.built()
        reason = why if not built else _reason(name, dev, None)
        out[name] = {
            "built": built,
            "usable": reason is None,
            "reason": reason or "",
            "auto_ops": [op for op in OPS if picks[op] == name],
        }
    return out


def _auto_picks(device: torch.device, dtype: torch.dtype | None, dir_dtype: torch.dtype | None) -> dict[str, str]:
    """op -> the backend ``auto`` uses: the first in :data:`AUTO`'s list that can run here with these dtypes."""
    table = AUTO.get(device.type, _DEFAULT_AUTO)
    return {op: next((b for b in table[op] if _reason(b, device, dtype, dir_dtype) is None), "reference") for op in OPS}


def resolve(
    name: str, device: torch.device, dtype: torch.dtype | None = None, dir_dtype: torch.dtype | None = None
) -> Backend:
    """The ops to use for backend ``name`` ("auto" or a name from :func:`available`) on ``device`` with
    activations of ``dtype`` and directions of ``dir_dtype``. Kept per arguments and :data:`AUTO`'s entries for
    the device: what is built and which devices exist do not change while the process runs."""
    table = tuple(AUTO.get(device.type, _DEFAULT_AUTO).items()) if name == "auto" else None
    return _resolve(name, device, dtype, dir_dtype, table)


@functools.lru_cache(maxsize=64)
def _resolve(
    name: str, device: torch.device, dtype: torch.dtype | None, dir_dtype: torch.dtype | None, table: tuple | None
) -> Backend:
    if name == "auto":
        chosen = _auto_picks(device, dtype, dir_dtype)
        label = "auto(" + ", ".join(f"{op}={b}" for op, b in chosen.items()) + ")"
        return _backend(label, chosen)
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(['auto', *_MODULES])}")
    why = _reason(name, device, dtype, dir_dtype)
    if why is not None:
        raise RuntimeError(f"backend {name!r} cannot run here: {why}")
    return _backend(name, dict.fromkeys(OPS, name))
