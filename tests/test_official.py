"""Where we say "official", we are: each convention against a literal re-statement of the official G-effect code
(tmlr-group/G-effect: ``dataloader.py``, ``dataloader_ge.py``, ``data_module_ge.py``, ``config/model_config.yaml``).

The ``official_*`` functions below re-state those formulas in the official code's own terms (its shifts,
``CrossEntropyLoss``, ``kl_div``, hyper-parameter fall-backs and name loops); nothing here calls the library's
formula code. Every default checked here differed before (NPO β 0.1, WGA α 1, TNPO β 0.1, WTNPO (0.1, 1),
RMU c 6.5 with an L1 distance, KL over labelled positions in float32, "Answer: " masked, answers never cut,
the final norm always in ``deep``), so these tests fail on the old defaults.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FixedLogits, make_batch, make_model, narrow_llama
from torch import nn
from torch.nn import CrossEntropyLoss

import geffect_fast as gf
from geffect_fast import data
from geffect_fast import objectives as O
from geffect_fast.groups import assign


def _setup(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100  # a masked prompt
    labels[1, 5:] = -100  # right padding
    labels[2, :3] = -100
    batch = {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}
    ref = FixedLogits(logits + 0.7 * torch.randn(B, T, V, generator=g, dtype=torch.float64))
    return FixedLogits(logits), ref, batch


# -- the official code, re-stated ----------------------------------------------------------------------------------
def hf_loss(logits, labels):
    """HF causal-LM ``outputs.loss``: token mean of the shifted cross-entropy."""
    sl, sh = logits[..., :-1, :].contiguous(), labels[..., 1:].contiguous()
    return CrossEntropyLoss(ignore_index=-100)(sl.view(-1, sl.size(-1)), sh.view(-1))


def get_batch_loss(output, labels):  # data_module.py
    shifted_labels = labels[..., 1:].contiguous()
    output = output[..., :-1, :].contiguous()
    loss_function = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss_function(output.transpose(-1, -2), shifted_labels).sum(dim=-1)


def official_npo(logits, ref_logits, labels, hyper_param="None"):
    beta = hyper_param if hyper_param != "None" else 0.5
    neg_log_ratios = get_batch_loss(logits, labels) - get_batch_loss(ref_logits, labels)
    return -F.logsigmoid(beta * neg_log_ratios).mean() * 2 / beta


def _token_ce(logits, labels):
    shift_labels = labels[..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    ce = CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1)
    )
    return ce, shift_labels


def official_tnpo(logits, ref_logits, labels, hyper_param="None"):
    beta = hyper_param if hyper_param != "None" else 4
    ce, shift_labels = _token_ce(logits, labels)
    ce_oracle, _ = _token_ce(ref_logits, labels)
    probs, probs_oracle = (-ce).exp().detach(), (-ce_oracle).exp().detach()
    npo_weights = 2 * probs**beta / (probs**beta + probs_oracle**beta + 1e-5)
    return -(npo_weights * ce)[shift_labels.view(-1) != -100].mean()


def official_wtnpo(logits, ref_logits, labels, loss_type="wtnpo_", hyper_param="None"):
    beta = hyper_param if hyper_param != "None" else 4
    try:
        alpha = float(loss_type.split("_")[1])
    except ValueError:
        alpha = 1.5
    ce, shift_labels = _token_ce(logits, labels)
    ce_oracle, _ = _token_ce(ref_logits, labels)
    probs, probs_oracle = (-ce).exp().detach(), (-ce_oracle).exp().detach()
    npo_weights = 2 * probs ** (beta + alpha) / (probs**beta + probs_oracle**beta + 1e-5)
    return -(npo_weights * ce)[shift_labels.view(-1) != -100].mean()


def official_wga(logits, labels, hyper_param="None"):
    beta = hyper_param if hyper_param != "None" else 5
    lm_loss, shift_labels = _token_ce(logits, labels)
    weights = (-lm_loss).exp().detach() ** beta
    return -(weights * lm_loss)[shift_labels.view(-1) != -100].mean()


def official_kl(logits, ref_logits):
    """The ``KL``/``*_kl`` retain term."""
    retain_probs = F.log_softmax(ref_logits, dim=-1).view(-1, ref_logits.shape[-1])
    current_probs = F.log_softmax(logits, dim=-1).view(-1, logits.shape[-1])
    return nn.functional.kl_div(current_probs, retain_probs, reduction="batchmean", log_target=True)


def official_rmu(hidden_states, labels, emb_idx, rmu_noise, hyper_param="None"):
    c = hyper_param if hyper_param != "None" else 2
    emb_tar = rmu_noise * c
    h = hidden_states[emb_idx][..., :-1, :]
    emb_dif = ((h - emb_tar[0, 0, : h.size(-1)]) ** 2).mean(-1)
    return emb_dif[labels[..., 1:] != -100].mean()


def _grad(loss, model):
    return torch.autograd.grad(loss, [model.logits])[0]


# -- objectives ---------------------------------------------------------------------------------------------------
def test_weighted_objectives_at_official_defaults():
    """NPO β 0.5, TNPO β 4, WTNPO (4, 1.5), WGA α 5: loss and gradient equal the official branches'."""
    for seed in range(3):
        model, ref, batch = _setup(seed)
        lg, rl, lab = model.logits, ref.logits.detach(), batch["labels"]
        for name, want in (
            ("npo", official_npo(lg, rl, lab)),
            ("tnpo", official_tnpo(lg, rl, lab)),
            ("wtnpo", official_wtnpo(lg, rl, lab)),
            ("wga", official_wga(lg, lab)),
        ):
            got = O.get(name)(model, batch, ref)
            assert torch.allclose(got, want, rtol=1e-12, atol=0), name
            assert torch.allclose(_grad(got, model), _grad(want, model), rtol=1e-10, atol=1e-15), name
    # the name-parsed α of ``wtnpo_<α>`` and an explicit hyper_param map onto our hyper-parameters
    assert torch.allclose(
        O.get("wtnpo", beta=2.0, alpha=0.5)(model, batch, ref),
        official_wtnpo(lg, rl, lab, loss_type="wtnpo_0.5", hyper_param=2.0),
        rtol=1e-12,
    )


