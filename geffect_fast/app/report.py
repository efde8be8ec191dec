"""Reports from a run folder: ``geffects.jsonl`` (+ ``meta.json``) -> ``summary.csv``, PNG plots,
``report.md`` and a self-contained ``report.html`` (images embedded), with findings computed from the data.

The records are the tracker's (:mod:`geffect_fast.tracker`), one per objective, step and risk set, with at
least ``objective``, ``step``, ``risk`` ("unlearn" or "retain"), ``total`` and ``groups``; ``loss`` (the
risk's NLL before the step) and ``measured_dR`` feed the NLL curves, ``per_instance`` the distributions.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

REQUIRED = ("objective", "step", "risk", "total", "groups")
RISKS = ("unlearn", "retain")
TITLES = {"unlearn": "unlearning G-effect (forget set)", "retain": "retaining G-effect (retain set)"}
#: the sign convention, first thing in every report (markdown: ** marks bold)
SIGNS = (
    "**Signs first.** G-effect e = ⟨∇R, v⟩ (R: NLL of a probe set, v: the direction of a step); a step of size η "
    "changes R by about −η·e. **Unlearning wants e < 0** on the forget set (its NLL rises); **retention wants "
    "e ≥ 0** on the retain set (its NLL does not rise)."
)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a geffects.jsonl, each checked for the fields a report needs and their types: an object
    with ``objective`` and ``risk`` strings, an integer ``step``, a finite ``total``, ``groups`` mapping names
    to finite numbers, and numbers or null for ``loss``, ``measured_dR`` and ``predicted_dR``."""
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
        problem = _record_problem(r)
        if problem:
            raise ValueError(f"{path}:{i}: {problem}")
        recs.append(r)
    if not recs:
        raise ValueError(f"{path} holds no records")
    return recs


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _record_problem(r: Any) -> str | None:
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
    if not _finite(r["total"]):
        return f"total must be a finite number, got {r['total']!r}"
    if not isinstance(r["groups"], dict) or not all(isinstance(g, str) and _finite(v) for g, v in r["groups"].items()):
        return f"groups must map group names to finite numbers, got {r['groups']!r}"[:200]
    for k in ("loss", "measured_dR", "predicted_dR"):
        v = r.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            return f"{k} must be a number or null, got {v!r}"
    pi = r.get("per_instance")
    if pi is not None and not (
        isinstance(pi, list) and all(isinstance(row, list) and all(x is None or _finite(x) for x in row) for row in pi)
    ):
        return "per_instance must be a list of rows of numbers (null for none)"
    return None


