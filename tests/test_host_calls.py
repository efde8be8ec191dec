"""The host path stays lean: one warm measure() pass costs the interpreter at most twice the calls of a plain
forward+backward (the issue's case: Llama h256 x 6 layers, B = 1, T = 64, a prebuilt Direction over every
parameter). benchmarks/bench_host.py reports the count beside the time; this keeps it from growing back."""

import importlib.util
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import geffect_fast as gf

# benchmarks/bench_host.py by its path (opacus installs a top-level package named `benchmarks` too)
_spec = importlib.util.spec_from_file_location(
    "gf_bench_host", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_host.py"
)
bench_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_host)
calls_case, count_calls = bench_host.calls_case, bench_host.count_calls


def _llama(hidden=256, layers=6, inter=688, heads=8, vocab=8192):
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _batch(B, T, vocab=8192, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_count_calls_counts_python_and_c_calls():
    def three():
        len([])
        abs(-1)
        max(1, 2)

    assert count_calls(three) == 4  # three() itself and its three C calls


def test_a_warm_measure_pass_costs_at_most_twice_a_plain_pass():
    model = _llama()
    g = torch.Generator().manual_seed(1)
    d = gf.Direction({n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}, "v")
    batch = _batch(1, 64)
    plain, ours = calls_case(model, batch, d)
    assert plain > 1000  # the count sees HF's forward
    assert ours <= 2 * plain, (ours, plain)
    # and with more directions and samples the host work does not grow per sample
    d3 = gf.Direction.stack({"a": d, "b": d, "c": d})
    batch8 = _batch(8, 64, seed=2)
    plain8, ours8 = calls_case(model, batch8, d3)
    assert ours8 <= 2 * plain8, (ours8, plain8)
