"""measure() across ranks, side by side with the training step it rides along: two CPU ranks over gloo.

    python -m benchmarks.bench_distributed      # writes benchmarks/results/distributed_cpu.md

Per rank (one thread each), median of the repeats after a warm-up, every rank timed between barriers:
the plain forward+backward of the rank's batch under DDP (with its gradient all-reduce) and under FSDP2
(all-gathers and reduce-scatter) are the floors; beside them measure() under DDP (per instance), the same
call with ``process_group=None`` (this rank alone: the cost of the agreement points and the gather is the
difference), and FSDP2's two routes (aggregates from the sharded gradient; per instance with the direction
all-gathered layer by layer, the next layer's gather started ahead; and, as an ablation, without that).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchmarks._common import cpu_name, padded_batch
from geffect_fast.memory import Config

CFG = Config(256, 4, 688, 4, 4, 8000)
B_RANK, T = 4, 128
REPEATS = 11


def _timed(fns: dict, dist) -> dict[str, float]:
    """Median seconds of each function, the functions interleaved round by round (so drift hits all alike)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(REPEATS):
        for k, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rank(rank: int, tmp: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    import geffect_fast as gf
    from geffect_fast.loss import risk

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(CFG.to_hf(max_position_embeddings=T)).eval()

    batch = padded_batch(B_RANK, T, CFG.vocab, torch.Generator().manual_seed(rank))

    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    V = {n: torch.randn_like(p) for n, p in model.named_parameters()}

    def ddp_step():
        risk(ddp, batch).backward()
        for p in ddp.parameters():
            p.grad = None

    fns = {
        "DDP: plain forward+backward (+ all-reduce)": ddp_step,
        "DDP: measure(per_instance=True)": lambda: gf.measure(ddp, V, batch, per_instance=True),
        "this rank alone: measure(process_group=None)": lambda: gf.measure(
            ddp, V, batch, per_instance=True, process_group=None
        ),
    }

    sharded = build()
    mesh = init_device_mesh("cpu", (2,))
    for block in sharded.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    gf.objectives.get("ga")(sharded, batch, None).backward()
    v = gf.Direction.from_grads(sharded)  # sharded, as a user has it

    def fsdp_step():
        risk(sharded, batch).backward()
        for p in sharded.parameters():
            p.grad = None

    # ablation: each direction gathered only when its layer needs it (no gather started ahead)
    from geffect_fast.capture.session import CaptureSession

    ahead = CaptureSession._start

    def no_ahead():
        CaptureSession._start = lambda self, j: None
        try:
            gf.measure(sharded, v, batch, per_instance=True)
        finally:
            CaptureSession._start = ahead

    fns.update(
        {
            "FSDP2: plain forward+backward (+ reduce-scatter)": fsdp_step,
            "FSDP2: measure() aggregates (sharded route)": lambda: gf.measure(sharded, v, batch),
            "FSDP2: measure(per_instance=True) (taps route)": lambda: gf.measure(sharded, v, batch, per_instance=True),
            "FSDP2: per instance, no gather ahead (ablation)": no_ahead,
        }
    )
    rows = _timed(fns, dist)
    times = torch.tensor(list(rows.values()), dtype=torch.float64)
    got = [torch.zeros_like(times) for _ in range(2)]
    dist.all_gather(got, times)
    if rank == 0:
        slowest = torch.stack(got).max(0).values  # a collective step takes as long as its slowest rank
        Path(tmp, "rows").write_text("\n".join(f"{k}\t{float(t)}" for k, t in zip(rows, slowest)))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(tmp,), nprocs=2)
        rows = [line.split("\t") for line in Path(tmp, "rows").read_text().splitlines()]
    floor = {"DDP": float(rows[0][1]), "FSDP2": float(rows[3][1])}
    c = CFG
    lines = [
        "# measure() across ranks (CPU, gloo)",
        "",
        f"Command: `python -m benchmarks.bench_distributed`. Machine: {cpu_name()}, 2 ranks × 1 thread, torch "
        f"{torch.__version__}. Llama hidden {c.hidden}, {c.layers} blocks, intermediate {c.intermediate}, vocab "
        f"{c.vocab}, float32; B = {B_RANK} sequences of T = {T} per rank. Median of {REPEATS} rounds (methods",
        "interleaved round by round) after a warm-up, the slower rank's time. Ratios against the plain",
        "forward+backward under the same wrapper.",
        "",
        "| what | seconds | × plain step |",
        "|---|---:|---:|",
    ]
    for name, t in rows:
        base = floor["FSDP2" if name.startswith("FSDP2") else "DDP"]
        lines.append(f"| {name} | {float(t):.3f} | {float(t) / base:.2f} |")
    out = Path(__file__).parent / "results" / "distributed_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
