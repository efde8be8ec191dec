"""The figures of a run (``plots``, ``meta_plots``) and of the paper's findings (``findings_plots``), and the checks
every figure passes before it is saved (``figure_problems``).

Conventions, the same in every figure:

- every **step axis** runs over whole steps from 0 (before unlearning) to the last step, so the NLL after s steps
  sits above step s, where the cumulative G-effect of steps 1…s predicts its change (ΔR ≈ −η·Σe);
- every **value axis** has a label with its unit (:data:`~geffect_fast.app.records.UNIT_E` and friends) and at
  most :data:`MAX_TICKS` labelled ticks, plain (0.25, −3.1) or short powers of ten (1e−2); it is linear when the
  values span less than a factor 1/:data:`LINEAR_SHARE`, else symmetric-log with the linear band (±1% of the
  largest value, rounded down to a power of ten) shaded — near-zero groups flipping sign stay near the zero line;
- **one colour per objective** across all figures (:func:`objective_colours`; categorical) and one per layer group
  (:func:`group_colours`: a dark-to-light sequence from the embedding to the head, with alternating line styles),
  so a colour never means an objective in one figure and a group in the next; heatmaps are blue where a set gets
  what it wants (unlearning e < 0, retention e ≥ 0) and red where it does not;
- before a figure is saved its labels are read back (:func:`figure_problems`): too few or too many tick labels,
  fractional steps, a value axis without a label, or text drawn over other text is a bug, not a figure.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from .records import RISKS, TITLES, UNIT_E, UNIT_NLL, UNIT_PER_UNIT, common_scale, per_unit
from .records import groups as record_groups
from .records import series as record_series

#: above this many layer groups, per-group curves give way to a layer × step heatmap
MANY_GROUPS = 10
#: the symmetric-log axes are linear within ±(this share of the largest |value|, rounded down to a power of
#: ten): smaller values — near-zero groups flipping sign — stay visibly small near the zero line
LINEAR_SHARE = 1e-2
#: at most this many labelled ticks on a numeric axis
MAX_TICKS = 7
#: the paper's objectives (and ours) in the protocol's order: each keeps its colour in every figure
KNOWN_OBJECTIVES = ("GA", "GD", "GA+KL", "NPO", "NPO+KL", "WGA", "TNPO", "WTNPO", "RMU", "IdkPO", "SimNPO")
DEPTHS = ("shallow", "middle", "deep")
#: the depth groups (``thirds``/``paper``) in order
THIRDS = ("embed", *DEPTHS, "lm")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- colours -------------------------------------------------------------------------------------------------------
def _palette() -> list:
    from matplotlib import colormaps

    tab10, tab20 = colormaps["tab10"], colormaps["tab20"]
    return [tab10(i) for i in range(10)] + [tab20(2 * i + 1) for i in range(10)]


def objective_colours(names: Sequence[str]) -> dict[str, Any]:
    """A colour per objective, the same in every figure: the known objectives by their place in
    :data:`KNOWN_OBJECTIVES` (case-insensitive), others in the colours left, in order of appearance."""
    pal = _palette()
    known = {k.upper(): i for i, k in enumerate(KNOWN_OBJECTIVES)}
    out, free = {}, [c for i, c in enumerate(pal) if i >= len(KNOWN_OBJECTIVES)]
    for n in names:
        i = known.get(n.upper())
        out[n] = pal[i] if i is not None else free[len([m for m in out if m.upper() not in known]) % len(free)]
    return out


def _group_order(groups: Sequence[str]) -> list[str]:
    return list(THIRDS) if set(groups) <= set(THIRDS) else list(groups)  # depth groups keep theirs when some are empty


def group_colours(groups: Sequence[str]) -> dict[str, Any]:
    """A colour per layer group: a dark-to-light sequence (plasma) in the groups' order, embedding to head."""
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    order = _group_order(groups)
    n = max(1, len(order) - 1)
    return {g: cmap(0.88 * order.index(g) / n) for g in groups}


