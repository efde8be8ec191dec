"""Objectives against hand-computed formulas on small tensors; NPO's weighted-GA form; edge values."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FixedLogits, make_batch, make_model

import geffect_fast as gf
from geffect_fast import objectives as O


def _setup(seed=0, B=3, T=6, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100
    labels[1, 4:] = -100
    labels[2, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ref = FixedLogits(logits + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64))
    return FixedLogits(logits), ref, batch


def _by_hand(model, batch):
    """nll [B, T-1], mask [B, T-1] by explicit indexing."""
    lp = F.log_softmax(model.logits[:, :-1], -1)
    lab = batch["labels"][:, 1:]
    mask = lab != -100
    nll = -lp.gather(-1, lab.clamp_min(0)[..., None])[..., 0] * mask
    return nll, mask


def test_ga_wga_tnpo_wtnpo_formulas():
    model, ref, batch = _setup()
    nll, mask = _by_hand(model, batch)
    nll_r, _ = _by_hand(ref, batch)
    N = mask.sum()
    p, pr = torch.exp(-nll), torch.exp(-nll_r)
    assert torch.allclose(O.get("ga")(model, batch), -(nll * mask).sum() / N)
    a = 0.7
    w = (p**a).detach()
    assert torch.allclose(O.get("wga", alpha=a)(model, batch), -(w * nll * mask).sum() / N)
    b = 0.3
    w = (2 * p**b / (p**b + pr**b + 1e-5)).detach()
    assert torch.allclose(O.get("tnpo", beta=b)(model, batch, ref), -(w * nll * mask).sum() / N)
    w = (2 * p ** (b + a) / (p**b + pr**b + 1e-5)).detach()
    assert torch.allclose(O.get("wtnpo", beta=b, alpha=a)(model, batch, ref), -(w * nll * mask).sum() / N)
    # the weights are detached: the gradient is the weighted GA gradient
    obj = O.get("wga", alpha=a)
    (g1,) = torch.autograd.grad(obj(model, batch), [model.logits])
    w = obj.weights(model, batch).detach()
    (g2,) = torch.autograd.grad(-(w * _by_hand(model, batch)[0]).sum() / N, [model.logits])
    assert torch.allclose(g1, g2)


def test_npo_and_simnpo_formulas():
    model, ref, batch = _setup(1)
    nll, mask = _by_hand(model, batch)
    nll_r, _ = _by_hand(ref, batch)
    S, Sr = (nll * mask).sum(1), (nll_r * mask).sum(1)
    b = 0.25
    want = -F.logsigmoid(b * (S - Sr)).mean() * 2 / b
    assert torch.allclose(O.get("npo", beta=b)(model, batch, ref), want)
    d = 0.4
    ell = S / mask.sum(1)
    want = -F.logsigmoid(b * (ell - d)).mean() * 2 / b
    assert torch.allclose(O.get("simnpo", beta=b, delta=d)(model, batch), want)


def test_npo_gradient_is_weighted_ga_on_summed_nll():
    """∇L_npo = −(1/B) Σ_b w_b ∇S_b, w_b = 2σ(−β(S_b − S_b^ref)) = 2p^β/(p^β + p_ref^β)."""
    model, ref, batch = _setup(2)
    obj = O.get("npo", beta=0.5)
    (g_npo,) = torch.autograd.grad(obj(model, batch, ref), [model.logits])
    w = obj.weights(model, batch, ref)
    nll, mask = _by_hand(model, batch)
    S = (nll * mask).sum(1)
    (g_wga,) = torch.autograd.grad(-(w * S).sum() / S.shape[0], [model.logits])
    assert torch.allclose(g_npo, g_wga, rtol=1e-10, atol=1e-14)
    nll_r, _ = _by_hand(ref, batch)
    p, pr = torch.exp(-S.detach()), torch.exp(-(nll_r * mask).sum(1))
    assert torch.allclose(w, 2 * p**0.5 / (p**0.5 + pr**0.5))


def test_edge_values():
    model, ref, batch = _setup(3)
    nll, mask = _by_hand(model, batch)
    # WGA with α = 0 is GA
    assert torch.allclose(O.get("wga", alpha=0.0)(model, batch), O.get("ga")(model, batch))
    # NPO as β → 0: its gradient tends to GA on the summed NLL, −(1/B) Σ ∇S_b
    (g,) = torch.autograd.grad(O.get("npo", beta=1e-7)(model, batch, ref), [model.logits])
    (g0,) = torch.autograd.grad(-(nll * mask).sum(1).mean(), [model.logits])
    assert torch.allclose(g, g0, rtol=1e-5, atol=1e-9)
    # TNPO against itself as reference at a small β: weights 2p^β/(2p^β + 1e-5) ≈ 1, so ≈ GA
    same = copy.deepcopy(model)
    assert torch.allclose(O.get("tnpo", beta=0.1)(model, batch, same), O.get("ga")(model, batch), rtol=1e-4)


def test_regularisers_and_idk():
    model, ref, batch = _setup(4)
    _, ref2, retain = _setup(5)
    both = {"forget": batch, "retain": retain}
    nll_f, mf = _by_hand(model, batch)
    nll_r, mr = _by_hand(model, retain)
    R_ret = (nll_r * mr).sum() / mr.sum()
    ga = -(nll_f * mf).sum() / mf.sum()
    assert torch.allclose(O.get("gd", retain_weight=0.5)(model, both), ga + 0.5 * R_ret)
    assert torch.allclose(O.get("ga", retain="gd")(model, both), ga + R_ret)
    # KL(p_ref || p_θ) over the labelled retain positions (kl_positions="labelled"; the default, the official
    # all-positions form, is in test_official.py)
    lp, lq = F.log_softmax(ref.logits[:, :-1], -1), F.log_softmax(model.logits[:, :-1], -1)
    kl = ((lp.exp() * (lp - lq)).sum(-1) * mr).sum() / mr.sum()
    assert torch.allclose(
        O.get("npo", retain="kl", retain_weight=2.0, kl_positions="labelled")(model, both, ref),
        O.get("npo")(model, batch, ref) + 2 * kl,
    )
    # IdkPO: the NLL of the refusal batch
    assert torch.allclose(O.get("idkpo")(model, {"forget": batch, "idk": retain}), R_ret)


def test_rmu_against_hidden_states_and_seed():
    model = make_model("llama")
    batch = make_batch(model)
    obj = O.get("rmu", layer=1, c=3.0, seed=7)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    h = out.hidden_states[1][:, :-1]
    u = torch.rand(h.shape[-1], generator=torch.Generator().manual_seed(7)).double()
    mask = batch["labels"][:, 1:] != -100
    want = (((h - 3.0 * u) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(obj(model, batch), want, rtol=1e-12)
    l1 = O.get("rmu", layer=1, c=3.0, seed=7, distance="l1")(model, batch)
    assert torch.allclose(l1, ((h - 3.0 * u).abs().mean(-1) * mask).sum() / mask.sum(), rtol=1e-12)
    assert torch.equal(
        obj.target(32, "cpu", torch.float64), O.get("rmu", c=3.0, seed=7).target(32, "cpu", torch.float64)
    )
    assert not torch.equal(
        obj.target(32, "cpu", torch.float64), O.get("rmu", c=3.0, seed=8).target(32, "cpu", torch.float64)
    )
    # its gradient drives a G-effect like any other objective
    v = gf.Direction.from_objective(model, obj, batch, name="rmu")
    assert gf.measure(model, v, batch).total["risk"] != 0


def test_bad_input():
    model, ref, batch = _setup()
    with pytest.raises(KeyError, match="unknown objective 'foo'"):
        O.get("foo")
    with pytest.raises(TypeError, match="no hyperparameter.*gamma"):
        O.get("npo", gamma=1.0)
    with pytest.raises(ValueError, match="needs a reference model"):
        O.get("npo")(model, batch)
    with pytest.raises(ValueError, match="needs a retain batch"):
        O.get("gd")(model, batch)
    with pytest.raises(ValueError, match="retain must be"):
        O.get("ga", retain="l2")
    with pytest.raises(ValueError, match="reference model"):
        O.get("ga", retain="kl")(model, {"forget": batch, "retain": batch})
    assert O.get("ins_npo").name == "tnpo" and O.get("IDK").name == "idkpo"
