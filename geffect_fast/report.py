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
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

REQUIRED = ("objective", "step", "risk", "total", "groups")
RISKS = ("unlearn", "retain")
TITLES = {"unlearn": "unlearning G-effect (forget set)", "retain": "retaining G-effect (retain set)"}


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
    breaks, and the best trade-off."""
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
        best = max(scores, key=scores.get)
        out.append(
            f"Best trade-off: **{best}** — retaining G-effect per unit of unlearning G-effect "
            f"{scores[best]:+.3g} (the others: "
            + ", ".join(f"{k} {v:+.3g}" for k, v in scores.items() if k != best)
            + ")."
        )
    return out


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
def plots(recs: Sequence[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    """Write the PNGs; return [(file name, caption)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    series = _series(recs)
    objs = list(series)
    groups = _groups(recs)
    cmap = plt.get_cmap("tab10") if len(groups) <= 10 else plt.get_cmap("viridis", len(groups))
    colours = {g: cmap(i) for i, g in enumerate(groups)}
    linthresh = _linthresh(recs)
    made = []
    for mode in ("cumulative", "per_step"):
        fig, axes = plt.subplots(
            len(objs),
            2,
            figsize=(11, 2.3 * len(objs) + 1.0),
            sharex=True,
            sharey="col",
            squeeze=False,
            layout="constrained",
        )
        for i, obj in enumerate(objs):
            for j, risk in enumerate(RISKS):
                ax = axes[i][j]
                lst = series[obj].get(risk, [])
                steps = [r["step"] for r in lst]
                for g in groups:
                    vals = [r["groups"].get(g, 0.0) for r in lst]
                    if mode == "cumulative":
                        vals = [sum(vals[: k + 1]) for k in range(len(vals))]
                    ax.plot(steps, vals, color=colours[g], lw=1.6, label=g)
                ax.axhline(0, color="0.45", lw=0.9)
                ax.set_yscale("symlog", linthresh=linthresh)
                ax.yaxis.set_major_locator(ticker.SymmetricalLogLocator(linthresh=linthresh, base=100))
                ax.yaxis.set_minor_locator(ticker.NullLocator())
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(_symlog_label(linthresh)))
                ax.tick_params(labelsize=8)
                if i == 0:
                    ax.set_title(TITLES[risk], fontsize=10)
                if j == 0:
                    ax.set_ylabel(obj, fontsize=10, fontweight="bold")
                ax.grid(alpha=0.25)
        for ax in axes[-1]:
            ax.set_xlabel("unlearning step")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(8, len(groups)), fontsize=9, frameon=False)
        fig.suptitle(f"G-effect per layer group, {mode.replace('_', ' ')} (symmetric log scale)", fontsize=12)
        name = f"geffects_{mode}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(
            (
                name,
                f"G-effect per layer group ({mode.replace('_', ' ')}), one row per objective: "
                "unlearning (left; negative = forgetting) beside retaining (right; negative = damage).",
            )
        )
    # NLL curves
    if any(r.get("loss") is not None for r in recs):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), squeeze=False)
        for j, risk in enumerate(RISKS):
            ax = axes[0][j]
            for obj in objs:
                lst = series[obj].get(risk, [])
                pts = [(r["step"], r["loss"]) for r in lst if r.get("loss") is not None]
                if lst and lst[-1].get("measured_dR") is not None:
                    pts.append((lst[-1]["step"] + 1, lst[-1]["loss"] + lst[-1]["measured_dR"]))
                if pts:
                    ax.plot(*zip(*pts), lw=1.8, marker="o", ms=2.5, label=obj)
            ax.set_title(f"{'forget' if risk == 'unlearn' else 'retain'} NLL", fontsize=10)
            ax.set_xlabel("unlearning step")
            ax.grid(alpha=0.25)
        axes[0][0].legend(fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(out / "nll.png", dpi=110)
        plt.close(fig)
        made.append(("nll.png", "NLL of the forget set (left: should rise) and the retain set (right: should stay)."))
    # per-instance distributions at the last measured step
    pi = [
        (obj, risk, lst[-1]["per_instance"])
        for obj in objs
        for risk, lst in series[obj].items()
        if lst and lst[-1].get("per_instance")
    ]
    if pi:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), squeeze=False)
        for j, risk in enumerate(RISKS):
            data = [(obj, [sum(x for x in row if x is not None) for row in inst]) for obj, rk, inst in pi if rk == risk]
            ax = axes[0][j]
            if data:
                ax.boxplot([d for _, d in data], tick_labels=[o for o, _ in data], showfliers=True)
                ax.axhline(0, color="0.6", lw=0.8)
                vals = sorted(abs(x) for _, d in data for x in d if x)
                lt = 10.0 ** math.floor(math.log10(vals[len(vals) // 4])) if vals else 1.0
                ax.set_yscale("symlog", linthresh=lt)
                ax.yaxis.set_major_locator(ticker.SymmetricalLogLocator(linthresh=lt, base=10))
                ax.yaxis.set_minor_locator(ticker.NullLocator())
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(_symlog_label(lt)))
            ax.set_title(f"per-instance {TITLES[risk].split(' (')[0]}, last step", fontsize=10)
            ax.grid(alpha=0.25)
        fig.tight_layout()
        fig.savefig(out / "per_instance.png", dpi=110)
        plt.close(fig)
        made.append(("per_instance.png", "Per-instance G-effects (summed over groups) at the last measured step."))
    return made


def meta_plots(meta: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Plots from the run's meta.json: NPO's weights against per-instance G-effects, when recorded."""
    sc = meta.get("npo_scatter")
    if not sc or not sc.get("weights"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.scatter(sc["geffect"], sc["weights"], s=18, alpha=0.75, color="tab:purple")
    vals = sorted(abs(x) for x in sc["geffect"] if x)
    lt = 10.0 ** math.floor(math.log10(vals[len(vals) // 4])) if vals else 1.0
    ax.set_xscale("symlog", linthresh=lt)
    ax.xaxis.set_major_locator(ticker.SymmetricalLogLocator(linthresh=lt, base=10))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(_symlog_label(lt)))
    ax.set_xlabel(f"per-instance unlearning G-effect at step {sc.get('step', '?')}")
    ax.set_ylabel("NPO weight 2σ(−β log(π/π_ref))")
    ax.grid(alpha=0.3)
    fig.savefig(out / "npo_weights.png", dpi=110)
    plt.close(fig)
    return [
        (
            "npo_weights.png",
            f"Each forget sample's NPO weight after the NPO run against its own unlearning G-effect at step "
            f"{sc.get('step', '?')}: low weights mark the samples NPO has turned down.",
        )
    ]


def _harmful_lines(meta: dict[str, Any]) -> list[tuple[str, str, float]]:
    return [(h["question"], h["answer"], h["retain_g_effect"]) for h in meta.get("most_harmful", [])]


def _symlog_label(linthresh: float):
    """Tick labels for symlog axes: powers of ten, nothing inside the linear band but 0."""

    def fmt(y: float, _pos: int) -> str:
        if abs(y) <= linthresh * 1.01:
            return "0" if y == 0 else ""
        e = round(math.log10(abs(y)))
        return f"{'−' if y < 0 else ''}1e{e}"

    return fmt


def _linthresh(recs: Sequence[dict[str, Any]]) -> float:
    """A power of ten near the 10th percentile of |values|: the linear band of the symlog axes."""
    vals = sorted(abs(v) for r in recs for v in r["groups"].values() if v)
    if not vals:
        return 1.0
    return 10.0 ** math.floor(math.log10(max(vals[len(vals) // 10], 1e-12)))


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
    lines = ["# G-effect report", ""]
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
    for name, cap in images:
        lines += [f"![{cap}]({name})", "", f"*{cap}*", ""]
    lines += [
        "G-effect e = ⟨∇R, v⟩ (R: NLL of the probe set, v: the direction of the step); a step of size η changes",
        "R by about −η·e. Unlearning wants e < 0 on the forget set; retention wants e ≥ 0 on the retain set.",
        "",
    ]
    return "\n".join(lines)


_CSS = """body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1120px;margin:2em auto;
padding:0 1.2em;color:#1d2330}h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #e3e6ec;
padding-bottom:.2em}table{border-collapse:collapse;width:100%;font-size:13px}th,td{border:1px solid #e3e6ec;
padding:.35em .6em;text-align:left}th{background:#f4f6f9}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1.4em 0}figure img{max-width:100%;border:1px solid #e3e6ec}figcaption{color:#5a6270;font-size:13px}
ul.findings li{margin:.35em 0}.setup{color:#404859}.neg{color:#b3261e}.pos{color:#1b6e3a}"""


def _html(meta, rows, facts, images, out: Path) -> str:
    def md_bold(s: str) -> str:
        parts = html.escape(s).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    head, body = _table(rows)
    h = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>G-effect report</title>",
        f"<style>{_CSS}</style></head><body><h1>G-effect report</h1>",
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
    for name, cap in images:
        b64 = base64.b64encode((out / name).read_bytes()).decode()
        h.append(
            f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        )
    h.append(
        "<p class='setup'>G-effect e = ⟨∇R, v⟩ (R: NLL of the probe set, v: the direction of the step); a step "
        "of size η changes R by about −η·e. Unlearning wants e &lt; 0 on the forget set; retention wants e ≥ 0 on "
        "the retain set.</p></body></html>"
    )
    return "\n".join(h)