def test_ga_gd_idkpo_are_hf_token_means():
    model, ref, batch = _setup(4)
    _, _, retain = _setup(5)
    retain_model = model  # the same parameters see both batches
    lg, lab = model.logits, batch["labels"]
    assert torch.allclose(O.get("ga")(model, batch), -hf_loss(lg, lab), rtol=1e-12)
    # gd: forget_loss + gd_coef * retain_loss, gd_coef = 1
    want = -hf_loss(lg, lab) + 1 * hf_loss(retain_model.logits, retain["labels"])
    assert torch.allclose(O.get("gd")(model, {"forget": batch, "retain": retain}), want, rtol=1e-12)
    assert torch.allclose(O.get("idkpo")(model, {"forget": batch, "idk": retain}), hf_loss(lg, retain["labels"]))


def test_kl_retain_term_is_the_official_batchmean_over_all_positions():
    """KL(p_ref ‖ p_θ) averaged over all B·T positions (prompt, padding, last position), in float64 here."""
    model, ref, batch = _setup(6)
    _, _, forget = _setup(7)
    both = {"forget": forget, "retain": batch}
    want_kl = official_kl(model.logits, ref.logits.detach())
    got = O.get("ga", retain="kl")(model, both, ref) - O.get("ga")(model, forget)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want_kl, rtol=1e-12, atol=0)
    kl = O.kl_to_reference(model, ref, batch)
    assert torch.allclose(_grad(kl, model), _grad(want_kl, model), rtol=1e-10, atol=1e-16)
    # NPO+KL: NPO at β 0.5 plus the KL at weight 1 (not the official npo_kl's β-scaled KL: see objectives.py)
    npo_kl = O.get("npo", retain="kl")(model, {"forget": forget, "retain": batch}, ref)
    want = official_npo(model.logits, ref.logits.detach(), forget["labels"]) + want_kl
    assert torch.allclose(npo_kl, want, rtol=1e-12)
    # ours, kept as an option: the labelled (shifted) positions only — a different number
    lp, lq = F.log_softmax(ref.logits[:, :-1], -1), F.log_softmax(model.logits[:, :-1], -1)
    mask = batch["labels"][:, 1:] != -100
    labelled = ((lp.exp() * (lp - lq)).sum(-1) * mask).sum() / mask.sum()
    assert torch.allclose(O.kl_to_reference(model, ref, batch, "labelled"), labelled, rtol=1e-12)
    assert not torch.allclose(labelled, want_kl, rtol=1e-3)
    with pytest.raises(ValueError, match="kl_positions"):
        O.get("ga", retain="kl", kl_positions="prompt")


def test_kl_in_float32_models_stays_float32():
    model, ref, batch = _setup(8)
    model, ref = model.float(), ref.float()
    want = official_kl(model.logits, ref.logits.detach())
    got = O.kl_to_reference(model, ref, batch)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5)


