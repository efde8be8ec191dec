"""Tiny models of several families, batches with padding and masked prompts, and the float64 oracle."""

from __future__ import annotations

import torch
import transformers as tf
from torch import Tensor, nn

from geffect_fast import groups as groups_mod
from geffect_fast.loss import forward_logits, sample_nll

VOCAB = 61  # odd on purpose

# name -> (config class, kwargs); dropout 0 so train-mode checks are deterministic
FAMILIES: dict[str, tuple[type, dict]] = {
    "llama": (
        tf.LlamaConfig,
        dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    ),
    "gpt2": (
        tf.GPT2Config,
        dict(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=1,
        ),
    ),
    "qwen2": (
        tf.Qwen2Config,
        dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "phi": (
        tf.PhiConfig,
        dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        ),
    ),
    "gemma": (
        tf.GemmaConfig,
        dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
        ),
    ),
    "gpt_neox": (
        tf.GPTNeoXConfig,
        dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        ),
    ),
    "opt": (
        tf.OPTConfig,
        dict(
            hidden_size=32,
            ffn_dim=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=1,
        ),
    ),
}
# a few more layouts, for grouping and a wider oracle sweep
EXTRA_FAMILIES: dict[str, tuple[type, dict]] = {
    "mistral": (
        tf.MistralConfig,
        dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    "qwen3": (
        tf.Qwen3Config,
        dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=True,
        ),
    ),
    "phi3": (
        tf.Phi3Config,
        dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        ),
    ),
}
ALL_FAMILIES = {**FAMILIES, **EXTRA_FAMILIES}

