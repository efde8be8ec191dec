"""Misuse that used to give a silent wrong answer, leave state behind, or raise an unclear error (issue 13):
each now gives the exact answer (against the float64 per-sample autograd oracle) or a clear error naming the
cause, and the model comes back as it was."""

import threading

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from helpers import VOCAB, assert_close_per_group, make_batch, make_model, oracle, random_direction
from torch import nn

import geffect_fast as gf
from geffect_fast.capture import UnsupportedModuleError
from geffect_fast.groups import assign


def _one(V):
    return {n: t[0] for n, t in V.items()}


def _groups(model):
    return assign(model, "block", [n for n, _ in model.named_parameters()])


def _check_lenient(model, V, batch, res, expected_uncovered):
    """``res`` (strict=False) against the oracle with ``expected_uncovered`` in a group of their own: totals of
    every group, per-instance values of the covered groups."""
    assert set(res.uncovered) == set(expected_uncovered), res.uncovered
    grouping = _groups(model)
    of = dict(grouping.of)
    for n in expected_uncovered:
        of[n] = len(grouping)
    e, c = oracle(model, V, batch, of, len(grouping) + 1)
    totals = (e * c[None, :, None]).sum(1)
    assert_close_per_group(res.group_totals["r"][:, None], totals[:, None], 1e-6, "totals")
    assert_close_per_group(res.instances["r"][:, :, :-1], e[:, :, :-1], 1e-6, "covered per instance")
    assert torch.isnan(res.instances["r"][:, :, -1]).all()
    # ...and the total is plain autograd's ⟨∇R, v⟩ (the batched one: float32 RMSNorms round the same way)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(gf.risk(model, batch), list(params.values()), allow_unused=True)
    exact = sum(float((g * V[n][0]).sum()) for n, g in zip(params, grads) if g is not None)
    assert res.total["r"] == pytest.approx(exact, rel=1e-9, abs=1e-12)


# -- 1. a covered parameter used outside its module's forward ------------------------------------------------
def _bloom_slow_but_exact():
    return make_model("bloom", pretraining_tp=2, slow_but_exact=True)


def _bloom_dense(model):
    return [
        n
        for n, _ in model.named_parameters()
        if n.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight"))
    ]


def test_bloom_slow_but_exact_strict_names_the_parameter():
    model = _bloom_slow_but_exact()
    V = random_direction(model)
    with pytest.raises(
        UnsupportedModuleError,
        match=r"'transformer\.h\.0\.self_attention\.dense\.weight' is used outside the forward of its module "
        r"'transformer\.h\.0\.self_attention\.dense'.*strict=False",
    ):
        gf.measure(model, gf.Direction(V, names=["v"]), make_batch(model))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_bloom_slow_but_exact_lenient_is_exact():
    model = _bloom_slow_but_exact()
    V = random_direction(model)
    batch = make_batch(model)
    res = gf.measure(model, gf.Direction(V, names=["v"]), {"r": batch}, strict=False, per_instance=True)
    _check_lenient(model, V, batch, res, _bloom_dense(model))


class FunctionalHeadLM(nn.Module):
    """A custom LM whose head reuses the embedding table through F.linear (no nn.Linear owns the use)."""

    def __init__(self, vocab=VOCAB, d=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))

    def forward(self, input_ids, attention_mask=None):
        h = self.tok(input_ids)
        h = h + self.mlp(h)
        return F.linear(h, self.tok.weight)


def _functional_head():
    torch.manual_seed(0)
    model = FunctionalHeadLM().double()
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :2] = -100
    return model, {"input_ids": ids, "labels": labels}


def test_custom_head_using_the_embedding_table_functionally():
    model, batch = _functional_head()
    V = random_direction(model)
    with pytest.raises(UnsupportedModuleError, match=r"'tok\.weight' is used outside the forward of its module 'tok'"):
        gf.measure(model, gf.Direction(V, names=["v"]), batch)
    res = gf.measure(model, gf.Direction(V, names=["v"]), {"r": batch}, strict=False, per_instance=True)
    _check_lenient(model, V, batch, res, ["tok.weight"])


