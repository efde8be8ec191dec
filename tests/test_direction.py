"""Direction sources: grads, objectives, updates (ΔR ≈ −lr·e), mappings, stacks."""

import pytest
import torch
from helpers import make_batch, make_model, random_direction

import geffect_fast as gf


def test_from_grads_copies_and_marks_missing_as_zero():
    model = make_model("llama")
    gf.risk(model, make_batch(model)).backward()
    model.lm_head.weight.grad = None
    v = gf.Direction.from_grads(model)
    assert "lm_head.weight" in v.zero and "lm_head.weight" not in v.keys()
    w = model.model.norm.weight
    assert torch.equal(v.tensor("model.norm.weight")[0], w.grad)
    w.grad.zero_()  # the direction is a copy
    assert v.tensor("model.norm.weight").abs().sum() > 0
    with pytest.raises(ValueError, match="run a backward"):
        gf.Direction.from_grads(make_model("llama"))


def test_from_update_predicts_the_risk_change_of_an_adamw_step():
    """Direction.from_update makes ΔR ≈ −lr·e hold for a real AdamW step at a small learning rate."""
    model = make_model("gpt2")
    forget, retain = make_batch(model, seed=1), make_batch(model, seed=7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = 1e-5
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    r0 = {"u": gf.risk(model, forget).item(), "r": gf.risk(model, retain).item()}
    (-gf.risk(model, forget)).backward()
    opt.step()
    v = gf.Direction.from_update(before, model, lr)
    # measured at θ_before, as the prediction is made before the step
    with torch.no_grad():
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.copy_(before[n])
    res = gf.measure(model, v, {"u": forget, "r": retain})
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(after[n])
    for r, batch in (("u", forget), ("r", retain)):
        measured = gf.risk(model, batch).item() - r0[r]
        predicted = -lr * res.total[r]
        assert predicted == pytest.approx(measured, rel=0.02), r


def test_from_update_validation():
    a = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="identical"):
        gf.Direction.from_update(a, {"w": torch.ones(3)}, 0.1)
    with pytest.raises(KeyError, match="different entries"):
        gf.Direction.from_update(a, {"x": torch.ones(3)}, 0.1)
    with pytest.raises(ValueError, match="lr"):
        gf.Direction.from_update(a, {"w": torch.zeros(3)}, 0.0)
    v = gf.Direction.from_update(
        {"w": torch.ones(3, dtype=torch.bfloat16), "s": torch.ones(2)},
        {"w": torch.zeros(3, dtype=torch.bfloat16), "s": torch.ones(2)},
        0.5,
    )
    assert v.tensor("w").dtype == torch.float32 and torch.equal(v.tensor("w")[0], torch.full((3,), 2.0))
    assert v.zero == {"s"}


def test_stack_getitem_and_to():
    model = make_model("llama")
    V = random_direction(model, K=2)
    a = gf.Direction({n: t[0] for n, t in V.items()}, "a")
    b = gf.Direction(V, names=["x", "y"])
    s = gf.Direction.stack({"a": a, "b": b})
    assert s.names == ("a", "b.x", "b.y") and s.k == 3
    assert torch.equal(s["b.y"].tensor("lm_head.weight")[0], V["lm_head.weight"][1])
    assert s.to(torch.float32).tensor("lm_head.weight").dtype == torch.float32
    with pytest.raises(KeyError, match="no direction 'c'"):
        s["c"]
    with pytest.raises(ValueError, match="unique"):
        gf.Direction(V, names=["x", "x"])
    with pytest.raises(ValueError, match="stacked"):
        gf.Direction(V, names=["x", "y", "z"])
    partial = gf.Direction({n: t[0] for n, t in V.items() if n != "lm_head.weight"}, "p", zero=["lm_head.weight"])
    s2 = gf.Direction.stack({"a": a, "p": partial})
    assert torch.all(s2.tensor("lm_head.weight")[1] == 0)
    missing = gf.Direction({n: t[0] for n, t in V.items() if n != "lm_head.weight"}, "m")
    with pytest.raises(KeyError, match="no entry for 'lm_head.weight'"):
        gf.Direction.stack({"a": a, "m": missing})


def test_objective_must_return_a_finite_scalar():
    model = make_model("llama")
    batch = make_batch(model)
    with pytest.raises(TypeError, match="scalar"):
        gf.Direction.from_objective(model, lambda m, b, r: torch.ones(2), batch)
    with pytest.raises(ValueError, match="not finite"):
        gf.Direction.from_objective(model, lambda m, b, r: gf.risk(m, b) * float("nan"), batch)
    with pytest.raises(ValueError, match="does not depend"):
        gf.Direction.from_objective(model, lambda m, b, r: torch.tensor(1.0), batch)


@pytest.mark.parametrize("factored", [False, True])
def test_a_trainable_parameter_without_an_entry_is_named(factored):
    """A direction (dense or factored) that misses a trainable parameter is a KeyError naming it and the remedy,
    never a silent zero for it."""
    model = make_model("llama")
    batch = make_batch(model)
    model.lm_head.weight.requires_grad_(False)
    v = gf.Direction.from_objective(model, gf.objectives.get("ga"), batch, factored=factored)
    model.lm_head.weight.requires_grad_(True)
    remedy = "set requires_grad=False on parameters outside the direction"
    with pytest.raises(KeyError, match=r"no entry for trainable parameter\(s\) \['lm_head.weight'\].*" + remedy):
        gf.measure(model, v, {"u": batch})
