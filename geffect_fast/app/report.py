"""Reports from a run folder: ``geffects.jsonl`` (+ ``meta.json``) -> ``summary.csv``, PNG plots,
``report.md`` and a self-contained ``report.html`` (images embedded), with findings computed from the data.

The records are described in :mod:`geffect_fast.app.records`, the figures made in :mod:`geffect_fast.app.figures`.
Objectives are compared on the common scale e/‖v‖ when the records carry ‖v‖ (``direction_norm``; every run of
``geffect-fast demo``/``run``/``reproduce`` does), beside the raw G-effects.
"""

from __future__ import annotations

import base64
import html
import math
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

from .common import note_written
from .figures import meta_plots, plots
from .records import (
    RISKS,
    TITLES,
    UNIT_E,
    UNIT_PER_UNIT,
    common_scale,
    load_decisions,
    load_records,
    per_unit,
    read_meta,
    series,
    value_of,
)
from .text import md, md_unescape, write_csv

#: the sign convention, first thing in every report (markdown: ** marks bold)
SIGNS = (
    "**Signs first.** G-effect e = ⟨∇R, v⟩ (R: NLL of a probe set, v: the direction of a step); a step of size η "
    "changes R by about −η·e. **Unlearning wants e < 0** on the forget set (its NLL rises); **retention wants "
    "e ≥ 0** on the retain set (its NLL does not rise)."
)
#: what the common scale is, where a report first uses it
SCALE = (
    "Raw G-effects grow with the size of each objective's gradient, so they do not compare across objectives; "
    "e/‖v‖ — the G-effect per unit of step length, ‖v‖ the size of the step's direction — does, and the comparisons "
    "use it."
)

Records = Sequence[dict[str, Any]]


def _raw(r: dict[str, Any]) -> float:
    return r["total"]


# -- findings ---------------------------------------------------------------------------------------------
def findings(recs: Records) -> list[str]:
    """Short statements computed from the records: per objective its signs (raw and on the common scale), the
    groups that carry the effect and where retention breaks; then the objectives ranked on the common scale, and
    the best trade-off (near-ties within noise said as such, see :func:`tradeoff_se`)."""
    S = series(recs)
    scaled = common_scale(recs)
    value = value_of(scaled)
    out = [_objective_line(obj, by_risk, scaled) for obj, by_risk in S.items()]
    if scaled and len(S) > 1:
        out.append(_ranking(S))
    scores = {}
    for obj, by_risk in S.items():
        cum = {risk: sum(value(r) for r in by_risk[risk]) for risk in RISKS if by_risk.get(risk)}
        if "unlearn" in cum and "retain" in cum and cum["unlearn"] < 0:
            scores[obj] = cum["retain"] / -cum["unlearn"]
    if len(scores) > 1:
        out.append(_tradeoff(S, scores, value, scaled))
    return out


def _objective_line(obj: str, by_risk: dict[str, list[dict[str, Any]]], scaled: bool) -> str:
    parts = []
    for risk in RISKS:
        lst = by_risk.get(risk)
        if not lst:
            continue
        total = sum(r["total"] for r in lst)
        unit = sum(per_unit(r) for r in lst) if scaled else None
        sign = unit if unit is not None else total
        groups: dict[str, float] = defaultdict(float)
        for r in lst:
            for g, v in r["groups"].items():
                groups[g] += v
        denom = sum(abs(v) for v in groups.values()) or 1.0
        top = sorted(groups.items(), key=lambda kv: -abs(kv[1]))[:2]
        carry = ", ".join(f"{md(g)} ({abs(v) / denom:.0%})" for g, v in top)
        word = (
            ("unlearns (negative)" if sign < 0 else "does not unlearn (non-negative)")
            if risk == "unlearn"
            else ("keeps retention (non-negative)" if sign >= 0 else "erodes retention (negative)")
        )
        shown = f"{total:+.3g}" + (f" (e/‖v‖ {unit:+.3g})" if unit is not None else "")
        parts.append(f"{TITLES[risk].split(' (')[0]} {shown}: {word}; carried by {carry}")
    breaks = _retention_break(by_risk.get("retain", []))
    if breaks:
        parts.append(breaks)
    return f"**{md(obj)}**: " + "; ".join(parts) + "."


