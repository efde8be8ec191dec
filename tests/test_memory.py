"""The memory model (geffect_fast/memory.py) against measured tensor peaks, and its arithmetic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import geffect_fast as gf
from geffect_fast.memory import LLAMA2, Config, estimate

_spec = importlib.util.spec_from_file_location(
    "_memtrack", Path(__file__).parent.parent / "benchmarks" / "_memtrack.py"
)
_memtrack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_memtrack)
PeakBytes = _memtrack.PeakBytes


def test_peak_tracker_counts_new_tensors_only():
    old = torch.ones(1000)
    with PeakBytes() as pk:
        a = old * 2  # 4000 bytes, new
        b = old[:10]  # a view of an older tensor: not counted
        del a
        c = torch.empty(3000, dtype=torch.float64)  # 24000 bytes
    assert pk.peak == 24000 and pk.live == 24000
    del b, c


def test_config_round_trip_and_parameter_count_of_a_real_model():
    c = Config(96, 3, 200, 6, 2, 321, tied=True)
    hf = c.to_hf()
    assert Config.from_hf(hf) == c
    assert sum(p.numel() for p in LlamaForCausalLM(hf).parameters()) == c.params
    untied = Config(96, 3, 200, 6, 2, 321)
    assert sum(p.numel() for p in LlamaForCausalLM(untied.to_hf()).parameters()) == untied.params


def test_llama2_parameter_counts():
    assert LLAMA2["7B"].params == 6_738_415_616
    assert abs(LLAMA2["13B"].params - 13.016e9) < 0.01e9
    assert abs(LLAMA2["70B"].params - 68.977e9) < 0.01e9


@pytest.mark.parametrize(
    "dtype,ck", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True), (torch.bfloat16, True)]
)
def test_predicted_peak_matches_measured(dtype, ck):
    """measure()'s own allocations within 15% of the model (benchmarks/results/memory_model.md: 0.91–1.02)."""
    c, B, T = Config(384, 3, 1024, 6, 2, 6000), 4, 96
    torch.manual_seed(0)
    m = LlamaForCausalLM(c.to_hf(max_position_embeddings=128)).to(dtype)
    if ck:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, c.vocab, (B, T), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    V = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    mode = "train" if ck else "eval"
    gf.measure(m, V, batch, mode=mode)
    with PeakBytes() as pk:
        gf.measure(m, V, batch, mode=mode)
    e = estimate(c, B, T, param_bytes=dtype.itemsize, direction_bytes=dtype.itemsize, checkpointing=ck)
    ratio = pk.peak / (e.activations + e.logits + e.transient)
    assert 0.85 <= ratio <= 1.15, ratio


def test_fsdp_and_ddp_arithmetic():
    cfg = LLAMA2["7B"]
    one = estimate(cfg, 4, 512)
    fsdp = estimate(cfg, 4, 512, world=8, fsdp=True, strategy="sharded")
    taps = estimate(cfg, 4, 512, world=8, fsdp=True, strategy="taps")
    assert one.weights == cfg.params * 2 and one.communication == 0
    assert fsdp.weights == pytest.approx(cfg.params * 2 / 8 + (cfg.root_params + 2 * cfg.block_params) * 2)
    assert taps.direction == pytest.approx(cfg.params * 2 / 8 + 2 * cfg.largest_param * 2)
    assert taps.gradients == 0 < fsdp.gradients
    # the sharded strategy moves what a training step does: two parameter all-gathers and a reduce-scatter
    assert fsdp.communication == pytest.approx(3 * cfg.params * 2 * 7 / 8 + 8 * (cfg.layers + 3) * 8)
    assert estimate(cfg, 4, 512, checkpointing=True).total < one.total
    with pytest.raises(ValueError, match="only under FSDP"):
        estimate(cfg, 4, 512, strategy="sharded")
    with pytest.raises(ValueError, match="strategy"):
        estimate(cfg, 4, 512, fsdp=True, strategy="nope")
