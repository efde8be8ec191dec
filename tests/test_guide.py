"""Guide: each policy's rule against a hand computation (gf.measure for the gradient's G-effects, per-sample
autograd for the samples' ones) on a tiny float64 Llama, the stop decision, the layer scaling of .grad, the sample
weights and the weighted loss, probe gradients reused with every=k, state kept on error, the Trainer callback
under gradient accumulation.

Tolerance: the guide's probe gradient is one batched backward; gf.measure and the per-sample oracle run the
samples' own rows. The tiny Llama's batched and per-sample forwards agree to ~1e-9 relative in float64 (Hugging
Face builds its RoPE tables in float32), hence rel=1e-7 where the two are compared."""

import copy
import json
import math

import pytest
import torch
from helpers import Rows, make_batch, make_model, objective_oracle

import geffect_fast as gf
from geffect_fast import objectives as O
from geffect_fast.guide import Guide


def _setup(seed=0):
    """A tiny Llama, a forget batch, and a retain batch that shares two thirds of the forget batch's tokens (so
    that unlearning the one harms the other, as with real data)."""
    model = make_model("llama", seed=seed)
    forget, other = make_batch(model, seed=1), make_batch(model, seed=2)
    retain = {k: v.clone() for k, v in forget.items()}
    keep = torch.arange(retain["input_ids"].shape[1]) % 3 != 0
    for k in ("input_ids", "labels"):
        retain[k] = torch.where(keep & (forget["labels"] != -100), forget[k], other[k].masked_fill(~keep, 5))
    retain["labels"] = torch.where(forget["labels"] == -100, -100, retain["labels"])
    return model, forget, retain, {"unlearn": forget, "retain": retain}


def _ga_grad(model, forget):
    model.zero_grad()
    O.get("ga")(model, forget).backward()


def _hand_effects(model, probes):
    """The gradient's G-effects per group, as the user would measure them."""
    res = gf.measure(model, gf.Direction.from_grads(model), probes)
    return res.by_group["unlearn"], res.by_group["retain"], res.loss


