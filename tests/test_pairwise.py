"""Pairwise G-effect matrices against the float64 oracle; the two routes agree; the cost-model switch;
rows sum to the per-instance G-effects."""

import pytest
import torch
from helpers import make_batch, make_model

import geffect_fast as gf
from geffect_fast import objectives as O
from geffect_fast.groups import assign
from geffect_fast.ops import pairwise as pw
from geffect_fast.pairwise import measure_pairwise


def pairwise_oracle(model, objective, obj_batch, risk_batch, grouping, ref=None):
    """E[g, i, j] from per-sample gradients formed one sample at a time (float64)."""
    from geffect_fast.loss import forward_logits, sample_nll

    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    for p in params:
        p.requires_grad_(True)
    B = risk_batch["input_ids"].shape[0]
    risk_grads = []
    for i in range(B):
        sub = {k: t[i : i + 1] for k, t in risk_batch.items()}
        ell, n = sample_nll(forward_logits(model, sub), sub["labels"])
        risk_grads.append(torch.autograd.grad(ell.sum(), params, allow_unused=True) if int(n) else None)
    per = objective.per_sample(model, obj_batch, ref)
    obj_grads = [torch.autograd.grad(per[j], params, retain_graph=True, allow_unused=True) for j in range(per.shape[0])]
    E = torch.zeros(len(grouping), B, per.shape[0], dtype=torch.float64)
    for i, gi in enumerate(risk_grads):
        if gi is None:
            continue
        for j, gj in enumerate(obj_grads):
            for n, a, b in zip(names, gi, gj):
                if a is not None and b is not None:
                    E[grouping.of[n], i, j] += (a.double() * b.double()).sum()
    return E


def _close(a, b, rtol, what=""):
    scale = b.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    err = ((a - b).abs() / scale).max().item()
    assert err <= rtol, f"{what}: {err:.2e}"
    return err


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "opt", "gemma", "phi"])
def test_pairwise_against_oracle(family):
    model = make_model(family)
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2, empty_sample=True)
    obj = O.get("wga", alpha=0.5)
    res = measure_pairwise(model, obj, forget, {"retain": retain, "unlearn": forget})
    grouping = assign(model, "block", [n for n, _ in model.named_parameters()])
    assert res.groups == grouping.names
    for r, b in (("retain", retain), ("unlearn", forget)):
        E = pairwise_oracle(model, obj, forget, b, grouping)
        assert res.matrix[r].shape == E.shape
        _close(res.matrix[r], E, 1e-6 if family != "gemma" else 1e-5, f"{family} {r}")
    assert torch.all(res.matrix["retain"][:, -1] == 0)  # the sample with no labels


def test_methods_agree_and_switch_by_cost():
    model = make_model("gpt2")
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=3, seed=2)
    obj = O.get("ga")
    ghost = measure_pairwise(model, obj, forget, {"r": retain}, method="ghost")
    mat = measure_pairwise(model, obj, forget, {"r": retain}, method="materialise")
    auto = measure_pairwise(model, obj, forget, {"r": retain})
    _close(mat.matrix["r"], ghost.matrix["r"], 1e-10, "materialise vs ghost")
    _close(auto.matrix["r"], ghost.matrix["r"], 1e-10, "auto vs ghost")
    assert set(ghost.methods.values()) == {"ghost"}
    assert mat.methods["transformer.wte.weight[0]"] == "ghost"  # one-hot factors: never materialised
    assert mat.methods["transformer.h.0.mlp.c_fc.weight[0]"] == "materialise"
    # embeddings (one-hot factors) always go by the ghost route; biases and norms (d_R = 1) are materialised
    assert auto.methods["transformer.wte.weight[0]"] == "ghost"
    assert auto.methods["transformer.ln_f.weight[0]"] == "materialise"
    assert auto.methods["transformer.h.0.attn.c_attn.bias[0]"] == "materialise"
    assert "transformer.wte.weight[1]" in auto.methods  # tied: the lm_head use pairs too


def test_cost_model():
    # ghost costs N·N'·(dL + dR); materialising (N + N')·dL·dR + B·B'·dL·dR: short sequences, wide layers -> ghost
    c = pw.costs(n1=64, n2=64, B1=4, B2=4, dL=4096, dR=4096, onehot=False)
    assert c["ghost"] < c["materialise"]
    c = pw.costs(n1=4096, n2=4096, B1=4, B2=4, dL=64, dR=64, onehot=False)
    assert c["materialise"] < c["ghost"]
    assert pw.costs(10, 10, 1, 1, 100, 8, onehot=True)["materialise"] == float("inf")


@pytest.mark.parametrize("name", ["ga", "npo", "tnpo", "simnpo", "rmu"])
def test_rows_sum_to_per_instance_g_effects(name):
    model = make_model("llama")
    ref = make_model("llama", seed=5)
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2)
    obj = O.get(name, layer=1) if name == "rmu" else O.get(name)
    res = measure_pairwise(model, obj, forget, {"retain": retain}, ref_model=ref)
    v = gf.Direction.from_objective(model, obj, forget, ref_model=ref)
    e = gf.measure(model, v, {"retain": retain}, per_instance=True).per_instance["retain"]  # [B, G]
    rows = res.matrix["retain"].sum(2).T  # [B, G]
    assert torch.allclose(rows, e, rtol=1e-8, atol=1e-12 * e.abs().max())
    worst = res.most_harmful("retain", n=2)
    assert len(worst) <= 2 and all(v < 0 for _, v in worst) and [v for _, v in worst] == sorted(v for _, v in worst)


def test_most_harmful_never_lists_helpful_samples():
    """Column sums −3, +2, −1, +5, 0: asked for 5, only the two harmful samples come back, most harmful first."""
    from geffect_fast.pairwise import PairwiseResult

    col = torch.tensor([-3.0, 2.0, -1.0, 5.0, 0.0], dtype=torch.float64)
    E = torch.stack([col / 2, col / 2])[None]  # [1 group, 2 retain rows, 5 forget samples]
    res = PairwiseResult(groups=("all",), matrix={"retain": E})
    assert res.most_harmful("retain", 5) == [(0, -3.0), (2, -1.0)]
    assert res.most_harmful("retain", 1) == [(0, -3.0)]
    assert res.most_harmful("retain", 0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        res.most_harmful("retain", -1)


def test_pairwise_bad_input():
    model = make_model("llama")
    b = make_batch(model)
    with pytest.raises(ValueError, match="retain term"):
        measure_pairwise(model, O.get("gd"), {"forget": b, "retain": b}, {"r": b})
    with pytest.raises(ValueError, match="unknown method"):
        measure_pairwise(model, O.get("ga"), b, {"r": b}, method="fast")
    with pytest.raises(ValueError, match="reference model"):
        measure_pairwise(model, O.get("npo"), b, {"r": b})
