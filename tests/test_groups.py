"""Grouping: the block layout of each family, the paper's five buckets, modules, callables, and wrapped
names (DDP ``module.``, PEFT ``base_model.model.``)."""

import pytest
import torch
from helpers import ALL_FAMILIES, assert_close_per_group, make_batch, make_model, narrow_llama, oracle, random_direction

import geffect_fast as gf
from geffect_fast.groups import assign, find_layout

EXPECTED = {
    # family: (embed params, final-norm params, lm_head params)
    "llama": ({"model.embed_tokens.weight"}, {"model.norm.weight"}, {"lm_head.weight"}),
    "gpt2": (
        {"transformer.wte.weight", "transformer.wpe.weight"},
        {"transformer.ln_f.weight", "transformer.ln_f.bias"},
        set(),
    ),
    "qwen2": ({"model.embed_tokens.weight"}, {"model.norm.weight"}, set()),
    "phi": (
        {"model.embed_tokens.weight"},
        {"model.final_layernorm.weight", "model.final_layernorm.bias"},
        {"lm_head.weight", "lm_head.bias"},
    ),
    "gemma": ({"model.embed_tokens.weight"}, {"model.norm.weight"}, set()),
    "gpt_neox": (
        {"gpt_neox.embed_in.weight"},
        {"gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"},
        {"lm_head.weight"},
    ),  # transformers 5 names it lm_head (embed_out before)
    "opt": (
        {"model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"},
        {"model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"},
        set(),
    ),
    "mistral": ({"model.embed_tokens.weight"}, {"model.norm.weight"}, {"lm_head.weight"}),
    "qwen3": ({"model.embed_tokens.weight"}, {"model.norm.weight"}, set()),
    "phi3": ({"model.embed_tokens.weight"}, {"model.norm.weight"}, {"lm_head.weight"}),
}


@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_block_layout(family):
    model = make_model(family)
    names = [n for n, _ in model.named_parameters()]
    g = assign(model, "block", names)
    embed, final, head = EXPECTED[family]
    expected_groups = ["embed", "block.0", "block.1", "final_norm"] + (["lm_head"] if head else [])
    assert list(g.names) == expected_groups
    by = {n: g.names[i] for n, i in g.of.items()}
    assert {n for n, x in by.items() if x == "embed"} == embed
    assert {n for n, x in by.items() if x == "final_norm"} == final
    assert {n for n, x in by.items() if x == "lm_head"} == head
    layers = find_layout(model)
    assert layers.n_blocks == 2
    for n, x in by.items():
        if x.startswith("block."):
            assert f".{x.split('.')[1]}." in n


def test_paper_buckets_on_a_deep_model():
    model = make_model(
        "llama", num_hidden_layers=24, hidden_size=8, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1
    )
    names = [n for n, _ in model.named_parameters()]
    g = assign(model, "paper", names)
    assert g.names == ("embed", "shallow", "middle", "deep", "lm")
    by = {n: g.names[i] for n, i in g.of.items()}
    assert by["model.layers.9.mlp.up_proj.weight"] == "shallow"
    assert by["model.layers.10.mlp.up_proj.weight"] == "middle"
    assert by["model.layers.19.input_layernorm.weight"] == "middle"
    assert by["model.layers.20.self_attn.o_proj.weight"] == "deep"
    assert by["model.norm.weight"] == "deep"
    assert by["lm_head.weight"] == "lm"
    assert by["model.embed_tokens.weight"] == "embed"


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 7, 22, 30])
def test_thirds_split_any_depth(layers):
    model = narrow_llama(layers)
    names = [n for n, _ in model.named_parameters()]
    g = assign(model, "thirds", names)
    by = {n: g.names[i] for n, i in g.of.items()}
    depth = [by[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(layers)]
    for i, d in enumerate(depth):  # block i in the third its middle falls in
        third = int(3 * (i + 0.5) / layers)
        assert d == ("shallow", "middle", "deep")[third]
    sizes = [depth.count(d) for d in ("shallow", "middle", "deep") if d in depth]
    assert max(sizes) - min(sizes) <= 1
    assert depth.count("shallow") == depth.count("deep")  # symmetric
    assert by["model.norm.weight"] == depth[-1] and by["model.embed_tokens.weight"] == "embed"
    assert by["lm_head.weight"] == "lm"
    assert g.names == ("embed", *dict.fromkeys(depth), "lm")
    if layers == 30:  # the paper's own buckets where the paper's depth is
        assert g.of == assign(model, "paper", names).of
    if layers >= 2:
        assert depth[0] == "shallow" and depth[-1] == "deep"


def test_module_and_callable_schemes():
    model = make_model("gpt2")
    names = [n for n, _ in model.named_parameters()]
    g = assign(model, "module", names)
    assert "transformer.h.1.attn.c_attn" in g.names
    assert g.of["transformer.h.1.attn.c_attn.bias"] == g.of["transformer.h.1.attn.c_attn.weight"]
    g = assign(model, lambda n: "bias" if n.endswith("bias") else "weight", names)
    assert g.names == ("weight", "bias")
    with pytest.raises(ValueError, match="returned None"):
        assign(model, lambda n: None, names)


def test_ddp_wrapped_model_and_prefixed_direction(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = make_model("gpt2")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        V = {f"module.{n}": t[0] for n, t in random_direction(model).items()}  # names as a DDP state dict has them
        batch = make_batch(model)
        res = gf.measure(ddp, V, {"r": batch}, per_instance=True)
        plain = gf.measure(model, {n[len("module.") :]: t for n, t in V.items()}, {"r": batch}, per_instance=True)
        assert res.groups == plain.groups and res.groups[1] == "block.0"
        assert torch.equal(res.per_instance["r"], plain.per_instance["r"])
        # grouping a wrapper's own names still finds the blocks
        g = assign(ddp, "paper", [n for n, _ in ddp.named_parameters()])
        assert g.names == ("embed", "shallow")  # 2 blocks: the final norm follows the last block, into shallow
    finally:
        dist.destroy_process_group()


def test_peft_lora_names_groups_and_values():
    peft = pytest.importorskip("peft", reason="peft is in the test extras; install with pip install '.[test]'")
    base = make_model("llama")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    model = peft.get_peft_model(base, cfg).double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    batch = make_batch(base)
    gf.risk(model, batch).backward()
    v = gf.Direction.from_grads(model)
    res = gf.measure(model, v, {"r": batch}, per_instance=True)
    assert res.groups == ("embed", "block.0", "block.1", "final_norm", "lm_head")
    # the frozen base is outside the direction: only the blocks, where the adapters live, carry an effect
    assert res.by_group["r"]["embed"] == res.by_group["r"]["lm_head"] == 0.0
    assert res.by_group["r"]["block.0"] != 0.0
    grouping = assign(model, "block", [n for n, _ in model.named_parameters()])
    V = {n: v.tensor(n) for n in v.keys()}
    e, _ = oracle(model, V, batch, grouping.of, len(grouping))
    assert_close_per_group(res.instances["r"][:, :, 1:3], e[:, :, 1:3], 1e-6, "LoRA")