def _series(recs: Sequence[dict[str, Any]]):
    """objective -> risk -> sorted list of records (the taken direction only, not 'compare' ones)."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r.get("kind", "gradient") == "compare":
            continue
        out[r["objective"]][r["risk"]].append(r)
    for by_risk in out.values():
        for lst in by_risk.values():
            lst.sort(key=lambda r: r["step"])
    return out


def _groups(recs: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in recs:
        for g in r["groups"]:
            seen.setdefault(g, None)
    return list(seen)


# -- findings ---------------------------------------------------------------------------------------------
def findings(recs: Sequence[dict[str, Any]]) -> list[str]:
    """Short statements computed from the records: signs, which groups carry the effect, where retention
    breaks, and the best trade-off (near-ties within noise said as such, see :func:`tradeoff_se`)."""
    series = _series(recs)
    out = []
    scores = {}
    for obj, by_risk in series.items():
        parts = []
        cum = {}
        for risk in RISKS:
            lst = by_risk.get(risk)
            if not lst:
                continue
            total = sum(r["total"] for r in lst)
            cum[risk] = total
            groups: dict[str, float] = defaultdict(float)
            for r in lst:
                for g, v in r["groups"].items():
                    groups[g] += v
            denom = sum(abs(v) for v in groups.values()) or 1.0
            top = sorted(groups.items(), key=lambda kv: -abs(kv[1]))[:2]
            carry = ", ".join(f"{g} ({abs(v) / denom:.0%})" for g, v in top)
            word = (
                ("unlearns (negative)" if total < 0 else "does not unlearn (non-negative)")
                if risk == "unlearn"
                else ("keeps retention (non-negative)" if total >= 0 else "erodes retention (negative)")
            )
            parts.append(f"{TITLES[risk].split(' (')[0]} {total:+.3g}: {word}; carried by {carry}")
        breaks = _retention_break(by_risk.get("retain", []))
        if breaks:
            parts.append(breaks)
        out.append(f"**{obj}**: " + "; ".join(parts) + ".")
        if "unlearn" in cum and "retain" in cum and cum["unlearn"] < 0:
            scores[obj] = cum["retain"] / -cum["unlearn"]
    if len(scores) > 1:
        out.append(_tradeoff(series, scores))
    return out


#: two trade-offs closer than this many standard errors of their difference (paired jackknife) are a tie
TIE_SE = 2.0
#: … or closer than this share of the larger one (when there are too few steps for a standard error)
TIE_REL = 0.02


def _leave_one_step_out(by_risk: dict[str, list[dict[str, Any]]]) -> tuple[float, dict[int, float]] | None:
    """The trade-off ratio ρ = Σ_s r_s / −Σ_s u_s (retaining over unlearning G-effects of the measured steps s),
    and ρ_(s) with step s left out, for every step; None when leaving a step out leaves no unlearning."""
    u = {r["step"]: r["total"] for r in by_risk.get("unlearn", [])}
    r = {x["step"]: x["total"] for x in by_risk.get("retain", [])}
    steps = sorted(set(u) & set(r))
    U, R = sum(u[s] for s in steps), sum(r[s] for s in steps)
    if not steps or U >= 0 or any(U - u[s] >= 0 for s in steps):
        return None
    return R / -U, {s: (R - r[s]) / -(U - u[s]) for s in steps}


def _jackknife_se(values: Sequence[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return math.sqrt((n - 1) / n * sum((x - mean) ** 2 for x in values))


def tradeoff_se(by_risk: dict[str, list[dict[str, Any]]]) -> float | None:
    """Standard error of one objective's trade-off ratio ρ by the jackknife over its measured steps:
    se² = (n−1)/n · Σ_s (ρ_(s) − ρ̄)², ρ_(s) leaving step s out. It says how much ρ rests on single steps.
    None with fewer than three steps."""
    got = _leave_one_step_out(by_risk)
    if got is None or len(got[1]) < 3:
        return None
    return _jackknife_se(list(got[1].values()))


def tradeoff_diff_se(a: dict[str, list[dict[str, Any]]], b: dict[str, list[dict[str, Any]]]) -> float | None:
    """Standard error of the difference ρ_a − ρ_b by the paired jackknife over the steps both measured (step s
    left out of both): steps that move both objectives alike cancel, so a consistent small advantage shows.
    None with fewer than three common steps."""
    ga, gb = _leave_one_step_out(a), _leave_one_step_out(b)
    if ga is None or gb is None:
        return None
    common = sorted(set(ga[1]) & set(gb[1]))
    if len(common) < 3 or len(common) != len(ga[1]) or len(common) != len(gb[1]):
        return None
    return _jackknife_se([ga[1][s] - gb[1][s] for s in common])


def _tradeoff(series, scores: dict[str, float]) -> str:
    """The trade-off finding: what the ratio means and its sign, the best objective, and every other objective
    within noise of it said to be tied with it."""
    se = {k: tradeoff_se(series[k]) for k in scores}

    def tied(a: str, b: str) -> bool:
        d = abs(scores[a] - scores[b])
        paired = tradeoff_diff_se(series[a], series[b])
        if paired is not None and d <= TIE_SE * paired:
            return True
        return d <= TIE_REL * max(abs(scores[a]), abs(scores[b]))

    def show(k: str) -> str:
        return f"{k} {scores[k]:+.3g}" + (f" ± {se[k]:.2g}" if se[k] is not None else "")

    order = sorted(scores, key=lambda k: -scores[k])
    best = order[0]
    ties = [k for k in order[1:] if tied(best, k)]
    rest = [k for k in order[1:] if k not in ties]
    meaning = (
        "Trade-off = cumulative retaining ÷ |cumulative unlearning| G-effect: retention kept (> 0) or lost (< 0) "
        "per unit of unlearning, higher is better"
    )
    noise = (
        f"± one standard error (jackknife over steps); within noise = a difference under {TIE_SE:g} standard errors "
        f"of the paired jackknife over steps, or under {TIE_REL:.0%}"
    )
    if ties:
        lead = (
            "No single best trade-off: "
            + ", ".join(f"**{k}**" for k in [best, *ties])
            + " are within noise of each other ("
            + ", ".join(show(k) for k in [best, *ties])
            + ")"
        )
    else:
        lead = f"Best trade-off: **{best}** ({show(best)})"
    tail = f"; the others: {', '.join(show(k) for k in rest)}" if rest else ""
    return f"{lead}{tail}. {meaning}; {noise}."


def _retention_break(lst: Sequence[dict[str, Any]]) -> str:
    if not lst:
        return ""
    first_neg = next((r["step"] for r in lst if r["total"] < 0), None)
    nll = [(r["step"], r["loss"]) for r in lst if r.get("loss") is not None]
    rise = None
    if nll:
        base = nll[0][1]
        rise = next((s for s, v in nll if v > base * 1.2 + 1e-3), None)
    bits = []
    if first_neg is not None:
        bits.append(f"retaining G-effect first negative at step {first_neg}")
    if rise is not None:
        bits.append(f"retain NLL up >20% by step {rise}")
    return "; ".join(bits) if bits else "retention holds throughout"


# -- tables -----------------------------------------------------------------------------------------------
def summary_rows(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per objective and risk: cumulative G-effect, per group, NLL first/last, fidelity."""
    rows = []
    for obj, by_risk in _series(recs).items():
        for risk, lst in by_risk.items():
            groups: dict[str, float] = defaultdict(float)
            for r in lst:
                for g, v in r["groups"].items():
                    groups[g] += v
            # −lr·e predicts the real step only for the optimiser's update (for a gradient direction it is what
            # plain SGD would do), so fidelity is reported for update records alone
            fid = [
                abs(r["predicted_dR"] - r["measured_dR"]) / abs(r["measured_dR"])
                for r in lst
                if r.get("kind") == "update"
                and r.get("measured_dR") not in (None, 0)
                and r.get("predicted_dR") is not None
            ]
            last = lst[-1]
            nll_end = (
                None
                if last.get("loss") is None or last.get("measured_dR") is None
                else (last["loss"] + last["measured_dR"])
            )
            rows.append(
                {
                    "objective": obj,
                    "risk": risk,
                    "direction": lst[0].get("kind", "gradient"),
                    "steps": len(lst),
                    "cumulative": sum(r["total"] for r in lst),
                    "nll_start": lst[0].get("loss"),
                    "nll_end": nll_end,
                    "fidelity_median_rel_err": sorted(fid)[len(fid) // 2] if fid else None,
                    **{f"group:{g}": v for g, v in groups.items()},
                }
            )
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# -- plots ------------------------------------------------------------------------------------------------
#: above this many layer groups, per-group curves give way to a layer × step heatmap (ten tab10 colours)
MANY_GROUPS = 10
#: the symmetric-log axes are linear within ±(this share of the largest |value|, rounded down to a power of
#: ten): smaller values — near-zero groups flipping sign — stay visibly small near the zero line
LINEAR_SHARE = 1e-2


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(recs: Sequence[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    """Write the PNGs; return [(file name, caption)].

    Every step axis runs over whole steps from 0 (before unlearning) to the last step, in every plot, so the
    curves line up: the NLL after s steps sits above step s, where the cumulative G-effect of steps 1…s
    predicts its change (ΔR ≈ −η·Σe). Value axes are linear when the values span less than LINEAR_SHARE of
    their range, else symmetric-log with the linear band shaded; with more than MANY_GROUPS groups the
    per-group plots are layer × step heatmaps."""
    plt = _pyplot()
    series = _series(recs)
    objs = list(series)
    groups = _groups(recs)
    last_step = max(r["step"] for by in series.values() for lst in by.values() for r in lst)
    made = []
    for mode in ("cumulative", "per_step"):
        name = f"geffects_{mode}.png"
        if len(groups) > MANY_GROUPS:
            fig = _heatmaps(plt, series, objs, groups, mode)
            how = "layer × step heatmap, one row per objective"
        else:
            fig = _curves(plt, series, objs, groups, mode, last_step)
            how = "one row per objective"
        _save(fig, out / name)
        plt.close(fig)
        what = "summed over steps 1…s" if mode == "cumulative" else "of each step"
        made.append(
            (
                name,
                f"G-effect per layer group {what} ({how}): unlearning (left; negative = forgetting) beside "
                "retaining (right; negative = damage).",
            )
        )
    if any(r.get("loss") is not None for r in recs):
        fig = _nll(plt, series, objs, last_step)
        _save(fig, out / "nll.png")
        plt.close(fig)
        made.append(
            (
                "nll.png",
                "NLL of the forget set (left: should rise) and the retain set (right: should stay) after each step "
                "(0: before unlearning), on the same step axis as the G-effect plots.",
            )
        )
    pi = [
        (obj, risk, lst[-1]["per_instance"], lst[-1]["step"])
        for obj in objs
        for risk, lst in series[obj].items()
        if lst and lst[-1].get("per_instance")
    ]
    if pi:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), squeeze=False, layout="constrained")
        for j, risk in enumerate(RISKS):
            data = [
                (obj, [sum(x for x in row if x is not None) for row in inst]) for obj, rk, inst, _ in pi if rk == risk
            ]
            ax = axes[0][j]
            if data:
                ax.boxplot([d for _, d in data], tick_labels=[o for o, _ in data], showfliers=True)
                ax.axhline(0, color="0.45", lw=0.9)
                _value_axis(ax, [x for _, d in data for x in d], "y")
            ax.set_title(f"per-instance {TITLES[risk].split(' (')[0]}, step {pi[0][3]}", fontsize=10)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.25)
        _save(fig, out / "per_instance.png")
        plt.close(fig)
        made.append(
            (
                "per_instance.png",
                f"Per-instance G-effects (summed over groups) at the last measured step ({pi[0][3]}): one box per "
                "objective over the probe samples.",
            )
        )
    return made


