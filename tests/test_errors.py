"""Bad input gets a clear error that names what is wrong, and leaves the model as it was."""

import pytest
import torch
from helpers import assert_close_per_group, make_batch, make_model, oracle, random_direction
from torch import nn

import geffect_fast as gf
from geffect_fast.capture import UnsupportedModuleError
from geffect_fast.groups import assign


@pytest.fixture()
def setup():
    model = make_model("llama")
    V = {n: t[0] for n, t in random_direction(model).items()}
    return model, V, make_batch(model)


def test_no_labelled_tokens(setup):
    model, V, batch = setup
    batch["labels"] = torch.full_like(batch["labels"], -100)
    batch["labels"][:, 0] = 5  # the first position is never a target after the shift
    with pytest.raises(ValueError, match="risk set 'forget'.*no labelled tokens"):
        gf.measure(model, V, {"forget": batch})


def test_label_shape_mismatch(setup):
    model, V, batch = setup
    batch["labels"] = batch["labels"][:, :-1]
    with pytest.raises(ValueError, match="labels has shape"):
        gf.measure(model, V, batch)


def test_batch_missing_keys(setup):
    model, V, batch = setup
    with pytest.raises(KeyError, match="no 'labels'"):
        gf.measure(model, V, {"r": {"input_ids": batch["input_ids"]}})
    with pytest.raises(TypeError, match="must be a dict"):
        gf.measure(model, V, {"r": [1, 2]})


def test_direction_missing_a_trainable_parameter(setup):
    model, V, batch = setup
    V.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(KeyError, match="no entry for trainable parameter.*up_proj"):
        gf.measure(model, V, batch)
    # explicitly zero is fine
    res = gf.measure(model, gf.Direction(V, zero=["model.layers.1.mlp.up_proj.weight"]), batch)
    assert res.total["risk"] != 0


def test_direction_wrong_shape_dtype_device_name(setup):
    model, V, batch = setup
    bad = dict(V, **{"model.norm.weight": torch.randn(7, dtype=torch.float64)})
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        gf.measure(model, bad, batch)
    bad = dict(V, **{"model.norm.weight": torch.ones(32, dtype=torch.int64)})
    with pytest.raises(TypeError, match="model.norm.weight.*int64"):
        gf.measure(model, bad, batch)
    bad = dict(V, **{"model.norm.weight": torch.ones(32, dtype=torch.float16)})
    with pytest.raises(TypeError, match="float16"):
        gf.measure(model, bad, batch)
    bad = dict(V, **{"model.norm.weight": torch.ones(32, dtype=torch.float64, device="meta")})
    with pytest.raises(ValueError, match="model.norm.weight.*meta"):
        gf.measure(model, bad, batch)
    bad = dict(V, **{"model.nonexistent.weight": torch.ones(3)})
    with pytest.raises(KeyError, match="model.nonexistent.weight"):
        gf.measure(model, bad, batch)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_direction_not_finite(setup, value):
    model, V, batch = setup
    V["model.layers.0.self_attn.q_proj.weight"][3, 4] = value
    with pytest.raises(ValueError, match="NaN or inf in 'model.layers.0.self_attn.q_proj.weight'"):
        gf.measure(model, V, batch)


def test_risk_not_finite_names_the_set(setup):
    model, V, batch = setup
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="risk set 'retain'.*not finite"):
        gf.measure(model, V, {"retain": batch})


def test_batch_on_another_device(setup):
    model, V, batch = setup
    meta = {k: t.to("meta") for k, t in batch.items()}
    with pytest.raises(ValueError, match="batch is on meta.*cpu"):
        gf.measure(model, V, meta)


def test_unknown_options(setup):
    model, V, batch = setup
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        gf.measure(model, V, batch, backend="cuda-magic")
    with pytest.raises(ValueError, match="unknown groups"):
        gf.measure(model, V, batch, groups="layers")
    with pytest.raises(ValueError, match="unknown reduction"):
        gf.measure(model, V, batch, reduction="sum")
    with pytest.raises(ValueError, match="unknown mode"):
        gf.measure(model, V, batch, mode="inference")


def test_zero_direction_everywhere(setup):
    model, V, batch = setup
    with pytest.raises(ValueError, match="zero on every parameter"):
        gf.measure(model, {n: torch.zeros_like(t) for n, t in V.items()}, batch)


class Scale(nn.Module):
    """A layer no adapter knows: y = x ⊙ s."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(1 + 0.1 * torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


def _model_with_scale():
    model = make_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.down_proj = nn.Sequential(mlp.down_proj, Scale(32))
    return model


def test_uncovered_module_strict_names_it():
    model = _model_with_scale()
    V = {n: t[0] for n, t in random_direction(model).items()}
    with pytest.raises(UnsupportedModuleError, match=r"model.layers.0.mlp.down_proj.1.s.*Scale.*no adapter"):
        gf.measure(model, V, make_batch(model))


def test_uncovered_module_lenient_is_an_exact_aggregate():
    model = _model_with_scale()
    V = random_direction(model)
    batch = make_batch(model)
    res = gf.measure(model, gf.Direction(V, names=["v"]), {"r": batch}, strict=False, per_instance=True)
    assert res.groups[-1] == "uncovered" and res.uncovered == ("model.layers.0.mlp.down_proj.1.s",)
    assert "uncovered" in str(res)
    assert torch.isnan(res.per_instance["r"][:, -1]).all()
    # the oracle with the uncovered parameter in a group of its own
    names = [n for n, _ in model.named_parameters()]
    grouping = assign(model, "block", names)
    of = dict(grouping.of)
    of["model.layers.0.mlp.down_proj.1.s"] = len(grouping)
    e, c = oracle(model, V, batch, of, len(grouping) + 1)
    totals = (e * c[None, :, None]).sum(1)
    assert_close_per_group(res.group_totals["r"][:, None], totals[:, None], 1e-6, "uncovered totals")
    assert_close_per_group(res.instances["r"][:, :, :-1], e[:, :, :-1], 1e-6, "covered per instance")
    assert model.model.layers[0].mlp.down_proj[1].s.grad is None
    assert model.model.layers[0].mlp.down_proj[1].s.requires_grad


def test_embedding_with_max_norm_is_unsupported():
    model = make_model("llama")
    model.model.embed_tokens.max_norm = 1.0
    V = {n: t[0] for n, t in random_direction(model).items()}
    with pytest.raises(UnsupportedModuleError, match="embed_tokens.*max_norm"):
        gf.measure(model, V, make_batch(model))


def test_error_inside_embedding_forward_leaves_no_mode_behind(setup):
    model, V, batch = setup
    batch["input_ids"][0, 0] = 10_000  # out of the table
    with pytest.raises(IndexError):
        gf.measure(model, V, batch)
    assert torch._C._len_torch_function_stack() == 0
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())