def test_rmu_official_squared_distance_and_c():
    """rmu_<layer>: ((h[..., :-1, :] − c·u) ** 2).mean(-1) over positions with a valid next label, c = 2."""
    model = make_model("llama")
    batch = make_batch(model)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    for layer in (1, 2, -1):
        obj = O.get("rmu", layer=layer, seed=3)
        d = out.hidden_states[layer].shape[-1]
        u = obj.target(d, "cpu", torch.float64) / obj.hp["c"]
        noise = torch.zeros(1, 1, 4096, dtype=torch.float64)
        noise[0, 0, :d] = u  # the official draws (1, 1, 4096) and cuts it to the hidden size
        want = official_rmu(out.hidden_states, batch["labels"], layer, noise)
        got = obj(model, batch)
        assert obj.hp["c"] == 2 and obj.hp["distance"] == "mse"
        assert torch.allclose(got, want, rtol=1e-12), layer
    # ours, kept as an option: the L1 distance (the official code has it only in commented-out lines)
    l1 = O.get("rmu", layer=1, seed=3, distance="l1")(model, batch)
    h = out.hidden_states[1][:, :-1]
    mask = batch["labels"][:, 1:] != -100
    assert torch.allclose(l1, (h - 2 * u).abs().mean(-1)[mask].mean(), rtol=1e-12)
    assert not torch.allclose(l1, O.get("rmu", layer=1, seed=3)(model, batch), rtol=1e-3)


def test_defaults_table():
    """The documented defaults (objectives.py, README): the official training code's where it has one."""
    assert O.get("npo").hp == {"beta": 0.5}
    assert O.get("wga").hp == {"alpha": 5.0}
    assert O.get("tnpo").hp == {"beta": 4.0}
    assert O.get("wtnpo").hp == {"beta": 4.0, "alpha": 1.5}
    assert O.get("rmu").hp == {"layer": -1, "c": 2.0, "seed": 0, "distance": "mse"}
    assert O.get("gd").retain_weight == 1.0 and O.get("npo", retain="kl").retain_weight == 1.0
    assert O.get("npo", retain="kl").kl_positions == "all"


# -- data ---------------------------------------------------------------------------------------------------------
MODEL_CONFIGS = {  # config/model_config.yaml
    "llama2": ("[INST] ", " [/INST]", ""),
    "phi": ("Question: ", "\n", "Answer: "),
}


def official_convert(tokenizer, max_length, question, answer, model_configs):
    """data_module.py ``convert_raw_data_to_model_format``."""
    question_start_token, question_end_token, answer_token = model_configs
    new_question = question_start_token + question + question_end_token
    new_answer = answer_token + answer
    full_text = new_question + new_answer
    num_question_tokens = len(tokenizer.tokenize(new_question, add_special_tokens=True))
    encoded = tokenizer(full_text, add_special_tokens=True, max_length=max_length, truncation=True)
    pad_length = max_length - len(encoded.input_ids)
    pad_input_ids = encoded["input_ids"] + [tokenizer.eos_token_id] * pad_length
    pad_attention_mask = encoded["attention_mask"] + [0] * pad_length
    if len(encoded.input_ids) == max_length:
        label = encoded.input_ids
    else:
        label = encoded["input_ids"] + [tokenizer.eos_token_id] + [-100] * (pad_length - 1)
    for i in range(num_question_tokens):
        label[i] = -100
    return pad_input_ids, label, pad_attention_mask


@pytest.fixture(scope="module")
def tok():
    return data.build_tokenizer()


@pytest.mark.parametrize("prompt", ["llama2", "phi"])
@pytest.mark.parametrize("max_length", [64, 28, 20])
def test_encode_qa_as_the_official_data_module(tok, prompt, max_length):
    """Labels, and the ids of every attended position, equal the official code's: "Answer: " labelled for phi,
    the whole text cut at max_length (answer included), the EOS labelled only where there is room."""
    recs = [
        {"question": "Where was Aria Vell born?", "answer": "Aria Vell was born in Tarsk."},
        {"question": "What does Corin Quist write, and for whom?", "answer": "Corin Quist writes comic verse, mostly."},
    ]
    # our tokenizer adds no BOS (as the official code's tokenizer(add_special_tokens=True) here)
    b = data.encode_qa(recs, tok, prompt=prompt, max_length=max_length, add_bos=False, padding="max_length")
    assert b["input_ids"].shape == (2, max_length)
    cut = False
    for i, r in enumerate(recs):
        ids, lab, att = official_convert(tok, max_length, r["question"], r["answer"], MODEL_CONFIGS[prompt])
        assert b["labels"][i].tolist() == lab, (prompt, max_length, i)
        attended = [j for j, m in enumerate(att) if m]
        assert [b["input_ids"][i, j].item() for j in attended] == [ids[j] for j in attended]
        cut |= len(attended) == max_length
    if max_length < 64:
        assert cut  # the truncating case is exercised
    if prompt == "phi":
        first = b["labels"][0][b["labels"][0] != -100].tolist()
        assert tok.decode(first).startswith("Answer: ")  # "Answer: " is labelled


