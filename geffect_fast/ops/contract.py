"""The op contract every backend implements: names, shapes, dtypes, and the checks all backends share.

Ops (``reference.py`` holds the formulas and is the specification):

* ``linear_dot(a [N,i] | None, g [N,o], v [K,o,i] | None, seg [N], B, vb [K,o] | None) -> (out_w, out_b)``
* ``embedding_dot(ids [N], g [N,d], v [K,vocab,d], seg [N], B, padding_idx=None) -> out``
* ``norm_dot(xhat [N,d], g [N,d], vw [K,d] | None, vb [K,d] | None, seg [N], B) -> (out_w, out_b)``
* ``segment_outer(u [N,ku], w [N,kw], seg [N], B) -> [B, ku, kw]`` — Σ_{t∈b} u_t w_tᵀ, the accumulation of the
  Kronecker sketches (``pairwise.py`` holds its spec with the pairwise ops)

Outputs are [K, B] (segment_outer: [B, ku, kw]) in the accumulation dtype: float64 if any input is float64,
else float32. An output whose direction is None is None. ``seg`` holds each row's sample id (int32 or int64) in [0, B).
"""

from __future__ import annotations

import torch
from torch import Tensor

OPS = ("linear_dot", "embedding_dot", "norm_dot", "segment_outer")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def acc_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_seg(seg: Tensor, n: int, B: int) -> None:
    if seg.dim() != 1 or seg.shape[0] != n:
        raise ValueError(f"seg must have shape [{n}], got {tuple(seg.shape)}")
    if seg.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seg must be int32 or int64, got {seg.dtype}")
    if B < 1:
        raise ValueError(f"B must be >= 1, got {B}")


def check_linear(a: Tensor | None, g: Tensor, v: Tensor | None, seg: Tensor, B: int, vb: Tensor | None):
    """Validate linear_dot's arguments; return (N, i, o, K) (i = 0 when there is no weight direction)."""
    if g.dim() != 2:
        raise ValueError(f"g must be [N, o], got {tuple(g.shape)}")
    N, o = g.shape
    if v is None and vb is None:
        raise ValueError("linear_dot needs at least one of v, vb")
    i = 0
    if v is not None:
        if a is None or a.dim() != 2 or a.shape[0] != N:
            raise ValueError(f"a must be [{N}, i], got {None if a is None else tuple(a.shape)}")
        i = a.shape[1]
        if v.dim() != 3 or v.shape[1:] != (o, i):
            raise ValueError(f"v must be [K, {o}, {i}], got {tuple(v.shape)}")
    K = v.shape[0] if v is not None else vb.shape[0]
    if vb is not None and vb.shape != (K, o):
        raise ValueError(f"vb must be [{K}, {o}], got {tuple(vb.shape)}")
    check_seg(seg, N, B)
    return N, i, o, K


def check_embedding(ids: Tensor, g: Tensor, v: Tensor, seg: Tensor, B: int):
    """Validate embedding_dot's arguments; return (N, d, K, vocab)."""
    if ids.dim() != 1 or g.dim() != 2 or ids.shape[0] != g.shape[0]:
        raise ValueError(f"ids [N] and g [N, d] expected, got {tuple(ids.shape)} and {tuple(g.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    N, d = g.shape
    if v.dim() != 3 or v.shape[2] != d:
        raise ValueError(f"v must be [K, vocab, {d}], got {tuple(v.shape)}")
    check_seg(seg, N, B)
    return N, d, v.shape[0], v.shape[1]


def check_norm(xhat: Tensor, g: Tensor, vw: Tensor | None, vb: Tensor | None, seg: Tensor, B: int):
    """Validate norm_dot's arguments; return (N, d, K)."""
    if xhat.shape != g.shape or g.dim() != 2:
        raise ValueError(f"xhat and g must both be [N, d], got {tuple(xhat.shape)} and {tuple(g.shape)}")
    N, d = g.shape
    K = None
    for name, t in (("vw", vw), ("vb", vb)):
        if t is not None:
            if t.dim() != 2 or t.shape[1] != d or (K is not None and t.shape[0] != K):
                raise ValueError(f"{name} must be [K, {d}], got {tuple(t.shape)}")
            K = t.shape[0]
    if K is None:
        raise ValueError("norm_dot needs at least one of vw, vb")
    check_seg(seg, N, B)
    return N, d, K


def check_segment_outer(u: Tensor, w: Tensor, seg: Tensor, B: int):
    """Validate segment_outer's arguments; return (N, ku, kw)."""
    if u.dim() != 2 or w.dim() != 2 or u.shape[0] != w.shape[0]:
        raise ValueError(f"u [N, ku] and w [N, kw] expected, got {tuple(u.shape)} and {tuple(w.shape)}")
    check_seg(seg, u.shape[0], B)
    return u.shape[0], u.shape[1], w.shape[1]