def group_styles(groups: Sequence[str]) -> dict[str, str]:
    """A line style per layer group, alternating along the depth, so that neighbouring groups (close in colour)
    stay apart."""
    order = _group_order(groups)
    return {g: ("-", "--", "-.", ":")[order.index(g) % 4] for g in groups}


# -- axes ----------------------------------------------------------------------------------------------------------
def _band(top: float) -> float:
    """The symmetric-log linear band: LINEAR_SHARE of ``top``, rounded down to a power of ten."""
    return 10.0 ** math.floor(math.log10(top * LINEAR_SHARE))


def symlog_ticks(band: float, lo: float, hi: float, max_ticks: int = MAX_TICKS) -> list[float]:
    """Ticks for a symmetric-log axis viewing [lo, hi]: 0 and powers of ten from the band's edge outwards on each
    side that reaches it, every k-th decade so that there are at most ``max_ticks``."""
    d0 = round(math.log10(band))
    sides = [s for s, top in ((1.0, hi), (-1.0, -lo)) if top >= band * 0.999]
    ticks = [0.0]
    if not sides:
        return ticks
    per_side = (max_ticks - 1) // len(sides)
    for sign in sides:
        top = hi if sign > 0 else -lo
        d1 = math.floor(math.log10(top) + 1e-9)
        step = max(1, math.ceil((d1 - d0 + 1) / per_side))
        ticks += [sign * 10.0**k for k in range(d0, d1 + 1, step)]
    return sorted(ticks)


def _linear(axis_obj) -> None:
    from matplotlib import ticker

    axis_obj.set_major_locator(ticker.MaxNLocator(nbins=MAX_TICKS - 2, min_n_ticks=3))
    axis_obj.set_major_formatter(ticker.FuncFormatter(lambda y, _pos: num(y)))


def value_axis(ax, values: Sequence[float], axis: str = "y") -> float | None:
    """Scale a value axis for ``values``: linear when every nonzero |value| is within a factor 1/LINEAR_SHARE of
    the largest (nothing would hide near zero), else symmetric log with the linear band ±_band(max) shaded.
    The view spans the values and 0 with a 5% margin on the drawn scale. Returns the band (None when linear)."""
    from matplotlib import ticker

    finite = [v for v in values if v is not None and math.isfinite(v)]
    mags = [abs(v) for v in finite if v]
    axis_obj = ax.yaxis if axis == "y" else ax.xaxis
    set_scale, set_lim = (ax.set_yscale, ax.set_ylim) if axis == "y" else (ax.set_xscale, ax.set_xlim)
    band = None
    if not mags or min(mags) >= max(mags) * LINEAR_SHARE:
        set_scale("linear")
        _linear(axis_obj)
    else:
        band = _band(max(mags))
        set_scale("symlog", linthresh=band)
        axis_obj.set_minor_locator(ticker.NullLocator())
        axis_obj.set_major_formatter(ticker.FuncFormatter(_log_label(band)))
        (ax.axhspan if axis == "y" else ax.axvspan)(-band, band, color="0.5", alpha=0.12, lw=0, zorder=0)
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    if hi > lo:
        tr = axis_obj.get_transform()
        t_lo, t_hi = tr.transform([lo, hi])
        pad = 0.05 * (t_hi - t_lo)
        set_lim(*tr.inverted().transform([t_lo - pad, t_hi + pad]))
    if band is not None:
        view = ax.get_ylim() if axis == "y" else ax.get_xlim()
        axis_obj.set_major_locator(ticker.FixedLocator(symlog_ticks(band, *sorted(view))))
    return band


def step_axis(ax, last_step: int) -> None:
    """Whole steps only, 0 … last_step, the same on every step axis."""
    from matplotlib import ticker

    ax.set_xlim(0, max(1, last_step))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=MAX_TICKS - 1, integer=True, min_n_ticks=2))


def num(y: float) -> str:
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
        return num(10.0 ** round(math.log10(abs(y))) * (1 if y > 0 else -1))

    return fmt