def _ranking(S) -> str:
    """The objectives side by side on the common scale: Σ_t e_t/‖v_t‖ per set, best first."""
    cum = {risk: {obj: sum(per_unit(r) for r in by[risk]) for obj, by in S.items() if by.get(risk)} for risk in RISKS}
    unl = sorted(cum["unlearn"].items(), key=lambda kv: kv[1])
    ret = sorted(cum["retain"].items(), key=lambda kv: -kv[1])
    bits = []
    if unl:
        bits.append("unlearning, strongest first: " + ", ".join(f"{md(o)} {v:+.3g}" for o, v in unl))
    if ret:
        bits.append("retaining, least damage first: " + ", ".join(f"{md(o)} {v:+.3g}" for o, v in ret))
    return f"On the common scale (Σ over steps of e/‖v‖, in {UNIT_PER_UNIT}): " + "; ".join(bits) + "."


#: two trade-offs closer than this many standard errors of their difference (paired jackknife) are a tie
TIE_SE = 2.0
#: … or closer than this share of the larger one (when there are too few steps for a standard error)
TIE_REL = 0.02


def _leave_one_step_out(
    by_risk: dict[str, list[dict[str, Any]]], value: Callable[[dict[str, Any]], float] = _raw
) -> tuple[float, dict[int, float]] | None:
    """The trade-off ratio ρ = Σ_s r_s / −Σ_s u_s (retaining over unlearning values of the measured steps s), and
    ρ_(s) with step s left out, for every step; None when leaving a step out leaves no unlearning."""
    u = {r["step"]: value(r) for r in by_risk.get("unlearn", [])}
    r = {x["step"]: value(x) for x in by_risk.get("retain", [])}
    steps = sorted(set(u) & set(r))
    U, R = sum(u[s] for s in steps), sum(r[s] for s in steps)
    if not steps or U >= 0 or any(U - u[s] >= 0 for s in steps):
        return None
    return R / -U, {s: (R - r[s]) / -(U - u[s]) for s in steps}


