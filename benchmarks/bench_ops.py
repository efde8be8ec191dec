"""Per-op kernel benchmark on CPU: each usable backend against the torch reference, time and peak memory.

    python -m benchmarks.bench_ops            # writes benchmarks/results/ops_cpu.{csv,md}
    python -m benchmarks.bench_ops --quick    # small shapes, seconds

Shapes are layers of 0.1B–7B models (SmolLM-135M, Llama-2-7B) at token counts this 2-core CPU handles.
Each (op, shape, backend) runs in its own subprocess: peak = the peak RSS of the warm-up and repeats (VmHWM,
reset first, free heap returned to the OS) minus the RSS before them. Times are medians after a warm-up.
``agree`` is the max relative difference from the reference's output in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import cpu_name, peak_mb, reset_peak, rss_mb, write_csv

# name: (op, dims, dtype)
SHAPES = {
    "smollm135m.q_proj N1024": ("linear_dot", dict(N=1024, i=576, o=576, K=1), "float32"),
    "smollm135m.up_proj N1024": ("linear_dot", dict(N=1024, i=576, o=1536, K=1), "float32"),
    "smollm135m.lm_head N512": ("linear_dot", dict(N=512, i=576, o=49152, K=1), "float32"),
    "llama7b.q_proj N256": ("linear_dot", dict(N=256, i=4096, o=4096, K=1), "float32"),
    "llama7b.q_proj N256 K3": ("linear_dot", dict(N=256, i=4096, o=4096, K=3), "float32"),
    "llama7b.q_proj N256 bf16": ("linear_dot", dict(N=256, i=4096, o=4096, K=1), "bfloat16"),
    "smollm135m.embed N4096": ("embedding_dot", dict(N=4096, vocab=49152, d=576, K=1), "float32"),
    "llama7b.embed N4096": ("embedding_dot", dict(N=4096, vocab=32000, d=4096, K=1), "float32"),
    "llama7b.embed N4096 K3": ("embedding_dot", dict(N=4096, vocab=32000, d=4096, K=3), "float32"),
    "llama7b.embed N4096 bf16": ("embedding_dot", dict(N=4096, vocab=32000, d=4096, K=1), "bfloat16"),
    "smollm135m.norm N4096": ("norm_dot", dict(N=4096, d=576, K=1), "float32"),
    "llama7b.norm N4096": ("norm_dot", dict(N=4096, d=4096, K=1), "float32"),
    "llama7b.norm N4096 K3": ("norm_dot", dict(N=4096, d=4096, K=3), "float32"),
    "llama7b.norm N4096 bf16": ("norm_dot", dict(N=4096, d=4096, K=1), "bfloat16"),
}
QUICK = {
    "tiny.linear": ("linear_dot", dict(N=64, i=48, o=80, K=1), "float32"),
    "tiny.embed": ("embedding_dot", dict(N=64, vocab=100, d=48, K=1), "float32"),
    "tiny.norm": ("norm_dot", dict(N=64, d=48, K=1), "float32"),
}
B = 8


def _inputs(op: str, dims: dict, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    N = dims["N"]
    seg = (torch.arange(N) * B // N).to(torch.int32)
    if op == "linear_dot":
        a = torch.randn(N, dims["i"], generator=g).to(dtype)
        gr = torch.randn(N, dims["o"], generator=g).to(dtype)
        v = torch.randn(dims["K"], dims["o"], dims["i"], generator=g).to(dtype)
        vb = torch.randn(dims["K"], dims["o"], generator=g).to(dtype)
        return (a, gr, v, seg, B, vb)
    if op == "embedding_dot":
        ids = torch.randint(0, dims["vocab"], (N,), generator=g)
        gr = torch.randn(N, dims["d"], generator=g).to(dtype)
        v = torch.randn(dims["K"], dims["vocab"], dims["d"], generator=g).to(dtype)
        return (ids, gr, v, seg, B)
    xh = torch.randn(N, dims["d"], generator=g).to(dtype)
    gr = torch.randn(N, dims["d"], generator=g).to(dtype)
    vw = torch.randn(dims["K"], dims["d"], generator=g).to(dtype)
    vb = torch.randn(dims["K"], dims["d"], generator=g).to(dtype)
    return (xh, gr, vw, vb, seg, B)


def _flops_bytes(op: str, dims: dict, itemsize: int) -> tuple[float, float]:
    N, K = dims["N"], dims["K"]
    if op == "linear_dot":
        i, o = dims["i"], dims["o"]
        return 2.0 * N * i * o * K, itemsize * (N * i + N * o + K * o * i)
    d = dims["d"]
    if op == "embedding_dot":
        return 2.0 * N * d * K, itemsize * (N * d + K * N * d)
    return 4.0 * N * d * K, itemsize * (2 * N * d + 2 * K * d)


def _worker(shape: str, backend: str, repeats: int, dump: str) -> dict:
    from geffect_fast.ops import dispatch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    op, dims, dt = {**SHAPES, **QUICK}[shape]
    dtype = getattr(torch, dt)
    args = _inputs(op, dims, dtype)
    fn = getattr(dispatch.resolve(backend, torch.device("cpu"), dtype), op)
    reset_peak()
    base = rss_mb()
    out = fn(*args)  # warm-up; its allocations count towards the peak
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    peak = peak_mb()
    res = out[0] if isinstance(out, tuple) else out
    torch.save(res, dump)
    flops, nbytes = _flops_bytes(op, dims, torch.finfo(dtype).bits // 8)
    med = statistics.median(times)
    return {
        "shape": shape,
        "op": op,
        "dtype": dt,
        "backend": backend,
        "median_ms": med * 1e3,
        "gflops": flops / med / 1e9,
        "gbps": nbytes / med / 1e9,
        "peak_extra_mb": max(0.0, peak - base),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backends", default="reference,native")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.repeats, args.dump)))
        return 0
    shapes = QUICK if args.quick else SHAPES
    repeats = 2 if args.quick else args.repeats
    rows = []
    tmp = Path(args.out) / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        outs = {}
        for backend in args.backends.split(","):
            dump = tmp / f"{backend}.pt"
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.bench_ops",
                "--worker",
                shape,
                backend,
                "--repeats",
                str(repeats),
                "--dump",
                str(dump),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
            if proc.returncode != 0:
                rows.append({"shape": shape, "backend": backend, "error": proc.stderr.strip().splitlines()[-1]})
                print(f"{shape:<30}{backend:<10} FAILED: {rows[-1]['error']}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            outs[backend] = torch.load(dump)
            rows.append(row)
            print(
                f"{shape:<30}{backend:<10}{row['median_ms']:10.2f} ms {row['gflops']:8.1f} GFLOP/s "
                f"peak +{row['peak_extra_mb']:7.1f} MB",
                flush=True,
            )
        ref_row = next((r for r in rows if r["shape"] == shape and r["backend"] == "reference"), None)
        for r in rows:
            if r["shape"] == shape and "error" not in r:
                if ref_row:
                    r["speedup_vs_reference"] = ref_row["median_ms"] / r["median_ms"]
                if "reference" in outs:
                    ref = outs["reference"].double()
                    r["agree"] = float((outs[r["backend"]].double() - ref).abs().max() / ref.abs().max())
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    out = Path(args.out)
    stem = "ops_cpu_quick" if args.quick else "ops_cpu"
    keys = [
        "shape",
        "op",
        "dtype",
        "backend",
        "median_ms",
        "speedup_vs_reference",
        "gflops",
        "gbps",
        "peak_extra_mb",
        "agree",
        "error",
    ]
    write_csv(out / f"{stem}.csv", rows, keys)
    cpu = cpu_name()
    lines = [
        f"# Kernel ops on CPU ({cpu}, {os.cpu_count()} cores, {os.environ.get('BENCH_THREADS', '2')} threads, "
        f"torch {torch.__version__})",
        "",
        f"Command: `python -m benchmarks.bench_ops{' --quick' if args.quick else ''}`. B = {B} samples; medians of "
        f"{repeats} repeats after a warm-up; peak = peak RSS of the warm-up and repeats (VmHWM, reset first, free",
        "heap returned to the OS) minus RSS before them (per process).",
        "",
        "| shape | dtype | backend | ms | × reference | GFLOP/s | GB/s | peak extra MB | agree |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | | {r['backend']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['backend']} | {r['median_ms']:.2f} | "
            f"{r.get('speedup_vs_reference', float('nan')):.2f} | {r['gflops']:.1f} | {r['gbps']:.1f} | "
            f"{r['peak_extra_mb']:.0f} | {r.get('agree', float('nan')):.1e} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