def _step_values(lst: Sequence[dict[str, Any]], group: str, mode: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one group: per step, or cumulative from (0, 0) — nothing is summed before step 1."""
    steps = [r["step"] for r in lst]
    vals = [r["groups"].get(group, 0.0) for r in lst]
    if mode == "cumulative":
        acc, cum = 0.0, []
        for v in vals:
            acc += v
            cum.append(acc)
        return [0, *steps], [0.0, *cum]
    return steps, vals


def _curves(plt, series, objs, groups, mode, last_step):
    cmap = plt.get_cmap("tab10")
    colours = {g: cmap(i) for i, g in enumerate(groups)}
    fig, axes = plt.subplots(
        len(objs),
        2,
        figsize=(11, 2.3 * len(objs) + 1.0),
        sharex=True,
        sharey="col",
        squeeze=False,
        layout="constrained",
    )
    for j, risk in enumerate(RISKS):
        column = []
        for i, obj in enumerate(objs):
            ax = axes[i][j]
            lst = series[obj].get(risk, [])
            for g in groups:
                steps, vals = _step_values(lst, g, mode)
                column += vals
                ax.plot(steps, vals, color=colours[g], lw=1.6, label=g, marker="o" if len(steps) <= 3 else None)
            ax.axhline(0, color="0.45", lw=0.9)
            ax.tick_params(labelsize=8)
            if i == 0:
                ax.set_title(TITLES[risk], fontsize=10)
            if j == 0:
                ax.set_ylabel(obj, fontsize=10, fontweight="bold")
            ax.grid(alpha=0.25)
        band = None
        for i in range(len(objs)):
            band = _value_axis(axes[i][j], column, "y")
        if band is not None:
            axes[0][j].set_title(f"{TITLES[risk]}\nlinear within ±{_num(band)} (shaded), log beyond", fontsize=10)
    for ax in axes[-1]:
        _step_axis(ax, last_step)
        ax.set_xlabel("unlearning step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(8, len(groups)), fontsize=9, frameon=False)
    fig.suptitle(f"G-effect per layer group, {mode.replace('_', ' ')}", fontsize=12)
    return fig


def _heatmaps(plt, series, objs, groups, mode):
    """One layer × step heatmap per objective and risk; colour on a symmetric-log scale per risk column."""
    from matplotlib import colors, ticker

    n = len(groups)
    fig, axes = plt.subplots(
        len(objs),
        2,
        figsize=(11, max(2.0, 0.075 * n + 0.7) * len(objs) + 1.2),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    label_every = max(1, math.ceil(n / 12))
    rows = [k for k in range(0, n, label_every)]
    if rows[-1] != n - 1:
        rows[-1] = n - 1
    for j, risk in enumerate(RISKS):
        mats = {}
        for obj in objs:
            lst = series[obj].get(risk, [])
            mats[obj] = (
                [r["step"] for r in lst],
                [_step_values(lst, g, mode)[1][1 if mode == "cumulative" else 0 :] for g in groups],
            )
        vals = [abs(v) for _, m in mats.values() for row in m for v in row if v]
        top = max(vals) if vals else 1.0
        band = _band(top)
        norm = colors.SymLogNorm(linthresh=band, vmin=-top, vmax=top, base=10)
        mesh = None
        for i, obj in enumerate(objs):
            ax = axes[i][j]
            steps, m = mats[obj]
            if steps:
                mesh = ax.pcolormesh(_edges(steps), [k - 0.5 for k in range(n + 1)], m, cmap="RdBu", norm=norm)
            ax.set_ylim(n - 0.5, -0.5)
            ax.yaxis.set_major_locator(ticker.FixedLocator(rows))
            ax.yaxis.set_major_formatter(ticker.FixedFormatter([groups[k] for k in rows]))
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(f"{TITLES[risk]}\ncolour: linear within ±{_num(band)}, log beyond", fontsize=10)
            if j == 0:
                ax.set_ylabel(obj, fontsize=10, fontweight="bold")
        if mesh is not None:
            cb = fig.colorbar(mesh, ax=list(axes[:, j]), location="bottom", shrink=0.8, aspect=40, pad=0.01)
            cb.ax.xaxis.set_major_locator(ticker.SymmetricalLogLocator(linthresh=band, base=10))
            cb.ax.xaxis.set_minor_locator(ticker.NullLocator())
            cb.ax.xaxis.set_major_formatter(ticker.FuncFormatter(_log_label(band)))
            cb.ax.tick_params(labelsize=7)
            cb.set_label(f"{TITLES[risk].split(' (')[0]} ({'cumulative' if mode == 'cumulative' else 'per step'})")
    for ax in axes[-1]:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("unlearning step")
    fig.suptitle(f"G-effect per layer group, {mode.replace('_', ' ')} ({n} groups)", fontsize=12)
    return fig


def _edges(steps: Sequence[int]) -> list[float]:
    """Cell edges around measured steps (every=K gives gaps; each cell spans half way to its neighbours)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [steps[0] - (mids[0] - steps[0]), *mids, steps[-1] + (steps[-1] - mids[-1])]


def _nll(plt, series, objs, last_step):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), squeeze=False, layout="constrained")
    for j, risk in enumerate(RISKS):
        ax = axes[0][j]
        for obj in objs:
            lst = series[obj].get(risk, [])
            # ``loss`` is R before the record's step: after step − 1 steps
            pts = [(r["step"] - 1, r["loss"]) for r in lst if r.get("loss") is not None]
            if lst and lst[-1].get("loss") is not None and lst[-1].get("measured_dR") is not None:
                pts.append((lst[-1]["step"], lst[-1]["loss"] + lst[-1]["measured_dR"]))
            if pts:
                ax.plot(*zip(*pts), lw=1.8, marker="o", ms=2.5, label=obj)
        ax.set_title(f"{'forget' if risk == 'unlearn' else 'retain'} NLL after each step", fontsize=10)
        _step_axis(ax, last_step)
        ax.set_xlabel("unlearning step (0: before unlearning)")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    axes[0][0].legend(fontsize=8, frameon=False)
    return fig


