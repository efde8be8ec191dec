"""Mixture-of-experts layers per sample (capture/moe.py): fused experts and top-k routers against the float64
per-sample oracle, in every family that builds from a tiny config; per-expert groups; the grouped_mm and
batched_mm experts implementations in float32; the router's auxiliary loss kept out of R; the consumers that take
whole parameters (pairwise, factored directions) say what they do with experts."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import MOE_FAMILIES, MOE_PARTLY, assert_close_per_group, make_batch, make_model, oracle

import geffect_fast as gf
from geffect_fast.capture import UnsupportedModuleError
from geffect_fast.groups import assign

RTOL = 1e-6  #: float64 models: the oracle's own rounding (RMSNorms and router softmaxes compute in float32)
RTOL_FLOAT32 = 1e-4


def _direction(model, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn((K, *p.shape), generator=g, dtype=torch.float64) for n, p in model.named_parameters()}


def _is_moe(name: str) -> bool:
    return ".experts." in name or name.endswith(("gate.weight", "gate.bias", "router.weight", "router.bias"))


def _check(res, model, V, batch, groups="block", rtol=RTOL, uncovered=()):
    """Per instance (and per group total) against the oracle; ``uncovered`` parameters in an extra last column."""
    grouping = assign(model, groups, [n for n, _ in model.named_parameters()])
    assert res.groups[: len(grouping)] == grouping.names
    of = {**grouping.of, **grouping.parts}
    G = len(grouping)
    for n in uncovered:
        of[n] = G
    e, c = oracle(model, V, batch, of, G + 1 if uncovered else G)
    assert_close_per_group(res.instances["r"][:, :, :G].double(), e[:, :, :G], rtol, "per instance")
    totals = (e * c[None, :, None]).sum(1)
    ours = res.group_totals["r"].double()
    terms = (e.abs() * c[None, :, None]).sum(1)  # a total that cancels is judged on the scale of its terms
    err = ((ours[:, :G] - totals[:, :G]).abs() / terms[:, :G].clamp_min(1e-9 * terms.max())).max().item()
    assert err <= rtol, f"group totals: relative error {err:.3e}"
    if uncovered:  # by autograd of the pooled R, as the oracle's float32 router softmax rounds per sample
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(gf.risk(model, batch), [params[n] for n in uncovered])
        exact = sum((V[n].reshape(V[n].shape[0], -1) @ g.reshape(-1).double()) for n, g in zip(uncovered, grads))
        torch.testing.assert_close(ours[:, G], exact, rtol=1e-9, atol=1e-12)
    return grouping


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_moe_family_per_instance_exact(family, side):
    """strict=True: every parameter measured per sample — routed experts, top-k routers, shared experts — K = 2."""
    model = make_model(family)
    assert any(_is_moe(n) for n, _ in model.named_parameters())
    batch = make_batch(model, B=4, T=9, side=side, empty_sample=True)
    V = _direction(model)
    res = gf.measure(model, gf.Direction(V, names=["a", "b"]), {"r": batch}, per_instance=True)
    assert res.uncovered == ()
    _check(res, model, V, batch)


@pytest.mark.parametrize("family", sorted(MOE_PARTLY))
def test_moe_beside_uncovered_layers(family):
    """gpt-oss (attention sinks) and Jamba (Mamba mixers): strict refuses those layers — not the experts — and
    strict=False measures experts and routers per sample, the rest by autograd."""
    model = make_model(family)
    batch = make_batch(model, B=3, T=8, side="right")
    V = _direction(model)
    d = gf.Direction(V, names=["a", "b"])
    with pytest.raises(UnsupportedModuleError) as err:
        gf.measure(model, d, {"r": batch})
    assert ".experts." not in str(err.value).split("Register")[0]
    res = gf.measure(model, d, {"r": batch}, per_instance=True, strict=False)
    assert res.uncovered and not any(_is_moe(n) for n in res.uncovered)
    assert any(_is_moe(n) for n in V)
    _check(res, model, V, batch, uncovered=res.uncovered)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_per_expert_groups(family):
    """groups="module": one group per expert of each fused experts module (its stacked weights split by expert),
    exact per instance, and the groups sum to the total of groups="block"."""
    model = make_model(family)
    batch = make_batch(model, B=3, T=9, side="left")
    V = _direction(model, K=1)
    d = gf.Direction(V, names=["a"])
    res = gf.measure(model, d, {"r": batch}, groups="module", per_instance=True)
    grouping = _check(res, model, V, batch, groups="module")
    experts = [m for m, mod in model.named_modules() if type(mod).__name__.endswith("Experts")]
    E = model.get_submodule(experts[0]).num_experts
    for m in experts:
        assert [g for g in grouping.names if g.startswith(m + ".")] == [f"{m}.{e}" for e in range(E)]
    by_block = gf.measure(model, d, {"r": batch}, groups="block")
    torch.testing.assert_close(
        res.group_totals["r"].sum(-1), by_block.group_totals["r"].sum(-1), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_grouped_and_batched_experts_in_float32(family, impl):
    """A float32 model whose experts run grouped_mm or batched_mm: the tap runs the class's eager forward (the same
    map) and is exact to float32 against the float64 oracle of the same weights."""
    m64 = make_model(family)
    m32 = copy.deepcopy(m64).float()
    m32.config._experts_implementation = impl
    batch = make_batch(m64, B=3, T=9, side="left")
    V = _direction(m64)
    logits = m32(**batch).logits  # the implementation runs here
    assert torch.allclose(logits.double(), m64(**batch).logits, atol=1e-5)
    d = gf.Direction({n: v.float() for n, v in V.items()}, names=["a", "b"])
    res = gf.measure(m32, d, {"r": batch}, per_instance=True)
    _check(res, m64, V, batch, rtol=RTOL_FLOAT32)


def test_router_aux_loss_never_reaches_r():
    """output_router_logits=True adds the load-balancing loss to HF's .loss; R is the labelled tokens' NLL only."""
    model = make_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    batch = make_batch(model, B=3, T=9)
    hf = model(**batch)
    assert hf.aux_loss is not None and hf.aux_loss.detach().item() > 0
    V = _direction(model)
    res = gf.measure(model, gf.Direction(V, names=["a", "b"]), {"r": batch}, per_instance=True)
    assert abs(res.losses["r"] - gf.risk(model, batch).detach().item()) < 1e-12
    assert abs(res.losses["r"] - hf.loss.detach().item()) > 1e-3  # HF's .loss carries the aux loss; ours does not
    _check(res, model, V, batch)


def test_whole_parameter_consumers_and_experts():
    """Pairwise refuses experts with the reason (its factors are whole parameters); a factored direction forms the
    experts' part densely (by autograd) and measures as the dense direction does."""
    model = make_model("mixtral")
    forget, retain = make_batch(model, B=2, T=8, seed=1), make_batch(model, B=3, T=8, seed=2)
    with pytest.raises(UnsupportedModuleError, match="one expert slice at a time"):
        gf.measure_pairwise(model, "ga", forget, {"retain": retain})
    fac = gf.Direction.from_objective(model, "ga", forget, factored=True)
    dense = gf.Direction.from_objective(model, "ga", forget)
    a = gf.measure(model, fac, {"r": retain}, per_instance=True)
    b = gf.measure(model, dense, {"r": retain}, per_instance=True)
    torch.testing.assert_close(a.instances["r"], b.instances["r"], rtol=1e-9, atol=1e-12)


def test_an_unknown_use_of_an_expert_weight_is_refused():
    """A forward that uses an expert's slice outside the calls the tap knows (here W[e].T @ x) is refused —
    strict=False measures the experts by autograd instead — never measured wrongly."""
    model = make_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    cls = type(experts)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            rows, pos = torch.where(top_k_index == e)
            h = hidden_states[rows] @ self.gate_up_proj[e].T  # a transpose: not one of the tapped calls
            gate, up = h.chunk(2, dim=-1)
            h = torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, rows, h * top_k_weights[rows, pos, None])
        return out

    experts.forward = forward.__get__(experts, cls)
    batch = make_batch(model, B=3, T=8)
    V = _direction(model)
    d = gf.Direction(V, names=["a", "b"])
    with pytest.raises(UnsupportedModuleError, match="gate_up_proj"):
        gf.measure(model, d, {"r": batch})
    res = gf.measure(model, d, {"r": batch}, per_instance=True, strict=False)
    assert res.uncovered == ("model.layers.0.mlp.experts.gate_up_proj",)
    _check(res, model, V, batch, uncovered=res.uncovered)