def _quantile(xs, q):
    """Linear interpolation between order statistics (numpy's default), by hand."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def test_public_name():
    assert gf.Guide is Guide and "Guide" in gf.__all__


def test_layers_rule_zeroes_exactly_the_chosen_groups(tmp_path):
    model, forget, _, probes = _setup()
    _ga_grad(model, forget)
    eu, er, _ = _hand_effects(model, probes)
    cost = {g: -er[g] / max(-eu[g], 1e-12) for g in er if er[g] < 0}
    assert len(cost) >= 2, cost  # the case is non-trivial: several harmful groups to choose among
    tau = _quantile(list(cost.values()), 0.5)
    chosen = {g for g, c in cost.items() if c >= tau}
    assert 0 < len(chosen) < len(eu)
    before_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    guide = Guide(model, probes, policies="layers", quantile=0.5, log=tmp_path / "guide.jsonl")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert guide.step(opt) is True
    dec = guide.decisions[0]
    assert dec["scaled_groups"] == dict.fromkeys(chosen, 0.0)
    assert dec["e_unlearn"] == pytest.approx(sum(e for g, e in eu.items() if g not in chosen), rel=1e-7)
    assert dec["e_retain"] == pytest.approx(sum(e for g, e in er.items() if g not in chosen), rel=1e-7)
    of = guide.group_of()
    for n, p in model.named_parameters():
        if of[n] in chosen:  # gradient zeroed, so plain SGD left the parameter where it was
            assert torch.equal(p.grad, torch.zeros_like(p.grad)) and torch.equal(p.detach(), before[n]), n
        else:
            assert torch.equal(p.grad, before_grad[n]) and not torch.equal(p.detach(), before[n]), n
    logged = [json.loads(x) for x in (tmp_path / "guide.jsonl").read_text().splitlines()]
    assert logged == [json.loads(json.dumps(dec))]


def test_layers_scale_update_freezes_the_groups_under_adam():
    """scale='update' scales the step itself: with AdamW's momentum from an earlier step, a scaled grad would
    still move the group; the update scaling leaves it exactly where it was."""
    model, forget, _, probes = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _ga_grad(model, forget)
    opt.step()  # momentum
    _ga_grad(model, forget)
    guide = Guide(model, probes, policies=("layers",), quantile=0.5, scale="update")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert guide.step(opt)
    chosen = set(guide.decisions[0]["scaled_groups"])
    assert chosen
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) == (guide.group_of()[n] in chosen), n


def test_stop_rule_fires_after_patience_and_skips_the_step():
    model, forget, _, probes = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guide = Guide(model, probes, policies=("stop",), threshold=1e9, patience=2)
    _ga_grad(model, forget)
    eu, er, loss = _hand_effects(model, probes)
    e_u, e_r = sum(eu.values()), sum(er.values())
    assert e_r < 0  # the step harms retention, so ρ is finite
    assert guide.step(opt) is True  # ρ < threshold once: patience not yet reached
    d = guide.decisions[0]
    assert d["ratio"] == pytest.approx(max(-e_u, 0) / -e_r, rel=1e-7) and d["probe_age"] == 0
    assert d["forget_nll"] == pytest.approx(loss["unlearn"]) and d["taken"] and not d["stop"]
    _ga_grad(model, forget)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert guide.step(opt) is False  # second step below threshold: stop, and the step is not taken
    d = guide.decisions[1]
    assert d["stop"] and not d["taken"] and d["reason"].startswith("ratio") and "for 2 step" in d["reason"]
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert guide.step(opt) is False and guide.decisions[2]["reason"] == "stopped earlier"
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_stop_never_fires_at_threshold_zero_and_fires_at_the_target_nll():
    model, forget, _, probes = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guide = Guide(model, probes, policies="stop", threshold=0.0, patience=1)
    for _ in range(2):
        _ga_grad(model, forget)
        assert guide.step(opt)
    nll = gf.risk(model, forget).item()
    target = Guide(model, probes, policies="stop", threshold=0.0, target_forget_nll=nll - 1e-6)
    _ga_grad(model, forget)
    assert target.step(opt) is False
    assert target.decisions[0]["reason"].startswith("forget NLL")


def _sample_effects(model, objective, batch, probes, ref):
    """u_j, h_j = ⟨∇R, ∇ℓ^obj_j⟩ for R the unlearn and retain probes' mean token NLL, by per-sample autograd in
    float64 (helpers.objective_oracle)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for p in model.parameters()]
    d = [torch.autograd.grad(gf.risk(model, probes[k]), params) for k in ("unlearn", "retain")]
    V = {n: torch.stack([du, dr]) for n, du, dr in zip(names, *d)}
    e, _ = objective_oracle(model, objective, batch, V, "block", ref)
    return e.sum(-1).tolist()


@pytest.mark.parametrize("name", ["ga", "npo", "gd"])
def test_sample_weights_are_the_formula_and_weighted_is_their_sum(name):
    model, forget, retain, probes = _setup()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    obj_batch = make_batch(model, B=5, seed=7)
    batch = {"forget": obj_batch, "retain": retain} if name == "gd" else obj_batch
    objective = O.get(name)
    with torch.no_grad():  # move off the reference so NPO's weights are not all equal
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    forget_only = O.get("ga") if name == "gd" else objective
    u, h = _sample_effects(model, forget_only, obj_batch, probes, ref)
    s = []
    for uj, hj in zip(u, h):
        b, c = max(-uj, 0.0), max(-hj, 0.0)
        s.append(b / (b + c) if b + c > 0 else 0.0)
    mean = sum(s) / len(s)
    lo, hi = 0.2, 1.6
    w = [min(max(x / mean, lo), hi) for x in s]
    assert any(x != 1.0 for x in w)
    guide = Guide(model, probes, policies="samples", clip=(lo, hi))
    loss = guide.weighted(objective, batch, ref)
    per = forget_only.per_sample(model, obj_batch, ref)
    want = sum(wj * pj for wj, pj in zip(w, per.tolist()))
    if name == "gd":
        want += gf.risk(model, retain).item()
    assert loss.item() == pytest.approx(want, rel=1e-10)
    loss.backward()
    assert guide.step(torch.optim.SGD(model.parameters(), lr=1e-3))
    assert guide.decisions[0]["sample_weights"] == pytest.approx(w, rel=1e-10)
    assert guide.decisions[0]["scaled_groups"] == {} and guide.decisions[0]["ratio"] is None  # nothing measured