def _step_axis(ax, last_step: int) -> None:
    """Whole steps only, 0 … last_step, the same on every step axis."""
    from matplotlib import ticker

    ax.set_xlim(0, max(1, last_step))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=2))


def _band(top: float) -> float:
    """The symmetric-log linear band: LINEAR_SHARE of ``top``, rounded down to a power of ten."""
    return 10.0 ** math.floor(math.log10(top * LINEAR_SHARE))


def _value_axis(ax, values: Sequence[float], axis: str = "y") -> float | None:
    """Scale a value axis for ``values``: linear when every nonzero |value| is within a factor 1/LINEAR_SHARE of
    the largest (nothing would hide near zero), else symmetric log with the linear band ±_band(max) shaded.
    The view spans the values and 0 with a 5% margin on the drawn scale. Returns the band (None when linear)."""
    from matplotlib import ticker

    finite = [v for v in values if math.isfinite(v)]
    mags = [abs(v) for v in finite if v]
    axis_obj = ax.yaxis if axis == "y" else ax.xaxis
    set_scale, set_lim = (ax.set_yscale, ax.set_ylim) if axis == "y" else (ax.set_xscale, ax.set_xlim)
    band = None
    if not mags or min(mags) >= max(mags) * LINEAR_SHARE:
        set_scale("linear")
        axis_obj.set_major_locator(ticker.MaxNLocator(nbins=6, min_n_ticks=3))
        axis_obj.set_major_formatter(ticker.FuncFormatter(lambda y, _pos: _num(y)))
    else:
        band = _band(max(mags))
        set_scale("symlog", linthresh=band)
        decades = math.log10(max(mags) / band)
        axis_obj.set_major_locator(ticker.SymmetricalLogLocator(linthresh=band, base=10 if decades <= 5 else 100))
        axis_obj.set_minor_locator(ticker.NullLocator())
        axis_obj.set_major_formatter(ticker.FuncFormatter(_log_label(band)))
        (ax.axhspan if axis == "y" else ax.axvspan)(-band, band, color="0.5", alpha=0.12, lw=0, zorder=0)
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    if hi > lo:
        tr = axis_obj.get_transform()
        t_lo, t_hi = tr.transform([lo, hi])
        pad = 0.05 * (t_hi - t_lo)
        set_lim(*tr.inverted().transform([t_lo - pad, t_hi + pad]))
    return band


