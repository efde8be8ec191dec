"""Which route each parameter of a factored direction takes in a measure() call: its V formed first (dense) or its
factors contracted as they are (factored), by a cost model (docs/design.md §2, "Factored directions").

Per (risk use of N rows, objective use of N' rows), with factor widths I = d_R and O = d_L: the dense route forms V
once, 2·N'·I·O FLOPs, then contracts it, 2·N·I·O·K; the factored route costs 2·N·N'·(I + O) (dense × dense, in
tiles), (N + N')·d (embedding × embedding) or the cross terms of a tied head. Time = FLOPs / ``flops`` + bytes /
``bandwidth`` + op calls · ``call`` of the device's :class:`Machine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..capture.embedding import EmbeddingAdapter
from ..ops import pairwise as pw
from .factors import FactoredEntry, acc_of

ROUTES = ("auto", "dense", "factored")


@dataclass(frozen=True)
class Machine:
    """What a route's time is made of: ``flops`` (multiply-adds ×2 per second in a GEMM), ``bandwidth``
    (bytes per second of a streaming op) and ``call`` (seconds of fixed cost per op called)."""

    flops: float
    bandwidth: float
    call: float


#: per device type and accumulation class ("half" when the factors are bf16/fp16 on CUDA: tensor cores).
#: CPU: fitted to the 48 layer shapes of benchmarks/results/factored_cpu.md (one thread of an Intel Xeon: RMS
#: error of the predicted times 18%, the same choice as the measured faster route at every shape); only the
#: ratios matter for the choice. CUDA: H100/H200-class figures, provisional until benchmarks/gpu_check.sh
#: measures them.
MACHINES: dict[str, Machine] = {
    "cpu": Machine(flops=1.3e11, bandwidth=1e10, call=2e-5),
    "cuda": Machine(flops=4.5e13, bandwidth=3e12, call=8e-6),
    "cuda-half": Machine(flops=4e14, bandwidth=3e12, call=8e-6),
}


@dataclass(frozen=True)
class UseShape:
    """One use of a parameter in the cost model: factor widths d_L, d_R (d_L the table's rows for ids), rows,
    and for ids the distinct ids (None: as many as rows)."""

    ids: bool
    dL: int
    dR: int
    rows: int
    unique: int | None = None


def route_costs(
    obj: Sequence[UseShape],
    risk: Sequence[UseShape],
    risk_rows_all: Sequence[int],
    K: int,
    K_dense: int,
    itemsize: int,
    accsize: int,
    machine: Machine,
    calls: int = 1,
) -> dict[str, float]:
    """Predicted seconds of one parameter's two routes over a measure() call (every risk set).

    ``obj``: the objective uses (rows N' after dropping those without gradient); ``risk``: the risk-side uses,
    ``rows`` = N rows that can carry gradient (summed over the risk sets), ``risk_rows_all`` the rows each use's
    tap sees (B·T summed); ``K`` directions of which ``K_dense`` are dense already; ``calls``: risk sets.
    Per (risk use of N rows, objective use of N' rows), with I = d_R, O = d_L:

    * dense: form V once, 2·N'·I·O FLOPs and I·O·K elements written, then contract per risk use
      2·N·I·O·K FLOPs reading V (a gather of N rows for ids);
    * factored: 2·N·N'·(I + O) FLOPs and ~4·N·N' accumulator elements through memory per dense × dense pair,
      in tiles of ``pairwise.TILE_BYTES`` (each reading the other side's factors again); (N + N')·d for an
      embedding × embedding pair (rows of V at the objective's ids), N·U·d and N'·U·d for a tied head's
      cross terms (U distinct ids); dense directions of the entry contracted as in the dense route.

    Time = FLOPs / ``machine.flops`` + bytes / ``machine.bandwidth`` + op calls · ``machine.call``.
    """
    F, W, C = machine.flops, machine.bandwidth, machine.call
    b, a = itemsize, accsize
    side = max(16, int((pw.TILE_BYTES / (3 * a)) ** 0.5))

    def contract(r: UseShape, n_all: int, k: int) -> float:
        if k == 0:
            return 0.0
        if r.ids:
            return 2 * n_all * r.dR * k / F + n_all * r.dR * (b + k * a) / W + 2 * C * calls
        flops = 2.0 * n_all * r.dL * r.dR * k
        byts = k * r.dL * r.dR * a * calls + n_all * (r.dL + r.dR) * b + 2 * k * n_all * min(r.dL, r.dR) * a
        return flops / F + byts / W + 4 * C * calls

    # dense: form V (zeros, then each use), contract every risk use once
    form = K * obj[0].dL * obj[0].dR * a / W if obj else 0.0
    for u in obj:
        if u.ids:
            form += u.rows * u.dR / F + u.rows * u.dR * (b + 2 * a) / W + 2 * C
        else:
            form += 2.0 * u.rows * u.dL * u.dR / F + (u.rows * (u.dL + u.dR) * b + 2 * u.dL * u.dR * a) / W + 2 * C
    dense = form + sum(contract(r, n, K) for r, n in zip(risk, risk_rows_all))

    # factored: the dense part as above, then every (risk use, objective use) pair
    fact = 0.0
    for r, n_all in zip(risk, risk_rows_all):
        n = r.rows
        fact += contract(r, n_all, K_dense)
        fact += n_all * (r.dL + r.dR if not r.ids else r.dR) * b / W + n * (r.dL + r.dR) * b / W + 3 * C * calls
        for u in obj:
            m = u.rows
            if not r.ids and not u.ids:
                tiles = math.ceil(n / side) * math.ceil(m / side)
                flops = 2.0 * n * m * (r.dL + r.dR) + 4.0 * n * m
                byts = 4.0 * n * m * a + (math.ceil(n / side) * m + math.ceil(m / side) * n) * (r.dL + r.dR) * b
                fact += flops / F + byts / W + 6 * C * tiles
            elif r.ids and u.ids:
                fact += (m * u.dR + 2.0 * n * r.dR) / F + (m + n) * r.dR * (b + a) / W + 6 * C * calls
            elif u.ids:  # a dense risk use (a tied head) against the objective's ids: columns U of its L
                U = min(u.unique or m, r.dL)
                fact += (2.0 * n * U * r.dR + n * U) / F + (n * U * (b + a) + U * r.dR * a) / W + 4 * C * calls
            else:  # a risk embedding use against the objective's head use: rows of V at the risk ids
                U = min(n, u.dL)
                fact += (2.0 * m * U * u.dR + 2.0 * n * r.dR) / F + (m * U * b + U * u.dR * a) / W + 6 * C * calls
    return {"dense": dense, "factored": fact}


def machine_for(device: torch.device, dtype: torch.dtype) -> Machine:
    if device.type == "cuda":
        return MACHINES["cuda-half" if dtype in (torch.bfloat16, torch.float16) else "cuda"]
    return MACHINES.get(device.type, MACHINES["cpu"])


def active_rows(batch: Mapping[str, Tensor]) -> int:
    """Rows of a risk batch whose output gradient can be nonzero: attended positions up to each sample's last
    labelled logit (a causal LM's later positions and its padding get no gradient)."""
    labels = batch["labels"]
    B, T = labels.shape
    if T < 2:
        return 0
    lab = labels[:, 1:] != -100  # logit position p predicts labels[:, p + 1]
    pos = torch.arange(T - 1, device=labels.device).expand(B, -1)
    last = torch.where(lab, pos, torch.full_like(pos, -1)).amax(1)  # [B]
    upto = torch.arange(T, device=labels.device)[None, :] <= last[:, None]
    mask = batch.get("attention_mask")
    if mask is not None:
        upto = upto & (mask != 0)
    return int(upto.sum())


@dataclass
class Routing:
    """What :func:`plan_routes` decided: the route per parameter, per layer kind, and the predicted seconds."""

    routes: dict[str, str]
    kinds: dict[str, str]
    predicted: dict[str, float]


def _kind(uses: list[tuple[str, nn.Module, str]]) -> str:
    return "+".join(sorted({f"{type(m).__name__}.{local}" for _, m, local in uses}))


def plan_routes(
    entries: Mapping[str, FactoredEntry],
    layout: Any,
    risks: Mapping[str, Mapping[str, Tensor]],
    route: str,
    device: torch.device,
) -> Routing:
    """The route of every parameter with a factored entry: ``route`` "dense" or "factored" for all (where the
    taps can factor the parameter: every use has an adapter), or "auto": the cheaper by :func:`route_costs`.
    ``layout`` is the model's :class:`~geffect_fast.engine.modulemap.ModuleMap` (each parameter's uses and their
    adapters)."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; use one of {', '.join(ROUTES)}")
    rows = [active_rows(b) for b in risks.values()]
    rows_all = [int(b["input_ids"].numel()) for b in risks.values()]
    n_act, n_all = sum(rows), sum(rows_all)
    routes: dict[str, str] = {}
    by_kind: dict[str, set[str]] = {}
    predicted = {"dense": 0.0, "factored": 0.0, "chosen": 0.0}
    for name, e in entries.items():
        owners = layout.owners.get(name, [])
        adapters = [layout.adapters[id(m)] for _, m, _ in owners]
        can = bool(owners) and all(ad is not None and not ad.sliced for ad in adapters)  # experts: V slices
        if not e.uses or not can:
            routes[name] = "dense"
        else:
            numel = e.shape.numel()
            obj = []
            for u in e.uses:
                dR = u.R.shape[1]
                obj.append(UseShape(u.ids, numel // dR, dR, u.n, None))
            risk = []
            for ad in adapters:  # the risk side's uses have the objective's factor shapes, per kind of adapter
                is_ids = isinstance(ad, EmbeddingAdapter)
                ref = next((u for u in obj if u.ids == is_ids), obj[0])
                dR = ref.dR if ref.ids == is_ids else (e.shape[-1] if len(e.shape) > 1 else 1)
                risk.append(UseShape(is_ids, numel // dR, dR, n_act))
            dt = next((u.R.dtype for u in e.uses), e.param_dtype)
            c = route_costs(
                obj,
                risk,
                [n_all] * len(risk),
                e.K,
                len(e.dense_k),
                torch.finfo(dt).bits // 8,
                torch.finfo(acc_of(dt)).bits // 8,
                machine_for(device, dt),
                calls=len(risks),
            )
            predicted["dense"] += c["dense"]
            predicted["factored"] += c["factored"]
            if route == "auto":
                routes[name] = "factored" if c["factored"] < c["dense"] else "dense"
            else:
                routes[name] = route
            predicted["chosen"] += c[routes[name]]
        by_kind.setdefault(_kind(owners) if owners else "unowned", set()).add(routes[name])
    kinds = {k: v.pop() if len(v) == 1 else "mixed" for k, v in sorted(by_kind.items())}
    return Routing(routes, kinds, predicted)
