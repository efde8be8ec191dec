"""``geffect-fast reproduce``: the findings' decision rules on constructed runs, and the command end to end on the
demo's tiny model."""

import json

import pytest

from geffect_fast.app import reproduce
from geffect_fast.app.cli import main


def _objective(name, e_u, e_r, d_f, d_r, depth_u=(3.0, 1.0, 0.5), norms=None):
    """Records of one objective: per-step totals e_u/e_r (unlearning/retaining), per-step NLL changes d_f/d_r, the
    unlearning G-effect split over shallow/middle/deep in proportions ``depth_u``; ``norms``: ‖v‖ per step."""
    recs, lf, lr = [], 2.0, 1.0
    curve = {"unlearn": [lf], "retain": [lr]}
    w = [x / sum(depth_u) for x in depth_u]
    for t, (eu, er, df, dr) in enumerate(zip(e_u, e_r, d_f, d_r), 1):
        for risk, e, loss in (("unlearn", eu, lf), ("retain", er, lr)):
            split = w if risk == "unlearn" else (1 / 3, 1 / 3, 1 / 3)
            groups = {"embed": 0.0, **{g: e * s for g, s in zip(reproduce.DEPTHS, split)}}
            recs.append(
                {
                    "objective": name,
                    "kind": "gradient",
                    "step": t,
                    "risk": risk,
                    "total": e,
                    "groups": groups,
                    "smoothed_total": e,
                    "smoothed_groups": groups,
                    "loss": loss,
                    "measured_dR": None,
                }
            )
            if norms is not None:
                recs[-1]["direction_norm"] = norms[t - 1]
        lf, lr = lf + df, lr + dr
        curve["unlearn"].append(lf)
        curve["retain"].append(lr)
    outcome = {
        "nll_before": {"unlearn": 2.0, "retain": 1.0},
        "nll_after": {"unlearn": lf, "retain": lr},
        "nll_curve": curve,
        "acc_after": {"forget": {"token": 0.1}, "retain": {"token": 0.8}},
    }
    return recs, outcome


def _findings(spec, learned=None, norms=None):
    records, outcomes = [], {}
    for name, args in spec.items():
        r, o = _objective(name, *args, norms=(norms or {}).get(name))
        records += r
        outcomes[name] = o
    return {f["id"]: f for f in reproduce.findings(records, outcomes, learned=learned)}


GROWING = ([-1.0, -1.0, -1.0], [-0.1, -0.2, -0.4], [0.5, 0.5, 0.5], [0.01, 0.02, 0.04])