def test_weighted_without_samples_is_the_objective():
    model, forget, _, probes = _setup()
    guide = Guide(model, probes, policies="stop")
    assert guide.weighted("ga", forget).item() == O.get("ga")(model, forget).item()


class _Boom(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("boom")


def test_state_restored_when_the_optimiser_fails():
    model, forget, _, probes = _setup()
    _ga_grad(model, forget)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    guide = Guide(model, probes, policies=("stop", "layers"), quantile=1.0, threshold=1e9, patience=2)
    with pytest.raises(RuntimeError, match="boom"):
        guide.step(_Boom(model.parameters(), lr=0.1))
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p.detach(), params[n]) for n, p in model.named_parameters())
    assert guide.decisions == [] and guide.n_steps == 0 and guide.streak == 0 and not guide.stopped
    assert guide.step(torch.optim.SGD(model.parameters(), lr=0.1))  # and it goes on as if nothing happened
    d = guide.decisions[0]
    assert d["step"] == 1 and len(d["scaled_groups"]) == 1 and d["ratio"] is not None and guide.streak == 1


def test_bad_options_are_refused():
    model, _, _, probes = _setup()
    with pytest.raises(ValueError, match="policies"):
        Guide(model, probes, policies="stop,nonsense")
    with pytest.raises(ValueError, match="retain"):
        Guide(model, {"unlearn": probes["unlearn"]})
    with pytest.raises(ValueError, match="scale"):
        Guide(model, probes, scale="both")
    with pytest.raises(ValueError, match=".grad"):
        Guide(model, probes).step(torch.optim.SGD(model.parameters(), lr=0.1))


def _trainer(tmp_path, model, cb, steps=3):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=steps,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=Rows(make_batch(model, B=12, seed=3)), callbacks=[cb])


def test_callback_acts_once_per_optimiser_step_under_gradient_accumulation(tmp_path):
    from geffect_fast.hf import GuideCallback

    model = make_model("llama", dtype=torch.float32)
    _, _, _, probes = _setup()
    cb = GuideCallback(probes, policies=("stop", "layers"), threshold=0.0, quantile=0.5, log=tmp_path / "g.jsonl")
    seen = []
    orig = Guide.begin

    def spy(self, optimizer):  # the gradient the guide measured: the accumulated one, after clipping
        seen.append({n: p.grad.clone() for n, p in self.model.named_parameters()})
        return orig(self, optimizer)

    trainer = _trainer(tmp_path, model, cb)
    Guide.begin = spy
    try:
        trainer.train()
    finally:
        Guide.begin = orig
    decs = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [d["step"] for d in decs] == [1, 2, 3] == [d["step"] for d in cb.guide.decisions]  # not per micro-batch
    assert trainer.state.global_step == 3 and len(seen) == 3
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in seen[0].values()))
    assert float(norm) <= 0.5 + 1e-4  # clipped before the guide saw it
    assert all(d["taken"] and d["scaled_groups"] for d in decs)


def test_callback_stop_ends_training_without_taking_the_step(tmp_path):
    from geffect_fast.hf import GuideCallback

    model = make_model("llama", dtype=torch.float32)
    _, _, _, probes = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = GuideCallback(probes, policies="stop", target_forget_nll=0.0)  # fires at once
    trainer = _trainer(tmp_path, model, cb)
    trainer.train()
    assert trainer.state.global_step == 1 and len(cb.guide.decisions) == 1 and cb.guide.decisions[0]["stop"]
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_report_shows_long_guided_runs_shortened():
    """The report's table keeps each objective's first and last GUIDE_ROWS // 2 decisions and counts the rest."""
    from geffect_fast.app.report import GUIDE_ROWS, guide_rows

    long = [{"objective": "GA", "step": i, "ratio": None, "scaled_groups": {"embed": 0.0}} for i in range(1, 31)]
    short = [{"objective": "NPO", "step": 1, "ratio": 0.5, "stop": True, "reason": "ratio 0.5 < threshold 1"}]
    rows = guide_rows(long + short)
    half = GUIDE_ROWS // 2
    assert len(rows) == GUIDE_ROWS + 2
    assert [r[1] for r in rows[:half]] == [str(i) for i in range(1, half + 1)]
    assert rows[half][1] == f"{30 - GUIDE_ROWS} steps more (guide.jsonl)"
    assert rows[half + 1][1] == str(30 - half + 1) and rows[-1][0] == "NPO"
    assert rows[0][5] == "embed×0" and rows[-1][4] == "0.5" and rows[-1][7] == "stop: ratio 0.5 < threshold 1"