# -- 2. user forward hooks that change a tapped module's output ---------------------------------------------
@pytest.mark.parametrize("prepend", [False, True])
@pytest.mark.parametrize("when", ["before the pass", "during the pass"])
def test_user_hook_changing_a_tapped_output(when, prepend):
    model = make_model("llama")
    V = random_direction(model)
    batch = make_batch(model)
    target = model.model.layers[0].mlp.down_proj
    handles, user = [], []

    def install():
        user.append(target.register_forward_hook(lambda m, a, o: 2 * o, prepend=prepend))

    if when == "before the pass":
        install()
    else:  # registered by the model's own pre-hook on the pass's forward, after the taps are in place

        def pre(mod, args, kwargs):
            if not user:
                install()

        handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        res = gf.measure(model, gf.Direction(V, names=["v"]), {"r": batch}, per_instance=True)
        assert len(user) == 1
        grouping = _groups(model)
        e, _ = oracle(model, V, batch, grouping.of, len(grouping))  # the hook is part of the model's function
    finally:
        for h in handles + user:
            h.remove()
    assert_close_per_group(res.instances["r"], e, 1e-9, f"hook {when}, prepend={prepend}")


# -- 3. routed tokens ----------------------------------------------------------------------------------------
class Top1MoE(nn.Module):
    """A top-1 MoE built from nn.Linear experts that run on the rows routed to them, x[idx]."""

    def __init__(self, d=32, experts=2):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])  # the batch's B·T tokens in order: a known layout
        gate = self.router(flat).softmax(-1)
        idx = gate.argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            sel = torch.where(idx == e)[0]
            out = out.index_add(0, sel, expert(flat[sel]) * gate[sel, e : e + 1])
        return out.view_as(x)


def _moe_llama():
    model = make_model("llama")
    torch.manual_seed(5)
    model.model.layers[0].mlp = Top1MoE().double()
    return model


def test_routed_rows_strict_is_an_error_naming_the_module():
    model = _moe_llama()
    V = random_direction(model)
    with pytest.raises(UnsupportedModuleError, match=r"mlp\.experts\.\d' \(Linear\).*gathered by index"):
        gf.measure(model, gf.Direction(V, names=["v"]), make_batch(model))


def test_routed_rows_lenient_is_exact():
    model = _moe_llama()
    V = random_direction(model)
    batch = make_batch(model)
    res = gf.measure(model, gf.Direction(V, names=["v"]), {"r": batch}, strict=False, per_instance=True)
    experts = [n for n, _ in model.named_parameters() if ".mlp.experts." in n]
    # the router runs on the flattened [B·T, d] tokens: measured per instance, inside block.0
    _check_lenient(model, V, batch, res, experts)


# -- 4. a Direction changed in place after a first measure() -------------------------------------------------
def test_direction_changed_in_place_is_checked_again():
    model = make_model("llama")
    batch = make_batch(model)
    V = _one(random_direction(model))
    V["lm_head.weight"].zero_()
    d = gf.Direction(V)
    gf.measure(model, d, batch)  # binds: lm_head's entry is zero
    V["lm_head.weight"].normal_(generator=torch.Generator().manual_seed(7))  # the user's tensor, in place
    got = gf.measure(model, d, batch).total["risk"]
    fresh = gf.measure(model, gf.Direction({n: t.clone() for n, t in V.items()}), batch).total["risk"]
    assert got == pytest.approx(fresh, rel=1e-12)
    V["model.norm.weight"].zero_()  # nonzero -> zero
    got = gf.measure(model, d, batch).total["risk"]
    fresh = gf.measure(model, gf.Direction({n: t.clone() for n, t in V.items()}), batch).total["risk"]
    assert got == pytest.approx(fresh, rel=1e-12)
    V["model.layers.0.mlp.up_proj.weight"][1, 2] = float("nan")  # and a NaN written afterwards
    with pytest.raises(ValueError, match="NaN or inf in 'model.layers.0.mlp.up_proj.weight'"):
        gf.measure(model, d, batch)


# -- 5. two threads measuring the same model -----------------------------------------------------------------
def test_threads_measuring_one_model_get_their_own_exact_results():
    model = make_model("llama")
    V = gf.Direction(random_direction(model), names=["v"])
    batches = [make_batch(model, B=2 + i % 3, seed=10 + i) for i in range(6)]
    expected = [gf.measure(model, V, b, per_instance=True).instances["risk"] for b in batches]
    got: list = [None] * len(batches)
    errors: list = []
    start = threading.Barrier(len(batches))

    def work(i):
        try:
            start.wait()
            for _ in range(2):
                got[i] = gf.measure(model, V, batches[i], per_instance=True).instances["risk"]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), i
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_a_pass_nested_in_another_on_the_same_model_is_refused():
    model = make_model("llama")
    V = _one(random_direction(model))
    batch = make_batch(model)
    inner: list = []

    def hook(mod, args, out):
        if not inner:
            inner.append(None)
            try:
                gf.measure(model, V, batch)
            except RuntimeError as e:
                inner[0] = e

    h = model.model.layers[1].register_forward_hook(hook)
    try:
        gf.measure(model, V, batch)
    finally:
        h.remove()
    assert isinstance(inner[0], RuntimeError) and "nested call" in str(inner[0]), inner