def band_note(band: float | None) -> str:
    return "" if band is None else f"shaded: linear within ±{num(band)}, log beyond"


def place_labels(ax, points: Sequence[tuple[float, float]], names: Sequence[str], colours: Mapping[str, Any]) -> None:
    """Name each point beside it without covering another name: each label takes the first of a few offsets
    (right-above, right-below, left-above, left-below, further out) at which it overlaps no label placed before
    it and stays inside the axes."""
    fig = ax.figure
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    frame = ax.get_window_extent(r)
    offsets = [(4, 4), (4, -11), (-4, 4), (-4, -11), (4, 15), (4, -22), (-4, 15), (-4, -22), (12, 26), (12, -33)]
    placed = []
    for (x, y), name in zip(points, names):
        for i, (dx, dy) in enumerate(offsets):
            t = ax.annotate(
                name,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=8,
                color=colours[name],
                ha="left" if dx > 0 else "right",
            )
            box = t.get_window_extent(r)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (inside and not any(_overlap(box, b) for b in placed)) or i == len(offsets) - 1:
                placed.append(box)
                break
            t.remove()


# -- checks --------------------------------------------------------------------------------------------------------
def save(fig, path: Path) -> None:
    """Draw, read every value axis's tick labels back, save and close the figure. An axis that shows tick labels
    but has fewer than two readable ones in view (a symmetric-log axis whose data sit inside one decade, say) is
    redrawn linear before saving; :func:`figure_problems` must then find nothing."""
    try:
        _save(fig, path)
    finally:
        _pyplot().close(fig)


def _save(fig, path: Path) -> None:
    fig.canvas.draw()
    redo = False
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>" and labels_shown(ax, "y") and len(visible_tick_labels(ax, "y")) < 2:
            ax.set_yscale("linear")
            _linear(ax.yaxis)
            redo = True
    if redo:
        fig.canvas.draw()
    problems = figure_problems(fig)
    if problems:  # pragma: no cover - a bug in the plotting code, never the data's fault
        raise RuntimeError(f"{path.name}: unreadable figure: {'; '.join(problems)}")
    fig.savefig(path, dpi=110)


def labels_shown(ax, axis: str) -> bool:
    """Whether ``ax`` draws tick labels on ``axis`` at all (shared axes hide the inner ones)."""
    params = (ax.yaxis if axis == "y" else ax.xaxis).get_tick_params()
    keys = ("labelleft", "labelright") if axis == "y" else ("labelbottom", "labeltop")
    return any(params.get(k, False) for k in keys)


def _tick_texts(ax, axis: str) -> list:
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    k = 1 if axis == "y" else 0
    slack = (hi - lo) * 1e-9
    labels = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    return [t for t in labels if t.get_visible() and t.get_text() and lo - slack <= t.get_position()[k] <= hi + slack]


def visible_tick_labels(ax, axis: str = "y") -> list[str]:
    """The non-empty tick labels an axis shows inside its view limits (after ``fig.canvas.draw()``)."""
    return [t.get_text() for t in _tick_texts(ax, axis)]


def is_number(text: str) -> bool:
    try:
        float(text.replace("−", "-"))
    except ValueError:
        return False
    return True


def is_step_label(label: str) -> bool:
    """Whether an axis label names a step axis ("unlearning step", "step (0: before)"), not a quantity measured
    at a step ("per-instance G-effect at step 12")."""
    return re.match(r"(unlearning )?steps?\b", label.strip().lower()) is not None


