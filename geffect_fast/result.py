"""The result of :func:`geffect_fast.measure`.

Shapes
------
With one direction (K = 1)::

    res.total[risk]          -> float                    ⟨∇R_risk, v⟩
    res.by_group[risk]       -> dict group -> float      sums to res.total[risk]
    res.per_instance[risk]   -> Tensor [B, n_groups]     e_b = ⟨∇ℓ_b, v_g⟩ (when measured with per_instance=True)

With several directions (``Direction.stack``), each of these is keyed by direction name first:
``res.total[direction][risk]`` and so on; ``res[direction]`` is the one-direction Result.
``res.loss[risk]`` is the risk value R itself, ``res.n_tokens[risk]`` the labelled tokens per sample and
``res.weights[risk]`` the reduction weights c_b, with ``total = Σ_b c_b · e_b`` summed over groups.

A group ``uncovered`` (``strict=False`` only) holds parameters no adapter covers; it is computed by
ordinary autograd, so it has a total but no per-instance values (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

UNCOVERED = "uncovered"


@dataclass(frozen=True)
class Result:
    directions: tuple[str, ...]
    risks: tuple[str, ...]
    groups: tuple[str, ...]
    reduction: str
    #: risk -> [K, G] float64: Σ_b c_b e_b per group (uncovered column: the autograd aggregate)
    group_totals: dict[str, Tensor]
    #: risk -> [K, B, G] float64: e_b per group (uncovered column NaN), or None when not kept
    instances: dict[str, Tensor] | None
    weights: dict[str, Tensor]
    n_tokens: dict[str, Tensor]
    losses: dict[str, float]
    uncovered: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    # -- views -------------------------------------------------------------------------------------------
    def _keyed(self, fn) -> dict:
        if len(self.directions) == 1:
            return {r: fn(0, r) for r in self.risks}
        return {d: {r: fn(k, r) for r in self.risks} for k, d in enumerate(self.directions)}

    @property
    def total(self) -> dict:
        """risk -> float (K = 1), or direction -> risk -> float."""
        return self._keyed(lambda k, r: float(self.group_totals[r][k].sum()))

    @property
    def by_group(self) -> dict:
        """risk -> {group: float} in group order (K = 1), or direction -> risk -> {group: float}."""
        return self._keyed(lambda k, r: {g: float(v) for g, v in zip(self.groups, self.group_totals[r][k])})

    @property
    def per_instance(self) -> dict:
        """risk -> Tensor [B, n_groups] of e_b = ⟨∇ℓ_b, v_g⟩ (K = 1), or direction -> risk -> Tensor."""
        if self.instances is None:
            raise ValueError("per-instance values were not kept: call measure(..., per_instance=True)")
        return self._keyed(lambda k, r: self.instances[r][k])

    @property
    def loss(self) -> dict[str, float]:
        """risk -> R, the risk value at the measured parameters."""
        return dict(self.losses)

    def __getitem__(self, direction: str) -> Result:
        if direction not in self.directions:
            raise KeyError(f"no direction {direction!r}; have {', '.join(self.directions)}")
        k = self.directions.index(direction)
        return replace(
            self,
            directions=(direction,),
            group_totals={r: t[k : k + 1] for r, t in self.group_totals.items()},
            instances=None if self.instances is None else {r: t[k : k + 1] for r, t in self.instances.items()},
        )

    # -- export ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready. Always keyed by direction, then risk (whatever K is)."""

        def nan_none(x: float) -> float | None:
            return None if x != x else x

        out: dict[str, Any] = {
            "directions": list(self.directions),
            "risks": list(self.risks),
            "groups": list(self.groups),
            "reduction": self.reduction,
            "uncovered": list(self.uncovered),
            "loss": dict(self.losses),
            "n_tokens": {r: self.n_tokens[r].tolist() for r in self.risks},
            "weights": {r: self.weights[r].tolist() for r in self.risks},
            "total": {},
            "by_group": {},
            "meta": dict(self.meta),
        }
        if self.instances is not None:
            out["per_instance"] = {}
        for k, d in enumerate(self.directions):
            out["total"][d] = {r: float(self.group_totals[r][k].sum()) for r in self.risks}
            out["by_group"][d] = {
                r: {g: float(v) for g, v in zip(self.groups, self.group_totals[r][k])} for r in self.risks
            }
            if self.instances is not None:
                out["per_instance"][d] = {
                    r: [[nan_none(float(x)) for x in row] for row in self.instances[r][k]] for r in self.risks
                }
        return out

    def __str__(self) -> str:
        lines = []
        width = max([len("total"), len("risk R"), *(len(g) for g in self.groups)]) + 2
        colw = max(13, *(len(r) + 2 for r in self.risks))
        for k, d in enumerate(self.directions):
            lines.append(f"G-effect <grad R, v>  direction={d!r}  reduction={self.reduction}")
            lines.append("group".ljust(width) + "".join(r.rjust(colw) for r in self.risks))
            for gi, g in enumerate(self.groups):
                vals = "".join(f"{float(self.group_totals[r][k, gi]):>{colw}.4e}" for r in self.risks)
                lines.append(g.ljust(width) + vals)
            lines.append("-" * (width + colw * len(self.risks)))
            lines.append(
                "total".ljust(width) + "".join(f"{float(self.group_totals[r][k].sum()):>{colw}.4e}" for r in self.risks)
            )
            lines.append("risk R".ljust(width) + "".join(f"{self.losses[r]:>{colw}.4f}" for r in self.risks))
            lines.append("")
        if self.uncovered:
            lines.append(
                f"note: {len(self.uncovered)} parameter(s) no adapter covers are in group {UNCOVERED!r}, computed by "
                "ordinary autograd (aggregate only, no per-instance values)"
            )
        return "\n".join(lines).rstrip() + "\n"

    def _repr_html_(self) -> str:
        """A notebook's view: one compact table per direction — a row per group, a column per risk set, then the
        total and the risk value R — with the reduction and any uncovered parameters said below."""
        from html import escape

        def cell(x: float, fmt: str) -> str:
            return f"<td style='text-align:right;font-variant-numeric:tabular-nums'>{x:{fmt}}</td>"

        head = "".join(f"<th style='text-align:right'>{escape(r)}</th>" for r in self.risks)
        parts = []
        for k, d in enumerate(self.directions):
            rows = [
                f"<tr><td>{escape(g)}</td>"
                + "".join(cell(float(self.group_totals[r][k, gi]), ".4e") for r in self.risks)
                + "</tr>"
                for gi, g in enumerate(self.groups)
            ]
            rows.append(
                "<tr style='border-top:1px solid'><td><b>total</b></td>"
                + "".join(cell(float(self.group_totals[r][k].sum()), ".4e") for r in self.risks)
                + "</tr>"
            )
            rows.append("<tr><td>risk R</td>" + "".join(cell(self.losses[r], ".4f") for r in self.risks) + "</tr>")
            parts.append(
                f"<table><caption style='text-align:left'>G-effect ⟨∇R, v⟩, direction <b>{escape(d)}</b> "
                f"(reduction {escape(self.reduction)})</caption><tr><th>group</th>{head}</tr>{''.join(rows)}</table>"
            )
        if self.uncovered:
            parts.append(
                f"<p>{len(self.uncovered)} parameter(s) no adapter covers are in group {UNCOVERED!r}, computed by "
                "ordinary autograd (aggregate only, no per-instance values)</p>"
            )
        return "<div>" + "".join(parts) + "</div>"

    def __repr__(self) -> str:
        return (
            f"Result(directions={list(self.directions)}, risks={list(self.risks)}, groups={len(self.groups)}, "
            f"total={self.total})"
        )