def test_anneal_cuts_the_learning_rate_instead_of_stopping():
    model, forget, _, probes = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guide = Guide(model, probes, policies="stop", threshold=1e9, patience=2, anneal=0.5)
    for _ in range(4):
        _ga_grad(model, forget)
        assert guide.step(opt)  # never stops
    ann = [d["annealed"] for d in guide.decisions]
    assert [a is not None for a in ann] == [False, True, False, True]  # at patience, then it counts again
    assert ann[1].endswith("lr × 0.5") and not any(d["stop"] for d in guide.decisions)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    assert [d["lr"] for d in guide.decisions] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    once = Guide(model, probes, policies="stop", threshold=1e9, patience=1, anneal=0.5)
    bad = _Boom(model.parameters(), lr=1e-3)
    _ga_grad(model, forget)
    with pytest.raises(RuntimeError, match="boom"):  # an annealing on a failed step is undone
        once.step(bad)
    assert bad.param_groups[0]["lr"] == 1e-3 and once.decisions == [] and once.streak == 0
    with pytest.raises(ValueError, match="anneal"):
        Guide(model, probes, anneal=1.5)


def test_every_k_reuses_the_probe_gradients_measured_k_steps_ago():
    """every=2: the probe gradients are measured at θ of steps 1, 3, … and dotted with the gradients of steps 2,
    4, … as they are (probe_age 1, no NLLs logged), not measured again."""
    model, forget, _, probes = _setup()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    guide = Guide(model, probes, policies="stop", threshold=0.0, every=2)
    stale = fresh = None
    for step in range(4):
        d = torch.autograd.grad(gf.risk(model, probes["unlearn"]), params)
        if step % 2 == 0:
            stale = d
        _ga_grad(model, forget)
        fresh = sum(float((a * p.grad).sum()) for a, p in zip(d, params))
        want = sum(float((a * p.grad).sum()) for a, p in zip(stale, params))
        assert guide.step(opt)
        dec = guide.decisions[-1]
        assert dec["e_unlearn"] == pytest.approx(want, rel=1e-10)
        assert dec["probe_age"] == step % 2 and (dec["forget_nll"] is None) == (step % 2 == 1)
        if step % 2:
            assert dec["e_unlearn"] != pytest.approx(fresh, rel=1e-6)  # θ moved: the stale value differs
    with pytest.raises(ValueError, match="every"):
        Guide(model, probes, every=0)


