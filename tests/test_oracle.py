"""measure() against the float64 per-sample autograd oracle, per instance and per group, on tiny models of
several families (tied and untied heads, Conv1D, biases, learned positions, LayerNorm, (1+γ) RMSNorm)."""

import pytest
import torch
from helpers import ALL_FAMILIES, FAMILIES, assert_close_per_group, make_batch, make_model, oracle, random_direction

import geffect_fast as gf
from geffect_fast.groups import assign


def _run(family, dtype, side="right", K=1, groups="block", reduction="token_mean", empty=False):
    model = make_model(family, dtype=dtype)
    batch = make_batch(model, side=side, empty_sample=empty)
    V = random_direction(model, K=K)
    names = [f"d{k}" for k in range(K)]
    res = gf.measure(
        model, gf.Direction(V, names=names), {"risk": batch}, groups=groups, per_instance=True, reduction=reduction
    )
    grouping = assign(model, groups, [n for n, _ in model.named_parameters()])
    ref_model = make_model(family, dtype=torch.float64)  # the oracle always runs in float64
    Vref = {n: t.double() for n, t in V.items()}
    e, c = oracle(ref_model, Vref, batch, grouping.of, len(grouping), reduction)
    return res, e, c, grouping


@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_float64_per_instance_and_group(family):
    res, e, c, grouping = _run(family, torch.float64)
    assert res.groups == grouping.names
    ours = res.instances["risk"]
    assert_close_per_group(ours, e, 1e-6, f"{family} per instance")
    totals = (e * c[None, :, None]).sum(1)
    assert_close_per_group(res.group_totals["risk"][:, None, :], totals[:, None, :], 1e-6, f"{family} per group")
    assert ours.abs().max() > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_against_float64_oracle(family):
    res, e, c, _ = _run(family, torch.float32)
    assert_close_per_group(res.instances["risk"], e, 1e-4, f"{family} float32")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma"])
def test_left_padding(family):
    res, e, _, _ = _run(family, torch.float64, side="left")
    assert_close_per_group(res.instances["risk"], e, 1e-6, f"{family} left padding")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_several_directions_and_sample_mean(family):
    res, e, c, _ = _run(family, torch.float64, K=3, reduction="sample_mean")
    assert_close_per_group(res.instances["risk"], e, 1e-6, f"{family} K=3")
    assert set(res.total) == {"d0", "d1", "d2"}


@pytest.mark.parametrize("groups", ["paper", "module"])
def test_other_group_schemes(groups):
    res, e, _, grouping = _run("qwen2", torch.float64, groups=groups)
    assert res.groups == grouping.names
    assert_close_per_group(res.instances["risk"], e, 1e-6, f"groups={groups}")


def test_sample_without_labels_is_zero_and_weightless():
    res, e, c, _ = _run("llama", torch.float64, empty=True)
    pi = res.per_instance["risk"]
    assert torch.all(pi[-1] == 0)
    assert res.weights["risk"][-1] == 0 and res.n_tokens["risk"][-1] == 0
    assert_close_per_group(res.instances["risk"], e, 1e-6, "empty sample")
