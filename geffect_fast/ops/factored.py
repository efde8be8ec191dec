"""The factored route's contractions: a risk-side use's factors against an objective use's, never forming the
parameter-sized V (docs/design.md §2, "Factored directions").

For a risk use with rows (L_t, R_t) and an objective use (L'_s, R'_s) of the same parameter, a sample's G-effect
against the objective's gradient is Σ_{t∈b} ⟨L_t R_tᵀ, Σ_s L'_s R'_sᵀ⟩ = Σ_{t∈b} Σ_s (L_t·L'_s)(R_t·R'_s):

* dense × dense — :func:`geffect_fast.ops.pairwise.factor_pairwise`, in tiles of tokens (no N × N' matrix of a
  whole batch);
* ids × ids (embeddings) — through the rows of V the objective's ids touch (Σ_s over equal ids first: the same
  sum, (N + N')·d work);
* a tied head's cross terms (an embedding use against a head use) — through the columns or rows that the other
  side's ids select, in tiles of ``TILE_BYTES``.

Also here: which rows of a use carry gradient (:func:`keep_rows`), so that rows without any (padding, positions
after the last label) are dropped before pairing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import pairwise as pw
from .contract import Seg, seg_tensor, segment_sum
from .dispatch import Backend
from .pairwise import is_ids

#: transient bytes of one tile of the cross-term products (the dense × dense tiles are pairwise.TILE_BYTES)
TILE_BYTES = 8 << 20


def _rows_nonzero(x: Tensor, share: float = 0.0) -> tuple[Tensor, bool]:
    """([n] bool: row t of x is nonzero, every row finite), from one fast reduction, the row norms ‖x_t‖₂: zero for a
    zero row, not finite for a row with NaN or inf (rows whose norm overflows are checked exactly). A nonzero row
    whose squares underflow also has norm 0 (all |x_tj| < 4e-23 in float32): it is dropped only where the largest
    row norm is ≥ 1e-10 (so it is below 1e-10 of it: beneath float32 rounding), else checked exactly.
    Where fewer than ``share`` of the rows have a zero norm, every row counts as nonzero."""
    s = torch.linalg.vector_norm(x, 2, dim=1)
    keep = s != 0
    n_zero = x.shape[0] - int(keep.sum())
    if n_zero and n_zero < share * x.shape[0]:
        keep.fill_(True)
    elif n_zero and not bool(s.max() >= 1e-10):  # a tiny gradient: underflow could hide whole rows
        zero = ~keep
        keep[zero] = x[zero].any(1)
    bad = ~torch.isfinite(s)
    finite = True
    if bool(bad.any()):  # NaN or inf in the row, or a finite row whose norm overflows
        finite = bool(torch.isfinite(x[bad]).all())
    return keep, finite


def keep_rows(L: Tensor, R: Tensor, pad: int | None, share: float = 0.0) -> tuple[Tensor, bool]:
    """([n] bool: the rows that carry gradient — L and R nonzero, ids other than ``pad`` —, all rows finite);
    ``share``: see :func:`_rows_nonzero` (ids at ``pad`` are always dropped)."""
    keep, finite = _rows_nonzero(R, share)
    if not is_ids(L):
        kl, fl = _rows_nonzero(L, share)
        keep &= kl
        finite = finite and fl
    elif pad is not None:
        keep &= L != pad
    return keep, finite


def nonzero_rows(L: Tensor, R: Tensor, seg: Seg, B: int, pad: int | None) -> tuple[Tensor, Tensor, Seg]:
    """The rows that carry gradient (:func:`_keep`), with their sample ids (a non-finite row is kept: the
    pass reports it)."""
    keep, finite = keep_rows(L, R, pad)
    if not finite or bool(keep.all()):
        return L, R, seg
    idx = keep.nonzero().squeeze(1)
    return L.index_select(0, idx), R.index_select(0, idx), seg_tensor(seg, R.shape[0], B, R.device).index_select(0, idx)


def _lookup(U: Tensor, ids: Tensor) -> Tensor:
    """Position of each id in the sorted ids ``U``, or len(U) where it is not there."""
    u = U.shape[0]
    if u == 0:
        return torch.full_like(ids, 0, dtype=torch.long)
    pos = torch.searchsorted(U, ids.long())
    hit = U[pos.clamp(max=u - 1)] == ids.long()
    return torch.where(hit, pos, torch.full_like(pos, u))


def _rows_per_tile(width: int, accsize: int) -> int:
    return max(1, TILE_BYTES // max(1, width * accsize))


def pair_use(
    L: Tensor,
    R: Tensor,
    seg: Seg,
    B: int,
    L2: Tensor,
    R2: Tensor,
    table: tuple[Tensor, Tensor] | None,
    ops: Backend,
    acc: torch.dtype,
) -> Tensor:
    """[B]: Σ_{t∈b} ⟨L_t R_tᵀ, Σ_s L2_s R2_sᵀ⟩ for a risk use's rows (L, R, seg) against an objective use's rows
    (L2, R2), never forming the parameter-sized V. Rows are those that carry gradient (pad ids dropped). An ids
    objective use also gives its ``table`` (U, T): its distinct ids U (sorted) and T[j] = Σ_{s: x_s = U_j} R2_s."""
    u_ids = is_ids(L2)
    if not is_ids(L) and not u_ids:  # Σ_t Σ_s (L_t·L'_s)(R_t·R'_s), in tiles of tokens
        return pw.factor_pairwise(L, R, seg, B, L2, R2, R2.shape[0], 1)[:, 0].to(acc)
    if is_ids(L) and u_ids:  # Σ_t R_t · V[x_t], V's rows at the objective's ids only
        U, T = table
        table = torch.cat([T, T.new_zeros(1, T.shape[1])])  # the last row: ids the objective never saw
        return ops.embedding_dot(_lookup(U, L), R, table[None], seg, B, None)[0].to(acc)
    if u_ids:  # a dense risk use (tied head, L = g over the vocab) against the objective's ids: columns U of L
        U, T = table
        Tt = T.to(acc)
        tok = torch.empty(R.shape[0], dtype=acc, device=R.device)
        n = _rows_per_tile(U.shape[0] + T.shape[1], torch.finfo(acc).bits // 8)
        for t0 in range(0, R.shape[0], n):
            Lc = L[t0 : t0 + n].index_select(1, U).to(acc)  # [n, u]
            tok[t0 : t0 + n] = (Lc * (R[t0 : t0 + n].to(acc) @ Tt.T)).sum(1)
        return segment_sum(tok, seg, B)
    # a risk embedding use against the objective's dense use (a tied head, L' over the vocab): V's rows at the
    # risk ids, Σ_s L'_s[x] R'_s, in tiles of those rows
    Ur, inv = torch.unique(L.long(), sorted=True, return_inverse=True)
    rows = torch.empty(Ur.shape[0], R2.shape[1], dtype=acc, device=R.device)
    Rp = R2.to(acc)
    n = _rows_per_tile(R2.shape[0], torch.finfo(acc).bits // 8)
    for j0 in range(0, Ur.shape[0], n):
        rows[j0 : j0 + n] = L2.index_select(1, Ur[j0 : j0 + n]).to(acc).T @ Rp
    return ops.embedding_dot(inv, R, rows[None], seg, B, None)[0].to(acc)
