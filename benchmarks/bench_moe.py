"""measure(per_instance=True) through mixture-of-experts layers against a plain forward+backward (issue 20's target:
<= 1.15x on a tiny Mixtral, 8 experts, top-2, B = 8, T = 128, on the CPU).

    python -m benchmarks.bench_moe                      # -> benchmarks/results/moe_cpu.md

Timed round-robin in one process (each repeat runs both once; medians and the interquartile range of the per-repeat
ratio). ``plain``: HF's ``.loss`` forward+backward with weight gradients; ``ours``: ``measure(model, v, {"risk":
batch}, per_instance=True)`` with a Direction over every parameter (experts and routers per sample, every expert's
slice a tapped call). Both run the experts' eager implementation (the one the pass runs). Peak memory: what the call
allocates beyond what exists before it (weight gradients included for plain): on a CPU every storage created
inside the call (benchmarks/_memtrack.py), on a GPU the allocator's peak.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks._memtrack import PeakBytes


def mixtral_model(hidden: int, layers: int, experts: int, top_k: int, inter: int, vocab: int):
    import transformers as tf

    cfg = tf.MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=512,
        attn_implementation="sdpa",
        experts_implementation="eager",
    )
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(cfg).eval()


def run(args: argparse.Namespace) -> str:
    import geffect_fast as gf

    dev = torch.device(args.device)
    model = mixtral_model(args.hidden, args.layers, args.experts, args.top_k, args.inter, args.vocab).to(dev)
    g = torch.Generator().manual_seed(1)
    v = gf.Direction({n: torch.randn(p.shape, generator=g).to(dev) for n, p in model.named_parameters()}, "v")
    ids = torch.randint(2, args.vocab, (args.B, args.T), generator=g).to(dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def plain():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def ours():
        gf.measure(model, v, {"risk": batch}, per_instance=True)

    for _ in range(2):
        plain()
        ours()
    t = {"plain": [], "ours": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("ours", ours)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            t[name].append(time.perf_counter() - t0)
    p, o = statistics.median(t["plain"]), statistics.median(t["ours"])
    peaks = {}
    for name, fn in (("plain", plain), ("ours", ours)):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - base
        else:
            with PeakBytes() as pk:  # tensors allocated inside the call (weight gradients included)
                fn()
            peaks[name] = pk.peak
    r = sorted(b / a for a, b in zip(t["plain"], t["ours"]))
    params = sum(p_.numel() for p_ in model.parameters())
    return (
        f"# measure() through MoE layers, {args.device}\n\n"
        f"Command: `python -m benchmarks.bench_moe --device {args.device} --threads {args.threads} "
        f"--repeats {args.repeats}`; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}; one row per thread count."
        f"\n\nModel: Mixtral, hidden {args.hidden}, {args.layers} layers, {args.experts} experts, top-{args.top_k}, "
        f"expert width {args.inter}, vocab {args.vocab} ({params / 1e6:.1f}M parameters); B = {args.B}, "
        f"T = {args.T}; a direction over every parameter.\n\n"
        "| threads | plain fwd+bwd (ms) | measure per_instance (ms) | ours/plain (IQR) | peak MB plain | peak MB ours "
        "|\n|---:|---:|---:|---:|---:|---:|\n"
        f"| {torch.get_num_threads()} | {1e3 * p:.1f} | {1e3 * o:.1f} | {o / p:.3f} "
        f"({r[len(r) // 4]:.3f}–{r[3 * len(r) // 4]:.3f}) | {peaks['plain'] / 2**20:.1f} | "
        f"{peaks['ours'] / 2**20:.1f} |\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", default="1,2", help="torch thread counts, one table row each")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_cpu.md"))
    a = ap.parse_args(argv)
    rows = []
    for n in a.threads.split(","):
        torch.set_num_threads(int(n))
        rows.append(run(a))
    text = rows[0] + "".join(r.rsplit("\n", 2)[-2] + "\n" for r in rows[1:])
    print(text)
    Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
