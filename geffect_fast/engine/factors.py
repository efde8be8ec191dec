"""The factors of a direction that is an objective's gradient, per parameter (the types the engine, the factored
directions and the ops share).

For a parameter W used as y_s = W a_s, the objective's gradient over its batch of N' rows is V = Σ_s g'_s a'_sᵀ.
Every covered parameter has such factors, G = Σ_s L_s R_sᵀ with one factor per side of the weight: ``nn.Linear``
L = g', R = a'; HF ``Conv1D`` L = a', R = g'; embeddings L = the one-hot rows of the ids, R = g'; a bias L = g',
R = 1; a norm's γ L = g' ⊙ x̂', R = 1. A :class:`FactorUse` is one use's share (one module call of the objective's
forward); a :class:`FactoredEntry` is one parameter's K directions: a dense part and factor uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor

from ..ops.pairwise import is_ids


def acc_of(dtype: torch.dtype) -> torch.dtype:
    """Where a factor of ``dtype`` is accumulated (and a dense V formed): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class FactorUse:
    """Direction ``k``'s share Σ_s L_s R_sᵀ of a parameter's gradient from one use (one module call of the
    objective's forward). ``L`` is [n, d_L] or, for an embedding, the ids [n] (one-hot rows of the table's
    width); ``R`` is [n, d_R]; d_L·d_R is the parameter's size. Rows carry a nonzero gradient (the others,
    padding and positions after the last label, are dropped when captured; ids at ``padding_idx`` too)."""

    k: int
    L: Tensor
    R: Tensor
    _table: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def ids(self) -> bool:
        return is_ids(self.L)

    @property
    def n(self) -> int:
        return self.R.shape[0]

    @property
    def nbytes(self) -> int:
        return self.L.numel() * self.L.element_size() + self.R.numel() * self.R.element_size()

    def table(self) -> tuple[Tensor, Tensor]:
        """(U, T) for an ids use: the distinct ids U [u] (sorted) and the rows of V they hold, T[j] = Σ_{s: x_s =
        U_j} R_s [u, d_R], in the accumulation dtype. Kept (a use is measured against every risk set)."""
        if self._table is None:
            U, inv = torch.unique(self.L.long(), sorted=True, return_inverse=True)
            T = torch.zeros(U.shape[0], self.R.shape[1], dtype=acc_of(self.R.dtype), device=self.R.device)
            self._table = (U, T.index_add_(0, inv, self.R.to(T.dtype)))
        return self._table

    def shifted(self, by: int) -> FactorUse:
        return FactorUse(self.k + by, self.L, self.R, self._table)


class FactoredEntry:
    """One parameter's K directions: a dense part (directions ``dense_k``, [len(dense_k), *shape]) and factor
    uses for the others (a direction may have several uses: tied weights, a module called twice, an objective
    that runs the model on two batches)."""

    def __init__(
        self,
        shape: Sequence[int],
        param_dtype: torch.dtype,
        device: torch.device,
        K: int,
        uses: Iterable[FactorUse] = (),
        dense: Tensor | None = None,
        dense_k: Sequence[int] = (),
    ):
        self.shape = torch.Size(shape)
        self.param_dtype = param_dtype
        self.device = torch.device(device)
        self.K = K
        self.uses = list(uses)
        self.dense = dense
        self.dense_k = tuple(dense_k)
        if (dense is None) != (not self.dense_k) or (dense is not None and dense.shape[0] != len(self.dense_k)):
            raise ValueError("a dense part needs one direction index per row")
        if any(not 0 <= k < K for k in (*self.dense_k, *(u.k for u in self.uses))):
            raise ValueError(f"direction indices must lie in [0, {K})")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of V formed from this entry: the parameter's, widened to at least float32."""
        dts = [self.param_dtype, torch.float32] + ([self.dense.dtype] if self.dense is not None else [])
        out = dts[0]
        for d in dts[1:]:
            out = torch.promote_types(out, d)
        return out

    @property
    def nbytes(self) -> int:
        d = 0 if self.dense is None else self.dense.numel() * self.dense.element_size()
        return d + sum(u.nbytes for u in self.uses)

    def is_zero(self) -> bool:
        return not self.uses and (self.dense is None or not bool(self.dense.any()))

    def dense_tensor(self) -> Tensor:
        """V [K, *shape]: the dense part, plus Σ_s L_s R_sᵀ of every use (an index_add for ids) — the
        weight-gradient GEMMs the factored objective backward skipped, N'·d_L·d_R multiply-adds per use."""
        dt = self.dtype
        V = torch.zeros(self.K, self.shape.numel(), dtype=dt, device=self.device)
        if self.dense is not None:
            V[list(self.dense_k)] = self.dense.reshape(len(self.dense_k), -1).to(dt)
        for u in self.uses:
            dR = u.R.shape[1]
            Vk = V[u.k].view(-1, dR)
            if u.ids:
                Vk.index_add_(0, u.L.long(), u.R.to(dt))
            else:
                Vk.addmm_(u.L.T.to(dt), u.R.to(dt))
        return V.reshape(self.K, *self.shape)

    def select(self, ks: Sequence[int]) -> FactoredEntry:
        """The entry of directions ``ks`` (re-indexed 0, 1, … in that order)."""
        where = {k: i for i, k in enumerate(ks)}
        uses = [FactorUse(where[u.k], u.L, u.R, u._table) for u in self.uses if u.k in where]
        rows = [i for i, k in enumerate(self.dense_k) if k in where]
        dense = None if not rows or self.dense is None else self.dense[rows]
        return FactoredEntry(
            self.shape, self.param_dtype, self.device, len(ks), uses, dense, [where[self.dense_k[i]] for i in rows]
        )