def tick_label_problems(fig) -> list[str]:
    """What a reader could not read off ``fig`` (drawn): every value axis that shows tick labels has at least two
    in view (a categorical one at least one) and at most MAX_TICKS, a y axis that shows labels has an axis label
    (what and in which unit), and a step axis (labelled "unlearning step …", see :func:`is_step_label`) shows
    whole numbers only."""
    out = []
    for n, ax in enumerate(fig.axes):
        colorbar = ax.get_label() == "<colorbar>"
        axes_to_check = ("x", "y")
        if colorbar:  # a colour bar's labels run along its long side only
            box = ax.get_position()
            axes_to_check = ("x",) if box.width > box.height else ("y",)
        for axis in axes_to_check:
            if not labels_shown(ax, axis):
                continue
            texts = visible_tick_labels(ax, axis)
            categorical = texts and not any(is_number(t) for t in texts)  # e.g. one box per objective
            if len(texts) < (1 if categorical else 2):
                out.append(f"axes {n} {axis}: tick labels {texts}")
            if not categorical and len(texts) > MAX_TICKS:
                out.append(f"axes {n} {axis}: {len(texts)} tick labels {texts} (at most {MAX_TICKS})")
            label = ax.get_xlabel() if axis == "x" else ax.get_ylabel()
            if axis == "y" and not colorbar and not label.strip():
                out.append(f"axes {n} y: no axis label")
            whole = all(t.replace("−", "-").lstrip("-").isdigit() for t in texts)
            if is_step_label(label) and not colorbar and not whole:
                out.append(f"axes {n} {axis}: non-integer steps {texts}")
    return out


def _overlap(a, b, tol: float = 0.5) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


def overlap_problems(fig) -> list[str]:
    """Text drawn over other text in ``fig`` (drawn): neighbouring tick labels of one axis, and the labels written
    into an axes (point names, notes), pairwise."""
    r = fig.canvas.get_renderer()
    out = []
    for n, ax in enumerate(fig.axes):
        for axis in ("x", "y"):
            if not labels_shown(ax, axis):
                continue
            ticks = sorted(_tick_texts(ax, axis), key=lambda t: t.get_position()[1 if axis == "y" else 0])
            boxes = [(t.get_text(), t.get_window_extent(r)) for t in ticks]
            for (ta, a), (tb, b) in zip(boxes, boxes[1:]):
                if _overlap(a, b):
                    out.append(f"axes {n} {axis}: tick labels {ta!r} and {tb!r} overlap")
        texts = [(t.get_text(), t.get_window_extent(r)) for t in ax.texts if t.get_visible() and t.get_text()]
        for i, (ta, a) in enumerate(texts):
            for tb, b in texts[i + 1 :]:
                if _overlap(a, b):
                    out.append(f"axes {n}: labels {ta!r} and {tb!r} overlap")
    return out


def figure_problems(fig) -> list[str]:
    """Everything :func:`save` refuses: :func:`tick_label_problems` and :func:`overlap_problems`."""
    return tick_label_problems(fig) + overlap_problems(fig)


