"""Check the memory model (geffect_fast/memory.py) against tensor peaks measured on scaled-down Llamas,
and print it for Llama-2 7B, 13B and 70B.

    python -m benchmarks.memory_model      # writes benchmarks/results/memory_model.md

Measured: the peak bytes of tensors that measure() itself creates (benchmarks/_memtrack.py: every op's new
output storages, until freed), i.e. everything but the weights, direction and batch that exist before the
call. Predicted: the model's activations + logits + transient (+ FSDP's unsharded working set, gathered
direction and gradients on two gloo ranks). Run on this CPU; the terms are device-independent tensor sizes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchmarks._common import cpu_name, padded_batch
from benchmarks._memtrack import PeakBytes
from geffect_fast.memory import LLAMA2, Config, GiB, MiB, estimate

CASES = [  # config, B, T, checkpointing
    (Config(256, 2, 512, 4, 4, 4000), 8, 64, False),
    (Config(256, 4, 512, 4, 4, 4000), 8, 64, False),
    (Config(512, 2, 1536, 8, 2, 4000), 8, 128, False),
    (Config(512, 2, 1024, 8, 8, 16000), 4, 128, False),
    (Config(512, 4, 1024, 8, 8, 4000), 8, 128, True),
    (Config(768, 2, 2048, 12, 4, 8000), 4, 256, False),
]
FSDP_CASE = (Config(256, 4, 768, 4, 2, 2000), 4, 64)


def model(c: Config, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(c.to_hf(max_position_embeddings=1024)).to(dtype).eval()


def single(c: Config, B: int, T: int, ck: bool, dtype: torch.dtype, device: str = "cpu") -> tuple[float, float]:
    """(measured, predicted) bytes measure() adds; on CUDA measured by the allocator's own peak."""
    import geffect_fast as gf

    m = model(c, dtype).to(device)
    if ck:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = {k: t.to(device) for k, t in padded_batch(B, T, c.vocab, torch.Generator().manual_seed(0)).items()}
    V = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    mode = "train" if ck else "eval"
    gf.measure(m, V, batch, mode=mode)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        gf.measure(m, V, batch, mode=mode)
        torch.cuda.synchronize()
        got = torch.cuda.max_memory_allocated() - base
    else:
        with PeakBytes() as pk:
            gf.measure(m, V, batch, mode=mode)
        got = pk.peak
    e = estimate(c, B, T, param_bytes=dtype.itemsize, direction_bytes=dtype.itemsize, checkpointing=ck)
    return got, e.activations + e.logits + e.transient


