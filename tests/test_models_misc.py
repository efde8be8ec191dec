"""Beyond the HF families: a plain nn.Module LM, low precision, and what checkpointing keeps alive."""

import pytest
import torch
from helpers import assert_close_per_group, make_batch, make_model, oracle, random_direction
from torch import nn

import geffect_fast as gf
from geffect_fast.groups import assign


class TinyLM(nn.Module):
    """Not a transformers model: ids -> embedding (+ learned positions) -> 2 residual MLP blocks with
    LayerNorm -> torch RMSNorm -> head (bias). Returns logits directly; no use_cache argument."""

    def __init__(self, vocab=29, d=12, T=16, positions_2d=True):
        super().__init__()
        self.positions_2d = positions_2d
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.GELU(), nn.Linear(3 * d, d)) for _ in range(2)
        )
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        pos = torch.arange(input_ids.shape[1])
        h = self.tok(input_ids) + self.pos(pos[None] if self.positions_2d else pos)  # [1, T] or [T], broadcast
        for blk in self.blocks:
            h = h + blk(h)
        return self.head(self.norm(h))


def test_plain_module_lm_against_oracle():
    torch.manual_seed(0)
    model = TinyLM(positions_2d=False).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 29, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    batch = {"input_ids": ids, "labels": labels}
    V = random_direction(model)
    # 1-D position ids broadcast over the batch cannot be split per sample: a clear error, not a wrong number
    with pytest.raises(gf.capture.UnsupportedModuleError, match="pos"):
        gf.measure(model, gf.Direction(V, names=["v"]), batch)
    # positions given as [1, T] (as HF models do) are expanded per sample
    model.positions_2d = True
    res = gf.measure(model, gf.Direction(V, names=["v"]), {"r": batch}, per_instance=True)
    grouping = assign(model, "block", [n for n, _ in model.named_parameters()])
    assert grouping.names == ("embed", "block.0", "block.1", "final_norm")  # head found by name only: 'head' is not one
    e, _ = oracle(model, V, batch, grouping.of, len(grouping))
    assert_close_per_group(res.instances["r"], e, 1e-9, "plain module")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_half_precision_model_within_stated_tolerance(family, dtype, tol):
    """bf16/fp16 weights and activations, fp32 accumulation: every group total within ``tol`` · max |total|
    of the float64 oracle on the same rounded weights (README "How exact"; measured worst over ten families:
    bf16 1.9e-2, fp16 4.5e-3, as the model's own per-sample autograd at that precision gets —
    benchmarks/results/oracle_errors.md)."""
    model = make_model(family, dtype=dtype)
    batch = make_batch(model)
    V = random_direction(model, dtype=torch.float32)
    res = gf.measure(model, gf.Direction(V, names=["v"]), {"r": batch}, per_instance=True)
    assert res.meta["dtype"] == "float32"
    ref = make_model(family, dtype=torch.float64)
    with torch.no_grad():  # the oracle sees the same rounded weights
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(q.double())
    grouping = assign(ref, "block", [n for n, _ in ref.named_parameters()])
    e, c = oracle(ref, {n: t.double() for n, t in V.items()}, batch, grouping.of, len(grouping))
    tot = (e * c[None, :, None]).sum(1)
    err = ((res.group_totals["r"] - tot).abs().max() / tot.abs().max()).item()
    assert err <= tol, f"{family} {dtype}: {err:.2e}"
    assert err > 0  # the half-precision forward does move it: a zero would mean the oracle ran in half too


def test_checkpointing_keeps_no_layer_input_from_the_first_forward():
    """Under non-reentrant checkpointing, the inputs our taps save inside a block are dropped after the
    forward and recomputed in backward, like every other activation of the block."""
    model = make_model("llama", num_hidden_layers=3)
    batch = make_batch(model)
    V = {n: t[0] for n, t in random_direction(model).items()}

    def saved_outside_checkpoint(ckpt: bool) -> int:
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable() if hasattr(model, "activation_checkpointing_disable") else None
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            res = gf.measure(model, V, batch, mode="train")
        assert res.total["risk"] != 0
        return count[0]

    plain = saved_outside_checkpoint(False)
    ckpt = saved_outside_checkpoint(True)
    # 3 blocks × 7 linears + 2 norms each save their inputs in the plain pass; under checkpointing none of
    # them is held by the outer graph
    assert plain - ckpt >= 3 * 9, (plain, ckpt)
