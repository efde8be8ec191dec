"""The ``cuda`` backend: CUDA kernels from ``csrc/cuda`` (module ``geffect_fast._C_cuda``) and cuBLAS through
torch, launched on torch's current stream of the tensors' device.

* ``linear_dot`` — the GEMM route (:func:`geffect_fast.ops.gemm.linear_dot_gemm`): P = x₁ M_k by cuBLAS in
  token chunks (float32 output of bf16/fp16 operands on the tensor cores, a hi + lo split for float32
  directions on 16-bit activations, DGEMM for float64), then the CUDA epilogue :func:`row_dot_tokens`.
* ``embedding_dot``, ``norm_dot`` and the epilogue ``row_dot`` — one warp per token row reading the
  activation row once for up to ``_C_cuda.max_k_per_launch()`` directions (more go in groups), with 16-byte
  vector loads where every row is unit-stride and 16-byte aligned (else a scalar path through the strides),
  writing per-token values [K, N] that :func:`~geffect_fast.ops.contract.segment_sum` reduces per sample (a
  reshape-sum for uniform segments; no atomics, nothing indexed by a sample id in a kernel).
* ``segment_outer`` — uniform segments: one batched GEMM (:func:`~geffect_fast.ops.gemm.segment_outer_bmm`);
  ragged ids (checked to lie in [0, B) first): a CUDA kernel with atomics.

The module links the static CUDA runtime, so it builds wherever nvcc is and imports on machines without a
GPU; ``unusable_reason`` then says why it cannot run. float32, float64, bfloat16 and float16 activations and
directions (in any mix), float32 (float64 when an input is float64) accumulation and outputs. Each launch
makes the tensors' device current and restores the previous one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native_common
from ._native_common import index, mat, mat3, supports  # noqa: F401  (supports: the backend interface)
from .contract import (
    Seg,
    acc_dtype,
    check_embedding,
    check_linear,
    check_norm,
    check_row_dot,
    check_seg_values,
    check_segment_outer,
    segment_sum,
)
from .gemm import linear_dot_gemm_kernel, segment_outer_bmm

try:
    from .. import _C_cuda as _ext

    _IMPORT_ERROR = None
except ImportError as e:  # built without nvcc, or not built
    _ext = None
    _IMPORT_ERROR = str(e)

NAME = "cuda"


def built() -> tuple[bool, str]:
    if _ext is None:
        return False, (
            f"extension geffect_fast._C_cuda not built ({_IMPORT_ERROR}); it builds when nvcc is found at install "
            "time (GEFFECT_FAST_CUDA=1 forces it)"
        )
    return True, ""


def unusable_reason(device: torch.device) -> str | None:
    ok, why = built()
    if not ok:
        return why
    n, reason = _ext.device_count()
    if n == 0:
        return f"no CUDA device: {_driver_reason(reason)}"
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device.type}"
    if not torch.cuda.is_available():
        return "torch has no CUDA support in this build"
    return None


def _load_driver():
    """The NVIDIA driver library (libcuda), or None when this machine has none."""
    import ctypes
    import ctypes.util

    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _driver_reason(runtime_reason: str) -> str:
    """The CUDA runtime's reason for seeing no device, said plainly: the statically linked runtime reports a
    machine without any NVIDIA driver as "driver version is insufficient", so look for the driver first."""
    import ctypes

    lib = _load_driver()
    if lib is None:
        return "no NVIDIA driver on this machine (libcuda could not be loaded); the cuda backend needs a CUDA GPU"
    version = ctypes.c_int(0)
    try:
        ok = lib.cuDriverGetVersion(ctypes.byref(version)) == 0
    except AttributeError:  # pragma: no cover - not a CUDA driver library
        ok = False
    if ok and "insufficient" in runtime_reason:
        v, rt = version.value, _ext.runtime_version()
        return (
            f"the NVIDIA driver supports CUDA {v // 1000}.{v % 1000 // 10}, older than the CUDA {rt // 1000}."
            f"{rt % 1000 // 10} runtime this module was built with ({runtime_reason})"
        )
    return runtime_reason


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output allocation through ``_native_common.empty`` (looked up per call: the tests poison it with NaN to
    check that the kernels write every element)."""
    return _native_common.empty(shape, dtype, device)