def _num(y: float) -> str:
    """A short, readable number: 0, 0.25, −3.1, 8e3, 1.4e4, −6e−5 (the minus sign is U+2212)."""
    if y == 0:
        return "0"
    a = abs(y)
    if 1e-3 <= a < 1e3:
        s = f"{y:.3g}"
    else:
        mant, exp = f"{y:.1e}".split("e")
        s = f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return s.replace("-", "−")


def _log_label(band: float):
    """Tick labels for symmetric-log axes: powers of ten (the band's edges included), nothing strictly inside
    the linear band but 0."""

    def fmt(y: float, _pos: int) -> str:
        if y == 0:
            return "0"
        if abs(y) < band * 0.99:
            return ""
        return _num(10.0 ** round(math.log10(abs(y))) * (1 if y > 0 else -1))

    return fmt


def _save(fig, path: Path) -> None:
    """Draw, read every value axis's tick labels back, and save. An axis that shows tick labels but has fewer
    than two readable ones in view (a symmetric-log axis whose data sit inside one decade, say) is redrawn
    linear before saving; :func:`tick_label_problems` must then find nothing."""
    from matplotlib import ticker

    fig.canvas.draw()
    redo = False
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>" and labels_shown(ax, "y") and len(visible_tick_labels(ax, "y")) < 2:
            ax.set_yscale("linear")
            ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=6, min_n_ticks=3))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _pos: _num(y)))
            redo = True
    if redo:
        fig.canvas.draw()
    problems = tick_label_problems(fig)
    if problems:  # pragma: no cover - a bug in the plotting code, never the data's fault
        raise RuntimeError(f"{path.name}: unreadable tick labels: {'; '.join(problems)}")
    fig.savefig(path, dpi=110)


