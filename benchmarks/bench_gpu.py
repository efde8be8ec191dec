"""GPU benchmark: each kernel op against the library op it stands beside, and measure() against plain
forward+backward on a ~1B-parameter Llama. Run by benchmarks/gpu_check.sh on a GPU machine.

    python -m benchmarks.bench_gpu --out DIR              # on a CUDA machine
    python -m benchmarks.bench_gpu --device cpu --quick   # a dry run of the script itself (CPU, interpreter)

1. Ceilings, measured in the same run: device-to-device copy bandwidth (bytes read + written), bf16 and
   float32 (IEEE, no TF32) GEMM rates at 8192³.
2. linear_dot, per shape (N tokens, i, o, K) and dtype: every route — ``cuda`` (cuBLAS GEMM + CUDA epilogue),
   Triton fused at each config and autotuned, Triton's GEMM route — timed against the cuBLAS weight-gradient
   GEMM gᵀa of the same shape in the same run (the op that linear_dot replaces when weights are frozen):
   ``vs_gemm`` = t_gemm / t (target ≥ 0.75), TFLOP/s, and ‖out − ref‖/‖ref‖ against float64.
3. Memory-bound ops (embedding_dot, norm_dot, row_dot, segment_outer): GB/s (fewest bytes: each input read
   once) against the measured copy bandwidth (target ≥ 60%).
4. measure(per_instance=True) against plain forward+backward (weight gradients on) on a ~1B Llama in bf16,
   B×T = 8×512 and 32×128, K = 1 and 3 (and a float32 direction): median time, ours/plain, peak memory
   beyond the model (max_memory_allocated), agreement with measure(backend="reference").
5. Host overhead: ours/plain against batch size, B = 1 … 16 at T = 128 (where Python per tap shows).

Writes ops_gpu.csv, e2e_gpu.csv, batch_gpu.csv and summary.md to DIR; prints the short tables last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

LINEAR = {
    # name: (N, i, o, K) — 7B-class widths at 8k tokens, the ~1B model's, a small batch, an lm_head
    "7B q_proj N8192": (8192, 4096, 4096, 1),
    "7B q_proj N8192 K3": (8192, 4096, 4096, 3),
    "7B up_proj N8192": (8192, 4096, 11008, 1),
    "7B down_proj N8192": (8192, 11008, 4096, 1),
    "1B q_proj N4096": (4096, 2048, 2048, 1),
    "1B lm_head N4096": (4096, 2048, 32000, 1),
    "7B q_proj N512": (512, 4096, 4096, 1),
}
ROWS = {
    # name: (op, N, width, K[, vocab])
    "embed N8192 d4096": ("embedding_dot", 8192, 4096, 1, 32000),
    "embed N8192 d4096 K3": ("embedding_dot", 8192, 4096, 3, 32000),
    "norm N8192 d4096": ("norm_dot", 8192, 4096, 1),
    "norm N8192 d4096 K3": ("norm_dot", 8192, 4096, 3),
    "row_dot N8192 C4096": ("row_dot", 8192, 4096, 1),
    "sketch N8192 k64 uniform": ("segment_outer", 8192, 64, 1),
    "sketch N8192 k64 ragged": ("segment_outer", 8192, 64, 1),
}
QUICK_LINEAR = {"tiny N48": (48, 48, 72, 1), "tiny N48 K3": (48, 72, 48, 3)}
QUICK_ROWS = {
    "tiny embed": ("embedding_dot", 48, 48, 2, 90),
    "tiny norm": ("norm_dot", 48, 48, 1),
    "tiny row_dot": ("row_dot", 48, 48, 2),
    "tiny sketch uniform": ("segment_outer", 48, 8, 1),
    "tiny sketch ragged": ("segment_outer", 48, 8, 1),
}
#: the ~1B Llama: hidden 2048, 16 blocks, MLP 5632, 16 heads, vocab 32000 (0.95B parameters, untied head)
E2E_MODEL = (2048, 16, 5632, 16, 32000)
QUICK_MODEL = (64, 2, 128, 4, 256)
E2E_CASES = [(8, 512, 1, "bf16"), (8, 512, 3, "bf16"), (32, 128, 1, "bf16"), (32, 128, 3, "bf16"), (8, 512, 1, "fp32")]
QUICK_CASES = [(2, 16, 1, "bf16"), (2, 16, 2, "fp32")]
BATCHES = [1, 2, 4, 8, 16]
SAMPLES = 16  # samples of the op benchmarks' uniform segments


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, dev: torch.device, repeats: int) -> float:
    """Median seconds over ``repeats`` after two warm-ups (CUDA events on a GPU)."""
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
    """Copy bandwidth (bytes read + written per second) and bf16 / float32 GEMM rates, measured here."""
    n = 1 << (20 if quick else 28)
    x = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    y = torch.empty_like(x)
    out = {"bandwidth_Bps": 2 * x.numel() * 4 / timeit(lambda: y.copy_(x), dev, 10)}
    m = 256 if quick else 8192
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, dt in (("bf16_flops", torch.bfloat16), ("fp32_flops", torch.float32)):
            a, b = torch.randn(m, m, device=dev).to(dt), torch.randn(m, m, device=dev).to(dt)
            out[name] = 2 * m**3 / timeit(lambda a=a, b=b: a @ b, dev, 10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def _linear_variants(dev: torch.device):
    """(label, callable(a, g, v, T, B) -> out_w) of every linear_dot route usable here."""
    from geffect_fast.ops import dispatch
    from geffect_fast.ops.triton import _common as tri
    from geffect_fast.ops.triton import linear_dot as tld

    out = []
    info = dispatch.backends(dev)
    if not info["cuda"]["reason"]:
        out.append(("cuda (cuBLAS+epilogue)", lambda *a: dispatch._op("cuda", "linear_dot")(*a)[0]))
    if not info["triton"]["reason"]:

        def fused(config=None, tuning="heuristic"):
            def run(a, g, v, T, B):
                prev = tri.LINEAR_TUNING
                tri.LINEAR_TUNING = tuning
                try:
                    if config is None:
                        return tld.linear_dot(a, g, v, T, B)[0]
                    N, i = a.shape
                    o = g.shape[1]
                    x1, x2, m = (a, g, v.transpose(1, 2)) if i >= o else (g, a, v)
                    tok = torch.empty(v.shape[0], N, dtype=torch.float32, device=a.device)
                    with tri.on_device(a):
                        tld._launch_fused(x1, m, x2, tok, config=config)
                    from geffect_fast.ops.contract import segment_sum

                    return segment_sum(tok, T, B)
                finally:
                    tri.LINEAR_TUNING = prev

            return run

        out.append(("triton fused (heuristic)", fused()))
        for name in tri.LINEAR_CONFIGS:
            out.append((f"triton fused [{name}]", fused(name)))
        if dev.type == "cuda":
            out.append(("triton fused (autotune)", fused(tuning="autotune")))

        def gemm_route(a, g, v, T, B):
            prev = tri.LINEAR_ROUTE
            tri.LINEAR_ROUTE = "gemm"
            try:
                return tld.linear_dot(a, g, v, T, B)[0]
            finally:
                tri.LINEAR_ROUTE = prev

        out.append(("triton gemm route (cuBLAS+Triton epilogue)", gemm_route))
    return out


def bench_linear(dev: torch.device, shapes: dict, ceil: dict, repeats: int) -> list[dict]:
    from geffect_fast.ops import reference

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape, (N, i, o, K) in shapes.items():
        for label, act, vdt in (
            ("bf16", torch.bfloat16, torch.bfloat16),
            ("bf16+fp32 dir", torch.bfloat16, torch.float32),
        ):
            a = torch.randn(N, i, generator=gen).to(device=dev, dtype=act)
            g = torch.randn(N, o, generator=gen).to(device=dev, dtype=act)
            v = (torch.randn(K, o, i, generator=gen) / i**0.5).to(device=dev, dtype=vdt)
            T, B = N // SAMPLES, SAMPLES
            ref = reference.linear_dot(a.double(), g.double(), v.double(), T, B)[0]
            flops = 2.0 * N * i * o * K
            t_gemm = timeit(lambda a=a, g=g: g.T @ a, dev, repeats) * K  # the weight-gradient GEMM, once per direction
            base = dict(shape=shape, dtype=label, N=N, i=i, o=o, K=K)
            rows.append(
                dict(base, route="cuBLAS gᵀa (baseline)", ms=t_gemm * 1e3, tflops=flops / t_gemm / 1e12, vs_gemm=1.0)
            )
            for name, fn in _linear_variants(dev):
                try:
                    out = fn(a, g, v, T, B)
                    err = _rel(out, ref)
                    t = timeit(lambda fn=fn, a=a, g=g, v=v, T=T, B=B: fn(a, g, v, T, B), dev, repeats)
                except Exception as e:  # a failing route gets a row saying why
                    rows.append(dict(base, route=name, error=f"{type(e).__name__}: {e}"[:200]))
                    print(f"{shape:<22}{label:<15}{name:<44} ERROR {rows[-1]['error']}", flush=True)
                    continue
                rows.append(
                    dict(base, route=name, ms=t * 1e3, tflops=flops / t / 1e12, vs_gemm=t_gemm / t, rel_err=err)
                )
                print(f"{shape:<22}{label:<15}{name:<44}{t * 1e3:9.3f} ms  {flops / t / 1e12:7.1f} TFLOP/s  "
                      f"vs gemm {t_gemm / t:5.2f}  err {err:.1e}", flush=True)  # fmt: skip
            del a, g, v, ref
    return rows


def bench_rows(dev: torch.device, shapes: dict, ceil: dict, repeats: int) -> list[dict]:
    from geffect_fast.ops import dispatch, reference

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(1)
    bw = ceil["bandwidth_Bps"]
    for shape, (op, N, d, K, *rest) in shapes.items():
        h = torch.bfloat16

        def rnd(*s, dt=h):
            return torch.randn(*s, generator=gen).to(device=dev, dtype=dt)

        T, B = N // SAMPLES, SAMPLES
        if op == "embedding_dot":
            vocab = rest[0]
            args = (torch.randint(0, vocab, (N,), generator=gen).to(dev), rnd(N, d), rnd(K, vocab, d), T, B)
            nbytes = 2 * N * d * (1 + K) + 8 * N  # g, the gathered rows of V, the ids
        elif op == "norm_dot":
            args = (rnd(N, d), rnd(N, d), rnd(K, d), rnd(K, d), T, B)
            nbytes = 2 * 2 * N * d
        elif op == "row_dot":
            args = (rnd(K, N, d, dt=torch.float32), rnd(N, d), T, B)
            nbytes = 4 * K * N * d + 2 * N * d
        else:  # segment_outer: uniform (an int) or ragged (sorted ids)
            seg = T if "uniform" in shape else (torch.arange(N, device=dev) * B // N)
            args = (rnd(N, d), rnd(N, d), seg, B)
            nbytes = 2 * 2 * N * d
        ref_args = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args)
        ref = getattr(reference, op)(*ref_args)
        ref = ref[0] if isinstance(ref, tuple) else ref
        for backend in ("cuda", "triton"):
            why = dispatch.backends(dev)[backend]["reason"]
            if why:
                rows.append(dict(shape=shape, op=op, backend=backend, error=why))
                continue
            fn = dispatch._op(backend, op)
            try:
                out = fn(*args)
                out = out[0] if isinstance(out, tuple) else out
                err = _rel(out, ref)
                t = timeit(lambda fn=fn, args=args: fn(*args), dev, repeats)
            except Exception as e:
                rows.append(dict(shape=shape, op=op, backend=backend, error=f"{type(e).__name__}: {e}"[:200]))
                print(f"{shape:<28}{backend:<8} ERROR {rows[-1]['error']}", flush=True)
                continue
            rows.append(dict(shape=shape, op=op, backend=backend, ms=t * 1e3, gbps=nbytes / t / 1e9,
                             of_copy=nbytes / t / bw, rel_err=err))  # fmt: skip
            print(f"{shape:<28}{backend:<8}{t * 1e3:9.3f} ms  {nbytes / t / 1e9:8.0f} GB/s  "
                  f"{100 * nbytes / t / bw:5.1f}% of copy  err {err:.1e}", flush=True)  # fmt: skip
    return rows


def _model(spec: tuple, dev: torch.device, dtype: torch.dtype):
    from benchmarks._common import llama_model

    hidden, layers, inter, heads, vocab = spec
    with torch.device(dev):  # initialise on the device (a 1B model's CPU init takes tens of seconds)
        model = llama_model(hidden, layers, inter, heads, vocab, 512)
    return model.to(dtype)


def _direction(model, K: int, dtype: torch.dtype, seed: int):
    import geffect_fast as gf

    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    V = {n: torch.randn((K, *p.shape), generator=g, device=p.device, dtype=torch.float32).to(dtype)
         for n, p in model.named_parameters()}  # fmt: skip
    return gf.Direction(V, names=[f"v{k}" for k in range(K)])


def _peak(dev: torch.device, fn) -> float:
    """Peak device memory (MiB) beyond what was allocated before ``fn``."""
    if dev.type != "cuda":
        return float("nan")
    _sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    _sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def bench_e2e(dev: torch.device, spec: tuple, cases: list, batches: list[int], repeats: int):
    """measure() vs plain forward+backward on one model; then ours/plain over batch sizes."""
    import geffect_fast as gf
    from benchmarks._common import padded_batch

    model = _model(spec, dev, torch.bfloat16)
    nparams = sum(p.numel() for p in model.parameters())
    vocab = spec[4]

    def batch_of(Bn, T, seed=0):
        return {k: t.to(dev) for k, t in padded_batch(Bn, T, vocab, torch.Generator().manual_seed(seed)).items()}

    def plain(batch):
        def run():
            gf.risk(model, batch).backward()
            for p in model.parameters():
                p.grad = None

        return run

    e2e, sweep = [], []
    for Bn, T, K, vdt in cases:
        batch = batch_of(Bn, T)
        d = _direction(model, K, torch.bfloat16 if vdt == "bf16" else torch.float32, seed=K)
        case = f"B{Bn} T{T} K{K} dir {vdt}"
        ours = {}

        def measure(backend="auto", ours=ours, d=d, batch=batch):
            ours[backend] = gf.measure(model, d, {"r": batch}, per_instance=True, backend=backend)

        t_plain = timeit(plain(batch), dev, repeats)
        m_plain = _peak(dev, plain(batch))
        t_ours = timeit(measure, dev, repeats)
        m_ours = _peak(dev, measure)
        measure("reference")
        a, r = ours["auto"].instances["r"], ours["reference"].instances["r"]
        agree = float(((a - r).abs() / r.abs().amax(0).clamp_min(1e-30)).max())
        e2e.append(dict(case=case, params=nparams, plain_ms=t_plain * 1e3, ours_ms=t_ours * 1e3,
                        ours_over_plain=t_ours / t_plain, plain_peak_mib=m_plain, ours_peak_mib=m_ours,
                        agree_vs_reference=agree, backend=ours["auto"].meta["backend"]))  # fmt: skip
        print(f"{case:<26} plain {t_plain * 1e3:8.2f} ms  ours {t_ours * 1e3:8.2f} ms  x{t_ours / t_plain:5.2f}  "
              f"peak {m_plain:7.0f}/{m_ours:7.0f} MiB  agree {agree:.1e}", flush=True)  # fmt: skip
        del d, ours
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    d = _direction(model, 1, torch.bfloat16, seed=7)
    T = batches[-1] and (128 if spec is E2E_MODEL else 16)
    for Bn in batches:
        batch = batch_of(Bn, T, seed=Bn)
        t_plain = timeit(plain(batch), dev, repeats)
        t_ours = timeit(lambda batch=batch: gf.measure(model, d, {"r": batch}, per_instance=True), dev, repeats)
        sweep.append(dict(B=Bn, T=T, plain_ms=t_plain * 1e3, ours_ms=t_ours * 1e3, ours_over_plain=t_ours / t_plain))
        print(f"B{Bn:<3} T{T}  plain {t_plain * 1e3:8.2f} ms  ours {t_ours * 1e3:8.2f} ms  x{t_ours / t_plain:5.2f}",
              flush=True)  # fmt: skip
    return e2e, sweep


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> list[str]:
    """Markdown rows: cols = (header, key, format)."""
    out = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, k, fmt in cols:
            v = r.get(k)
            cells.append("" if v is None else (format(v, fmt) if fmt and not isinstance(v, str) else str(v)))
        if "error" in r:
            cells[-1] = r["error"][:70]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and model (a dry run of the script)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--only", default="linear,rows,e2e", help="sections to run (comma list: linear, rows, e2e)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from benchmarks._common import write_csv

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    ceil = ceilings(dev, args.quick)
    head = (
        f"{card}, torch {torch.__version__}: copy {ceil['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 GEMM "
        f"{ceil['bf16_flops'] / 1e12:.0f} TFLOP/s, fp32 GEMM {ceil['fp32_flops'] / 1e12:.1f} TFLOP/s (measured)"
    )
    print(head, flush=True)
    lin = bench_linear(dev, QUICK_LINEAR if args.quick else LINEAR, ceil, args.repeats) if "linear" in only else []
    rws = bench_rows(dev, QUICK_ROWS if args.quick else ROWS, ceil, args.repeats) if "rows" in only else []
    e2e, sweep = [], []
    if "e2e" in only:
        e2e, sweep = bench_e2e(
            dev,
            QUICK_MODEL if args.quick else E2E_MODEL,
            QUICK_CASES if args.quick else E2E_CASES,
            BATCHES[:2] if args.quick else BATCHES,
            max(3, args.repeats // 2),
        )
    for name, rows in (("ops_gpu.csv", lin + rws), ("e2e_gpu.csv", e2e), ("batch_gpu.csv", sweep)):
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            write_csv(out / name, rows, keys)
    lines = [f"# GPU benchmark: {head}", "", f"`python -m benchmarks.bench_gpu {' '.join(argv or sys.argv[1:])}`", ""]
    if lin:
        lines += ["## linear_dot against the same-shape cuBLAS GEMM (target vs_gemm ≥ 0.75)", ""]
        lines += _table(lin, [("shape", "shape", ""), ("dtype", "dtype", ""), ("route", "route", ""),
                              ("ms", "ms", ".3f"), ("TFLOP/s", "tflops", ".0f"), ("vs gemm", "vs_gemm", ".2f"),
                              ("rel err", "rel_err", ".1e")])  # fmt: skip
    if rws:
        lines += ["", "## memory-bound ops against the copy bandwidth (target ≥ 60%)", ""]
        lines += _table(rws, [("shape", "shape", ""), ("backend", "backend", ""), ("ms", "ms", ".3f"),
                              ("GB/s", "gbps", ".0f"), ("of copy", "of_copy", ".0%"),
                              ("rel err", "rel_err", ".1e")])  # fmt: skip
    if e2e:
        lines += ["", f"## measure(per_instance=True) vs plain forward+backward, Llama {e2e[0]['params'] / 1e9:.2f}B "
                  "bf16 (target ≤ 1.10× at K = 1)", ""]  # fmt: skip
        lines += _table(e2e, [("case", "case", ""), ("plain ms", "plain_ms", ".2f"), ("ours ms", "ours_ms", ".2f"),
                              ("ours/plain", "ours_over_plain", ".2f"), ("plain peak MiB", "plain_peak_mib", ".0f"),
                              ("ours peak MiB", "ours_peak_mib", ".0f"),
                              ("agree", "agree_vs_reference", ".1e")])  # fmt: skip
    if sweep:
        lines += ["", "## host overhead: ours/plain against batch size", ""]
        lines += _table(sweep, [("B", "B", ""), ("T", "T", ""), ("plain ms", "plain_ms", ".2f"),
                                ("ours ms", "ours_ms", ".2f"), ("ours/plain", "ours_over_plain", ".2f")])  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
