"""Identities the numbers must satisfy, whatever the model."""

import pytest
import torch
from helpers import assert_close_per_group, make_batch, make_model, random_direction

import geffect_fast as gf
from geffect_fast.loss import risk


def test_groups_sum_to_total_and_total_is_weighted_instances():
    model = make_model("gpt2")
    batch = make_batch(model)
    V = {n: t[0] for n, t in random_direction(model).items()}
    res = gf.measure(model, V, {"r": batch}, per_instance=True)
    assert abs(sum(res.by_group["r"].values()) - res.total["r"]) <= 1e-12 * abs(res.total["r"]) + 1e-15
    pooled = (res.per_instance["r"] * res.weights["r"][:, None]).sum().item()
    n = res.n_tokens["r"].double()
    assert torch.allclose(res.weights["r"], n / n.sum())
    assert abs(pooled - res.total["r"]) <= 1e-10 * abs(res.total["r"])


def test_total_is_directional_derivative_of_the_risk():
    """⟨∇R, v⟩ equals d/dε R(θ + ε v) at 0 (central difference, float64; GPT-2 computes in float64 throughout,
    where Llama's RMSNorm rounds through float32)."""
    model = make_model("gpt2")
    batch = make_batch(model)
    V = {n: t[0] for n, t in random_direction(model).items()}
    res = gf.measure(model, V, batch)
    eps = 1e-5
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, p in params.items():
            p.add_(eps * V[n])
        rp = risk(model, batch).item()
        for n, p in params.items():
            p.sub_(2 * eps * V[n])
        rm = risk(model, batch).item()
        for n, p in params.items():
            p.add_(eps * V[n])
    fd = (rp - rm) / (2 * eps)
    assert abs(res.total["risk"] - fd) <= 1e-6 * abs(fd)


def test_several_directions_equal_separate_passes():
    model = make_model("phi")
    batch = make_batch(model)
    V = random_direction(model, K=3)
    names = ["ga", "npo", "wga"]
    both = gf.measure(
        model, gf.Direction(V, names=names), {"u": batch, "r": make_batch(model, seed=5)}, per_instance=True
    )
    for k, name in enumerate(names):
        one = gf.measure(
            model,
            gf.Direction({n: t[k] for n, t in V.items()}, name),
            {"u": batch, "r": make_batch(model, seed=5)},
            per_instance=True,
        )
        for r in ("u", "r"):
            assert torch.allclose(both.per_instance[name][r], one.per_instance[r], rtol=1e-12, atol=1e-14)
            assert both.total[name][r] == pytest.approx(one.total[r], rel=1e-12)
        sub = both[name]
        assert sub.total == pytest.approx(one.total, rel=1e-12)


@pytest.mark.parametrize("family,rel", [("gpt2", 1e-10), ("qwen2", 1e-6)])
def test_ga_identity(family, rel):
    """With v = ∇(−R_u) on the same batch, e_u = −‖∇R_u‖². (Qwen2's RMSNorm rounds through float32 even in a
    float64 model, and the risk is backpropagated per sample here but pooled there: agreement to ~1e-7.)"""
    model = make_model(family)
    batch = make_batch(model)

    def ga(m, b, ref):
        return -risk(m, b)

    v = gf.Direction.from_objective(model, ga, batch)
    res = gf.measure(model, v, {"unlearn": batch})
    grads = torch.autograd.grad(risk(model, batch), list(model.parameters()))
    sq = sum((g.double() ** 2).sum() for g in grads).item()
    assert res.total["unlearn"] == pytest.approx(-sq, rel=rel)
    assert res.total["unlearn"] < 0


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_equals_plain(family, reentrant):
    model = make_model(family)
    batch = make_batch(model)
    V = {n: t[0] for n, t in random_direction(model).items()}
    plain = gf.measure(model, V, batch, per_instance=True, mode="train")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    orig = (
        model.model.layers[0]._gradient_checkpointing_func
        if family == "llama"
        else model.transformer.h[0]._gradient_checkpointing_func
    )

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    for layer in model.model.layers if family == "llama" else model.transformer.h:
        layer._gradient_checkpointing_func = counting
    ckpt = gf.measure(model, V, batch, per_instance=True, mode="train")
    assert calls, "checkpointing was not exercised"
    assert_close_per_group(ckpt.instances["risk"], plain.instances["risk"], 1e-12, "checkpointing")
    eval_ = gf.measure(model, V, batch, per_instance=True)  # dropout 0: eval equals train
    assert_close_per_group(eval_.instances["risk"], plain.instances["risk"], 1e-12, "eval vs train")


def test_per_token_view_of_the_ops_is_the_per_position_split():
    """seg = arange(N) gives per-position terms; their segment sums are the per-sample values."""
    from geffect_fast.ops import reference as ref

    g = torch.Generator().manual_seed(0)
    N, i, o, K, B = 11, 7, 5, 2, 3
    a, gg = torch.randn(N, i, generator=g, dtype=torch.float64), torch.randn(N, o, generator=g, dtype=torch.float64)
    V = torch.randn(K, o, i, generator=g, dtype=torch.float64)
    seg = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 2])
    per_pos, _ = ref.linear_dot(a, gg, V, torch.arange(N), N)
    per_sample, _ = ref.linear_dot(a, gg, V, seg, B)
    summed = torch.zeros(K, B, dtype=torch.float64).index_add_(1, seg, per_pos)
    assert torch.allclose(summed, per_sample, rtol=1e-12)
