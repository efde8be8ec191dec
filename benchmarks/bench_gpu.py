"""GPU benchmark: kernel ops against their roofline floor, and measure() end to end against plain
forward+backward and a per-sample loop. Run by benchmarks/gpu_check.sh on a GPU machine.

    python -m benchmarks.bench_gpu --out DIR              # on a CUDA machine
    python -m benchmarks.bench_gpu --device cpu --quick   # a dry run of the script itself (CPU, interpreter)

1. Ceilings, measured once: device-to-device copy bandwidth (bytes read + written), bf16 and float32
   (IEEE, no TF32) matrix-product rates through torch.
2. Per op, shape, dtype and backend: median time (CUDA events), FLOPs and bytes (each input read once,
   output written once), floor = max(FLOPs / rate, bytes / bandwidth), time / floor, and the error
   ‖out − ref‖ / ‖ref‖ against the float64 reference on the same inputs.
3. measure(per_instance=True) vs plain forward+backward vs per-sample loop on Llama configs: median time
   and peak memory (max_memory_allocated), agreement of the per-instance values.

Writes ops_gpu.csv, e2e_gpu.csv and summary.md to DIR; prints the short table last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import llama_case, methods, write_csv

OP_SHAPES = {
    # name: (op, dims)
    "llama7b.q_proj": ("linear_dot", dict(N=4096, i=4096, o=4096, K=1)),
    "llama7b.q_proj K3": ("linear_dot", dict(N=4096, i=4096, o=4096, K=3)),
    "llama7b.up_proj": ("linear_dot", dict(N=4096, i=4096, o=11008, K=1)),
    "llama7b.lm_head": ("linear_dot", dict(N=4096, i=4096, o=32000, K=1)),
    "llama7b.embed": ("embedding_dot", dict(N=4096, vocab=32000, d=4096, K=1)),
    "llama7b.embed K3": ("embedding_dot", dict(N=4096, vocab=32000, d=4096, K=3)),
    "llama7b.norm": ("norm_dot", dict(N=4096, d=4096, K=1)),
    "llama7b.norm K3": ("norm_dot", dict(N=4096, d=4096, K=3)),
    "sketch k64 N4096": ("segment_outer", dict(N=4096, ku=64, kw=64, K=1)),
}
QUICK_SHAPES = {
    "tiny.linear": ("linear_dot", dict(N=40, i=48, o=72, K=1)),
    "tiny.embed": ("embedding_dot", dict(N=40, vocab=90, d=48, K=1)),
    "tiny.norm": ("norm_dot", dict(N=40, d=48, K=1)),
    "tiny.sketch": ("segment_outer", dict(N=40, ku=8, kw=8, K=1)),
}
E2E = {
    # name: (hidden, layers, intermediate, heads, vocab, B, T, dtype)
    "llama2048x8 bf16 B16 T256": (2048, 8, 5504, 16, 32000, 16, 256, torch.bfloat16),
    "llama2048x8 bf16 B64 T64": (2048, 8, 5504, 16, 32000, 64, 64, torch.bfloat16),
    "llama1024x4 fp32 B16 T128": (1024, 4, 2752, 16, 32000, 16, 128, torch.float32),
}
QUICK_E2E = {"llama64x2 fp32 B4 T16": (64, 2, 128, 4, 256, 4, 16, torch.float32)}
B = 16


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev: torch.device, repeats: int) -> float:
    """Median seconds over ``repeats`` after two warm-ups (CUDA events on GPU)."""
    fn()
    fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(dev: torch.device, quick: bool) -> dict[str, float]:
    n = 1 << (20 if quick else 28)
    x = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / _time(lambda: y.copy_(x), dev, 10)
    m = 256 if quick else 8192
    out = {"bandwidth_Bps": bw}
    for name, dt in (("bf16_flops", torch.bfloat16), ("fp32_flops", torch.float32)):
        a = torch.randn(m, m, device=dev).to(dt)
        b = torch.randn(m, m, device=dev).to(dt)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            out[name] = 2 * m**3 / _time(lambda a=a, b=b: a @ b, dev, 10)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    return out


def _inputs(op: str, dims: dict, dtype: torch.dtype, dev: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    N = dims["N"]
    seg = (torch.arange(N) * B // N).to(torch.int32).to(dev)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(dev)

    if op == "linear_dot":
        return (
            rnd(N, dims["i"]),
            rnd(N, dims["o"]),
            rnd(dims["K"], dims["o"], dims["i"]),
            seg,
            B,
            rnd(dims["K"], dims["o"]),
        )
    if op == "embedding_dot":
        ids = torch.randint(0, dims["vocab"], (N,), generator=g).to(dev)
        return (ids, rnd(N, dims["d"]), rnd(dims["K"], dims["vocab"], dims["d"]), seg, B)
    if op == "segment_outer":
        return (rnd(N, dims["ku"]), rnd(N, dims["kw"]), seg, B)
    return (rnd(N, dims["d"]), rnd(N, dims["d"]), rnd(dims["K"], dims["d"]), rnd(dims["K"], dims["d"]), seg, B)


def _cost(op: str, dims: dict, itemsize: int) -> tuple[float, float]:
    """(FLOPs, fewest bytes moved) of one call."""
    N, K = dims["N"], dims["K"]
    if op == "linear_dot":
        i, o = dims["i"], dims["o"]
        return 2.0 * N * i * o * K + 2.0 * N * o * K, itemsize * (N * i + N * o + K * o * i + K * o)
    if op == "segment_outer":
        ku, kw = dims["ku"], dims["kw"]
        return 2.0 * N * ku * kw, itemsize * N * (ku + kw) + 4 * B * ku * kw
    d = dims["d"]
    if op == "embedding_dot":  # the gathered rows of V are read once per token
        return 2.0 * N * d * K, itemsize * (N * d + K * N * d)
    return 4.0 * N * d * K, itemsize * (2 * N * d + 2 * K * d)


def bench_ops(dev: torch.device, quick: bool, ceil: dict, repeats: int) -> list[dict]:
    from geffect_fast.ops import dispatch, reference
    from geffect_fast.ops.triton import _common as tri

    rows = []
    shapes = QUICK_SHAPES if quick else OP_SHAPES
    for shape, (op, dims) in shapes.items():
        for dtype in (torch.bfloat16, torch.float32):
            args = _inputs(op, dims, dtype, dev)
            # the float64 reference, on the same (rounded) inputs, computed on the device
            ref_args = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            ref = getattr(reference, op)(*ref_args)
            ref = ref[0] if isinstance(ref, tuple) else ref
            flops, nbytes = _cost(op, dims, torch.finfo(dtype).bits // 8)
            rate = ceil["bf16_flops"] if dtype == torch.bfloat16 else ceil["fp32_flops"]
            floor = max(flops / rate, nbytes / ceil["bandwidth_Bps"])
            variants = [("reference", None), ("cuda", None), ("triton", "atomic")]
            if op == "linear_dot":
                variants.append(("triton", "two_pass"))
            for backend, mode in variants:
                label = backend + (f"[{mode}]" if mode else "")
                why = dispatch.backends(dev)[backend]["reason"] or (
                    "" if dispatch._module(backend).supports(dtype) else f"does not take {dtype}"
                )
                if why:
                    rows.append(dict(shape=shape, op=op, dtype=str(dtype)[6:], backend=label, error=why))
                    continue
                if mode:
                    tri.SEGMENT_MODE = mode
                fn = getattr(dispatch.resolve(backend, dev, dtype), op)
                try:
                    out = fn(*args)
                    out = out[0] if isinstance(out, tuple) else out
                    err = float((out.double() - ref).norm() / ref.norm())
                    t = _time(lambda fn=fn, args=args: fn(*args), dev, repeats)
                except Exception as e:  # a failing backend gets a row saying why
                    rows.append(
                        dict(
                            shape=shape,
                            op=op,
                            dtype=str(dtype)[6:],
                            backend=label,
                            error=f"{type(e).__name__}: {e}"[:200],
                        )
                    )
                    continue
                finally:
                    tri.SEGMENT_MODE = "atomic"
                rows.append(
                    dict(
                        shape=shape,
                        op=op,
                        dtype=str(dtype)[6:],
                        backend=label,
                        ms=t * 1e3,
                        floor_ms=floor * 1e3,
                        x_floor=t / floor,
                        tflops=flops / t / 1e12,
                        tbps=nbytes / t / 1e12,
                        rel_err=err,
                    )
                )
                print(
                    f"{shape:<20}{rows[-1]['dtype']:<9}{label:<18}{t * 1e3:9.3f} ms  floor {floor * 1e3:8.3f} "
                    f"ms  x{t / floor:6.1f}  err {err:.1e}",
                    flush=True,
                )
    return rows


def _e2e_case(name: str, spec: tuple, dev: torch.device, repeats: int) -> list[dict]:
    hidden, layers, inter, heads, vocab, Bn, T, dtype = spec
    model, batch, V = llama_case(hidden, layers, inter, heads, vocab, Bn, T, dtype=dtype, device=dev)
    values = {}
    rows = []
    for method, fn in methods(model, batch, V).items():
        base = 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)

        def run(fn=fn, method=method):
            values[method] = fn()

        t = _time(run, dev, repeats if method != "per_sample_loop" else max(2, repeats // 3))
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else float("nan")
        rows.append(dict(case=name, method=method, ms=t * 1e3, peak_extra_mib=peak))
        print(f"{name:<28}{method:<18}{t * 1e3:10.2f} ms  peak +{peak:9.1f} MiB", flush=True)
    plain_ms = rows[0]["ms"]
    ref = values["per_sample_loop"]
    agree = float(((values["measure"].cpu() - ref).abs() / ref.abs().amax(0).clamp_min(1e-30)).max())
    for r in rows:
        r["x_plain"] = r["ms"] / plain_ms
        if r["method"] == "measure":
            r["agree_vs_loop"] = agree
    return rows


def bench_e2e(dev: torch.device, quick: bool, repeats: int) -> list[dict]:
    rows = []
    for name, spec in (QUICK_E2E if quick else E2E).items():
        rows += _e2e_case(name, spec, dev, repeats)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    ceil = ceilings(dev, args.quick)
    print(
        f"{card}: copy {ceil['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 GEMM {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s, "
        f"fp32 GEMM {ceil['fp32_flops'] / 1e12:.1f} TFLOP/s",
        flush=True,
    )
    ops_rows = bench_ops(dev, args.quick, ceil, args.repeats)
    e2e_rows = [] if args.skip_e2e else bench_e2e(dev, args.quick, max(3, args.repeats // 4))
    for fname, rows in (("ops_gpu.csv", ops_rows), ("e2e_gpu.csv", e2e_rows)):
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        write_csv(out / fname, rows, keys)
    lines = [
        f"# GPU check: {card}, torch {torch.__version__}",
        "",
        f"Ceilings measured: copy {ceil['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 GEMM "
        f"{ceil['bf16_flops'] / 1e12:.0f} TFLOP/s, fp32 GEMM {ceil['fp32_flops'] / 1e12:.1f} TFLOP/s.",
        "",
        "| op shape | dtype | backend | ms | floor ms | × floor | rel err |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in ops_rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['backend']} | — | | | {r['error'][:60]} |")
        else:
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r['backend']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | "
                f"{r['x_floor']:.1f} | {r['rel_err']:.1e} |"
            )
    if e2e_rows:
        lines += ["", "| case | method | ms | × plain | peak extra MiB | agree |", "|---|---|---:|---:|---:|---:|"]
        for r in e2e_rows:
            agree = f"{r['agree_vs_loop']:.1e}" if "agree_vs_loop" in r else ""
            lines.append(
                f"| {r['case']} | {r['method']} | {r['ms']:.2f} | {r['x_plain']:.2f} | "
                f"{r['peak_extra_mib']:.0f} | {agree} |"
            )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
