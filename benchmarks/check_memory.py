"""The GPU check's memory step: the memory model (geffect_fast/memory.py) against the peaks measure() adds on
the scaled-down Llamas of benchmarks/memory_model.py — every case in float32 and bf16 on a GPU (the allocator's
own peak), the first case in float32 with ``--quick`` (the check's simulation on a CPU). The table is rewritten
after every case, so a step cut at its time limit keeps the cases it finished.

    python -m benchmarks.check_memory --device cuda --out DIR    # -> DIR/memory_model_cuda.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from benchmarks.memory_model import CASES, single
    from geffect_fast.memory import MiB

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="the first case in float32 only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    cases = CASES[:1] if args.quick else CASES
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory_model_{args.device}.md"
    lines = [
        "# Memory model vs measured peaks (the GPU check's memory step)",
        "",
        f"`python -m benchmarks.check_memory {' '.join(argv if argv is not None else sys.argv[1:])}` on {machine}, "
        f"torch {torch.__version__}. Measured: the peak bytes measure() adds; predicted: geffect_fast/memory.py.",
        "",
        "| config | B×T | checkpointing | dtype | measured MiB | predicted MiB | measured/predicted | s |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for c, B, T, ck in cases:
        for dt in dtypes:
            t0 = time.perf_counter()
            got, pred = single(c, B, T, ck, dt, args.device)
            name = f"{c.hidden}/{c.layers}/{c.intermediate}/{c.kv_heads}/{c.vocab}"
            lines.append(
                f"| {name} | {B}×{T} | {'yes' if ck else 'no'} | {str(dt)[6:]} | {got / MiB:.1f} | {pred / MiB:.1f} "
                f"| {got / pred:.2f} | {time.perf_counter() - t0:.1f} |"
            )
            path.write_text("\n".join(lines) + "\n")
            print(lines[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