# -- 6. models that are not causal LMs -------------------------------------------------------------------------
_BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=40)


@pytest.mark.parametrize("strict", [True, False])
def test_masked_lm_is_refused(strict):
    model = tf.BertForMaskedLM(tf.BertConfig(**_BERT)).double().eval()
    V = _one(random_direction(model))
    with pytest.raises(ValueError, match="BertForMaskedLM is a masked LM"):
        gf.measure(model, V, make_batch(model), strict=strict)


def test_encoder_lm_head_without_is_decoder_is_refused_and_with_it_is_exact():
    model = tf.BertLMHeadModel(tf.BertConfig(**_BERT)).double().eval()
    V = random_direction(model)
    batch = make_batch(model)
    with pytest.raises(ValueError, match="is_decoder=True"):
        gf.measure(model, gf.Direction(V, names=["v"]), batch, strict=False)
    torch.manual_seed(0)
    model = tf.BertLMHeadModel(tf.BertConfig(**_BERT, is_decoder=True)).double().eval()
    res = gf.measure(model, gf.Direction(V, names=["v"]), {"r": batch}, per_instance=True, strict=False)
    # the prediction head registers the decoder's bias too, and has no adapter: that one goes by autograd
    _check_lenient(model, V, batch, res, ["cls.predictions.bias"])


def test_encoder_decoder_is_refused():
    cfg = tf.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, decoder_start_token_id=0
    )
    model = tf.T5ForConditionalGeneration(cfg).eval()
    V = _one(random_direction(model))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder"):
        gf.measure(model, V, make_batch(model), strict=False)


# -- 7. KeyboardInterrupt inside the embedding's forward ------------------------------------------------------
def test_keyboard_interrupt_in_the_embedding_leaves_nothing_behind():
    model = make_model("llama")
    V = _one(random_direction(model))
    emb = model.model.embed_tokens
    own = emb.forward

    def interrupted(*args, **kwargs):
        own(*args, **kwargs)
        raise KeyboardInterrupt

    emb.forward = interrupted
    flags = [p.requires_grad for p in model.parameters()]
    try:
        with pytest.raises(KeyboardInterrupt):
            gf.measure(model, V, make_batch(model, B=4))
        assert torch._C._len_torch_function_stack() == 0
        assert emb.__dict__["forward"] is interrupted  # the user's own forward is put back, not ours
    finally:
        while torch._C._len_torch_function_stack():  # what the old code left behind, so later tests run clean
            torch._C._pop_torch_function_stack()
        del emb.forward
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())
    logits = model(input_ids=torch.randint(2, VOCAB, (3, 5))).logits  # another batch size, plain forward
    assert logits.shape == (3, 5, VOCAB)


# -- 8. a model created under torch.inference_mode() ----------------------------------------------------------
def test_model_made_under_inference_mode_is_a_clear_error_and_untouched():
    with torch.inference_mode():
        model = make_model("llama")
    V = _one(random_direction(model))
    batch = make_batch(model)
    with pytest.raises(RuntimeError, match="inference tensors.*inference_mode"):
        gf.measure(model, V, batch)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():  # swapping .data is not enough: the parameters keep no version counter
        for p in model.parameters():
            p.data = p.data.clone()
    with pytest.raises(RuntimeError, match="inference tensors"):
        gf.measure(model, V, batch)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # the suggested fix
    assert gf.measure(model, V, batch).total["risk"] == pytest.approx(
        gf.measure(make_model("llama"), V, batch).total["risk"], rel=1e-12
    )


def test_inference_mode_around_the_call_is_a_clear_error_and_its_batches_are_fine():
    model = make_model("llama")
    V = _one(random_direction(model))
    with torch.inference_mode():
        batch = make_batch(model)
        with pytest.raises(RuntimeError, match="needs autograd, which torch.inference_mode"):
            gf.measure(model, V, batch)
    assert all(p.requires_grad for p in model.parameters())
    assert gf.measure(model, V, batch).total["risk"] == pytest.approx(
        gf.measure(model, V, make_batch(model)).total["risk"], rel=1e-12
    )


