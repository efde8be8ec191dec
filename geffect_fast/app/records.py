"""The records a run writes (``geffects.jsonl``), as the reports and the findings read them.

One record per objective, step and risk set (the tracker's, :mod:`geffect_fast.tracker`), with at least
``objective``, ``step``, ``risk`` ("unlearn" or "retain"), ``total`` and ``groups``; ``loss`` (the risk's NLL
before the step) and ``measured_dR`` feed the NLL curves, ``per_instance`` the distributions, and
``direction_norm`` = ‖v‖ of the measured direction puts objectives on one scale (:func:`per_unit`).

**The common scale.** A raw G-effect e = ⟨∇R, v⟩ grows with the size of the objective's gradient v: GA's gradient
on a model that knows its answers is large, WGA's (whose token weights p^α vanish as tokens are forgotten) small,
so GA's e is ~70× WGA's in the demo while WGA raises the forget NLL more. e/‖v‖ = ⟨∇R, v/‖v‖⟩ is the rate at
which R changes per unit of parameter distance moved along v — the same for two objectives that point the same
way, whatever their gradients' sizes — and is what the reports compare objectives by.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

REQUIRED = ("objective", "step", "risk", "total", "groups")
RISKS = ("unlearn", "retain")
TITLES = {"unlearn": "unlearning G-effect (forget set)", "retain": "retaining G-effect (retain set)"}
#: units of what the figures and tables show: R is an NLL in nats per token; −lr·e predicts R's change, so e is
#: in nats per unit of learning rate; e/‖v‖ is R's change per unit of parameter distance along v
UNIT_E = "nat/lr"
UNIT_PER_UNIT = "nat per unit ‖Δθ‖"
UNIT_NLL = "nat/token"

Record = dict[str, Any]


def load_records(path: str | Path) -> list[Record]:
    """Records from a geffects.jsonl, each checked for the fields a report needs and their types: an object
    with ``objective`` and ``risk`` strings, an integer ``step``, a finite ``total``, ``groups`` mapping names
    to finite numbers, and numbers or null for ``loss``, ``measured_dR``, ``predicted_dR`` and
    ``direction_norm``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no geffects.jsonl at {path}")
    recs = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e})") from e
        problem = record_problem(r)
        if problem:
            raise ValueError(f"{path}:{i}: {problem}")
        recs.append(r)
    if not recs:
        raise ValueError(f"{path} holds no records")
    return recs


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def record_problem(r: Any) -> str | None:
    """Why ``r`` is not a usable record (None if it is)."""
    if not isinstance(r, dict):
        return f"a record must be a JSON object, got {type(r).__name__}"
    missing = [k for k in REQUIRED if k not in r]
    if missing:
        return f"record lacks {missing}"
    for k in ("objective", "risk"):
        if not isinstance(r[k], str):
            return f"{k} must be a string, got {r[k]!r}"
    if not isinstance(r["step"], int) or isinstance(r["step"], bool):
        return f"step must be an integer, got {r['step']!r}"
    if not finite(r["total"]):
        return f"total must be a finite number, got {r['total']!r}"
    if not isinstance(r["groups"], dict) or not all(isinstance(g, str) and finite(v) for g, v in r["groups"].items()):
        return f"groups must map group names to finite numbers, got {r['groups']!r}"[:200]
    for k in ("loss", "measured_dR", "predicted_dR", "direction_norm"):
        v = r.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            return f"{k} must be a number or null, got {v!r}"
    pi = r.get("per_instance")
    if pi is not None and not (
        isinstance(pi, list) and all(isinstance(row, list) and all(x is None or finite(x) for x in row) for row in pi)
    ):
        return "per_instance must be a list of rows of numbers (null for none)"
    return None


def series(recs: Sequence[Record]) -> dict[str, dict[str, list[Record]]]:
    """objective -> risk -> its records sorted by step (the taken direction only, not 'compare' ones)."""
    out: dict[str, dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r.get("kind", "gradient") == "compare":
            continue
        out[r["objective"]][r["risk"]].append(r)
    for by_risk in out.values():
        for lst in by_risk.values():
            lst.sort(key=lambda r: r["step"])
    return out


def groups(recs: Sequence[Record]) -> list[str]:
    """The layer groups in the order the records first name them (embedding first, head last)."""
    seen: dict[str, None] = {}
    for r in recs:
        for g in r["groups"]:
            seen.setdefault(g, None)
    return list(seen)


def per_unit(r: Record) -> float | None:
    """The record's G-effect on the common scale, e/‖v‖ (None without a positive ``direction_norm``)."""
    n = r.get("direction_norm")
    return r["total"] / n if finite(n) and n > 0 else None


def common_scale(recs: Sequence[Record]) -> bool:
    """Whether every taken-direction record carries ‖v‖, so that objectives compare on e/‖v‖."""
    taken = [r for r in recs if r.get("kind", "gradient") != "compare"]
    return bool(taken) and all(per_unit(r) is not None for r in taken)


def value_of(scaled: bool) -> Callable[[Record], float]:
    """The per-step value a comparison uses: e/‖v‖ on the common scale, else the raw e."""
    if scaled:
        return lambda r: r["total"] / r["direction_norm"]
    return lambda r: r["total"]
