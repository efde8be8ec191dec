"""The report a researcher reads at a glance: every plot's tick labels read back before saving, whole-number
step axes, NLL aligned with the G-effect steps, near-zero flips kept small, heatmaps for many groups, and the
wording of the findings (signs first, near-ties within noise, what the ratio's sign means)."""

import math
import random

import matplotlib
import pytest

matplotlib.use("Agg")
from matplotlib.collections import QuadMesh  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from geffect_fast.app import figures as F  # noqa: E402
from geffect_fast.app import report  # noqa: E402
from geffect_fast.app.records import series  # noqa: E402

FIVE = ("embed", "block.0", "block.1", "final_norm", "lm_head")


def _records(
    objs=("GA", "NPO"),
    groups=FIVE,
    steps=12,
    seed=0,
    scale=None,
    per_instance=None,
    kind="gradient",
    retain_factor=None,
):
    """Tracker-shaped records: group values from ``scale(obj, risk, step, group)``, NLL and measured ΔR."""
    rng = random.Random(seed)
    scale = scale or (lambda o, r, s, g: (-1 if r == "unlearn" else 0.5) * 10.0 ** -groups.index(g))
    out = []
    for obj in objs:
        nll = {"unlearn": 0.1, "retain": 0.1}
        for s in range(1, steps + 1):
            for risk in ("unlearn", "retain"):
                g = {name: scale(obj, risk, s, name) * (1 + 0.2 * rng.random()) for name in groups}
                if retain_factor is not None and risk == "retain":
                    g = {name: v * retain_factor(obj, s) for name, v in g.items()}
                tot = sum(g.values())
                dR = 0.01 * (1 + rng.random())
                rec = {
                    "objective": obj,
                    "step": s,
                    "risk": risk,
                    "kind": kind,
                    "total": tot,
                    "groups": g,
                    "loss": nll[risk],
                    "measured_dR": dR,
                    "predicted_dR": -1e-3 * tot,
                }
                nll[risk] += dR
                if per_instance is not None:
                    rec["per_instance"] = [[per_instance(rng)] + [0.0] * (len(groups) - 1) for _ in range(16)]
                out.append(rec)
    return out


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report saves, drawn, by file name (read back just before it is written)."""
    seen = {}
    real = Figure.savefig

    def savefig(self, fname, *a, **k):
        seen[getattr(fname, "name", str(fname))] = self
        out = real(self, fname, *a, **{**k, "dpi": 40})  # the labels are the same at any dpi; tests run faster
        self.canvas.draw()  # read back below, as drawn when saved
        self.test_renderer = self.canvas.get_renderer()  # (closing the figure takes its canvas away)
        return out

    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


def _labels(ax, axis):
    """The tick labels ``ax`` shows on ``axis`` inside its view (shared inner axes show none)."""
    params = (ax.xaxis if axis == "x" else ax.yaxis).get_tick_params()
    if not any(params.get(k) for k in (("labelbottom", "labeltop") if axis == "x" else ("labelleft", "labelright"))):
        return None
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    pad = (hi - lo) * 1e-6
    k = 0 if axis == "x" else 1
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [
        t.get_text() for t in labels if t.get_visible() and t.get_text() and lo - pad <= t.get_position()[k] <= hi + pad
    ]


def _number(text):
    try:
        float(text.replace("−", "-"))
    except ValueError:
        return False
    return True


def _overlaps(boxes):
    return [
        (a, b)
        for i, (a, p) in enumerate(boxes)
        for b, q in boxes[i + 1 :]
        if min(p.x1, q.x1) - max(p.x0, q.x0) > 0.5 and min(p.y1, q.y1) - max(p.y0, q.y0) > 0.5
    ]


def _check_readable(fig, name):
    """Two to seven readable tick labels per numeric axis, whole steps on step axes, a label (with its unit, in
    brackets) on every value axis, and no text drawn over other text."""
    renderer = fig.test_renderer
    for n, ax in enumerate(fig.axes):
        colorbar = ax.get_label() == "<colorbar>"
        for axis in ("x", "y"):
            texts = _labels(ax, axis)
            if texts is None or (colorbar and axis == "y"):
                continue
            numeric = [t for t in texts if _number(t)]
            assert len(numeric) >= 2 or (texts and not numeric), f"{name}: axes {n} {axis} shows tick labels {texts}"
            assert len(numeric) <= 7, f"{name}: axes {n} {axis} shows {len(numeric)} tick labels {texts}"
            label = ax.get_xlabel() if axis == "x" else ax.get_ylabel()
            if not colorbar and F.is_step_label(label):
                assert all(t.lstrip("−-").isdigit() for t in texts), f"{name}: fractional steps {texts}"
            elif numeric and not colorbar:
                assert "[" in label and "]" in label, f"{name}: axes {n} {axis} label {label!r} has no unit"
            ticks = [
                t for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()) if t.get_text() in texts
            ]
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ticks]
            assert not _overlaps(boxes), f"{name}: axes {n} {axis} tick labels overlap: {_overlaps(boxes)}"
        notes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t.get_visible() and t.get_text()]
        assert not _overlaps(notes), f"{name}: axes {n}: labels overlap: {_overlaps(notes)}"


@pytest.mark.parametrize(
    "case",
    [
        # issue 16: an update-direction per-instance run with values −1.4e4…−6.1e4 lost every y label but "0"
        dict(per_instance=lambda rng: -1.4e4 - 4.7e4 * rng.random(), kind="update"),
        dict(steps=3),  # short runs showed steps 1.25, 1.5, …
        dict(steps=1, objs=("GA",), per_instance=lambda rng: 2.0 + rng.random()),  # one box: one name
        dict(steps=5, groups=("embed", *[f"block.{i}" for i in range(30)], "lm_head")),  # a heatmap
        dict(scale=lambda o, r, s, g: 3.0 + FIVE.index(g) * 1e-3),  # all values within one decade
        dict(scale=lambda o, r, s, g: (-1) ** s * 10.0 ** (-3 * FIVE.index(g))),  # 12 decades of sign flips
    ],
)
def test_every_plot_has_readable_ticks_and_whole_steps(tmp_path, figures, case):
    recs = _records(**case)
    made = report.plots(recs, tmp_path)
    assert {n for n, _ in made} == set(figures) and figures
    for name, fig in figures.items():
        _check_readable(fig, name)
        assert (tmp_path / name).is_file()


def test_step_axes_are_told_from_values_at_a_step():
    assert F.is_step_label("unlearning step") and F.is_step_label("unlearning step (0: before unlearning)")
    assert F.is_step_label("Steps") and not F.is_step_label("per-instance unlearning G-effect at step 12")


@pytest.mark.parametrize("spread", [1.0, 1e-3, 1e4])
def test_npo_weight_plot_has_readable_ticks(tmp_path, spread):
    """The demo's NPO scatter: per-instance G-effects from −1 to +0.01 (times ``spread``) on a symmetric-log axis
    labelled "… at step 12" — not a step axis (a full demo run once failed here on its −0.1, 0.01 ticks)."""
    import matplotlib.pyplot as plt

    rng = random.Random(0)
    g = [-(10.0 ** rng.uniform(-4, 0)) * spread for _ in range(40)] + [0.01 * spread, 0.002 * spread]
    meta = {"npo_scatter": {"geffect": g, "weights": [rng.uniform(0.2, 1.0) for _ in g], "step": 12}}
    made = F.meta_plots(meta, tmp_path)
    assert [n for n, _ in made] == ["npo_weights.png"] and (tmp_path / "npo_weights.png").is_file()
    plt.close("all")


def test_nll_is_aligned_with_the_geffect_steps(tmp_path, figures):
    report.plots(_records(steps=12), tmp_path)
    nll = figures["nll.png"].axes[0]
    xs = [list(line.get_xdata()) for line in nll.get_lines()]
    # NLL after 0 (before unlearning) … 12 steps: 13 points on 0…12, not 1…13
    assert xs and all(x == list(range(13)) for x in xs), xs
    cum = figures["geffects_cumulative.png"].axes[0]
    per = figures["geffects_per_step.png"].axes[0]
    assert [list(line.get_xdata()) for line in cum.get_lines()][0] == list(range(13))  # Σ_{1..s}, from 0 at 0
    assert [list(line.get_xdata()) for line in per.get_lines()][0] == list(range(1, 13))
    assert nll.get_xlim() == cum.get_xlim() == per.get_xlim() == (0.0, 12.0)


def _pixel_height(ax, y):
    return abs(ax.transData.transform((0, y))[1] - ax.transData.transform((0, 0))[1])


def test_near_zero_flips_are_drawn_small(tmp_path, figures):
    """A group flipping ±1e-4 beside groups of size ~1 must stay near the zero line, not look as large as they
    do (the old symlog put its linear band at the 10th percentile of |values|, i.e. at the flips)."""

    def scale(o, r, s, g):
        return (-1) ** s * 1e-4 if g == "final_norm" else -(10.0 ** -FIVE.index(g))

    report.plots(_records(scale=scale), tmp_path)
    ax = figures["geffects_per_step.png"].axes[0]
    big = _pixel_height(ax, 1.0)
    flip = _pixel_height(ax, 1e-4)
    assert flip < 0.02 * big, (flip, big)
    # ... and a tenth of the largest value is still drawn well apart from the zero line
    assert _pixel_height(ax, 0.1) > 0.3 * big


def test_many_groups_make_a_layer_by_step_heatmap(tmp_path, figures):
    groups = ("embed", *[f"block.{i}" for i in range(30)], "final_norm", "lm_head")

    def scale(o, r, s, g):
        return (-1) ** s * 1e-6 if g == "block.7" else -1.0 / (1 + groups.index(g))

    report.plots(_records(groups=groups, steps=6, scale=scale), tmp_path)
    fig = figures["geffects_per_step.png"]
    meshes = [c for ax in fig.axes if ax.get_label() != "<colorbar>" for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 4  # 2 objectives × (unlearn, retain)
    arr = meshes[0].get_array()
    assert arr.shape == (len(groups), 6)
    ax = meshes[0].axes
    names = _labels(ax, "y")
    assert names[0] == "embed" and names[-1] == "lm_head" and 6 <= len(names) <= 14
    assert not fig.legends  # no 33-colour legend
    # the near-zero flips of block.7 are (almost) white: colour value within 1% of the middle
    norm = meshes[0].norm
    k = groups.index("block.7")
    assert all(abs(float(norm(v)) - 0.5) < 0.01 for v in arr[k]), [float(norm(v)) for v in arr[k]]
    assert abs(float(norm(arr[0][0])) - 0.5) > 0.3  # the largest values are far from white


def test_few_groups_keep_curves_with_a_legend(tmp_path, figures):
    report.plots(_records(), tmp_path)
    fig = figures["geffects_cumulative.png"]
    assert fig.legends and [t.get_text() for t in fig.legends[0].get_texts()] == list(FIVE)
    assert not [c for ax in fig.axes for c in ax.collections if isinstance(c, QuadMesh)]


def _tradeoff_line(recs):
    lines = [f for f in report.findings(recs) if "rade-off" in f and f.startswith(("Best", "No single"))]
    assert len(lines) == 1, report.findings(recs)
    return lines[0]


def test_near_ties_are_said_to_be_within_noise():
    # retain/unlearn ratios −0.094 and −0.095 (the WTNPO/WGA): within noise, no winner crowned
    recs = _records(objs=("WGA", "WTNPO"), retain_factor=lambda o, s: 0.094 / 0.5 if o == "WTNPO" else 0.095 / 0.5)
    line = _tradeoff_line(recs)
    assert line.startswith("No single best trade-off: **") and "within noise" in line
    assert "**WGA**" in line and "**WTNPO**" in line


def test_identical_tradeoffs_with_few_steps_are_a_tie():
    recs = _records(objs=("GA", "NPO"), steps=2, seed=3)  # too few steps for a standard error
    for r in recs:
        if r["objective"] == "NPO":
            r["total"] = next(
                x["total"] for x in recs if x["objective"] == "GA" and x["step"] == r["step"] and x["risk"] == r["risk"]
            )
    assert _tradeoff_line(recs).startswith("No single best trade-off")


def test_a_clear_winner_is_named_and_the_ratio_sign_explained():
    recs = _records(objs=("GA", "WGA"), retain_factor=lambda o, s: -2.0 if o == "GA" else 0.02)
    line = _tradeoff_line(recs)
    assert line.startswith("Best trade-off: **WGA**")
    assert "GA −" in line.replace("-", "−") or "GA -" in line
    # what the number is and which sign is good
    assert "÷ |cumulative unlearning| G-effect" in line and "higher is better" in line and "lost (< 0)" in line


def test_tradeoff_standard_error_is_the_jackknife_over_steps():
    recs = _records(objs=("GA",), steps=5, seed=1)
    by = series(recs)["GA"]
    u = [r["total"] for r in by["unlearn"]]
    r = [x["total"] for x in by["retain"]]
    loo = [(sum(r) - r[i]) / -(sum(u) - u[i]) for i in range(5)]
    m = sum(loo) / 5
    assert report.tradeoff_se(by) == pytest.approx(math.sqrt(4 / 5 * sum((x - m) ** 2 for x in loo)), rel=1e-12)
    assert report.tradeoff_se(series(_records(objs=("GA",), steps=2))["GA"]) is None


def _steps(obj, retain, unlearn=-1.0):
    """Records of one objective, one group, with the given per-step retaining values."""
    return [
        {"objective": obj, "step": s, "risk": risk, "total": v, "groups": {"embed": v}}
        for s, x in enumerate(retain, 1)
        for risk, v in (("unlearn", unlearn), ("retain", x))
    ]


def test_a_consistent_advantage_is_not_a_tie_even_when_steps_vary_a_lot():
    """Both objectives swing alike from step to step; A is better at every step by 0.05. Each one's own
    standard error is large, but the paired jackknife of the difference is 0: A wins."""
    x = [0.5, -0.9, 0.3, -0.7, 0.1, -0.6, 0.4, -0.8]
    recs = _steps("A", [v + 0.05 for v in x]) + _steps("B", x)
    by = series(recs)
    assert report.tradeoff_se(by["A"]) > 0.1  # unpaired: the two would overlap
    assert report.tradeoff_diff_se(by["A"], by["B"]) == pytest.approx(0.0, abs=1e-12)
    assert _tradeoff_line(recs).startswith("Best trade-off: **A**")
    # the paired jackknife itself: leave step s out of both, then the usual jackknife of the differences
    y = [0.2, -0.1, 0.4, 0.0, -0.3]
    by = series(_steps("A", x[:5]) + _steps("B", y))
    d = [(sum(x[:5]) - x[i]) / 4 - (sum(y) - y[i]) / 4 for i in range(5)]
    m = sum(d) / 5
    assert report.tradeoff_diff_se(by["A"], by["B"]) == pytest.approx(math.sqrt(4 / 5 * sum((v - m) ** 2 for v in d)))


def test_sign_convention_comes_first(tmp_path):
    recs = _records()
    rows, facts = report.summary_rows(recs), report.findings(recs)
    md = report._markdown({"model": "m"}, rows, facts, [])
    html = report._html({"model": "m"}, rows, facts, [], tmp_path)
    assert 0 < md.index("Unlearning wants e < 0") < md.index("## Setup") < md.index("## Findings")
    assert md.index("retention wants") < md.index("## Findings")
    assert 0 < html.index("Unlearning wants e &lt; 0") < html.index("<h2>Findings")
    assert md.count("Unlearning wants") == 1  # said once, at the top


def test_gradient_runs_say_predicted_dR_is_plain_sgd():
    for kind, said in (("gradient", True), ("update", False)):
        md = report._markdown({}, report.summary_rows(_records(kind=kind)), [], [])
        assert ("plain SGD step" in md) is said, kind


def test_numbers_are_short():
    assert [F.num(x) for x in (0, 1000, -1e3, 0.25, -6.1e4, 1e-4, 1e5)] == [
        "0",
        "1e3",
        "−1e3",
        "0.25",
        "−6.1e4",
        "1e−4",
        "1e5",
    ]


PROTOCOL = ("GA", "GD", "GA+KL", "NPO", "NPO+KL", "WGA", "TNPO", "WTNPO", "RMU", "IdkPO")
THIRDS = ("embed", "shallow", "middle", "deep", "lm")


def _findings_run(steps=6, spread=1.0):
    """Records and outcomes of the ten protocol objectives as ``geffect-fast reproduce`` writes them, GA and NPO
    ending at almost the same point of the trade-off plot (their names once printed over each other: "NPAO")."""
    recs = _records(objs=PROTOCOL, groups=THIRDS, steps=steps)
    for r in recs:
        r["smoothed_total"], r["smoothed_groups"] = 0.6 * r["total"], {g: 0.6 * v for g, v in r["groups"].items()}
    outcomes = {}
    for i, n in enumerate(PROTOCOL):
        df = 0.5 + (0.001 if n == "NPO" else 0.1 * i) * spread
        dr = 0.03 * (1 + (0 if n == "NPO" else i)) * spread
        curve = {
            "unlearn": [2.0 + df * s / steps for s in range(steps + 1)],
            "retain": [1.0 + dr * s / steps for s in range(steps + 1)],
        }
        outcomes[n] = {
            "nll_before": {"unlearn": 2.0, "retain": 1.0},
            "nll_after": {"unlearn": 2.0 + df, "retain": 1.0 + dr},
            "nll_curve": curve,
        }
    return recs, outcomes


@pytest.mark.parametrize("spread", [1.0, 1e-3, 300.0])
def test_reproduce_figures_pass_the_same_read_back(tmp_path, figures, spread):
    """The findings' four figures (geffect-fast reproduce) are held to the same checks as a run's: readable ticks,
    labelled value axes with units, whole steps, and point names that do not overlap."""
    from geffect_fast.app import figures as F

    recs, outcomes = _findings_run(spread=spread)
    made = F.findings_plots(recs, outcomes, tmp_path)
    assert [n for n, _ in made] == [
        "findings_depth.png",
        "findings_geffects.png",
        "findings_nll.png",
        "findings_tradeoff.png",
    ]
    for name, fig in figures.items():
        _check_readable(fig, name)
    names = [t.get_text() for t in figures["findings_tradeoff.png"].axes[0].texts]
    assert sorted(names) == sorted(PROTOCOL)


def test_one_colour_per_objective_across_figures(tmp_path, figures):
    recs = _records(objs=("NPO", "GA", "WGA"), per_instance=lambda rng: -rng.random())
    for r in recs:
        r["direction_norm"] = 2.0
    report.plots(recs, tmp_path)
    want = F.objective_colours(["GA", "NPO", "WGA", "Custom"])
    assert want["GA"] == F.objective_colours(["WGA", "GA"])["GA"]  # the colour does not depend on who else ran
    for name in ("nll.png", "geffects_per_unit.png"):
        lines = {ln.get_label(): ln.get_color() for ax in figures[name].axes for ln in ax.get_lines()}
        for obj in ("GA", "NPO", "WGA"):
            assert matplotlib.colors.to_rgba(lines[obj]) == want[obj], (name, obj)
    boxes = [p for p in figures["per_instance.png"].axes[0].patches if type(p).__name__ == "PathPatch"]
    assert [tuple(round(c, 6) for c in b.get_facecolor()[:3]) for b in boxes] == [
        tuple(round(c, 6) for c in want[o][:3]) for o in ("NPO", "GA", "WGA")
    ]
    # layer groups take a sequence of their own, never an objective's colour
    groups = F.group_colours(FIVE)
    assert not set(map(tuple, groups.values())) & set(map(tuple, want.values()))


def _scaled(obj, u, r, norms):
    """Records of one objective with per-step unlearning/retaining totals and direction norms."""
    return [
        {"objective": obj, "step": s, "risk": risk, "total": v, "groups": {"embed": v}, "direction_norm": n}
        for s, (a, b, n) in enumerate(zip(u, r, norms), 1)
        for risk, v in (("unlearn", a), ("retain", b))
    ]


def test_objectives_compare_on_the_common_scale():
    """Raw G-effects scale with each objective's gradient: GA (large gradient) shows −11 where WGA shows −0.6, yet
    per unit of step WGA unlearns more. The ranking and the trade-off use e/‖v‖; without norms, the raw values."""
    ga = _scaled("GA", [-10.0, -1.0], [1.0, -1.0], [10.0, 1.0])  # per unit: u −1, −1; r +0.1, −1 -> ρ = −0.45
    wga = _scaled("WGA", [-0.3, -0.3], [-0.06, -0.06], [0.1, 0.1])  # per unit: u −3, −3; r −0.6, −0.6 -> ρ = −0.2
    facts = report.findings(ga + wga)
    ranking = next(f for f in facts if f.startswith("On the common scale"))
    assert (
        ranking.index("WGA −6") < ranking.index("GA −2")
        if "−" in ranking
        else ranking.index("WGA -6") < ranking.index("GA -2")
    )
    assert _tradeoff_line(ga + wga).startswith("Best trade-off: **WGA**")  # −0.2 beats −0.45
    assert "on the common scale" in _tradeoff_line(ga + wga)
    assert any("e/‖v‖ -2" in f or "e/‖v‖ −2" in f for f in facts if f.startswith("**GA**"))
    raw = [{k: v for k, v in r.items() if k != "direction_norm"} for r in ga + wga]
    assert _tradeoff_line(raw).startswith("Best trade-off: **GA**")  # raw: GA 0 vs WGA −0.2
    assert not any(f.startswith("On the common scale") for f in report.findings(raw))
    rows = {(r["objective"], r["risk"]): r for r in report.summary_rows(ga + wga)}
    assert rows[("GA", "unlearn")]["cumulative"] == -11.0 and rows[("GA", "unlearn")]["cumulative_per_unit"] == -2.0
    assert rows[("WGA", "unlearn")]["cumulative_per_unit"] == pytest.approx(-6.0)
    assert all(r["cumulative_per_unit"] is None for r in report.summary_rows(raw))


def test_html_colours_say_good_or_bad_per_set(tmp_path):
    """Unlearning wants e < 0 (green), retention e ≥ 0 (a negative retaining G-effect is red)."""
    recs = _scaled("GA", [-1.0, -1.0, -1.0], [-0.5, -0.5, -0.5], [1.0, 1.0, 1.0])
    recs += _scaled("NPO", [0.5, 0.5, 0.5], [0.2, 0.2, 0.2], [1.0, 1.0, 1.0])
    rows = report.summary_rows(recs)
    page = report._html({}, rows, report.findings(recs), [], tmp_path)
    cells = {}
    for tr in page.split("<tr>")[1:]:
        tds = tr.split("<td")
        if len(tds) > 4:
            obj, risk = tds[1].split(">")[1].split("<")[0], tds[2].split(">")[1].split("<")[0]
            cells[(obj, risk)] = (tds[3].split(">")[0], tds[4].split(">")[0])
    assert cells[("GA", "unlearn")] == (" class='num good'", " class='num good'")
    assert cells[("GA", "retain")] == (" class='num bad'", " class='num bad'")
    assert cells[("NPO", "unlearn")] == (" class='num bad'", " class='num bad'")
    assert cells[("NPO", "retain")] == (" class='num good'", " class='num good'")
    assert report.wanted("unlearn", "−0.3") and not report.wanted("retain", "-0.3") and report.wanted("retain", "+0")


def test_symlog_axes_keep_at_most_seven_ticks():
    for band, lo, hi in ((1e-3, -50.0, 40.0), (1e-6, -1e6, 0.0), (1e-2, 0.0, 3.0), (1e-8, -1e4, 1e4)):
        ticks = F.symlog_ticks(band, lo, hi)
        assert 0.0 in ticks and 2 <= len(ticks) <= 7, (band, lo, hi, ticks)
        assert all(lo <= t <= hi for t in ticks)
