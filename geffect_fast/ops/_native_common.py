"""Shared by the compiled backends (native CPU, CUDA): tensors -> the raw descriptors the extension
modules take (see csrc/common/bind_args.h), and the argument handling both wrap around their kernels."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .contract import (
    acc_dtype,
    check_embedding,
    check_linear,
    check_norm,
    check_segment_outer,
    seg_tensor,
)

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
NULL2 = (0, 0, 0, 0)
NULL3 = (0, 0, 0, 0, 0)


def supports(dtype: torch.dtype) -> bool:
    """The compiled kernels take float32, float64, bfloat16 and float16."""
    return dtype in DTYPE_CODE


def _code(t: Tensor) -> int:
    try:
        return DTYPE_CODE[t.dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {t.dtype}; expected one of {list(DTYPE_CODE)}") from None


def mat(t: Tensor | None) -> tuple:
    if t is None:
        return NULL2
    s = t.stride()
    try:
        return (t.data_ptr(), DTYPE_CODE[t.dtype], s[0], s[1])
    except KeyError:
        return (t.data_ptr(), _code(t), s[0], s[1])


def mat3(t: Tensor | None) -> tuple:
    if t is None:
        return NULL3
    s = t.stride()
    try:
        return (t.data_ptr(), DTYPE_CODE[t.dtype], s[0], s[1], s[2])
    except KeyError:
        return (t.data_ptr(), _code(t), s[0], s[1], s[2])


def index(t: Tensor) -> tuple:
    return (t.data_ptr(), t.dtype is torch.int64, t.stride()[0])


def seg_ids(seg, n: int, B: int, device: torch.device) -> Tensor:
    """``seg`` (an int T or ids, their values checked by the caller: the kernels index outputs with them) as ids.
    (Keep the result alive until the kernel has run: the descriptor holds only its pointer.)"""
    if seg.__class__ is int:
        try:
            return _UNIFORM[(B, seg, device)]
        except KeyError:
            return uniform_ids(B, seg, device)
    return seg


_UNIFORM: dict[tuple[int, int, torch.device], Tensor] = {}


def uniform_ids(B: int, T: int, device: torch.device) -> Tensor:
    """The ids [0]*T + [1]*T + … + [B-1]*T of uniform segments (valid by construction), kept per shape and device
    (the last few): a pass asks for the same ones at every tapped layer."""
    if len(_UNIFORM) >= 8:
        _UNIFORM.clear()
    ids = _UNIFORM[(B, T, device)] = seg_tensor(T, B * T, B, device)
    return ids


def ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output allocation: the kernels write every element (tests poison this to check that they do)."""
    return torch.empty(shape, dtype=dtype, device=device)


class KernelOps:
    """linear_dot / embedding_dot / norm_dot over one extension module.

    ``call(fn, *args)`` runs a kernel: the CPU backend appends the thread count, the CUDA backend the device
    and stream. Activations (a, g, x̂) share one dtype and directions (v, vb) another, as the kernels
    expect; mismatches are converted on the small side or the rare one.
    """

    def __init__(self, ext: object | None, missing: Callable[[], str], call: Callable[..., None]):
        self._ext = ext
        self._missing = missing
        self._call = call

    def _module(self):
        m = self._ext
        if m is None:
            raise RuntimeError(self._missing())
        return m

    def linear_dot(self, a, g, v, seg, B, vb=None):
        check_linear(a, g, v, seg, B, vb)
        return self.linear_dot_kernel(a, g, v, seg, B, vb)

    def linear_dot_kernel(self, a, g, v, seg, B, vb=None):
        """:meth:`linear_dot` without the argument checks."""
        N, o = g.shape
        i = 0 if v is None else a.shape[1]
        K = (v if v is not None else vb).shape[0]
        seg = seg_ids(seg, N, B, g.device)
        if a is not None and a.dtype != g.dtype:
            a = a.to(g.dtype)
        if v is not None and vb is not None and vb.dtype != v.dtype:
            vb = vb.to(v.dtype)
        acc = acc_dtype(a, g, v, vb)
        out_w = None if v is None else empty((K, B), acc, g.device)
        out_b = None if vb is None else empty((K, B), acc, g.device)
        self._call(
            self._module().linear_dot,
            mat(a if v is not None else None),
            mat(g),
            mat3(v),
            mat(vb),
            index(seg),
            N,
            i,
            o,
            K,
            B,
            ptr(out_w),
            ptr(out_b),
            acc == torch.float64,
            device=g.device,
        )
        return out_w, out_b

    def embedding_dot(self, ids, g, v, seg, B, padding_idx=None):
        check_embedding(ids, g, v, seg, B)
        return self.embedding_dot_kernel(ids, g, v, seg, B, padding_idx)

    def embedding_dot_kernel(self, ids, g, v, seg, B, padding_idx=None):
        """:meth:`embedding_dot` without the argument checks."""
        N, d = g.shape
        K, vocab = v.shape[0], v.shape[1]
        seg = seg_ids(seg, N, B, g.device)
        acc = acc_dtype(g, v)
        out = empty((K, B), acc, g.device)
        pad = -1 if padding_idx is None else int(padding_idx)
        self._call(
            self._module().embedding_dot,
            index(ids),
            mat(g),
            mat3(v),
            index(seg),
            N,
            d,
            K,
            B,
            vocab,
            pad,
            ptr(out),
            acc == torch.float64,
            device=g.device,
        )
        return out

    def norm_dot(self, xhat, g, vw, vb, seg, B):
        check_norm(xhat, g, vw, vb, seg, B)
        return self.norm_dot_kernel(xhat, g, vw, vb, seg, B)

    def norm_dot_kernel(self, xhat, g, vw, vb, seg, B):
        """:meth:`norm_dot` without the argument checks."""
        N, d = g.shape
        K = (vw if vw is not None else vb).shape[0]
        seg = seg_ids(seg, N, B, g.device)
        if xhat.dtype != g.dtype:  # e.g. HF RMSNorm's float32 x̂ beside a bf16 g: widen g, never round x̂
            wide = torch.promote_types(xhat.dtype, g.dtype)
            xhat, g = xhat.to(wide), g.to(wide)
        if vw is not None and vb is not None and vb.dtype != vw.dtype:
            vb = vb.to(vw.dtype)
        acc = acc_dtype(xhat, g, vw, vb)
        out_w = None if vw is None else empty((K, B), acc, g.device)
        out_b = None if vb is None else empty((K, B), acc, g.device)
        self._call(
            self._module().norm_dot,
            mat(xhat),
            mat(g),
            mat(vw),
            mat(vb),
            index(seg),
            N,
            d,
            K,
            B,
            ptr(out_w),
            ptr(out_b),
            acc == torch.float64,
            device=g.device,
        )
        return out_w, out_b

    def segment_outer(self, u, w, seg, B):
        N, ku, kw = check_segment_outer(u, w, seg, B)
        seg = seg_ids(seg, N, B, u.device)
        acc = acc_dtype(u, w)
        out = empty((B, ku, kw), acc, u.device)
        self._call(
            self._module().segment_outer,
            mat(u),
            mat(w),
            index(seg),
            N,
            ku,
            kw,
            B,
            ptr(out),
            acc == torch.float64,
            device=u.device,
        )
        return out