_H = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4)
_NO_DROP = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# the rest of the property suite's causal-LM families (tests/test_property.py). Families whose HF code has no
# sdpa attention run eager; in float64 eager attention is NaN at left-padded positions (a transformers quirk
# that breaks plain autograd too), so those are measured with right padding only (EAGER).
MORE_FAMILIES: dict[str, tuple[type, dict]] = {
    "gemma2": (tf.Gemma2Config, dict(_H, num_key_value_heads=2, head_dim=8, attn_implementation="eager")),
    "gemma3": (tf.Gemma3TextConfig, dict(_H, num_key_value_heads=2, head_dim=8, sliding_window=4)),
    "bloom": (
        tf.BloomConfig,
        dict(
            hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0, attn_implementation="eager"
        ),
    ),
    "gptj": (tf.GPTJConfig, dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, **_NO_DROP)),
    "gpt_neo": (
        tf.GPTNeoConfig,
        dict(
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            resid_dropout=0.0,
            embed_dropout=0.0,
            attention_dropout=0.0,
            attn_implementation="eager",
        ),
    ),
    "codegen": (
        tf.CodeGenConfig,
        dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, n_ctx=64, **_NO_DROP),
    ),
    "gpt_bigcode": (
        tf.GPTBigCodeConfig,
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True, **_NO_DROP),
    ),
    "stablelm": (tf.StableLmConfig, dict(_H, num_key_value_heads=2, partial_rotary_factor=0.5)),
    "olmo": (tf.OlmoConfig, dict(_H, num_key_value_heads=2)),
    "olmo2": (tf.Olmo2Config, dict(_H, num_key_value_heads=2)),
    "olmo3": (tf.Olmo3Config, dict(_H, num_key_value_heads=2)),
    "starcoder2": (tf.Starcoder2Config, dict(_H, num_key_value_heads=2, residual_dropout=0.0, embedding_dropout=0.0)),
    "granite": (tf.GraniteConfig, dict(_H, num_key_value_heads=2)),
    "persimmon": (tf.PersimmonConfig, dict(_H)),
    "biogpt": (
        tf.BioGptConfig,
        dict(_H, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, activation_dropout=0.0),
    ),
    "mpt": (tf.MptConfig, dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, attn_implementation="eager")),
    "glm": (tf.GlmConfig, dict(_H, num_key_value_heads=2, head_dim=8, pad_token_id=0)),
    "helium": (tf.HeliumConfig, dict(_H, num_key_value_heads=2, head_dim=8)),
    "smollm3": (tf.SmolLM3Config, dict(_H, num_key_value_heads=2, pad_token_id=0)),
    # covered by adapters of their own: FalconLinear (capture/linear.py), CohereLayerNorm (capture/norm.py)
    "falcon": (
        tf.FalconConfig,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2),
    ),
    "cohere": (tf.CohereConfig, dict(_H, num_key_value_heads=2, use_qk_norm=True)),
}
EAGER = {f for f, (_, kw) in MORE_FAMILIES.items() if kw.get("attn_implementation") == "eager"}
# fused-expert MoE families (capture/moe.py): experts and top-k routers measured per sample. Eager experts: the
# grouped_mm/batched_mm implementations have no float64 (tests/test_moe.py runs them in float32)
_MOE = dict(_H, num_key_value_heads=2, num_experts_per_tok=2, experts_implementation="eager")
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
MOE_FAMILIES: dict[str, tuple[type, dict]] = {
    "mixtral": (tf.MixtralConfig, dict(_MOE, num_local_experts=4)),
    "qwen2_moe": (
        tf.Qwen2MoeConfig,
        dict(_MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    ),
    "qwen3_moe": (tf.Qwen3MoeConfig, dict(_MOE, num_experts=4, moe_intermediate_size=16, head_dim=8)),
    "olmoe": (tf.OlmoeConfig, dict(_MOE, num_experts=4, pad_token_id=1, eos_token_id=2)),
    "deepseek_v3": (
        tf.DeepseekV3Config,
        dict(
            _MOE,
            num_key_value_heads=4,
            n_routed_experts=8,
            moe_intermediate_size=16,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_shared_experts=1,
            rope_parameters=_ROPE,  # the default YaRN scaling of a 163k context does not fit a 64-position model
        ),
    ),
    "granitemoe": (tf.GraniteMoeConfig, dict(_MOE, num_local_experts=4)),
    "phimoe": (tf.PhimoeConfig, dict(_MOE, num_local_experts=4)),
}
# MoE families with other layers no adapter covers (gpt-oss's attention sinks, Jamba's Mamba mixers): their experts
# and routers per sample, the rest by autograd under strict=False (tests/test_moe.py)
MOE_PARTLY: dict[str, tuple[type, dict]] = {
    "gpt_oss": (
        tf.GptOssConfig,
        dict(_MOE, num_local_experts=4, head_dim=8, sliding_window=8, attn_implementation="eager"),
    ),
    "jamba": (
        tf.JambaConfig,
        dict(
            _MOE,
            num_experts=4,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
        ),
    ),
}
_CONFIGS = {**ALL_FAMILIES, **MORE_FAMILIES, **MOE_FAMILIES, **MOE_PARTLY}


def make_model(
    family: str, dtype: torch.dtype = torch.float64, seed: int = 0, layers: int | None = None, **overrides
) -> nn.Module:
    """A tiny randomly initialised causal LM of ``family`` (eval mode); ``layers`` blocks if given."""
    cls, kw = _CONFIGS[family]
    kw = {"attn_implementation": "sdpa", **kw, **overrides}
    cfg = cls(vocab_size=VOCAB, max_position_embeddings=64, **kw)
    if layers is not None:
        cfg.num_hidden_layers = layers  # HF configs map it to their own name (n_layer, num_layers, ...)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    # norms start at exactly 1 (or 0 for Gemma) and biases at 0: randomise them so every term is exercised
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def pad_id(model: nn.Module) -> int:
    pid = getattr(model.config, "pad_token_id", None)
    return 0 if pid is None else int(pid)


def make_batch(
    model: nn.Module,
    B: int = 4,
    T: int = 9,
    side: str = "right",
    seed: int = 1,
    empty_sample: bool = False,
) -> dict[str, Tensor]:
    """Random ids; sample lengths vary (padding on ``side``); the first 2–3 tokens of each sample are a
    masked prompt. With ``empty_sample`` the last sample has no labelled token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    for b in range(B):
        length = T - (b % 3)
        prompt = 2 + (b % 2)
        if side == "right":
            mask[b, length:] = 0
            labels[b, length:] = -100
            labels[b, :prompt] = -100
        else:
            mask[b, : T - length] = 0
            labels[b, : T - length + prompt] = -100
    ids[mask == 0] = pad_id(model)
    if empty_sample:
        labels[-1] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def random_direction(
    model: nn.Module, K: int = 1, seed: int = 2, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """name -> [K, *shape] random normal tensors (never zeros) for every parameter."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn((K, *p.shape), generator=g, dtype=torch.float64).to(dtype or p.dtype)
        for n, p in model.named_parameters()
    }