def labels_shown(ax, axis: str) -> bool:
    """Whether ``ax`` draws tick labels on ``axis`` at all (shared axes hide the inner ones)."""
    params = (ax.yaxis if axis == "y" else ax.xaxis).get_tick_params()
    keys = ("labelleft", "labelright") if axis == "y" else ("labelbottom", "labeltop")
    return any(params.get(k, False) for k in keys)


def visible_tick_labels(ax, axis: str = "y") -> list[str]:
    """The non-empty tick labels an axis shows inside its view limits (after ``fig.canvas.draw()``)."""
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    k = 1 if axis == "y" else 0
    slack = (hi - lo) * 1e-9
    labels = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    return [
        t.get_text()
        for t in labels
        if t.get_visible() and t.get_text() and lo - slack <= t.get_position()[k] <= hi + slack
    ]


def _is_number(text: str) -> bool:
    try:
        float(text.replace("−", "-"))
    except ValueError:
        return False
    return True


def tick_label_problems(fig) -> list[str]:
    """What a reader could not read off ``fig`` (drawn): every value axis that shows tick labels has at least
    two in view (a categorical one at least one), and a step axis (labelled "unlearning step …", see
    :func:`is_step_label`) shows whole numbers only."""
    out = []
    for n, ax in enumerate(fig.axes):
        axes_to_check = ("x", "y")
        if ax.get_label() == "<colorbar>":  # a colour bar's labels run along its long side only
            box = ax.get_position()
            axes_to_check = ("x",) if box.width > box.height else ("y",)
        for axis in axes_to_check:
            if not labels_shown(ax, axis):
                continue
            texts = visible_tick_labels(ax, axis)
            categorical = texts and not any(_is_number(t) for t in texts)  # e.g. one box per objective
            if len(texts) < (1 if categorical else 2):
                out.append(f"axes {n} {axis}: tick labels {texts}")
            label = (ax.get_xlabel() if axis == "x" else ax.get_ylabel()).lower()
            if (
                is_step_label(label)
                and ax.get_label() != "<colorbar>"
                and not all(t.replace("−", "-").lstrip("-").isdigit() for t in texts)
            ):
                out.append(f"axes {n} {axis}: non-integer steps {texts}")
    return out


