"""A tap vouches for what it measures (no silent wrong answers, round 2): a forward the adapter did not write —
set on the instance, or an embedding subclass's own — is measured exactly where the tap can see the parameter's
own functional call (or check the module's output), and refused otherwise; never taken on trust. Also: two
direction keys naming one parameter, a key naming a tied head, labels of the wrong dtype."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_per_group, make_batch, make_model, oracle, random_direction
from torch import nn

import geffect_fast as gf
from geffect_fast.capture import NotPerSampleError
from geffect_fast.groups import assign


def _direction(model, K=1):
    V = random_direction(model, K=K)
    return V, gf.Direction(V, names=[f"v{k}" for k in range(K)])


def _oracle(model, V, batch, uncovered=()):
    grouping = assign(model, "block", [n for n, _ in model.named_parameters()])
    of = dict(grouping.of)
    for n in uncovered:
        of[n] = len(grouping)
    return oracle(model, V, batch, of, len(grouping) + (1 if uncovered else 0))


def _exact(model, V, d, batch):
    res = gf.measure(model, d, {"r": batch}, per_instance=True)
    assert not res.uncovered
    e, _ = _oracle(model, V, batch)
    assert_close_per_group(res.instances["r"], e, 1e-9, "per instance")


def _refused_then_lenient(model, V, d, batch, names):
    with pytest.raises(NotPerSampleError) as err:
        gf.measure(model, d, {"r": batch})
    assert set(err.value.params) <= set(names) and any(n.rsplit(".", 1)[0] in str(err.value) for n in names)
    res = gf.measure(model, d, {"r": batch}, per_instance=True, strict=False)
    assert set(res.uncovered) == set(names), res.uncovered
    e, c = _oracle(model, V, batch, uncovered=names)
    totals = (e * c[None, :, None]).sum(1)
    assert_close_per_group(res.group_totals["r"][:, None], totals[:, None], 1e-6, "totals")
    assert_close_per_group(res.instances["r"][:, :, :-1], e[:, :, :-1], 1e-6, "covered per instance")


# -- a forward set on the instance ---------------------------------------------------------------------------
def test_linear_with_a_faithful_instance_forward_is_exact():
    model = make_model("llama")
    lin = model.model.layers[0].mlp.up_proj
    lin.forward = lambda x: F.linear(x, lin.weight, lin.bias) + 0  # the same map, another forward
    V, d = _direction(model, K=2)
    _exact(model, V, d, make_batch(model))


def test_linear_whose_instance_forward_transforms_the_weight_is_refused():
    """The issue's case: lin.forward = lambda x: F.linear(x, 0.5 * lin.weight, lin.bias) was taken as y = Wa."""
    model = make_model("llama", attention_bias=True)
    lin = model.model.layers[1].self_attn.q_proj
    lin.forward = lambda x: F.linear(x, 0.5 * lin.weight, lin.bias)
    V, d = _direction(model)
    batch = make_batch(model)
    # the bias goes into a call the tap does not know either (F.linear with another weight): both by autograd
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.bias"]
    _refused_then_lenient(model, V, d, batch, names)
    assert "forward" in lin.__dict__  # the user's forward is put back, not ours


def test_linear_calling_its_weight_twice_adds_both_uses():
    model = make_model("llama")
    lin = model.model.layers[0].mlp.down_proj
    lin.forward = lambda x: F.linear(x, lin.weight) + 0.25 * F.linear(x * x, lin.weight)
    V, d = _direction(model)
    _exact(model, V, d, make_batch(model))


def test_conv1d_with_an_instance_forward_is_exact_through_its_addmm():
    model = make_model("gpt2")
    c = model.transformer.h[0].mlp.c_fc
    own = c.forward
    c.forward = lambda x: own(x)
    V, d = _direction(model)
    _exact(model, V, d, make_batch(model))


def test_a_module_whose_forward_uses_its_weight_otherwise_is_refused():
    model = make_model("gpt2")
    c = model.transformer.h[1].attn.c_proj
    c.forward = lambda x: x @ c.weight + c.bias  # the same value, but not through the call the tap knows
    V, d = _direction(model)
    _refused_then_lenient(
        model, V, d, make_batch(model), ["transformer.h.1.attn.c_proj.weight", "transformer.h.1.attn.c_proj.bias"]
    )


def test_norm_with_an_instance_forward_is_checked():
    model = make_model("gpt2")
    ln = model.transformer.h[0].ln_2
    own = ln.forward
    ln.forward = lambda x: own(x)
    V, d = _direction(model)
    batch = make_batch(model)
    _exact(model, V, d, batch)
    ln.forward = lambda x: own(x) * 1.5
    _refused_then_lenient(model, V, d, batch, ["transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias"])


# -- embedding subclasses --------------------------------------------------------------------------------------
class _Gathering(nn.Embedding):
    def forward(self, ids):
        return self.weight[ids]  # not F.embedding: the tap cannot see the table's gradient


class _Scaled(nn.Embedding):
    def forward(self, ids):
        return F.embedding(ids, 2.0 * self.weight)  # a transformed table


class _NoPaddingPassed(nn.Embedding):
    def forward(self, ids):
        return F.embedding(ids, self.weight)  # padding_idx set on the module, not passed: its row gets gradient


def _with_embedding(cls):
    model = make_model("llama")
    old = model.model.embed_tokens
    new = cls(old.num_embeddings, old.embedding_dim, padding_idx=0, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight + 0.1)  # the padding row nonzero too
    model.model.embed_tokens = new
    return model


