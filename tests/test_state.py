"""The model comes back exactly as it was: .grad, requires_grad, modes, hooks, RNG — after success and after
an exception inside the pass."""

import pytest
import torch
from helpers import make_batch, make_model, random_direction
from torch import nn

import geffect_fast as gf


def _snapshot(model):
    return {
        "grad": {n: (None if p.grad is None else (id(p.grad), p.grad.clone())) for n, p in model.named_parameters()},
        "rg": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_forward_hooks_always_called", {})),
                len(m._forward_hooks_with_kwargs),
            )
            for n, m in model.named_modules()
        },
        "rng": torch.random.get_rng_state().clone(),
        "forward": {n: m.__dict__.get("forward") for n, m in model.named_modules()},  # taps wrap forward
    }


def _assert_same(before, model):
    after = _snapshot(model)
    assert after["rg"] == before["rg"]
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    assert after["forward"] == before["forward"]
    assert torch.equal(after["rng"], before["rng"])
    for n, g in before["grad"].items():
        p = dict(model.named_parameters())[n]
        if g is None:
            assert p.grad is None, n
        else:
            assert id(p.grad) == g[0] and torch.equal(p.grad, g[1]), n


def _prepare(family="gpt2"):
    model = make_model(family)
    # a realistic mid-training state: some grads, some frozen params, train mode on a submodule only
    loss = gf.risk(model, make_batch(model, seed=9))
    loss.backward()
    params = list(model.parameters())
    params[1].requires_grad_(False)
    params[2].grad = None
    model.train()
    list(model.modules())[3].eval()
    torch.manual_seed(123)
    return model


@pytest.mark.parametrize("mode", ["eval", "train", "keep"])
def test_state_restored_after_success(mode):
    model = _prepare()
    before = _snapshot(model)
    V = {n: t[0] for n, t in random_direction(model).items()}
    res = gf.measure(model, gf.Direction(V), make_batch(model), mode=mode)
    assert res.total["risk"] != 0
    _assert_same(before, model)


class _Boom(RuntimeError):
    pass


def test_state_restored_after_failure_in_forward_and_backward():
    model = _prepare()
    before = _snapshot(model)
    V = {n: t[0] for n, t in random_direction(model).items()}
    target = model.transformer.h[1].mlp.c_fc

    # failure inside forward (a user hook raising after ours are installed)
    h = target.register_forward_hook(lambda *a: (_ for _ in ()).throw(_Boom("forward")))
    before_h = _snapshot(model)  # the user's own hook stays
    with pytest.raises(_Boom):
        gf.measure(model, V, make_batch(model))
    _assert_same(before_h, model)
    h.remove()

    # failure inside backward: an op that raises in its backward, after several taps have fired
    class _BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            raise _Boom("backward")

    def bad(m, a, out):
        return (_BadGrad.apply(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else _BadGrad.apply(out)

    h = model.transformer.h[0].register_forward_hook(bad)
    with pytest.raises(_Boom):
        gf.measure(model, V, make_batch(model))
    h.remove()
    _assert_same(before, model)

    # failure before any hook fires (bad batch) leaves everything alone too
    with pytest.raises(ValueError):
        gf.measure(model, V, {"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.full((2, 3), -100)})
    _assert_same(before, model)


def test_from_objective_leaves_state_alone():
    model = _prepare("llama")
    before = _snapshot(model)
    batch = make_batch(model)
    v = gf.Direction.from_objective(model, lambda m, b, r: -gf.risk(m, b), batch, name="ga")
    assert v.names == ("ga",)
    _assert_same(before, model)
    # ...and equals the plain autograd gradient of −R over the trainable parameters
    model.eval()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(-gf.risk(model, batch), [p for _, p in trainable])
    for (n, _), g in zip(trainable, grads):
        assert torch.allclose(v.tensor(n)[0], g, rtol=1e-12, atol=1e-15), n


def test_frozen_parameter_without_direction_is_fine_and_stays_frozen():
    model = make_model("llama")
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    V = {n: t[0] for n, t in random_direction(model).items() if not n.startswith("model.embed_tokens")}
    res = gf.measure(model, V, make_batch(model), per_instance=True)
    assert res.by_group["risk"]["embed"] == 0.0
    assert not model.model.embed_tokens.weight.requires_grad
    assert isinstance(model.model.embed_tokens, nn.Embedding)