def is_step_label(label: str) -> bool:
    """Whether an axis label names a step axis ("unlearning step", "step (0: before)"), not a quantity measured
    at a step ("per-instance G-effect at step 12")."""
    return re.match(r"(unlearning )?steps?\b", label.strip().lower()) is not None


def meta_plots(meta: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Plots from the run's meta.json: NPO's weights against per-instance G-effects, when recorded."""
    sc = meta.get("npo_scatter")
    if not sc or not sc.get("weights"):
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.scatter(sc["geffect"], sc["weights"], s=18, alpha=0.75, color="tab:purple")
    ax.axvline(0, color="0.45", lw=0.9)
    _value_axis(ax, sc["geffect"], "x")
    ax.set_xlabel(f"per-instance unlearning G-effect at step {sc.get('step', '?')}")
    ax.set_ylabel("NPO weight 2σ(−β log(π/π_ref))")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out / "npo_weights.png")
    plt.close(fig)
    return [
        (
            "npo_weights.png",
            f"Each forget sample's NPO weight after the NPO run against its own unlearning G-effect at step "
            f"{sc.get('step', '?')}: low weights mark the samples NPO has turned down.",
        )
    ]


NONE_HARMFUL = "None: every forget sample's GA gradient lowers (or keeps) the retain NLL (Σ_i E[i, j] ≥ 0 for all j)."


def _harmful_lines(meta: dict[str, Any]) -> list[tuple[str, str, float]]:
    return [(h["question"], h["answer"], h["retain_g_effect"]) for h in meta.get("most_harmful", [])]


# -- documents --------------------------------------------------------------------------------------------
def render(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """(Re-)render every report file of a run folder from its geffects.jsonl; returns name -> path.

    Everything is checked and written in a temporary folder first, then moved in: a failure leaves the files
    already there as they were."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    recs = load_records(run_dir / "geffects.jsonl")
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        rows = summary_rows(recs)
        write_csv(rows, tmp / "summary.csv")
        images = plots(recs, tmp) + meta_plots(meta, tmp)
        facts = findings(recs)
        md = _markdown(meta, rows, facts, images)
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(_html(meta, rows, facts, images, tmp))
        names = ["summary.csv", "report.md", "report.html", *(name for name, _ in images)]
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: out / name for name in names}


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = [
        "objective",
        "risk",
        "cumulative G-effect",
        "top groups",
        "NLL start → end",
        "first-order fidelity (update direction; median rel. err.)",
    ]
    body = []
    for r in rows:
        groups = {k[6:]: v for k, v in r.items() if k.startswith("group:")}
        top = ", ".join(f"{g} {v:+.2g}" for g, v in sorted(groups.items(), key=lambda kv: -abs(kv[1]))[:3])
        body.append(
            [
                r["objective"],
                r["risk"],
                _fmt(r["cumulative"], "+.3g"),
                top,
                f"{_fmt(r['nll_start'], '.3f')} → {_fmt(r['nll_end'], '.3f')}",
                _fmt(r["fidelity_median_rel_err"], ".1%"),
            ]
        )
    if all(r["fidelity_median_rel_err"] is None for r in rows):  # gradient directions only: nothing to check
        head, body = head[:-1], [b[:-1] for b in body]
    return head, body


def _prediction_note(rows: Sequence[dict[str, Any]]) -> str:
    """Why a gradient-direction run has no fidelity column: its predicted ΔR is plain SGD's, not the step taken."""
    if not any(r.get("direction") == "gradient" and r.get("nll_end") is not None for r in rows):
        return ""
    return (
        "For the gradient direction (the paper's G-effect), predicted_dR = −lr·e in geffects.jsonl is what a plain "
        "SGD step of size lr along the objective's gradient would change; the optimiser (AdamW in the demo and "
        "geffect-fast run) took its own step, whose change is measured_dR, so the two are not compared. Run with "
        "--direction update to check the first-order prediction against the real step."
    )


def _setup_lines(meta: dict[str, Any]) -> list[str]:
    keys = [
        ("model", "model"),
        ("data", "data"),
        ("objectives", "objectives"),
        ("steps", "steps"),
        ("lr", "lr"),
        ("direction", "direction"),
        ("groups", "groups"),
        ("answer_accuracy", "answer accuracy after fine-tuning"),
        ("wall_time_s", "wall time (s)"),
        ("machine", "machine"),
    ]
    return [f"{label}: {meta[k]}" for k, label in keys if k in meta]