def _jackknife_se(values: Sequence[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return math.sqrt((n - 1) / n * sum((x - mean) ** 2 for x in values))


def tradeoff_se(by_risk: dict[str, list[dict[str, Any]]], value: Callable = _raw) -> float | None:
    """Standard error of one objective's trade-off ratio ρ by the jackknife over its measured steps:
    se² = (n−1)/n · Σ_s (ρ_(s) − ρ̄)², ρ_(s) leaving step s out. It says how much ρ rests on single steps.
    None with fewer than three steps. ``value``: a record's per-step value (raw e, or e/‖v‖)."""
    got = _leave_one_step_out(by_risk, value)
    if got is None or len(got[1]) < 3:
        return None
    return _jackknife_se(list(got[1].values()))


def tradeoff_diff_se(
    a: dict[str, list[dict[str, Any]]], b: dict[str, list[dict[str, Any]]], value: Callable = _raw
) -> float | None:
    """Standard error of the difference ρ_a − ρ_b by the paired jackknife over the steps both measured (step s
    left out of both): steps that move both objectives alike cancel, so a consistent small advantage shows.
    None with fewer than three common steps."""
    ga, gb = _leave_one_step_out(a, value), _leave_one_step_out(b, value)
    if ga is None or gb is None:
        return None
    common = sorted(set(ga[1]) & set(gb[1]))
    if len(common) < 3 or len(common) != len(ga[1]) or len(common) != len(gb[1]):
        return None
    return _jackknife_se([ga[1][s] - gb[1][s] for s in common])


def _tradeoff(S, scores: dict[str, float], value: Callable, scaled: bool) -> str:
    """The trade-off finding: what the ratio means and its sign, the best objective, and every other objective
    within noise of it said to be tied with it."""
    se = {k: tradeoff_se(S[k], value) for k in scores}

    def tied(a: str, b: str) -> bool:
        d = abs(scores[a] - scores[b])
        paired = tradeoff_diff_se(S[a], S[b], value)
        if paired is not None and d <= TIE_SE * paired:
            return True
        return d <= TIE_REL * max(abs(scores[a]), abs(scores[b]))

    def show(k: str) -> str:
        return f"{md(k)} {scores[k]:+.3g}" + (f" ± {se[k]:.2g}" if se[k] is not None else "")

    order = sorted(scores, key=lambda k: -scores[k])
    best = order[0]
    ties = [k for k in order[1:] if tied(best, k)]
    rest = [k for k in order[1:] if k not in ties]
    scale = " on the common scale (each step's e/‖v‖)" if scaled else ""
    meaning = (
        f"Trade-off = cumulative retaining ÷ |cumulative unlearning| G-effect{scale}: retention kept (> 0) or lost "
        "(< 0) per unit of unlearning, higher is better"
    )
    noise = (
        f"± one standard error (jackknife over steps); within noise = a difference under {TIE_SE:g} standard errors "
        f"of the paired jackknife over steps, or under {TIE_REL:.0%}"
    )
    if ties:
        lead = (
            "No single best trade-off: "
            + ", ".join(f"**{md(k)}**" for k in [best, *ties])
            + " are within noise of each other ("
            + ", ".join(show(k) for k in [best, *ties])
            + ")"
        )
    else:
        lead = f"Best trade-off: **{md(best)}** ({show(best)})"
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
def summary_rows(recs: Records) -> list[dict[str, Any]]:
    """One row per objective and risk: cumulative G-effect (raw, and Σ e/‖v‖ when the records carry ‖v‖), NLL
    first/last, fidelity, per group."""
    rows = []
    for obj, by_risk in series(recs).items():
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
            units = [per_unit(r) for r in lst]
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
                    "cumulative_per_unit": None if None in units else sum(units),
                    "nll_start": lst[0].get("loss"),
                    "nll_end": nll_end,
                    "fidelity_median_rel_err": sorted(fid)[len(fid) // 2] if fid else None,
                    **{f"group:{g}": v for g, v in groups.items()},
                }
            )
    return rows


# -- plots ------------------------------------------------------------------------------------------------
NONE_HARMFUL = "None: every forget sample's GA gradient lowers (or keeps) the retain NLL (Σ_i E[i, j] ≥ 0 for all j)."


def _harmful_lines(meta: dict[str, Any]) -> list[tuple[str, str, float]]:
    return [(h["question"], h["answer"], h["retain_g_effect"]) for h in meta.get("most_harmful", [])]


# -- documents --------------------------------------------------------------------------------------------
def render(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """(Re-)render every report file of a run folder from its geffects.jsonl; returns name -> path.

    Everything is checked (the records, and meta.json by :func:`~geffect_fast.app.records.read_meta`) and written
    in a temporary folder first, then moved in: a failure leaves the files already there as they were. A folder
    this tool wrote (it holds :data:`~geffect_fast.app.common.MARKER`) has the files added to its marker."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    recs = load_records(run_dir / "geffects.jsonl")
    meta = read_meta(run_dir / "meta.json")
    guided = guide_rows(load_decisions(run_dir / "guide.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        rows = summary_rows(recs)
        write_csv(rows, tmp / "summary.csv")
        images = plots(recs, tmp) + meta_plots(meta, tmp)
        facts = findings(recs)
        md = _markdown(meta, rows, facts, images, guided)
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(_html(meta, rows, facts, images, tmp, guided))
        names = ["summary.csv", "report.md", "report.html", *(name for name, _ in images)]
        for name in names:
            os.replace(tmp / name, out / name)
        note_written(out, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: out / name for name in names}


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


#: the table's columns of G-effects, which the HTML colours by what their set wants
_GEFFECT_COLUMNS = (f"cumulative G-effect [{UNIT_E}]", "Σ e/‖v‖ (common scale)")


def _table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = [
        "objective",
        "risk",
        *_GEFFECT_COLUMNS,
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
                _fmt(r.get("cumulative_per_unit"), "+.3g"),
                top,
                f"{_fmt(r['nll_start'], '.3f')} → {_fmt(r['nll_end'], '.3f')}",
                _fmt(r["fidelity_median_rel_err"], ".1%"),
            ]
        )
    drop = set()
    if all(r["fidelity_median_rel_err"] is None for r in rows):  # gradient directions only: nothing to check
        drop.add(len(head) - 1)
    if all(r.get("cumulative_per_unit") is None for r in rows):  # records without ‖v‖ (older runs)
        drop.add(3)
    keep = [i for i in range(len(head)) if i not in drop]
    return [head[i] for i in keep], [[b[i] for i in keep] for b in body]


def wanted(risk: str, value: str) -> bool | None:
    """Whether a G-effect shown as ``value`` is what its set wants: unlearning e < 0, retention e ≥ 0 (None when
    there is no number)."""
    try:
        x = float(value.replace("−", "-"))
    except ValueError:
        return None
    return x < 0 if risk == "unlearn" else x >= 0


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
        ("guide", "guide policies"),
        ("guide_every", "guide's probes measured every (steps)"),
        ("answer_accuracy", "answer accuracy after fine-tuning"),
        ("wall_time_s", "wall time (s)"),
        ("machine", "machine"),
    ]
    return [f"{label}: {meta[k]}" for k, label in keys if k in meta]


GUIDE_HEAD = ("objective", "step", "forget NLL", "retain NLL", "ρ", "groups scaled", "sample weights", "decision")
GUIDE_NOTE = (
    "The guide's decision at each step (`guide.jsonl`): ρ = max(−e_u, 0)/(−e_r), the unlearning per unit of "
    "retention cost of the gradient about to be used (– where it does not harm retention); groups scaled by the "
    "layers rule, and the share of each group's step removed by the project rule; sample weights (min–max) of the "
    "samples rule; NLLs before the step (– on steps that reuse the probes measured earlier, --guide-every)."
)


#: decisions per objective the report shows in full; longer runs show their first and last GUIDE_ROWS // 2
GUIDE_ROWS = 20


def _shown_decisions(decisions: Sequence[dict[str, Any]]) -> list[dict[str, Any] | int]:
    """Each objective's decisions, its middle ones replaced by their count where it has more than GUIDE_ROWS."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in decisions:
        by[d["objective"]].append(d)
    out: list[dict[str, Any] | int] = []
    half = GUIDE_ROWS // 2
    for ds in by.values():
        out += ds if len(ds) <= GUIDE_ROWS else [*ds[:half], len(ds) - 2 * half, *ds[-half:]]
    return out


def guide_rows(decisions: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row of text per guide decision (:data:`GUIDE_HEAD`); an objective with more than :data:`GUIDE_ROWS`
    shows its first and last ones and a row saying how many steps are left out (all are in guide.jsonl)."""
    rows = []
    for d in _shown_decisions(decisions):
        if isinstance(d, int):
            rows.append(["…", f"{d} steps more (guide.jsonl)", *[""] * (len(GUIDE_HEAD) - 2)])
            continue
        w = d.get("sample_weights")
        scaled = [f"{g}×{f:g}" for g, f in (d.get("scaled_groups") or {}).items()]
        scaled += [f"{g} −{share:.0%} (projected)" for g, share in (d.get("projected") or {}).items()]
        scaled = ", ".join(scaled) or "–"
        decision = f"stop: {d.get('reason')}" if d.get("stop") else "step"
        rows.append(
            [
                d["objective"],
                str(d["step"]),
                _fmt(d.get("forget_nll"), ".4g"),
                _fmt(d.get("retain_nll"), ".4g"),
                _fmt(d.get("ratio"), ".3g"),
                scaled,
                f"{min(w):.2f}–{max(w):.2f}" if w else "–",
                decision,
            ]
        )
    return rows


def _markdown(meta, rows, facts, images, guided=()) -> str:
    head, body = _table(rows)
    lines = ["# G-effect report", "", SIGNS, ""]
    setup = _setup_lines(meta)
    if setup:
        lines += ["## Setup", ""] + [f"- {md(s)}" for s in setup] + [""]
    lines += ["## Findings", ""] + [f"- {f}" for f in facts] + ["", "## Cumulative G-effects", ""]
    lines.append("| " + " | ".join(md(c) for c in head) + " |")
    lines.append("|" + "---|" * len(head))
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in body]
    lines.append("")
    if any(r.get("cumulative_per_unit") is not None for r in rows):
        lines += [SCALE, ""]
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
        lines += [f"| {md(q)} | {md(a)} | {v:+.3g} |" for q, a, v in harmful]
        lines.append("")
    elif "most_harmful" in meta:
        lines += ["## Forget samples most harmful to retention", "", NONE_HARMFUL, ""]
    note = _prediction_note(rows)
    if note:
        lines += [note, ""]
    if guided:
        lines += ["## Guide decisions", "", md(GUIDE_NOTE).replace("\\`", "`"), ""]
        lines += ["| " + " | ".join(GUIDE_HEAD) + " |", "|" + "---|" * len(GUIDE_HEAD)]
        lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in guided] + [""]
    for name, cap in images:
        lines += [f"![{md(cap)}]({name})", "", f"*{md(cap)}*", ""]
    return "\n".join(lines)


_CSS = """body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1120px;margin:2em auto;
padding:0 1.2em;color:#1d2330}h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #e3e6ec;
padding-bottom:.2em}table{border-collapse:collapse;width:100%;font-size:13px}th,td{border:1px solid #e3e6ec;
padding:.35em .6em;text-align:left}th{background:#f4f6f9}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1.4em 0}figure img{max-width:100%;border:1px solid #e3e6ec}figcaption{color:#5a6270;font-size:13px}
ul.findings li{margin:.35em 0}.setup{color:#404859}
.signs{background:#f4f6f9;border-left:4px solid #5a6270;padding:.6em .9em;margin:1em 0}
.bad{color:#b3261e}.good{color:#1b6e3a}"""


def _html(meta, rows, facts, images, out: Path, guided=()) -> str:
    def md_bold(s: str) -> str:  # a finding's Markdown (** bold, backslash escapes) as HTML
        parts = [html.escape(md_unescape(p)) for p in s.split("**")]
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    head, body = _table(rows)
    h = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>G-effect report</title>",
        f"<style>{_CSS}</style></head><body><h1>G-effect report</h1>",
        f"<p class='signs'>{md_bold(SIGNS)} In the tables a G-effect is <span class='good'>green</span> where it "
        "is what its set wants and <span class='bad'>red</span> where it is not.</p>",
    ]
    setup = _setup_lines(meta)
    if setup:
        h.append("<ul class='setup'>" + "".join(f"<li>{html.escape(s)}</li>" for s in setup) + "</ul>")
    h.append("<h2>Findings</h2><ul class='findings'>" + "".join(f"<li>{md_bold(f)}</li>" for f in facts) + "</ul>")
    h.append("<h2>Cumulative G-effects</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
    coloured = [i for i, c in enumerate(head) if c in _GEFFECT_COLUMNS]
    for row in body:
        cells = []
        for i, c in enumerate(row):
            good = wanted(row[1], c) if i in coloured else None
            cls = "" if good is None else f" class='num {'good' if good else 'bad'}'"
            cells.append(f"<td{cls}>{html.escape(c)}</td>")
        h.append("<tr>" + "".join(cells) + "</tr>")
    h.append("</table>")
    if any(r.get("cumulative_per_unit") is not None for r in rows):
        h.append(f"<p class='setup'>{html.escape(SCALE)}</p>")
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
            h.append(f"<tr><td>{html.escape(q)}</td><td>{html.escape(a)}</td><td class='num bad'>{v:+.3g}</td></tr>")
        h.append("</table>")
    elif "most_harmful" in meta:
        h.append(f"<h2>Forget samples most harmful to retention</h2><p class='setup'>{html.escape(NONE_HARMFUL)}</p>")
    if guided:
        h.append(f"<h2>Guide decisions</h2><p class='setup'>{html.escape(GUIDE_NOTE)}</p><table><tr>")
        h.append("".join(f"<th>{html.escape(c)}</th>" for c in GUIDE_HEAD) + "</tr>")
        h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in guided]
        h.append("</table>")
    for name, cap in images:
        b64 = base64.b64encode((out / name).read_bytes()).decode()
        h.append(
            f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        )
    h.append("</body></html>")
    return "\n".join(h)