def _device(*tensors: Tensor | None) -> torch.device:
    """The one CUDA device of the given tensors (a clear error for CPU tensors or a mix of devices)."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) != 1:
        raise ValueError(f"the cuda backend needs every tensor on one device, got {sorted(map(str, devs))}")
    dev = devs.pop()
    if dev.type != "cuda":
        raise ValueError(f"the cuda backend takes CUDA tensors, got {dev}")
    return dev


def _module():
    if _ext is None:
        raise RuntimeError(built()[1])
    return _ext


def _launch(fn, *args, device: torch.device):
    """Run a kernel launcher on ``device`` (made current inside the launcher) and its current torch stream."""
    index_ = device.index if device.index is not None else torch.cuda.current_device()
    return fn(*args, index_, torch.cuda.current_stream(index_).cuda_stream)


def _promoted(x: Tensor | None, y: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """x and y in one dtype (the promoted one, an exact conversion) where both are given and differ."""
    if x is None or y is None or x.dtype == y.dtype:
        return x, y
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def _out(t: Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.data_ptr(), t.stride(0), t.stride(1))


def _check_out(out: Tensor, K: int, n: int, *inputs: Tensor | None, exact: bool = True) -> None:
    """``out`` is [K, n] in the accumulation dtype of ``inputs`` (``exact=False``: float64 is also allowed
    where the inputs would accumulate in float32 — linear_dot's bias term beside a float64 weight direction)."""
    if out.shape != (K, n):
        raise ValueError(f"out must be [{K}, {n}], got {tuple(out.shape)}")
    acc = acc_dtype(*inputs)
    if out.dtype != acc and (exact or out.dtype != torch.float64):
        raise TypeError(f"out must be in the accumulation dtype {acc}, got {out.dtype}")


def row_dot_tokens(p: Tensor, x: Tensor, out: Tensor, vectorize: bool = True) -> bool:
    """out[k, t] = p[k, t] · x[t] for p [K, n, C] (any strides; stride 0 over rows: a broadcast bias direction)
    and x [n, C], into ``out`` [K, n] (float32, or float64 when an input is; any strides) — linear_dot's GEMM
    epilogue. ``p`` is read in ``out``'s dtype (converted first when it is not: one row when broadcast).
    Returns whether the 16-byte vector path ran (``vectorize=False`` forces the scalar one)."""
    if x.dim() != 2 or p.dim() != 3 or p.shape[1:] != x.shape:
        raise ValueError(f"p [K, n, C] and x [n, C] expected, got {tuple(p.shape)} and {tuple(x.shape)}")
    _check_out(out, p.shape[0], p.shape[1], p, x, exact=False)
    _device(p, x, out)
    return _row_dot_launch(p, x, out, vectorize)


def _row_dot_launch(p: Tensor, x: Tensor, out: Tensor, vectorize: bool = True) -> bool:
    """:func:`row_dot_tokens` without its checks (the GEMM route's epilogue, once per chunk of P)."""
    K, n, C = p.shape
    if n == 0 or K == 0:
        return False
    if p.dtype != out.dtype:
        p = p[:, :1].to(out.dtype).expand(K, n, C) if p.stride(1) == 0 else p.to(out.dtype)
    return _launch(
        _module().row_dot, mat3(p), mat(x), _out(out), n, C, K, out.dtype == torch.float64, vectorize, device=x.device
    )


def row_dot(p: Tensor, x: Tensor, seg: Seg, B: int) -> Tensor:
    """CUDA implementation of :func:`geffect_fast.ops.reference.row_dot`."""
    N, C, K = check_row_dot(p, x, seg, B)
    tok = _empty((K, N), acc_dtype(p, x), x.device)
    row_dot_tokens(p, x, tok)
    return segment_sum(tok, seg, B)


def linear_dot(
    a: Tensor | None, g: Tensor, v: Tensor | None, seg: Seg, B: int, vb: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """CUDA implementation of :func:`geffect_fast.ops.reference.linear_dot`: cuBLAS (through torch) for
    P = x₁ M_k in token chunks, the CUDA epilogue :func:`row_dot_tokens`, then per-sample sums."""
    check_linear(a, g, v, seg, B, vb)
    _device(a if v is not None else None, g, v, vb)
    return linear_dot_kernel(a, g, v, seg, B, vb)


def linear_dot_kernel(
    a: Tensor | None, g: Tensor, v: Tensor | None, seg: Seg, B: int, vb: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`linear_dot` without the argument checks (``contract.check_linear`` holds, every tensor on g's
    CUDA device)."""
    with torch.cuda.device(g.device):
        return linear_dot_gemm_kernel(a, g, v, seg, B, vb, _row_dot_launch, empty=_empty)


def _embedding_tokens(
    ids: Tensor, g: Tensor, v: Tensor, out: Tensor, padding_idx: int | None = None, vectorize: bool = True
) -> bool:
    """out[k, t] = g_t · V_k[ids_t] (0 where ids_t = padding_idx) into ``out`` [K, N] (shapes checked by the
    caller). Returns whether the 16-byte vector path ran (``vectorize=False`` forces the scalar one)."""
    _check_out(out, v.shape[0], g.shape[0], g, v)
    _device(ids, g, v, out)
    return _embedding_launch(ids, g, v, out, padding_idx, vectorize)


def _embedding_launch(
    ids: Tensor, g: Tensor, v: Tensor, out: Tensor, padding_idx: int | None = None, vectorize: bool = True
) -> bool:
    """:func:`_embedding_tokens` without its checks."""
    N, d = g.shape
    K, vocab = v.shape[0], v.shape[1]
    if N == 0 or K == 0:
        return False
    pad = -1 if padding_idx is None else int(padding_idx)
    fn = _module().embedding_dot
    acc64 = out.dtype == torch.float64
    return _launch(fn, index(ids), mat(g), mat3(v), _out(out), N, d, K, vocab, pad, acc64, vectorize, device=g.device)


def embedding_dot(ids: Tensor, g: Tensor, v: Tensor, seg: Seg, B: int, padding_idx: int | None = None) -> Tensor:
    """CUDA implementation of :func:`geffect_fast.ops.reference.embedding_dot`."""
    check_embedding(ids, g, v, seg, B)
    _device(ids, g, v)
    return embedding_dot_kernel(ids, g, v, seg, B, padding_idx)


def embedding_dot_kernel(ids: Tensor, g: Tensor, v: Tensor, seg: Seg, B: int, padding_idx: int | None = None) -> Tensor:
    """:func:`embedding_dot` without the argument checks (``contract.check_embedding`` holds, one CUDA device)."""
    tok = _empty((v.shape[0], g.shape[0]), acc_dtype(g, v), g.device)
    _embedding_launch(ids, g, v, tok, padding_idx)
    return segment_sum(tok, seg, B)


def _norm_tokens(
    xhat: Tensor,
    g: Tensor,
    vw: Tensor | None,
    vb: Tensor | None,
    out_w: Tensor | None,
    out_b: Tensor | None,
    vectorize: bool = True,
) -> bool:
    """out_w[k, t] = (g_t ⊙ x̂_t) · vw_k and out_b[k, t] = g_t · vb_k into [K, N] outputs (shapes checked by
    the caller). The kernel takes x̂ and g in one dtype and vw and vb in one: where they differ, both go to the
    promoted type (exact). Returns whether the 16-byte vector path ran."""
    K = (vw if vw is not None else vb).shape[0]
    for v, o in ((vw, out_w), (vb, out_b)):
        if v is not None:
            _check_out(o, K, g.shape[0], xhat, g, vw, vb)
    _device(xhat, g, vw, vb, out_w, out_b)
    return _norm_launch(xhat, g, vw, vb, out_w, out_b, vectorize)


def _norm_launch(
    xhat: Tensor,
    g: Tensor,
    vw: Tensor | None,
    vb: Tensor | None,
    out_w: Tensor | None,
    out_b: Tensor | None,
    vectorize: bool = True,
) -> bool:
    """:func:`_norm_tokens` without its checks."""
    xhat, g = _promoted(xhat, g)
    vw, vb = _promoted(vw, vb)
    N, d = g.shape
    K = (vw if vw is not None else vb).shape[0]
    if N == 0 or K == 0:
        return False
    fn = _module().norm_dot
    acc64 = (out_w if out_w is not None else out_b).dtype == torch.float64
    args = (mat(xhat), mat(g), mat(vw), mat(vb), _out(out_w), _out(out_b), N, d, K, acc64, vectorize)
    return _launch(fn, *args, device=g.device)


def norm_dot(
    xhat: Tensor, g: Tensor, vw: Tensor | None, vb: Tensor | None, seg: Seg, B: int
) -> tuple[Tensor | None, Tensor | None]:
    """CUDA implementation of :func:`geffect_fast.ops.reference.norm_dot`."""
    check_norm(xhat, g, vw, vb, seg, B)
    _device(xhat, g, vw, vb)
    return norm_dot_kernel(xhat, g, vw, vb, seg, B)


def norm_dot_kernel(
    xhat: Tensor, g: Tensor, vw: Tensor | None, vb: Tensor | None, seg: Seg, B: int
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`norm_dot` without the argument checks (``contract.check_norm`` holds, one CUDA device)."""
    N = g.shape[0]
    K = (vw if vw is not None else vb).shape[0]
    acc = acc_dtype(xhat, g, vw, vb)
    tw = None if vw is None else _empty((K, N), acc, g.device)
    tb = None if vb is None else _empty((K, N), acc, g.device)
    _norm_launch(xhat, g, vw, vb, tw, tb)
    return (
        None if tw is None else segment_sum(tw, seg, B),
        None if tb is None else segment_sum(tb, seg, B),
    )


def segment_outer(u: Tensor, w: Tensor, seg: Seg, B: int) -> Tensor:
    """CUDA implementation of :func:`geffect_fast.ops.pairwise.segment_outer`: a batched GEMM over uniform
    segments, the atomic kernel over ragged ids (checked to lie in [0, B) first)."""
    N, ku, kw = check_segment_outer(u, w, seg, B)
    dev = _device(u, w, seg if isinstance(seg, Tensor) else None)
    if isinstance(seg, int):
        with torch.cuda.device(dev):
            return segment_outer_bmm(u, w, seg, B)
    check_seg_values(seg, B)
    acc = acc_dtype(u, w)
    out = _empty((B, ku, kw), acc, dev)
    args = (mat(u), mat(w), index(seg), N, ku, kw, B, out.data_ptr(), acc == torch.float64)
    _launch(_module().segment_outer, *args, device=dev)
    return out