# -- a run's figures -----------------------------------------------------------------------------------------------
def plots(recs: Sequence[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    """Write a run's PNGs; return [(file name, caption)]: G-effects per layer group (cumulative and per step; layer ×
    step heatmaps above MANY_GROUPS groups), the objectives on the common scale e/‖v‖ (when the records carry ‖v‖),
    the NLL after each step, and the per-instance distributions."""
    plt = _pyplot()
    series = record_series(recs)
    objs = list(series)
    groups = record_groups(recs)
    last_step = max(r["step"] for by in series.values() for lst in by.values() for r in lst)
    made = []
    for mode in ("cumulative", "per_step"):
        name = f"geffects_{mode}.png"
        if len(groups) > MANY_GROUPS:
            fig = _heatmaps(plt, series, objs, groups, mode)
            how = "layer × step heatmap, one row per objective; blue = what the set wants, red = against it"
        else:
            fig = _curves(plt, series, objs, groups, mode, last_step)
            how = "one row per objective; a colour and line style per group, embedding (dark) to head (light)"
        save(fig, out / name)
        what = "summed over steps 1…s" if mode == "cumulative" else "of each step"
        made.append(
            (
                name,
                f"G-effect per layer group {what} ({how}): unlearning (left; negative = forgetting) beside "
                f"retaining (right; negative = damage). e is in {UNIT_E}: −lr·e is the NLL change it predicts.",
            )
        )
    if common_scale(recs):
        fig = _per_unit(plt, series, objs, last_step)
        save(fig, out / "geffects_per_unit.png")
        made.append(
            (
                "geffects_per_unit.png",
                "The objectives on one scale: each step's G-effect divided by the size of its direction, e/‖v‖ — "
                "how fast the NLL changes per unit of parameter distance moved along v, whatever the size of the "
                "objective's gradient — summed over steps 1…s. Unlearning (left) wants it negative, retention "
                "(right) non-negative.",
            )
        )
    if any(r.get("loss") is not None for r in recs):
        fig = _nll(plt, series, objs, last_step)
        save(fig, out / "nll.png")
        made.append(
            (
                "nll.png",
                "NLL of the forget set (left: should rise) and the retain set (right: should stay) after each step "
                "(0: before unlearning), on the same step axis as the G-effect plots.",
            )
        )
    made += _per_instance(plt, series, objs, out)
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
    colours, styles = group_colours(groups), group_styles(groups)
    fig, axes = plt.subplots(
        len(objs),
        2,
        figsize=(11, 2.3 * len(objs) + 1.0),
        sharex=True,
        sharey="col",
        squeeze=False,
        layout="constrained",
    )
    quantity = "Σ e" if mode == "cumulative" else "e"
    for j, risk in enumerate(RISKS):
        column = []
        for i, obj in enumerate(objs):
            ax = axes[i][j]
            lst = series[obj].get(risk, [])
            for g in groups:
                steps, vals = _step_values(lst, g, mode)
                column += vals
                ax.plot(
                    steps,
                    vals,
                    color=colours[g],
                    ls=styles[g],
                    lw=1.6,
                    label=g,
                    marker="o" if len(steps) <= 3 else None,
                )
            ax.axhline(0, color="0.45", lw=0.9)
            ax.tick_params(labelsize=8)
            if i == 0:
                ax.set_title(TITLES[risk], fontsize=10)
            ax.set_ylabel(f"{obj}\n{quantity} [{UNIT_E}]", fontsize=9)
            ax.grid(alpha=0.25)
        band = None
        for i in range(len(objs)):
            band = value_axis(axes[i][j], column, "y")
        if band is not None:
            axes[0][j].set_title(f"{TITLES[risk]}\n{band_note(band)}", fontsize=10)
    for ax in axes[-1]:
        step_axis(ax, last_step)
        ax.set_xlabel("unlearning step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(8, len(groups)), fontsize=9, frameon=False)
    fig.suptitle(f"G-effect per layer group, {mode.replace('_', ' ')}", fontsize=12)
    return fig


def _heatmaps(plt, series, objs, groups, mode):
    """One layer × step heatmap per objective and risk; colour on a symmetric-log scale per risk column, blue where
    the set gets what it wants (unlearning e < 0, retention e > 0) and red where not."""
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
    rows = list(range(0, n, label_every))
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
        cmap = "RdBu_r" if risk == "unlearn" else "RdBu"  # negative is blue (wanted) for unlearning, red for retention
        mesh = None
        for i, obj in enumerate(objs):
            ax = axes[i][j]
            steps, m = mats[obj]
            if steps:
                mesh = ax.pcolormesh(_edges(steps), [k - 0.5 for k in range(n + 1)], m, cmap=cmap, norm=norm)
            ax.set_ylim(n - 0.5, -0.5)
            ax.yaxis.set_major_locator(ticker.FixedLocator(rows))
            ax.yaxis.set_major_formatter(ticker.FixedFormatter([groups[k] for k in rows]))
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(f"{TITLES[risk]}\ncolour: linear within ±{num(band)}, log beyond", fontsize=10)
            if j == 0:
                ax.set_ylabel(obj, fontsize=10, fontweight="bold")
        if mesh is not None:
            cb = fig.colorbar(mesh, ax=list(axes[:, j]), location="bottom", shrink=0.8, aspect=40, pad=0.01)
            cb.ax.xaxis.set_major_locator(ticker.FixedLocator(symlog_ticks(band, -top, top)))
            cb.ax.xaxis.set_minor_locator(ticker.NullLocator())
            cb.ax.xaxis.set_major_formatter(ticker.FuncFormatter(_log_label(band)))
            cb.ax.tick_params(labelsize=7)
            what = "cumulative" if mode == "cumulative" else "per step"
            cb.set_label(f"{TITLES[risk].split(' (')[0]}, {what} [{UNIT_E}]; blue = wanted, red = against")
    for ax in axes[-1]:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=MAX_TICKS - 1, integer=True))
        ax.set_xlabel("unlearning step")
    fig.suptitle(f"G-effect per layer group, {mode.replace('_', ' ')} ({n} groups)", fontsize=12)
    return fig


def _edges(steps: Sequence[int]) -> list[float]:
    """Cell edges around measured steps (every=K gives gaps; each cell spans half way to its neighbours)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [steps[0] - (mids[0] - steps[0]), *mids, steps[-1] + (steps[-1] - mids[-1])]


def _per_unit(plt, series, objs, last_step):
    """The objectives on one scale: Σ over steps 1…s of e/‖v‖, from 0 at step 0, one line per objective."""
    colours = objective_colours(objs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), squeeze=False, layout="constrained")
    for j, risk in enumerate(RISKS):
        ax = axes[0][j]
        vals = []
        for obj in objs:
            lst = [r for r in series[obj].get(risk, []) if per_unit(r) is not None]
            if lst:
                acc, ys = 0.0, [0.0]
                for r in lst:
                    acc += per_unit(r)
                    ys.append(acc)
                ax.plot([0, *(r["step"] for r in lst)], ys, lw=1.8, marker="o", ms=2.5, label=obj, color=colours[obj])
                vals += ys
        ax.axhline(0, color="0.45", lw=0.9)
        band = value_axis(ax, vals, "y")
        ax.set_title(f"{TITLES[risk]} ÷ ‖v‖, cumulative" + (f"\n{band_note(band)}" if band else ""), fontsize=10)
        ax.set_ylabel(f"Σ e/‖v‖ [{UNIT_PER_UNIT}]", fontsize=9)
        step_axis(ax, last_step)
        ax.set_xlabel("unlearning step")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    axes[0][0].legend(fontsize=8, frameon=False, ncol=2)
    return fig


def _nll(plt, series, objs, last_step):
    colours = objective_colours(objs)
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
                ax.plot(*zip(*pts), lw=1.8, marker="o", ms=2.5, label=obj, color=colours[obj])
        ax.set_title(f"{'forget' if risk == 'unlearn' else 'retain'} NLL after each step", fontsize=10)
        ax.set_ylabel(f"NLL [{UNIT_NLL}]", fontsize=9)
        _linear(ax.yaxis)
        step_axis(ax, last_step)
        ax.set_xlabel("unlearning step (0: before unlearning)")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    axes[0][0].legend(fontsize=8, frameon=False, ncol=2)
    return fig


def _per_instance(plt, series, objs, out: Path) -> list[tuple[str, str]]:
    """Per-instance G-effects at the last measured step: one box per objective over the probe samples."""
    pi = [
        (obj, risk, lst[-1]["per_instance"], lst[-1]["step"])
        for obj in objs
        for risk, lst in series[obj].items()
        if lst and lst[-1].get("per_instance")
    ]
    if not pi:
        return []
    colours = objective_colours(objs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), squeeze=False, layout="constrained")
    bands = []
    for j, risk in enumerate(RISKS):
        data = [(obj, [sum(x for x in row if x is not None) for row in inst]) for obj, rk, inst, _ in pi if rk == risk]
        ax = axes[0][j]
        band = None
        if data:
            box = ax.boxplot(
                [d for _, d in data],
                tick_labels=[o for o, _ in data],
                showfliers=True,
                patch_artist=True,
                medianprops={"color": "k"},
            )
            for patch, (obj, _) in zip(box["boxes"], data):
                patch.set_facecolor(colours[obj])
                patch.set_alpha(0.55)
            ax.axhline(0, color="0.45", lw=0.9)
            band = value_axis(ax, [x for _, d in data for x in d], "y")
        bands.append(band)
        title = f"per-instance {TITLES[risk].split(' (')[0]}, step {pi[0][3]}"
        ax.set_title(title + (f"\n{band_note(band)}" if band else ""), fontsize=10)
        ax.set_ylabel(f"e_b, summed over groups [{UNIT_E}]", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    save(fig, out / "per_instance.png")
    shaded = (
        " The grey band is the linear part of the symmetric-log axis (within it values are drawn to scale; beyond it "
        "each power of ten takes the same height)."
        if any(b is not None for b in bands)
        else ""
    )
    return [
        (
            "per_instance.png",
            f"Per-instance G-effects (summed over groups) at the last measured step ({pi[0][3]}): one box per "
            f"objective over the probe samples (box: middle half, line: median, whiskers: 1.5× the box).{shaded}",
        )
    ]


def meta_plots(meta: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Plots from the run's meta.json: NPO's weights against per-instance G-effects, when recorded."""
    sc = meta.get("npo_scatter")
    if not sc or not sc.get("weights"):
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.scatter(sc["geffect"], sc["weights"], s=18, alpha=0.75, color=objective_colours(["NPO"])["NPO"])
    ax.axvline(0, color="0.45", lw=0.9)
    value_axis(ax, sc["geffect"], "x")
    _linear(ax.yaxis)
    ax.set_xlabel(f"per-instance unlearning G-effect at step {sc.get('step', '?')} [{UNIT_E}]")
    ax.set_ylabel("NPO weight 2σ(−β log(π/π_ref)) [0–2]")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    save(fig, out / "npo_weights.png")
    return [
        (
            "npo_weights.png",
            f"Each forget sample's NPO weight after the NPO run against its own unlearning G-effect at step "
            f"{sc.get('step', '?')}: low weights mark the samples NPO has turned down.",
        )
    ]


# -- the findings' figures (geffect-fast reproduce) ---------------------------------------------------------------
def findings_plots(
    records: Sequence[Mapping[str, Any]], outcomes: Mapping[str, Mapping[str, Any]], out: Path
) -> list[tuple[str, str]]:
    """PNG figures for the paper's findings; returns (file name, caption) pairs."""
    plt = _pyplot()
    series = record_series(records)
    names = [n for n in outcomes if n in series]
    colours = objective_colours(names)
    last_step = max((r["step"] for n in names for lst in series[n].values() for r in lst), default=1)
    images = [_findings_depth(plt, series, names, record_groups(records), out)]
    images.append(_findings_geffects(plt, series, names, colours, last_step, out))
    images.append(_findings_nll(plt, outcomes, names, colours, out))
    images.append(_findings_tradeoff(plt, outcomes, names, colours, out))
    return images


def _findings_depth(plt, series, names, groups, out: Path) -> tuple[str, str]:
    """Finding 1: Σ_t |e_t,g| per depth third, per objective (unlearning and retaining)."""
    colours = group_colours(THIRDS)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), layout="constrained")
    width = 0.8 / len(DEPTHS)
    for ax, risk in zip(axes, RISKS):
        vals_all = []
        for j, g in enumerate(DEPTHS):
            vals = [sum(abs(r["groups"].get(g, 0.0)) for r in series[n][risk]) for n in names]
            vals_all += vals
            ax.bar([i + (j - 1) * width for i in range(len(names))], vals, width, label=g, color=colours.get(g))
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        band = value_axis(ax, vals_all, "y")
        ax.set_title(f"Σ over steps of |{TITLES[risk]}| per depth" + (f"\n{band_note(band)}" if band else ""))
        ax.set_ylabel(f"Σ_t |e_t,g| [{UNIT_E}]")
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8)
    save(fig, out / "findings_depth.png")
    return ("findings_depth.png", "Finding 1: G-effect magnitude per depth third, summed over the steps.")


