"""A layer kind the library does not know, added by a user as one adapter (docs/design.md §3): it hands over its
factors and every entry point measures it — the dense dot (through the generic ``factors`` form, which no
built-in adapter uses), a factored direction on both routes, pairwise matrices and sketches — exactly, against
the float64 per-sample oracle."""

import pytest
import torch
from helpers import assert_close_per_group, make_batch, make_model, oracle, random_direction
from torch import nn

import geffect_fast as gf
from geffect_fast import objectives as O
from geffect_fast.capture import Adapter, register
from geffect_fast.groups import assign


class Gain(nn.Module):
    """y = x ⊙ s (a per-feature gain): G_s = Σ_t g_t ⊙ x_t per sample."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(1 + 0.1 * torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


@register(Gain)
class GainAdapter(Adapter):
    """What a user writes: the factors of G_s (L = g ⊙ x, R = 1), handed to whatever consumes them."""

    param_names = ("s",)

    def bind(self, tap, state):
        module = tap.module
        parts = [(c, sl["s"]) for c, sl in tap.parts]

        def backward(g, seg, saved):
            (x,) = saved
            d = g.shape[-1]
            L = (g * x).reshape(-1, d)
            ones = L.new_ones(L.shape[0], 1)
            for c, slot in parts:
                c.factors(slot, L, ones, seg, None)

        def on_output(args, kwargs, out):
            x = args[0]
            seg = state.rows(out, out.shape[-1], module)
            return state.apply(out, backward, seg, x)  # out requires grad: x does (the model's activations)

        return on_output


@pytest.fixture
def model():
    m = make_model("llama")
    mlp = m.model.layers[0].mlp
    mlp.down_proj = nn.Sequential(mlp.down_proj, Gain(32))
    return m


def _oracle(model, V, batch):
    grouping = assign(model, "block", [n for n, _ in model.named_parameters()])
    return oracle(model, V, batch, grouping.of, len(grouping))


def test_measure_through_a_user_adapter(model):
    V = random_direction(model, K=2)
    batch = make_batch(model, B=4, side="left")
    res = gf.measure(model, gf.Direction(V, names=["a", "b"]), {"r": batch}, per_instance=True)
    assert not res.uncovered
    e, c = _oracle(model, V, batch)
    assert_close_per_group(res.instances["r"], e, 1e-9, "per instance")
    # only the gain: its group's value is the gain's own
    only = {n: (t if n.endswith(".s") else torch.zeros_like(t)) for n, t in V.items()}
    res_s = gf.measure(model, gf.Direction(only, names=["a", "b"]), {"r": batch}, per_instance=True)
    e_s, _ = _oracle(model, only, batch)
    assert_close_per_group(res_s.instances["r"], e_s, 1e-9, "the gain alone")


def test_factored_pairwise_and_sketch_through_a_user_adapter(model):
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2)
    ga = O.get("ga")
    fd = gf.Direction.from_objective(model, ga, forget, factored=True)
    assert fd.entry("model.layers.0.mlp.down_proj.1.s").uses  # kept as factors, not formed
    dense = gf.measure(model, fd.dense(), {"r": retain}, per_instance=True)
    for route in ("dense", "factored"):
        got = gf.measure(model, fd, {"r": retain}, per_instance=True, route=route)
        assert_close_per_group(got.instances["r"], dense.instances["r"], 1e-10, route)
    pw = gf.measure_pairwise(model, ga, forget, {"r": retain})
    # each row sums to that retain sample's G-effect against the objective's gradient
    assert_close_per_group(pw.matrix["r"].sum(-1).T[None], dense.instances["r"], 1e-9, "pairwise rows")
    sk = gf.Sketcher(model, k=8, seed=0)
    assert sk.sketch(retain).tensors["model.layers.0.mlp.down_proj.1.s"].shape == (4, 8, 1)
