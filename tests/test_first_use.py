"""What a new user touches first, outside the commands: objective names accepted where an objective is taken
(``objectives.resolve``), a notebook view of a Result, and a package import that does not drag torch in."""

import subprocess
import sys

import pytest
import torch

import geffect_fast as gf
from geffect_fast import objectives


def test_resolve_takes_names_aliases_and_retain_suffixes():
    npo = objectives.resolve("npo")
    assert isinstance(npo, objectives.NPO) and npo.hp == {"beta": 0.5} and npo.retain is None
    assert isinstance(objectives.resolve("NPO"), objectives.NPO)
    assert isinstance(objectives.resolve("grad_ascent"), objectives.GA)
    kl = objectives.resolve("npo+kl")
    assert isinstance(kl, objectives.NPO) and kl.retain == "kl"
    gd = objectives.resolve("ga + gd")
    assert gd.retain == "gd"
    assert objectives.resolve("rmu", layer=1).hp["layer"] == 1
    assert objectives.resolve("wga", alpha=2.0).hp["alpha"] == 2.0


def test_resolve_passes_objectives_and_callables_through_and_says_what_is_wrong():
    npo = objectives.get("npo")
    assert objectives.resolve(npo) is npo

    def mine(model, batch, ref_model):
        return torch.zeros(())

    assert objectives.resolve(mine) is mine
    with pytest.raises(KeyError, match="unknown objective 'frob'; known: ga, gd, npo"):
        objectives.resolve("frob")
    with pytest.raises(KeyError, match="retain regulariser, one of kl, gd"):
        objectives.resolve("npo+l2")
    with pytest.raises(TypeError, match="names its retain term"):
        objectives.resolve("npo+kl", retain="gd")
    with pytest.raises(TypeError, match="an objective is a name"):
        objectives.resolve(3)
    with pytest.raises(TypeError, match="apply to objectives given by name"):
        objectives.resolve(npo, beta=1.0)


def _result():
    from geffect_fast.result import Result

    return Result(
        directions=("GA", "NPO"),
        risks=("unlearn", "retain"),
        groups=("embed", "block.0"),
        reduction="token_mean",
        group_totals={"unlearn": torch.tensor([[-1.0, -2.0], [-0.5, 0.25]]), "retain": torch.zeros(2, 2)},
        instances=None,
        weights={"unlearn": torch.ones(1), "retain": torch.ones(1)},
        n_tokens={"unlearn": torch.ones(1), "retain": torch.ones(1)},
        losses={"unlearn": 0.5, "retain": 0.25},
    )


def test_result_has_a_notebook_view():
    """Jupyter shows ``_repr_html_``: a compact table per direction, a row per group, the total and R."""
    res = _result()
    page = res._repr_html_()
    assert page.count("<table>") == 2 and "<b>GA</b>" in page and "<b>NPO</b>" in page
    ga = page.split("<table>")[1]
    assert ga.count("<tr>") + ga.count("<tr ") == 1 + 2 + 2  # header, two groups, total, risk R
    assert "-3.0000e+00" in ga and "-1.0000e+00" in ga and "0.5000" in ga  # total = −1 − 2; R
    assert "-2.5000e-01" in page.split("<table>")[2]  # NPO's total −0.5 + 0.25
    assert "<b>GA</b>" in res["GA"]._repr_html_() and "NPO" not in res["GA"]._repr_html_()


def test_importing_the_package_does_not_import_torch():
    code = (
        "import sys\nimport geffect_fast as gf\nassert 'torch' not in sys.modules, 'torch imported'\n"
        "assert gf.__version__\nm = gf.measure\nassert 'torch' in sys.modules and callable(m)\n"
        "from geffect_fast import Tracker, objectives\nassert objectives.resolve('ga')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(gf.__all__) <= set(dir(gf))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gf.nope  # noqa: B018


def test_objective_names_work_wherever_an_objective_is_taken():
    """``Direction.from_objective``, ``measure_pairwise`` and the Tracker's ``compare``/``name`` take names: the
    same numbers as the objective passed itself; the Tracker's records are labelled by the trained objective."""
    from helpers import make_batch, make_model

    model = make_model("llama")
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=3, seed=2)
    by_name = gf.Direction.from_objective(model, "ga", forget)
    by_obj = gf.Direction.from_objective(model, objectives.get("ga"), forget)
    assert by_name.names == by_obj.names == ("ga",)
    for k in by_obj.keys():
        torch.testing.assert_close(by_name.tensor(k), by_obj.tensor(k), rtol=0, atol=0)
    fac = gf.Direction.from_objective(model, "ga", forget, factored=True)
    assert fac.names == ("ga",)
    res = gf.measure_pairwise(model, "wga", forget, {"retain": retain})
    ref = gf.measure_pairwise(model, objectives.get("wga"), forget, {"retain": retain})
    torch.testing.assert_close(res.matrix["retain"], ref.matrix["retain"], rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="per_sample"):
        gf.measure_pairwise(model, lambda m, b, r: m(**b).loss, forget, {"retain": retain})

    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tracker = gf.Tracker(
        model,
        {"retain": retain},
        name=objectives.get("npo"),
        compare={"GA": "ga"},
        compare_batch=forget,
        ref_model=None,
    )
    loss = objectives.get("ga")(model, forget, None)
    loss.backward()
    with tracker.step(opt, loss=loss):
        opt.step()
    labels = {r["objective"] for r in tracker.records}
    assert labels == {"npo", "GA"}, labels
    assert gf.Tracker(model, {"retain": retain}, name="NPO+KL").name == "NPO+KL"
    with pytest.raises(KeyError, match="unknown objective"):
        gf.Tracker(model, {"retain": retain}, compare={"X": "nope"})