def _findings_geffects(plt, series, names, colours, last_step: int, out: Path) -> tuple[str, str]:
    """G-effects per step: unsmoothed and smoothed, unlearning and retaining."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), layout="constrained")
    for i, risk in enumerate(RISKS):
        for j, key in enumerate(("total", "smoothed_total")):
            ax = axes[i][j]
            vals = []
            for n in names:
                lst = [r for r in series[n][risk] if r.get(key) is not None]
                if lst:
                    ax.plot([r["step"] for r in lst], [r[key] for r in lst], marker="o", ms=3, label=n, c=colours[n])
                    vals += [r[key] for r in lst]
            ax.axhline(0, c="k", lw=0.5)
            band = value_axis(ax, vals, "y")
            how = "unsmoothed" if key == "total" else "smoothed (0.6/0.4)"
            ax.set_title(f"{TITLES[risk]}, {how}" + (f"\n{band_note(band)}" if band else ""), fontsize=10)
            ax.set_ylabel(f"e [{UNIT_E}]", fontsize=9)
            step_axis(ax, last_step)
            ax.set_xlabel("unlearning step")
            ax.tick_params(labelsize=8)
    axes[0][0].legend(ncol=2, fontsize=8)
    save(fig, out / "findings_geffects.png")
    return ("findings_geffects.png", "G-effects per step: unsmoothed (left), official smoothing (right).")


def _findings_nll(plt, outcomes, names, colours, out: Path) -> tuple[str, str]:
    """Finding 3: forget and retain NLL along the run."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), layout="constrained")
    last = max((len(outcomes[n]["nll_curve"]["unlearn"]) - 1 for n in names), default=1)
    for ax, risk in zip(axes, RISKS):
        for n in names:
            ys = outcomes[n]["nll_curve"][risk]
            ax.plot(range(len(ys)), ys, marker="o", ms=3, label=n, c=colours[n])
        ax.set_title(f"{'forget' if risk == 'unlearn' else 'held-out retain'} NLL", fontsize=10)
        ax.set_ylabel(f"NLL [{UNIT_NLL}]", fontsize=9)
        _linear(ax.yaxis)
        step_axis(ax, last)
        ax.set_xlabel("unlearning step (0: before unlearning)")
        ax.tick_params(labelsize=8)
    axes[0].legend(ncol=2, fontsize=8)
    save(fig, out / "findings_nll.png")
    return ("findings_nll.png", "Finding 3: forget and retain NLL along the run.")