def test_finding_rules_decide_as_stated():
    base = {
        "GA": GROWING,  # κ_G = 0.7/3, κ_NLL = 0.07/1.5
        "GD": ([-1.0] * 3, [-0.05] * 3, [0.5] * 3, [0.01] * 3),  # κ lower than GA's
        "GA+KL": ([-1.0] * 3, [-0.02] * 3, [0.5] * 3, [0.005] * 3),  # lower than GD's
        "NPO": ([-1.0] * 3, [-0.1] * 3, [0.5] * 3, [0.02] * 3),  # lower than GA's
        "NPO+KL": ([-1.0] * 3, [-0.01] * 3, [0.5] * 3, [0.001] * 3),
        "RMU": ([-1.0] * 3, [-0.1] * 3, [0.5] * 3, [0.02] * 3, (0.1, 0.1, 5.0)),  # deep-heavy, but excluded from (1)
    }
    f = _findings(base)
    assert [f[i]["verdict"] for i in range(1, 6)] == ["reproduced"] * 5
    assert "shallow largest for 5/5" in f[1]["numbers"]
    # (1): one objective deep-heavy -> mixed; all -> not reproduced
    f = _findings({**base, "GD": (*base["GD"], (0.1, 0.2, 3.0))})
    assert f[1]["verdict"] == "mixed"
    f = _findings({k: (*v[:4], (0.1, 0.2, 3.0)) for k, v in base.items()})
    assert f[1]["verdict"] == "not reproduced"
    # (2): an objective that helps the retain set (E_retain > 0, NLL falls) -> mixed
    f = _findings({**base, "GD": ([-1.0] * 3, [0.05] * 3, [0.5] * 3, [-0.01] * 3)})
    assert f[2]["verdict"] == "mixed" and "4/5" in f[2]["numbers"] or "5/6" in f[2]["numbers"]
    # (3): GA's damage per step shrinking -> not reproduced; growing in G-effects but not in NLL -> mixed
    f = _findings({**base, "GA": ([-1.0] * 3, [-0.4, -0.2, -0.1], [0.5] * 3, [0.04, 0.02, 0.01])})
    assert f[3]["verdict"] == "not reproduced"
    f = _findings({**base, "GA": ([-1.0] * 3, [-0.1, -0.2, -0.4], [0.5] * 3, [0.04, 0.02, 0.01])})
    assert f[3]["verdict"] == "mixed"
    # (4): NPO costs more retention per unit of unlearning than GA -> not reproduced; an NPO that does not
    # unlearn (forget NLL falls) is never better
    f = _findings({**base, "NPO": ([-1.0] * 3, [-0.5] * 3, [0.5] * 3, [0.2] * 3)})
    assert f[4]["verdict"] == "not reproduced"
    f = _findings({**base, "NPO": ([-1.0] * 3, [-0.01] * 3, [-0.1] * 3, [0.001] * 3)})
    assert f[4]["verdict"] == "not reproduced"
    # (5): GD worse than GA+KL holds; GA+KL worse than GD -> mixed
    f = _findings({**base, "GA+KL": ([-1.0] * 3, [-0.07] * 3, [0.5] * 3, [0.015] * 3)})
    assert f[5]["verdict"] == "mixed" and "GA+KL" in f[5]["numbers"]