@pytest.mark.parametrize("cls", [_Gathering, _Scaled])
def test_embedding_subclass_using_its_table_otherwise_is_refused(cls):
    model = _with_embedding(cls)
    V, d = _direction(model)
    _refused_then_lenient(model, V, d, make_batch(model), ["model.embed_tokens.weight"])


def test_embedding_subclass_without_its_padding_idx_is_exact():
    model = _with_embedding(_NoPaddingPassed)
    V, d = _direction(model)
    batch = make_batch(model, side="left")  # padding id 0 in the batch: its row gets gradient here
    assert bool((batch["input_ids"] == 0).any())
    _exact(model, V, d, batch)


def test_idefics_decoupled_embedding_is_exact():
    """HF's IdeficsDecoupledEmbedding passes no padding_idx to F.embedding (the issue's case: 2.098 vs 2.973)."""
    from transformers.models.idefics.modeling_idefics import IdeficsDecoupledEmbedding

    model = make_model("llama")
    old = model.model.embed_tokens
    new = IdeficsDecoupledEmbedding(old.num_embeddings, 0, old.embedding_dim, padding_idx=0).to(old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight + 0.1)
    model.model.embed_tokens = new
    V, d = _direction(model)
    _exact(model, V, d, make_batch(model, side="left"))


# -- the direction and the batch -------------------------------------------------------------------------------
def test_two_keys_naming_one_parameter_are_an_error():
    model = make_model("llama")
    V = {n: t[0] for n, t in random_direction(model).items()}
    k = "model.layers.0.mlp.up_proj.weight"
    both = {**V, "module." + k: V[k] * 2}
    with pytest.raises(KeyError, match=r"'model.layers.0.mlp.up_proj.weight' and 'module.model.layers.0.mlp.up_proj"):
        gf.measure(model, both, make_batch(model))


def test_a_key_naming_a_tied_head_says_so():
    model = make_model("gpt2")  # lm_head tied to wte: one parameter
    V = {n: t[0] for n, t in random_direction(model).items()}
    V["lm_head.weight"] = V["transformer.wte.weight"]
    with pytest.raises(KeyError, match="tied to the input embeddings"):
        gf.measure(model, V, make_batch(model))


def test_labels_of_the_wrong_dtype_are_a_clear_error():
    model = make_model("llama")
    batch = make_batch(model)
    V = {n: t[0] for n, t in random_direction(model).items()}
    with pytest.raises(TypeError, match="labels must be integer"):
        gf.measure(model, V, {**batch, "labels": batch["labels"].float()})
    with pytest.raises(TypeError, match="input_ids must be integer"):
        gf.measure(model, V, {**batch, "input_ids": batch["input_ids"].float()})


# -- ids shared by the batch ([1, n]) ------------------------------------------------------------------------
class _TinyLM(nn.Module):
    """Token + learned position embeddings and a head; ``take_row``: the position rows taken as pos(ids)[0]."""

    def __init__(self, take_row: bool, vocab=29, d=6):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(16, d)
        self.mix, self.head = nn.Linear(d, d), nn.Linear(d, vocab)
        self.take_row = take_row
        self.double()

    def forward(self, input_ids, attention_mask=None, **kw):
        T = input_ids.shape[1]
        p = self.pos(torch.arange(T)[None])
        h = self.tok(input_ids) + (p[0] if self.take_row else p)
        return self.head(torch.tanh(self.mix(h)))


def _tiny_batch(B=3, T=7):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 29, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_position_rows_broadcast_over_the_batch_are_exact():
    torch.manual_seed(0)
    model = _TinyLM(take_row=False)
    V, d = _direction(model)
    _exact(model, V, d, _tiny_batch())


def test_position_rows_taken_once_for_every_sample_are_refused():
    """The issue's case: code doing pos(ids)[0] got 3–14% per instance wrong from the expanded rows."""
    torch.manual_seed(0)
    model = _TinyLM(take_row=True)
    V, d = _direction(model)
    _refused_then_lenient(model, V, d, _tiny_batch(), ["pos.weight"])


def test_peft_prompt_tuning_is_measured_or_refused_clearly():
    from peft import PromptTuningConfig, TaskType, get_peft_model

    base = make_model("llama", dtype=torch.float32)
    pm = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    V = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in params}

    def autograd_total(batch):
        grads = torch.autograd.grad(gf.risk(pm, batch), [p for _, p in params])
        return float(sum((g * V[n]).sum() for g, (n, _) in zip(grads, params)))

    one = make_batch(base, B=1)  # one row: the virtual tokens' logits set aside, measured per instance
    res = gf.measure(pm, V, {"r": one}, per_instance=True)
    assert res.total["r"] == pytest.approx(autograd_total(one), rel=1e-5)
    four = make_batch(base, B=4)  # the prompt rows repeated by PEFT over the batch: refused, then by autograd
    with pytest.raises(NotPerSampleError, match="ids shared by the batch"):
        gf.measure(pm, V, {"r": four})
    res = gf.measure(pm, V, {"r": four}, strict=False)
    assert res.uncovered == ("prompt_encoder.default.embedding.weight",)
    assert res.total["r"] == pytest.approx(autograd_total(four), rel=1e-5)


def test_an_offloaded_model_says_so():
    """accelerate's cpu_offload leaves the parameters on the meta device (the message said "move the batch")."""
    from accelerate import cpu_offload

    model = make_model("llama", dtype=torch.float32)
    V = {n: t[0].float() for n, t in random_direction(model).items()}
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="offloaded"):
        gf.measure(model, V, make_batch(model))
