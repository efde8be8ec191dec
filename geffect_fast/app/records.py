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
    recs = read_jsonl(path, record_problem)
    if not recs:
        raise ValueError(f"{path} holds no records")
    return recs


def read_jsonl(path: Path, problem_of: Callable[[Any], str | None]) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (blank lines skipped), each checked by ``problem_of`` (a reason, or None); a
    ValueError names the file, the line and the problem."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e})") from None
        problem = problem_of(d)
        if problem:
            raise ValueError(f"{path}:{i}: {problem}")
        out.append(d)
    return out


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


class Maybe:
    """A shape (see :func:`shape_problem`) that may also be null."""

    def __init__(self, shape: Any):
        self.shape = shape


#: shapes of :func:`shape_problem`'s leaves: a finite number, an integer, text or a number
NUMBER, INTEGER, SCALAR = "a finite number", "an integer", "text or a number"


def shape_problem(value: Any, shape: Any, where: str) -> str | None:
    """Why ``value`` (read from JSON) does not have ``shape`` (None if it does), naming the field by ``where``.

    A shape is ``str``, ``bool``, :data:`NUMBER`, :data:`INTEGER`, :data:`SCALAR`, ``Maybe(shape)``,
    ``[shape]`` (a list of them), or a dict of field -> shape (a field ending in "?" may be missing; the field
    "*" stands for every field, each mapped to its shape)."""
    if isinstance(shape, Maybe):
        return None if value is None else shape_problem(value, shape.shape, where)
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} must be a list, got {_shown(value)}"
        return next((p for i, v in enumerate(value) if (p := shape_problem(v, shape[0], f"{where}[{i}]"))), None)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} must be a JSON object, got {_shown(value)}"
        for key, sub in shape.items():
            name = key.rstrip("?")
            keys = list(value) if key == "*" else [name] if name in value or key == name else []
            for k in keys:
                if k not in value:
                    return f"field {where + '.' if where else ''}{k} is missing"
                problem = shape_problem(value[k], sub, f"{where}.{k}" if where else k)
                if problem:
                    return problem
        return None
    ok = {
        str: lambda v: isinstance(v, str),
        bool: lambda v: isinstance(v, bool),
        NUMBER: finite,
        INTEGER: lambda v: isinstance(v, int) and not isinstance(v, bool),
        SCALAR: lambda v: isinstance(v, str) or finite(v),
    }[shape](value)
    kind = {str: "text", bool: "true or false"}.get(shape, shape)
    return None if ok else f"{where} must be {kind}, got {_shown(value)}"


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: the fields of a run's meta.json that the report reads (every one may be missing)
REPORT_META = {
    **{
        f"{k}?": SCALAR
        for k in ("model", "data", "objectives", "steps", "lr", "direction", "groups", "answer_accuracy")
    },
    **{f"{k}?": SCALAR for k in ("wall_time_s", "machine", "guide", "guide_every")},
    "most_harmful?": [{"question": str, "answer": str, "retain_g_effect": NUMBER}],
    "npo_scatter?": Maybe({"weights": [NUMBER], "geffect": [NUMBER], "step?": INTEGER}),
}


#: a line of guide.jsonl (``geffect-fast run --guide``: :class:`~geffect_fast.guide.Guide`'s decisions, labelled)
GUIDE_DECISION = {
    "objective": str,
    "step": INTEGER,
    **{f"{k}?": Maybe(NUMBER) for k in ("forget_nll", "retain_nll", "e_unlearn", "e_retain", "ratio")},
    "scaled_groups?": {"*": NUMBER},
    "projected?": {"*": NUMBER},
    "sample_weights?": Maybe([NUMBER]),
    "stop?": bool,
    "reason?": Maybe(str),
}


def load_decisions(path: str | Path) -> list[dict[str, Any]]:
    """The guide's decisions of a run folder (``guide.jsonl``), each checked against :data:`GUIDE_DECISION`; []
    when the run was not guided. A ValueError names the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        return []
    return read_jsonl(path, lambda d: shape_problem(d, GUIDE_DECISION, ""))


def read_meta(path: str | Path, shape: Any = None, required: bool = False) -> dict[str, Any]:
    """A run's meta.json, checked as the records are: a JSON object whose fields have ``shape`` (default
    :data:`REPORT_META`); {} when there is none and it is not ``required``. A ValueError names the file and the
    field."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"no meta.json at {path}")
        return {}
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: must be a JSON object, got {_shown(meta)}")
    problem = shape_problem(meta, REPORT_META if shape is None else shape, "")
    if problem is None and isinstance(meta.get("npo_scatter"), dict):
        sc = meta["npo_scatter"]
        if len(sc["weights"]) != len(sc["geffect"]):
            problem = "npo_scatter.weights and npo_scatter.geffect must have one value per sample each"
    if problem:
        raise ValueError(f"{path}: {problem}")
    return meta


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