def test_reproduce_end_to_end_on_the_demo_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEFFECT_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "repro"
    argv = ["reproduce", "--model", "demo", "--quick", "--objectives", "GA,GD,NPO", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"findings.md", "geffects.jsonl", "meta.json", "report.md", "report.html"} <= names
    assert {"findings_depth.png", "findings_geffects.png", "findings_nll.png", "findings_tradeoff.png"} <= names
    recs = [json.loads(x) for x in (out / "geffects.jsonl").read_text().splitlines()]
    assert {r["objective"] for r in recs} == {"GA", "GD", "NPO"}
    assert all({"smoothed_total", "smoothed_groups"} <= set(r) for r in recs)
    assert set(recs[0]["groups"]) <= {"embed", "shallow", "middle", "deep", "lm"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["peak_rss_gb"] > 0 and meta["smoothing_cost"]["smoothed_s_per_step"] > 0
    assert [f["id"] for f in meta["findings"]] == [1, 2, 3, 4, 5]
    # the quick demo model never learns its data (~45% of answer tokens): no verdicts; finding 5 needs GA+KL
    verdicts = [f["verdict"] for f in meta["findings"]]
    assert verdicts == ["inconclusive"] * 4 + ["not tested"], verdicts
    assert meta["answer_accuracy_before"]["forget"]["token"] < reproduce.LEARNED_MIN
    assert all("direction_norm" in r and r["direction_norm"] > 0 for r in recs)
    md = (out / "findings.md").read_text()
    assert md.count("\n| ") >= 5 and "Peak memory" in md and "geffect-fast reproduce" in md
    # every text computed from the run: the quick demo model has 2 blocks (shallow: block 0, no middle, deep: block 1)
    # and was fine-tuned for the demo's --quick epochs, not the SmolLM2 protocol's
    from geffect_fast.app.demo import QUICK

    assert "(blocks 0/none/1 of 2)" in md and "blocks 0–9" not in md
    assert f"AdamW lr {QUICK.lr}, {QUICK.epochs} epochs, batch {QUICK.batch_size}" in md
    assert f"forget05: the last 5 % of authors ({meta['n_forget']} QA)" in md and meta["n_forget"] == 5
    err = capsys.readouterr()
    assert "findings.md" in err.out
    # `geffect-fast report` re-renders a reproduce folder's findings from its records (verdicts recomputed)
    (out / "findings.md").unlink()
    assert main(["report", str(out)]) == 0 and "findings.md" in capsys.readouterr().out
    assert (out / "findings.md").read_text().split("## Per objective")[1] == md.split("## Per objective")[1]
    assert json.loads((out / "meta.json").read_text())["findings"] == meta["findings"]
    assert main(["reproduce", "--model", "demo", "--objectives", "GA,XYZ", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown objective" in err and err.count(",") >= len(reproduce.OBJECTIVES) - 1  # lists all ten


def test_configs():
    full, quick = reproduce.config(), reproduce.config(quick=True)
    assert full.objectives == tuple(reproduce.OBJECTIVES) and len(full.objectives) == 10
    assert quick.steps < full.steps and quick.n_authors < full.n_authors
    with pytest.raises(ValueError, match="model must be"):
        reproduce.config("gpt2")


BASE = {
    "GA": GROWING,
    "GD": ([-1.0] * 3, [-0.05] * 3, [0.5] * 3, [0.01] * 3),
    "GA+KL": ([-1.0] * 3, [-0.02] * 3, [0.5] * 3, [0.005] * 3),
    "NPO": ([-1.0] * 3, [-0.1] * 3, [0.5] * 3, [0.02] * 3),
}


def test_findings_whose_objectives_did_not_run_are_not_tested():
    f = _findings({k: BASE[k] for k in ("GA", "GD", "NPO")})  # no GA+KL: "KL better than GD" cannot be decided
    assert f[5]["verdict"] == "not tested" and "GA+KL" in f[5]["numbers"]
    assert f[4]["verdict"] == "reproduced"  # GA and NPO ran
    f = _findings({k: BASE[k] for k in ("GD", "NPO")})  # no GA: findings 3, 4 and 5 compare against it
    assert [f[i]["verdict"] for i in (3, 4, 5)] == ["not tested"] * 3
    assert "GA" in f[3]["numbers"] and f[1]["verdict"] != "not tested"
    f = _findings({"GA": BASE["GA"]})
    assert f[4]["verdict"] == "not tested" and "NPO or WGA or TNPO or WTNPO" in f[4]["numbers"]


def test_no_verdicts_when_the_fine_tune_did_not_take():
    f = _findings(BASE, learned=0.405)
    assert all(v["verdict"] == "inconclusive" for v in f.values())
    assert "predicts 40.5% of the forget set's answer tokens (< 80%)" in f[1]["numbers"]
    assert "shallow largest" in f[1]["numbers"]  # what was measured is still said
    f = _findings(BASE, learned=reproduce.LEARNED_MIN)
    assert all(v["verdict"] == "reproduced" for v in f.values())


def test_findings_compare_objectives_per_unit_of_step():
    """κ_G on the common scale: NPO's retention damage sits on one step whose gradient is 30× the others' — raw,
    κ_G is 1.0 against GA's 0.23 (not reproduced); per unit of step it is 0.06 (reproduced)."""
    spec = {"GA": GROWING, "NPO": ([-1.0] * 3, [-3.0, -0.01, -0.01], [0.5] * 3, [0.001] * 3)}
    raw = _findings(spec)
    assert raw[4]["verdict"] == "not reproduced"
    scaled = _findings(spec, norms={"GA": [1.0, 1.0, 1.0], "NPO": [30.0, 1.0, 1.0]})
    assert scaled[4]["verdict"] == "reproduced" and "e/‖v‖" in scaled[3]["numbers"]


def test_thirds_are_computed_from_the_depth():
    assert reproduce._thirds(30) == "0–9/10–19/20–29"
    assert reproduce._thirds(2) == "0/none/1" and reproduce._thirds(4) == "0/1–2/3"