def _markdown(meta, rows, facts, images) -> str:
    head, body = _table(rows)
    lines = ["# G-effect report", "", SIGNS, ""]
    setup = _setup_lines(meta)
    if setup:
        lines += ["## Setup", ""] + [f"- {s}" for s in setup] + [""]
    lines += ["## Findings", ""] + [f"- {f}" for f in facts] + ["", "## Cumulative G-effects", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines.append("")
    harmful = _harmful_lines(meta)
    if harmful:
        lines += [
            "## Forget samples most harmful to retention",
            "",
            "Column sums of the pairwise G-effects ⟨∇ℓ_i(retain), ∇ℓ^GA_j(forget)⟩ at the fine-tuned model, most "
            "negative first:",
            "",
            "| forget question | answer | Σ_i E[i, j] |",
            "|---|---|---:|",
        ]
        lines += [f"| {q} | {a} | {v:+.3g} |" for q, a, v in harmful]
        lines.append("")
    elif "most_harmful" in meta:
        lines += ["## Forget samples most harmful to retention", "", NONE_HARMFUL, ""]
    note = _prediction_note(rows)
    if note:
        lines += [note, ""]
    for name, cap in images:
        lines += [f"![{cap}]({name})", "", f"*{cap}*", ""]
    return "\n".join(lines)


_CSS = """body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1120px;margin:2em auto;
padding:0 1.2em;color:#1d2330}h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #e3e6ec;
padding-bottom:.2em}table{border-collapse:collapse;width:100%;font-size:13px}th,td{border:1px solid #e3e6ec;
padding:.35em .6em;text-align:left}th{background:#f4f6f9}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1.4em 0}figure img{max-width:100%;border:1px solid #e3e6ec}figcaption{color:#5a6270;font-size:13px}
ul.findings li{margin:.35em 0}.setup{color:#404859}
.signs{background:#f4f6f9;border-left:4px solid #5a6270;padding:.6em .9em;margin:1em 0}
.neg{color:#b3261e}.pos{color:#1b6e3a}"""


def _html(meta, rows, facts, images, out: Path) -> str:
    def md_bold(s: str) -> str:
        parts = html.escape(s).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    head, body = _table(rows)
    h = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>G-effect report</title>",
        f"<style>{_CSS}</style></head><body><h1>G-effect report</h1>",
        f"<p class='signs'>{md_bold(SIGNS)} Negative values are red in the tables.</p>",
    ]
    setup = _setup_lines(meta)
    if setup:
        h.append("<ul class='setup'>" + "".join(f"<li>{html.escape(s)}</li>" for s in setup) + "</ul>")
    h.append("<h2>Findings</h2><ul class='findings'>" + "".join(f"<li>{md_bold(f)}</li>" for f in facts) + "</ul>")
    h.append("<h2>Cumulative G-effects</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
    for row in body:
        cells = []
        for i, c in enumerate(row):
            cls = ""
            if i == 2 and c not in ("–",):
                cls = " class='num neg'" if c.startswith("-") else " class='num pos'"
            cells.append(f"<td{cls}>{html.escape(c)}</td>")
        h.append("<tr>" + "".join(cells) + "</tr>")
    h.append("</table>")
    note = _prediction_note(rows)
    if note:
        h.append(f"<p class='setup'>{html.escape(note)}</p>")
    harmful = _harmful_lines(meta)
    if harmful:
        h.append(
            "<h2>Forget samples most harmful to retention</h2><p class='setup'>Column sums of the pairwise "
            "G-effects ⟨∇ℓ<sub>i</sub>(retain), ∇ℓ<sup>GA</sup><sub>j</sub>(forget)⟩ at the fine-tuned model, most "
            "negative first.</p><table><tr><th>forget question</th><th>answer</th><th>Σ<sub>i</sub> E[i, j]</th>"
            "</tr>"
        )
        for q, a, v in harmful:
            h.append(f"<tr><td>{html.escape(q)}</td><td>{html.escape(a)}</td><td class='num neg'>{v:+.3g}</td></tr>")
        h.append("</table>")
    elif "most_harmful" in meta:
        h.append(f"<h2>Forget samples most harmful to retention</h2><p class='setup'>{html.escape(NONE_HARMFUL)}</p>")
    for name, cap in images:
        b64 = base64.b64encode((out / name).read_bytes()).decode()
        h.append(
            f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        )
    h.append("</body></html>")
    return "\n".join(h)