def _fsdp_rank(rank: int, tmp: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import geffect_fast as gf

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    c, B, T = FSDP_CASE
    m = model(c, torch.float32)
    mesh = init_device_mesh("cpu", (2,))
    for block in m.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(m, mesh=mesh)
    batch = padded_batch(B, T, c.vocab, torch.Generator().manual_seed(rank))
    gf.objectives.get("ga")(m, batch, None).backward()
    v = gf.Direction.from_grads(m)
    for p in m.parameters():
        p.grad = None
    out = []
    for route, per_instance in (("sharded", False), ("taps", True)):
        gf.measure(m, v, batch, per_instance=per_instance)
        with PeakBytes() as pk:
            gf.measure(m, v, batch, per_instance=per_instance)
        out.append(f"{route} {pk.peak}")
    if rank == 0:
        Path(tmp, "fsdp").write_text("\n".join(out))
    dist.barrier()
    dist.destroy_process_group()


def fsdp() -> list[tuple[str, float, float]]:
    c, B, T = FSDP_CASE
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp_rank, args=(tmp,), nprocs=2)
        got = dict(line.split() for line in Path(tmp, "fsdp").read_text().splitlines())
    rows = []
    for route in ("sharded", "taps"):
        e = estimate(c, B, T, param_bytes=4, direction_bytes=4, world=2, fsdp=True, strategy=route)
        # not visible to the tracker: the weight and direction shards (they exist before the call) and FSDP's
        # unsharded parameter buffers (resized in place, never allocated through an op)
        pred = e.total - e.weights - c.params * 4 / 2
        rows.append((route, float(got[route]), pred))
    return rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    lines = [
        "# Memory model vs measured peaks",
        "",
        f"Command: `python -m benchmarks.memory_model --device {args.device}`. Machine: {machine}, torch "
        f"{torch.__version__}.",
        "Measured: peak bytes of the tensors measure() creates (benchmarks/_memtrack.py). Predicted:",
        "geffect_fast/memory.py (activations + logits + transient; under FSDP also the unsharded working set,",
        "gathered direction and gradients). Llama configs: hidden/layers/intermediate/kv heads/vocab.",
        "",
        "| config | B×T | checkpointing | dtype | measured MiB | predicted MiB | measured/predicted |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for c, B, T, ck in CASES:
        for dt in (torch.float32, torch.bfloat16):
            got, pred = single(c, B, T, ck, dt, args.device)
            name = f"{c.hidden}/{c.layers}/{c.intermediate}/{c.kv_heads}/{c.vocab}"
            lines.append(
                f"| {name} | {B}×{T} | {'yes' if ck else 'no'} | {str(dt)[6:]} | {got / MiB:.1f} | "
                f"{pred / MiB:.1f} | {got / pred:.2f} |"
            )
    c, B, T = FSDP_CASE
    fsdp_rows = fsdp() if args.device == "cpu" else []  # the 2-rank check runs over gloo on the CPU
    lines += [
        "",
        f"FSDP2 on 2 gloo ranks, {c.hidden}/{c.layers}/{c.intermediate}/{c.kv_heads}/{c.vocab}, B×T = {B}×{T} per "
        "rank, float32, sharded direction (rank 0). FSDP's unsharded parameter buffers are resized in place, not",
        "allocated through ops, so the tracker cannot see them: the predicted column leaves the weights out.",
        "",
        "| strategy | measured MiB | predicted MiB | measured/predicted |",
        "|---|---:|---:|---:|",
    ]
    for route, got, pred in fsdp_rows:
        lines.append(f"| {route} | {got / MiB:.2f} | {pred / MiB:.2f} | {got / pred:.2f} |")
    lines += [
        "",
        "## Llama-2 per GPU (the model's prediction)",
        "",
        "bf16 weights and direction (K = 1), B = 4 sequences of T = 512 tokens per GPU, no checkpointing unless",
        "said. GiB per GPU; communication in GiB per rank per measurement (one risk set).",
        "",
        "| model | setting | weights | direction | activations | logits | gradients | total | comm |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    settings = [
        ("1 GPU", dict()),
        ("1 GPU, checkpointing", dict(checkpointing=True)),
        ("DDP ×8", dict(world=8)),
        ("FSDP ×8, per instance (taps)", dict(world=8, fsdp=True, strategy="taps")),
        ("FSDP ×8, aggregates (sharded)", dict(world=8, fsdp=True, strategy="sharded")),
        ("FSDP ×8, sharded + checkpointing", dict(world=8, fsdp=True, strategy="sharded", checkpointing=True)),
    ]
    for name, cfg in LLAMA2.items():
        for label, kw in settings:
            e = estimate(cfg, 4, 512, **kw)
            lines.append(
                f"| {name} | {label} | {e.weights / GiB:.1f} | {e.direction / GiB:.1f} | {e.activations / GiB:.1f} | "
                f"{e.logits / GiB:.2f} | {e.gradients / GiB:.1f} | {e.total / GiB:.1f} | {e.communication / GiB:.2f} |"
            )
    out = Path(args.out) / ("memory_model.md" if args.device == "cpu" else "memory_model_cuda.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if "cuda" not in sys.argv:  # the interpreter only where there is no GPU (it breaks on numpy >= 2.4 there)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
