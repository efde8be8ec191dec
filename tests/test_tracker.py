"""Tracker: equals standalone measure(), fidelity of the update direction, the cumulative log, and it does
not perturb training."""

import copy
import json

import pytest
import torch
from helpers import make_batch, make_model

import geffect_fast as gf
from geffect_fast import objectives as O


def _train(model, steps, lr, tracker=None, opt_cls=torch.optim.AdamW, objective=None, batch=None, ref=None):
    opt = opt_cls(model.parameters(), lr=lr)
    objective = objective or O.get("ga")
    for _ in range(steps):
        loss = objective(model, batch, ref)
        opt.zero_grad()
        loss.backward()
        if tracker is None:
            opt.step()
        else:
            with tracker.step(opt, loss=loss):
                opt.step()
    return opt


def test_gradient_tracker_equals_standalone_measure():
    model = make_model("llama")
    forget, retain = make_batch(model, seed=1), make_batch(model, seed=2)
    probes = {"unlearn": forget, "retain": retain}
    tr = gf.Tracker(model, probes, direction="gradient", per_instance=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    (-gf.risk(model, forget)).backward()
    want = gf.measure(model, gf.Direction.from_grads(model, name="gradient"), probes, per_instance=True)
    with tr.step(opt):
        opt.step()
    for r in ("unlearn", "retain"):
        rec = next(x for x in tr.records if x["risk"] == r)
        assert rec["total"] == pytest.approx(want.total[r], rel=1e-12)
        assert rec["groups"] == pytest.approx(want.by_group[r], rel=1e-12)
        assert torch.allclose(torch.tensor(rec["per_instance"], dtype=torch.float64), want.per_instance[r], rtol=1e-12)
        assert rec["loss"] == pytest.approx(want.loss[r])
        # plain SGD: the gradient direction's prediction is the step's first-order ΔR
        assert rec["predicted_dR"] == pytest.approx(rec["measured_dR"], rel=0.02)


def test_adamw_update_direction_predicts_measured_change():
    """direction='update' with AdamW at a small learning rate: predicted ΔR within 10% of measured."""
    model = make_model("gpt2")
    forget, retain = make_batch(model, seed=1), make_batch(model, seed=2)
    tr = gf.Tracker(model, {"unlearn": forget, "retain": retain}, direction="update", curvature=True)
    _train(model, 3, 1e-4, tr, batch=forget)
    for f in tr.fidelity():
        assert f["predicted_dR"] == pytest.approx(f["measured_dR"], rel=0.10), f
        # the second-order term only brings the prediction closer
        assert abs(f["predicted_dR_2nd"] - f["measured_dR"]) <= abs(f["predicted_dR"] - f["measured_dR"])


def test_first_order_breaks_at_a_large_step():
    """The documented failure: one large SGD step of GA (lr = 0.2 on the tiny Llama). The measured rise of the
    forget NLL saturates: the first-order prediction overshoots by ~70%, and the second-order term, positive
    here (vᵀHv > 0), moves it further off — higher orders dominate. Both are reported, neither trusted."""
    model = make_model("llama")
    forget = make_batch(model, seed=1)
    tr = gf.Tracker(model, {"unlearn": forget}, direction="gradient", curvature=True)
    _train(model, 1, 0.2, tr, opt_cls=torch.optim.SGD, batch=forget)
    (f,) = tr.fidelity()
    first_err = abs(f["predicted_dR"] - f["measured_dR"]) / abs(f["measured_dR"])
    second_err = abs(f["predicted_dR_2nd"] - f["measured_dR"]) / abs(f["measured_dR"])
    assert 0 < f["measured_dR"] < f["predicted_dR"]  # the NLL rises, by less than first order says
    assert first_err > 0.3
    assert second_err > first_err


def test_tracker_does_not_perturb_training(tmp_path):
    base = make_model("qwen2")
    forget, retain = make_batch(base, seed=1), make_batch(base, seed=2)
    ref = copy.deepcopy(base)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    npo = O.get("npo", beta=0.1)
    _train(a, 4, 1e-3, None, objective=npo, batch=forget, ref=ref)
    tr = gf.Tracker(
        b,
        {"unlearn": forget, "retain": retain},
        direction="update",
        every=2,
        compare={"GA": O.get("ga"), "WGA": O.get("wga")},
        ref_model=ref,
        log=tmp_path / "g.jsonl",
    )
    _train(b, 4, 1e-3, tr, objective=npo, batch=forget, ref=ref)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    lines = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert {x["step"] for x in lines} == {1, 3}  # every=2
    assert {x["objective"] for x in lines} == {"update", "GA", "WGA"}
    keys = {
        "step",
        "objective",
        "kind",
        "risk",
        "total",
        "groups",
        "cumulative",
        "lr",
        "loss",
        "train_loss",
        "predicted_dR",
        "predicted_dR_2nd",
        "measured_dR",
    }
    assert all(keys <= set(x) for x in lines)
    ga_u = [x for x in lines if x["objective"] == "GA" and x["risk"] == "unlearn"]
    assert ga_u[1]["cumulative"] == pytest.approx(ga_u[0]["total"] + ga_u[1]["total"])
    assert all(x["total"] < 0 for x in ga_u)  # GA raises the forget NLL
    assert all(x["measured_dR"] is None for x in lines if x["kind"] == "compare")
    assert "cumulative" in tr.summary()


def test_bad_tracker_input():
    model = make_model("llama")
    with pytest.raises(ValueError, match="direction must be"):
        gf.Tracker(model, {"u": make_batch(model)}, direction="adam")
    with pytest.raises(ValueError, match="every"):
        gf.Tracker(model, {"u": make_batch(model)}, every=0)
    with pytest.raises(ValueError, match="probes"):
        gf.Tracker(model, {})
