"""Reference implementations of the pairwise and sketch ops (docs/design.md §2, §4), in plain torch.

A parameter use's per-sample gradient is a sum of outer products, G_b = Σ_{t∈b} L_t R_tᵀ, with one factor per
side of the weight: ``nn.Linear`` (W [o, i]): L = g, R = a; HF ``Conv1D`` (W [i, o]): L = a, R = g;
``nn.Embedding`` (E [vocab, d]): L = e_{x_t} (one-hot, given as the ids), R = g. A factor is either a dense
[N, d] tensor or an id vector [N] standing for its one-hot rows.

* ``factor_pairwise`` — the ghost method: ⟨G_i, G'_j⟩ = Σ_{t∈i, s∈j} (L_t·L'_s)(R_t·R'_s), in tiles of
  tokens (never the whole N × N' Gram matrix), segment-summed per sample pair. Cost N·N'·(dL + dR).
* ``materialise_pairwise`` — the materialised method for dense factors: G_b formed per sample, in tiles of L's
  rows, then ⟨G_i, G'_j⟩ by a Gram product. Cost (N + N')·dL·dR + B·B'·dL·dR.
* ``pairwise`` — picks the cheaper method per call by those two costs (``method="auto"``).
* ``segment_outer`` — the sketch op: out[b] = Σ_{t∈b} u_t w_tᵀ, [B, k_u, k_w], without forming [N, k_u, k_w].
* ``project`` — the Kronecker sketch of a use: P_L G_b P_Rᵀ = Σ_t (P_L L_t)(P_R R_t)ᵀ, [B, k_L, k_R].

Accumulation in float64 for float64 inputs, else float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import Seg, acc_dtype, check_seg, check_segment_outer, seg_tensor

#: transient memory bound of one tile, in bytes
TILE_BYTES = 8 << 20


def is_ids(x: Tensor) -> bool:
    """Whether a factor is given by ids (its one-hot rows) rather than dense rows."""
    return x.dtype in (torch.int32, torch.int64)


def _width(x: Tensor, vocab: int | None) -> int:
    if is_ids(x):
        if vocab is None:
            raise ValueError("a one-hot (ids) factor needs its width (vocab)")
        return vocab
    return x.shape[1]


def _onehot_seg(seg: Tensor, B: int, dtype: torch.dtype) -> Tensor:
    """[n, B] one-hot of the sample ids (for segment sums by matmul)."""
    return torch.nn.functional.one_hot(seg.long(), B).to(dtype)


def _kernel(x: Tensor, y: Tensor, acc: torch.dtype, pad: int | None) -> Tensor:
    """[n, m] of row-wise inner products x_t · y_s, for dense or one-hot (ids) factors."""
    xi, yi = is_ids(x), is_ids(y)
    if xi and yi:
        k = (x.long()[:, None] == y.long()[None, :]).to(acc)
        if pad is not None:
            k = k * (x.long() != pad).to(acc)[:, None]
        return k
    if xi:  # e_{x_t} · y_s = y_s[x_t]
        k = y.to(acc)[:, x.long()].T
        return k if pad is None else k * (x.long() != pad).to(acc)[:, None]
    if yi:
        k = x.to(acc)[:, y.long()]
        return k if pad is None else k * (y.long() != pad).to(acc)[None, :]
    return x.to(acc) @ y.to(acc).T


def factor_pairwise(
    l1: Tensor, r1: Tensor, seg1: Seg, B1: int,
    l2: Tensor, r2: Tensor, seg2: Seg, B2: int,
    pad: int | None = None,
) -> Tensor:  # fmt: skip
    """Ghost method: E[i, j] = Σ_{t∈i, s∈j} (L_t·L'_s)(R_t·R'_s), [B1, B2]. ``pad`` is an embedding's
    ``padding_idx``: one-hot rows with that id carry no gradient."""
    n1, n2 = r1.shape[0], r2.shape[0]
    for L, seg, B, n in ((l1, seg1, B1, n1), (l2, seg2, B2, n2)):
        if L.shape[0] != n:
            raise ValueError(f"factors disagree on the number of rows: {L.shape[0]} vs {n}")
        check_seg(seg, n, B)
    seg1, seg2 = seg_tensor(seg1, n1, B1, r1.device), seg_tensor(seg2, n2, B2, r2.device)
    if is_ids(l1) != is_ids(l2) and not (l1.dim() in (1, 2) and l2.dim() in (1, 2)):
        raise ValueError("bad factor shapes")
    acc = acc_dtype(*(t for t in (l1, r1, l2, r2) if not is_ids(t)))
    out = torch.zeros(B1, B2, dtype=acc, device=r1.device)
    # tile so that the two [t1, t2] kernels fit the budget
    side = max(16, int((TILE_BYTES / (3 * torch.finfo(acc).bits // 8)) ** 0.5))
    for i0 in range(0, n1, side):
        i1 = min(n1, i0 + side)
        s1 = _onehot_seg(seg1[i0:i1], B1, acc)
        for j0 in range(0, n2, side):
            j1 = min(n2, j0 + side)
            k = _kernel(l1[i0:i1], l2[j0:j1], acc, pad)  # a fresh tensor: multiplied in place
            k.mul_(_kernel(r1[i0:i1], r2[j0:j1], acc, None))
            s2 = _onehot_seg(seg2[j0:j1], B2, acc)
            # the segment sums in the cheaper order: t1·t2·min(B1, B2) multiply-adds for the first product
            out += (s1.T @ k) @ s2 if B1 <= B2 else s1.T @ (k @ s2)
    return out


def _per_sample(L: Tensor, R: Tensor, seg: Tensor, B: int, r0: int, r1: int, acc: torch.dtype) -> Tensor:
    """G_b[r0:r1, :] for every sample b: Σ_{t∈b} L_t[r0:r1] R_tᵀ, [B, r1 − r0, dR] (tokens grouped by sample,
    one product per sample: n·(r1 − r0)·dR FLOPs in all)."""
    order = torch.argsort(seg.long(), stable=True)
    counts = torch.bincount(seg.long(), minlength=B).tolist()
    Ls = L[order, r0:r1].to(acc).split(counts)
    Rs = R[order].to(acc).split(counts)
    out = torch.zeros(B, r1 - r0, R.shape[1], dtype=acc, device=R.device)
    for b in range(B):
        if counts[b]:
            out[b] = Ls[b].T @ Rs[b]
    return out


def materialise_pairwise(
    l1: Tensor, r1: Tensor, seg1: Seg, B1: int,
    l2: Tensor, r2: Tensor, seg2: Seg, B2: int,
) -> Tensor:  # fmt: skip
    """Materialised method (dense factors): G_b per sample in tiles of L's rows, then a Gram product."""
    if is_ids(l1) or is_ids(l2):
        raise ValueError("materialise_pairwise takes dense factors; one-hot ones go by the ghost method")
    check_seg(seg1, r1.shape[0], B1)
    check_seg(seg2, r2.shape[0], B2)
    seg1, seg2 = seg_tensor(seg1, r1.shape[0], B1, r1.device), seg_tensor(seg2, r2.shape[0], B2, r2.device)
    acc = acc_dtype(l1, r1, l2, r2)
    dL, dR = l1.shape[1], r1.shape[1]
    if l2.shape[1] != dL or r2.shape[1] != dR:
        raise ValueError("the two uses' factors must have the same widths")
    out = torch.zeros(B1, B2, dtype=acc, device=r1.device)
    rows = max(1, TILE_BYTES // ((B1 + B2) * dR * (torch.finfo(acc).bits // 8)))
    for r0 in range(0, dL, rows):
        r1_ = min(dL, r0 + rows)
        g1 = _per_sample(l1, r1, seg1, B1, r0, r1_, acc).flatten(1)
        g2 = _per_sample(l2, r2, seg2, B2, r0, r1_, acc).flatten(1)
        out += g1 @ g2.T
    return out


def costs(n1: int, n2: int, B1: int, B2: int, dL: int, dR: int, onehot: bool) -> dict[str, float]:
    """FLOP estimates of the two methods (the materialised one is unavailable with a one-hot factor)."""
    ghost = float(n1) * n2 * (1 if onehot else dL) + float(n1) * n2 * dR
    mat = float("inf") if onehot else (float(n1) + n2) * dL * dR + float(B1) * B2 * dL * dR
    return {"ghost": ghost, "materialise": mat}


def pairwise(
    l1: Tensor, r1: Tensor, seg1: Seg, B1: int,
    l2: Tensor, r2: Tensor, seg2: Seg, B2: int,
    method: str = "auto", vocab: int | None = None, pad: int | None = None,
) -> tuple[Tensor, str]:  # fmt: skip
    """⟨G_i, G'_j⟩ by ``method`` ("ghost", "materialise" or "auto": the cheaper by :func:`costs`; one-hot
    factors always go by the ghost method); returns (E [B1, B2], the method taken)."""
    onehot = is_ids(l1) or is_ids(l2)
    if method == "materialise" and onehot:
        method = "ghost"  # a one-hot factor's per-sample gradient is never formed (vocab × d per sample)
    if method == "auto":
        dL = _width(l1, vocab)
        c = costs(r1.shape[0], r2.shape[0], B1, B2, dL, r1.shape[1], onehot)
        method = "ghost" if c["ghost"] <= c["materialise"] else "materialise"
    if method == "ghost":
        return factor_pairwise(l1, r1, seg1, B1, l2, r2, seg2, B2, pad), "ghost"
    if method == "materialise":
        return materialise_pairwise(l1, r1, seg1, B1, l2, r2, seg2, B2), "materialise"
    raise ValueError(f"unknown method {method!r}; use auto, ghost or materialise")


def segment_outer(u: Tensor, w: Tensor, seg: Seg, B: int) -> Tensor:
    """out[b] = Σ_{t: seg_t = b} u_t w_tᵀ, [B, k_u, k_w], in tiles of tokens."""
    N, ku, kw = check_segment_outer(u, w, seg, B)
    seg = seg_tensor(seg, N, B, u.device)
    acc = acc_dtype(u, w)
    out = torch.zeros(B, ku, kw, dtype=acc, device=u.device)
    n = max(1, TILE_BYTES // (ku * kw * (torch.finfo(acc).bits // 8)))
    for t0 in range(0, u.shape[0], n):
        t1 = min(u.shape[0], t0 + n)
        out.index_add_(0, seg[t0:t1].long(), u[t0:t1].to(acc)[:, :, None] * w[t0:t1].to(acc)[:, None, :])
    return out


def project_factor(x: Tensor, p: Tensor, pad: int | None = None) -> Tensor:
    """P x_t for every row: dense x [N, d] -> x Pᵀ [N, k]; ids [N] -> P[:, ids]ᵀ (zero rows at ``pad``)."""
    if is_ids(x):
        out = p.T[x.long()]
        return out if pad is None else out * (x.long() != pad).to(out.dtype)[:, None]
    return x.to(p.dtype) @ p.T


def project(
    left: Tensor, right: Tensor, seg: Seg, B: int, p_l: Tensor, p_r: Tensor, pad: int | None = None,
    segment_outer_op=None,
) -> Tensor:  # fmt: skip
    """Kronecker sketch of a use: Σ_{t∈b} (P_L L_t)(P_R R_t)ᵀ, [B, k_L, k_R]. The projections are GEMMs; the
    segment sum of outer products is ``segment_outer_op`` (a backend's fused kernel; default the reference)."""
    op = segment_outer_op or segment_outer
    return op(project_factor(left, p_l, pad), project_factor(right, p_r), seg, B)