def test_probe_gradients_are_the_mean_token_nll_gradients_in_chunks_too():
    model, forget, _, probes = _setup()
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    whole = Guide(model, probes, policies="stop").probe_grads()
    chunked = Guide(model, probes, policies="stop", probe_batch=3).probe_grads()  # 4 rows: chunks of 3 and 1
    for k, key in enumerate(("unlearn", "retain")):
        want = torch.autograd.grad(gf.risk(model, probes[key]), params)
        for n, w in zip(names, want):
            torch.testing.assert_close(whole[n][k], w, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(chunked[n][k], w, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="probe_batch"):
        Guide(model, probes, probe_batch=0)
    empty = {**probes, "retain": {**probes["retain"], "labels": torch.full_like(probes["retain"]["labels"], -100)}}
    with pytest.raises(ValueError, match="no labelled token"):
        Guide(model, empty, policies="stop").probe_grads()


def test_project_removes_the_steps_retain_damage_per_group_by_hand():
    """project: per group, Δθ_g − max(⟨d_r,g, Δθ_g⟩, 0)/‖d_r,g‖² d_r,g after an AdamW step; the damaging groups'
    first-order retain change becomes 0, the others are untouched."""
    model, forget, _, probes = _setup()
    params = dict(model.named_parameters())
    dr = dict(zip(params, torch.autograd.grad(gf.risk(model, probes["retain"]), list(params.values()))))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _ga_grad(model, forget)
    shadow = copy.deepcopy(model)  # the same step without the guide
    sopt = torch.optim.AdamW(shadow.parameters(), lr=1e-2)
    for p, q in zip(model.parameters(), shadow.parameters()):
        q.grad = p.grad.clone()
    sopt.step()
    before = {n: p.detach().clone() for n, p in params.items()}
    guide = Guide(model, probes, policies="project", groups="module")
    assert guide.step(opt)
    of = guide.group_of()
    sp = dict(shadow.named_parameters())
    want, removed = {}, {}
    for g in set(of.values()):
        ns = [n for n in params if of[n] == g]
        delta = {n: sp[n].detach() - before[n] for n in ns}
        a = sum(float((dr[n] * delta[n]).sum()) for n in ns)
        nn2 = sum(float((dr[n] ** 2).sum()) for n in ns)
        c = a / nn2 if a > 0 else 0.0
        for n in ns:
            want[n] = before[n] + delta[n] - c * dr[n]
        if c > 0:
            removed[g] = c * nn2**0.5 / sum(float((delta[n] ** 2).sum()) for n in ns) ** 0.5
            assert sum(float((dr[n] * (want[n] - before[n])).sum()) for n in ns) == pytest.approx(0, abs=1e-12)
    assert removed and len(removed) < len(set(of.values()))  # some groups damage, some do not
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-10, atol=1e-12)
    assert guide.decisions[0]["projected"] == pytest.approx(removed, rel=1e-8)
    assert Guide(model, probes).policies == ("stop", "layers", "samples")  # project is opt-in


def test_callback_projects_each_optimiser_step(tmp_path):
    """project under Trainer (gradient accumulation, clipping): every optimiser step is projected in end(), so the
    parameters differ from the same training without the guide."""
    from geffect_fast.hf import GuideCallback

    _, _, _, probes = _setup()
    plain = make_model("llama", dtype=torch.float32)
    model = make_model("llama", dtype=torch.float32)
    _trainer(tmp_path / "a", plain, GuideCallback(probes, policies="stop", threshold=0.0), steps=2).train()
    cb = GuideCallback(probes, policies="project", every=2)
    _trainer(tmp_path / "b", model, cb, steps=2).train()
    decs = cb.guide.decisions
    assert [d["probe_age"] for d in decs] == [0, 1] and any(d["projected"] for d in decs)
    moved = [n for (n, p), q in zip(model.named_parameters(), plain.parameters()) if not torch.equal(p, q)]
    assert moved


def test_layers_update_and_project_together():
    """layers (scale="update", factor 0) then project: the scaled groups stay exactly where they were (their step
    is zero, nothing to project), the others are projected (their first-order retain change is not positive)."""
    model, forget, _, probes = _setup()
    params = dict(model.named_parameters())
    dr = dict(zip(params, torch.autograd.grad(gf.risk(model, probes["retain"]), list(params.values()))))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _ga_grad(model, forget)
    before = {n: p.detach().clone() for n, p in params.items()}
    guide = Guide(model, probes, policies=("layers", "project"), quantile=0.5, scale="update")
    assert guide.step(opt)
    dec, of = guide.decisions[0], guide.group_of()
    assert dec["scaled_groups"] and dec["projected"]
    assert not set(dec["scaled_groups"]) & set(dec["projected"])
    for g in set(of.values()):
        ns = [n for n in params if of[n] == g]
        if g in dec["scaled_groups"]:
            assert all(torch.equal(params[n].detach(), before[n]) for n in ns), g
        else:
            change = sum(float((dr[n] * (params[n].detach() - before[n])).sum()) for n in ns)
            assert change <= 1e-12, g