def test_phi_masked_and_prompt_truncation_keep_the_old_behaviour(tok):
    r = {"question": "Where was Aria Vell born?", "answer": "Aria Vell was born in Tarsk."}
    b = data.encode_qa([r], tok, prompt="phi_masked")
    a = tok(r["answer"], add_special_tokens=False)["input_ids"]
    assert b["labels"][0][b["labels"][0] != -100].tolist() == a + [tok.eos_token_id]
    with pytest.raises(ValueError, match="prompt fills max_length"):
        data.encode_qa([{"question": "Tell me " + "very " * 30 + "much?", "answer": "No."}], tok, max_length=10)


# -- groups -------------------------------------------------------------------------------------------------------
def official_keys(named_parameter_names):
    """dataloader_ge.py ``gradient_unlearn_effect``'s bucket of each parameter (names as DDP gives them)."""
    keys = {}
    key = None
    for name in named_parameter_names:
        if "model.embed_tokens" in name:
            key = "embed"
        if "module.model.layers." in name:
            if int(name.split(".")[3]) < 10:
                key = "module1"
            elif int(name.split(".")[3]) < 20:
                key = "module2"
            else:
                key = "module3"
        elif "lm_head" in name:
            key = "lm"
        keys[name] = key
    return keys


@pytest.mark.parametrize("layers", [4, 12, 22, 30])
def test_paper_groups_are_the_official_buckets(layers):
    model = narrow_llama(layers)
    names = [n for n, _ in model.named_parameters()]
    g = assign(model, "paper", names)
    rename = {"module1": "shallow", "module2": "middle", "module3": "deep", "embed": "embed", "lm": "lm"}
    official = official_keys([f"module.{n}" for n in names])
    for n in names:
        assert g.names[g.of[n]] == rename[official[f"module.{n}"]], n
    if layers == 4:  # the final norm follows the last block: shallow, not deep
        assert g.names[g.of["model.norm.weight"]] == "shallow"


# -- smoothing ----------------------------------------------------------------------------------------------------
def test_smoothed_tracker_is_the_official_smoothed_g_effect():
    """``*_gradient_fcn`` (ḡ = g, then ḡ ← .6·ḡ + .4·g, flattened) and ``gradient_unlearn_effect`` /
    ``gradient_retain_effect`` (Σ over each bucket's parameters of ⟨ḡ_obj, ḡ_R⟩), at every step of a run."""
    model = make_model(
        "llama", num_hidden_layers=22, hidden_size=8, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1
    )
    forget, retain = make_batch(model, seed=1), make_batch(model, seed=2)
    probes = {"unlearn": forget, "retain": retain}
    objective = O.get("npo")
    ref = copy.deepcopy(model)
    tr = gf.Tracker(model, probes, groups="paper", smooth=True, name="NPO")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    objective_dict, unlearn_dict, retain_dict = {}, {}, {}

    def gradient_fcn(store, grads):
        for name, g in grads.items():
            if name not in store:
                store[name] = g.view(-1).clone()
            else:
                store[name] = 0.6 * store[name] + 0.4 * g.view(-1)

    def effect(store):
        keys = official_keys(f"module.{n}" for n in store)
        ll_ge = {}
        for name in objective_dict:
            layer_ge = (objective_dict[name] * store[name]).sum()
            key = keys[f"module.{name}"]
            ll_ge[key] = ll_ge.get(key, 0.0) + layer_ge.item()
        return sum(ll_ge.values()), ll_ge

    params = dict(model.named_parameters())
    for _ in range(4):
        loss = objective(model, forget, ref)
        opt.zero_grad()
        loss.backward()
        gradient_fcn(objective_dict, {n: p.grad for n, p in params.items()})
        for store, batch in ((unlearn_dict, forget), (retain_dict, retain)):
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
            grads = torch.autograd.grad(hf_loss(out.logits, batch["labels"]), list(params.values()))
            gradient_fcn(store, dict(zip(params, grads)))
        want = {"unlearn": effect(unlearn_dict), "retain": effect(retain_dict)}
        with tr.step(opt, loss=loss):
            opt.step()
        rename = {"module1": "shallow", "module2": "middle", "module3": "deep", "embed": "embed", "lm": "lm"}
        for rec in tr.records[-2:]:
            total, groups = want[rec["risk"]]
            assert rec["smoothed_total"] == pytest.approx(total, rel=1e-10, abs=1e-14)
            assert rec["smoothed_groups"] == pytest.approx(
                {rename[k]: v for k, v in groups.items()}, rel=1e-9, abs=1e-14
            )