def _findings_tradeoff(plt, outcomes, names, colours, out: Path) -> tuple[str, str]:
    """Findings 2, 4, 5: what each objective unlearned (forget NLL rise) against what it cost (retain NLL rise)."""
    fig, ax = plt.subplots(figsize=(7, 5.2), layout="constrained")
    pts = []
    for n in names:
        o = outcomes[n]
        df = o["nll_after"]["unlearn"] - o["nll_before"]["unlearn"]
        dr = o["nll_after"]["retain"] - o["nll_before"]["retain"]
        pts.append((df, dr))
        ax.scatter(df, dr, color=colours[n], s=40, zorder=3)
    value_axis(ax, [p[0] for p in pts], "x")
    value_axis(ax, [p[1] for p in pts], "y")
    ax.axhline(0, color="0.45", lw=0.8)
    ax.axvline(0, color="0.45", lw=0.8)
    ax.set_xlabel(f"forget NLL rise [{UNIT_NLL}] (unlearning →)")
    ax.set_ylabel(f"retain NLL rise [{UNIT_NLL}] (damage ↑)")
    ax.set_title("the trade-off after the run (lower right is better)", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.25)
    place_labels(ax, pts, names, colours)
    save(fig, out / "findings_tradeoff.png")
    return ("findings_tradeoff.png", "Findings 2, 4, 5: what each objective unlearned against what it cost.")
