"""objective_effects: e[k, j, g] = ⟨∇ℓ^obj_j, v_k⟩ against per-sample autograd in float64 (each forget sample's
share of the objective differentiated alone), over objectives, families (tied weights and Conv1D, q/k/v biases,
MoE experts split per expert), padding sides, K directions, a float32 model; the errors."""

import copy

import pytest
import torch
from helpers import make_batch, make_model, objective_oracle, random_direction

import geffect_fast as gf
from geffect_fast import objectives as O
from geffect_fast.objective_samples import objective_effects


@pytest.mark.parametrize(
    "family,name,side,groups",
    [
        ("llama", "ga", "right", "block"),
        ("llama", "npo", "left", "block"),
        ("llama", "wga", "right", "module"),
        ("llama", "gd", "right", "thirds"),
        ("gpt2", "npo", "right", "block"),
        ("qwen2", "tnpo", "left", "block"),
        ("mixtral", "npo", "right", "module"),
    ],
)
def test_matches_per_sample_autograd(family, name, side, groups):
    model = make_model(family, seed=0)
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # off the reference, so NPO's per-sample factors differ
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    forget = make_batch(model, B=5, side=side, seed=3, empty_sample=name == "ga")
    batch = {"forget": forget, "retain": make_batch(model, seed=4)} if name == "gd" else forget
    V = random_direction(model, K=2, seed=5)
    objective = O.get(name)
    res = gf.objective_effects(model, objective, batch, gf.Direction(V, names=("a", "b")), groups, ref)
    forget_only = O.get("ga") if name == "gd" else objective  # the retain term is not a forget sample's share
    want, names = objective_oracle(model, forget_only, batch, V, groups, ref)
    assert res.groups == names and res.directions == ("a", "b") and res.values.shape == want.shape
    assert want.abs().max() > 0
    torch.testing.assert_close(res.values, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    assert torch.equal(res.total("b"), res.values[1].sum(-1))
    assert set(res.by_group("a")) == set(names)


def test_float32_model_and_the_model_left_as_it_was():
    model = make_model("llama", dtype=torch.float32, seed=1)
    model.train()
    batch = make_batch(model, B=3, seed=6)
    V = random_direction(model, K=1, seed=7)
    model.zero_grad()
    O.get("ga")(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    res = objective_effects(model, "ga", batch, {n: v[0] for n, v in V.items()})
    assert model.training and all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    m64 = copy.deepcopy(model).double().eval()
    want, _ = objective_oracle(m64, O.get("ga"), batch, V, "block", None)
    torch.testing.assert_close(res.values, want, rtol=2e-4, atol=2e-5 * float(want.abs().max()))


def test_errors():
    model = make_model("llama", seed=0)
    batch = make_batch(model, seed=1)
    V = random_direction(model, K=1, seed=2)
    d = {n: v[0] for n, v in V.items()}
    with pytest.raises(TypeError, match="per_sample"):
        objective_effects(model, lambda m, b, r=None: gf.risk(m, b), batch, d)
    with pytest.raises(ValueError, match="zero on every parameter"):
        objective_effects(model, "ga", batch, gf.Direction({}, zero=d))
    packed = gf.data.pack([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])])
    with pytest.raises(ValueError, match="packed"):
        objective_effects(model, "ga", packed, d)

    class Wrong(O.Objective):
        name = "wrong"

        def per_sample(self, model, batch, ref_model=None):
            return gf.risk(model, batch).reshape(1)

    with pytest.raises(ValueError, match="per_sample gave"):
        objective_effects(model, Wrong("wrong"), batch, d)
    with pytest.raises(TypeError, match="dense direction"):
        objective_effects(model, "ga", batch, gf.Direction.from_objective(model, "ga", batch, factored=True))