def add_group_dots(e: Tensor, g: Tensor, v: Tensor, cols: int | tuple[int, ...]) -> None:
    """e[k, col] += ⟨g, v_k⟩ in float64 for each of the K directions of ``v`` [K, *shape]; where ``cols`` is a
    tuple, slice i of the first dimension goes to column cols[i] (MoE experts)."""
    for k in range(v.shape[0]):
        if isinstance(cols, tuple):
            for i, col in enumerate(cols):
                e[k, col] += (g[i].double() * v[k][i].double()).sum()
        else:
            e[k, cols] += (g.double() * v[k].double()).sum()


def oracle(
    model: nn.Module,
    V: dict[str, Tensor],
    batch: dict[str, Tensor],
    group_of: dict[str, int | tuple[int, ...]],
    n_groups: int,
    reduction: str = "token_mean",
) -> tuple[Tensor, Tensor]:
    """Per-sample autograd, one sample at a time, dotted with V per group, in float64. A parameter whose group is
    a tuple is split along its first dimension, slice i to group ``group_of[name][i]`` (MoE experts).

    Returns (e [K, B, G], c [B]) with e[k, b, g] = ⟨∇ℓ_b, V_k⟩ restricted to group g and c the reduction
    weights (token_mean: n_b / N; sample_mean: 1/B' over samples with labels).
    """
    model = model.eval()
    names = [n for n in V]
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    B = batch["input_ids"].shape[0]
    K = next(iter(V.values())).shape[0]
    e = torch.zeros(K, B, n_groups, dtype=torch.float64)
    ns = []
    try:
        for b in range(B):
            sub = {k: t[b : b + 1] for k, t in batch.items()}
            ell, n = sample_nll(forward_logits(model, sub), sub["labels"])
            ns.append(int(n))
            if int(n) == 0:
                continue
            grads = torch.autograd.grad(ell.sum(), [params[x] for x in names], allow_unused=True)
            for name, gr in zip(names, grads):
                if gr is None:
                    continue
                add_group_dots(e[:, b], gr, V[name], group_of[name])
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    n = torch.tensor(ns, dtype=torch.float64)
    if reduction == "token_mean":
        c = n / n.sum()
    else:
        c = (n > 0).double() / (n > 0).sum()
    return e, c


def objective_oracle(
    model: nn.Module, objective, batch, V: dict[str, Tensor], groups, ref_model: nn.Module | None
) -> tuple[Tensor, tuple[str, ...]]:
    """(e [K, B, G], group names): e[k, j, g] = ⟨∇ℓ^obj_j, V_k⟩ over group g by per-sample autograd (each forget
    sample's share of the objective differentiated alone, in the batch's forward), in float64; MoE slices split by
    expert."""
    params = dict(model.named_parameters())
    names = list(V)
    grouping = groups_mod.assign(model, groups, names)
    per = objective.per_sample(model, batch, ref_model)
    K, B = next(iter(V.values())).shape[0], per.shape[0]
    e = torch.zeros(K, B, len(grouping.names), dtype=torch.float64)
    for j in range(B):
        grads = torch.autograd.grad(per[j], [params[n] for n in names], retain_graph=True, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                add_group_dots(e[:, j], g, V[n], grouping.columns(n))
    return e, tuple(grouping.names)


def assert_close_per_group(ours: Tensor, ref: Tensor, rtol: float, what: str = "") -> float:
    """max_b |ours − ref| ≤ rtol · max_b |ref| in every (direction, group) column; returns the worst ratio."""
    ours = ours.double()
    ref = ref.double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().amax(dim=-2, keepdim=True).clamp_min(1e-30)
    err = ((ours - ref).abs() / scale).max().item()
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"
    return err


def narrow_llama(layers: int):
    """A Llama of ``layers`` blocks, each as narrow as a block gets (hidden 8): for tests of depth groupings."""
    return make_model(
        "llama",
        num_hidden_layers=layers,
        hidden_size=8,
        intermediate_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


class FixedLogits(nn.Module):
    """A 'model' whose logits are a parameter: an objective's formula can be checked by hand (or against the
    official code's) on the logits directly."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask=None, labels=None, **kw):
        class Out:
            pass

        out = Out()
        out.logits = self.logits
        return out


class Rows(torch.utils.data.Dataset):
    """A batch's rows as a dataset (for ``transformers.Trainer``): item i is every tensor's row i."""

    def __init__(self, batch: dict[str, Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.batch.items()}