def test_frozen_reference_model_made_under_inference_mode_is_fine():
    """Only what autograd must differentiate is refused: NPO's frozen reference may be an inference model."""
    model = make_model("llama")
    with torch.inference_mode():
        ref = make_model("llama", seed=1)
    for p in ref.parameters():
        p.requires_grad_(False)
    batch = make_batch(model)
    npo = gf.objectives.get("npo")
    v = gf.Direction.from_objective(model, npo, batch, ref_model=ref)
    with torch.no_grad():
        plain_ref = make_model("llama", seed=1)
    w = gf.Direction.from_objective(model, npo, batch, ref_model=plain_ref)
    for n in v.keys():
        assert torch.equal(v.tensor(n), w.tensor(n)), n


def test_restore_never_hides_the_original_error(monkeypatch):
    """A failure while putting the state back must not replace the error that stopped the pass."""
    model = make_model("llama")
    V = _one(random_direction(model))
    batch = make_batch(model)
    batch["input_ids"][0, 0] = 10_000  # the real error: an id outside the table

    def broken(state):
        raise RuntimeError("cannot restore the RNG")

    monkeypatch.setattr(torch.random, "set_rng_state", broken)
    with pytest.raises(IndexError):
        gf.measure(model, V, batch)
    monkeypatch.undo()
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


# -- 9. autocast, no_grad, non-finite activations, a batch without labels --------------------------------------
def test_inside_no_grad_equals_outside():
    model = make_model("llama")
    V = gf.Direction(random_direction(model), names=["v"])
    batch = make_batch(model)
    with torch.no_grad():
        inside = gf.measure(model, V, batch, per_instance=True)
        v_inside = gf.Direction.from_objective(model, gf.objectives.get("ga"), batch)
    assert torch.is_grad_enabled()
    v_outside = gf.Direction.from_objective(model, gf.objectives.get("ga"), batch)
    assert all(torch.equal(v_inside.tensor(n), v_outside.tensor(n)) for n in v_outside.keys())
    outside = gf.measure(model, V, batch, per_instance=True)
    assert torch.equal(inside.instances["risk"], outside.instances["risk"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_under_autocast_matches_plain_autograd_under_the_same_autocast(family):
    """An fp32 model under CPU bf16 autocast, as a mixed-precision training loop runs it: our per-instance
    values against per-sample autograd under the same autocast, within that autocast's own rounding (the
    distance of either from the fp32 oracle)."""
    model = make_model(family, dtype=torch.float32)
    V = random_direction(model, dtype=torch.float32)
    batch = make_batch(model)
    grouping = _groups(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = gf.measure(model, gf.Direction(V, names=["v"]), {"r": batch}, per_instance=True)
        e_ac, _ = oracle(model, V, batch, grouping.of, len(grouping))
    e_32, _ = oracle(model, V, batch, grouping.of, len(grouping))
    ours = res.instances["r"]
    rounding = ((e_ac - e_32).abs().amax(1) / e_32.abs().amax(1)).max().item()
    assert rounding > 1e-4  # autocast did round: the check below is not trivially fp32 against fp32
    assert_close_per_group(ours, e_ac, 2 * rounding, f"{family} autocast vs autograd under autocast")
    assert res.meta["dtype"] == "float32"


def test_non_finite_activations_are_named_as_such():
    model = make_model("llama")
    V = _one(random_direction(model))
    batch = make_batch(model)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"input_layernorm' \(LlamaRMSNorm\) saw NaN or inf in every row"):
        gf.measure(model, V, batch)
    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[batch["input_ids"][0, 3]] = float("nan")  # one token's row only
    with pytest.raises(ValueError, match="risk set 'risk': the risk is not finite"):
        gf.measure(model, V, batch)


def test_from_objective_without_labels_names_the_missing_key():
    model = make_model("llama")
    batch = make_batch(model)
    del batch["labels"]
    with pytest.raises(KeyError, match=r"objective 'ga' looked up 'labels'.*keys input_ids, attention_mask"):
        gf.Direction.from_objective(model, gf.objectives.get("ga"), batch)
    with pytest.raises(KeyError, match=r"looked up 'labels'.*forget: keys input_ids"):
        gf.Direction.from_objective(
            model, gf.objectives.get("ga", retain="gd"), {"forget": batch, "retain": make_batch(model)}
        )


# -- 10. (the Tracker's part) a log file that already holds records --------------------------------------------
def test_tracker_refuses_to_truncate_an_existing_log(tmp_path):
    model = make_model("llama")
    log = tmp_path / "g.jsonl"
    log.write_text('{"step": 0}\n')
    with pytest.raises(FileExistsError, match="g.jsonl exists and holds records"):
        gf.Tracker(model, {"unlearn": make_batch(model)}, log=log)
    assert log.read_text() == '{"step": 0}\n'
    log.write_text("")  # an empty file is a fine place to start
    gf.Tracker(model, {"unlearn": make_batch(model)}, log=log)
