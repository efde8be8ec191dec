"""GPU benchmark: each kernel op against the library op it stands beside, and measure() against plain
forward+backward on a ~1B-parameter Llama. Run by benchmarks/gpu_check.sh on a GPU machine, in two steps
(``--only ops``, then ``--only e2e``), each writing its files as it goes.

    python -m benchmarks.bench_gpu --out DIR              # on a CUDA machine
    python -m benchmarks.bench_gpu --device cpu --quick   # a dry run of the script itself (CPU, interpreter)

Timing (:func:`timeit`): R calls back to back between one pair of CUDA events (R chosen so that a sample
lasts about ``SAMPLE_S``), the median of several samples per call: the host's Python around a launch overlaps
the previous kernels instead of being counted, so short ops read at their kernel speed. Cases run in order of
value, and after each one the CSV and the summary are rewritten (a run cut at its time limit keeps every
finished case); ``--budget`` seconds leave the later cases out, with a row saying so.

1. Ceilings, measured in the same run: device-to-device copy bandwidth (bytes read + written, 1 GiB), bf16 and
   float32 (IEEE, no TF32) GEMM rates at 8192³.
2. linear_dot (``ops``), per shape (N tokens, i, o, K) and dtype: ``cuda`` (cuBLAS GEMM + CUDA epilogue),
   Triton fused (the heuristic's config, and each config of the table at the first shape), Triton's GEMM
   route — against the cuBLAS weight-gradient GEMM gᵀa of the same shape (the op linear_dot replaces when
   weights are frozen): ``vs_gemm`` = t_gemm / t (target ≥ 0.75). A float32 direction on bf16 activations
   ("bf16+fp32 dir") is two 16-bit GEMMs by design (hi + lo), so its baseline is two GEMMs. ‖out − ref‖/‖ref‖
   against float64, computed once per shape.
3. Memory-bound ops (embedding_dot, norm_dot, row_dot, segment_outer) at ≥ 256 MB per call (several times the
   L2): GB/s (fewest bytes: each input read once) against the measured copy bandwidth (target ≥ 60%).
4. measure(per_instance=True) (``e2e``) against plain forward+backward (weight gradients on) on a ~1B Llama in
   bf16, B×T = 8×512 and 32×128, K = 1 and 3 (and a float32 direction): median time, ours/plain (target ≤ 1.10
   at K = 1), peak memory beyond the model, and agreement with measure(backend="reference") — once per case,
   at K = 1, with the reference's tiles enlarged (its default 4 MB tiles mean ~1e5 small launches).
5. Host overhead: ours/plain against batch size, B = 1, 4, 16 at T = 128.
6. Where the budget leaves ≥ 8 s, last: measure() through MoE layers (a tiny Mixtral, 8 experts top-2, hidden 512,
   B×T = 8×128, bf16, K = 1; eager experts as the pass runs them), a row of e2e_gpu.csv (target ≤ 1.15).

Writes ops_gpu.csv (``ops``), e2e_gpu.csv and batch_gpu.csv (``e2e``), and summary_<sections>.md to DIR.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

LINEAR = {
    # name: (N, i, o, K) — 7B-class widths at 8k tokens, the ~1B model's, a small batch, an lm_head
    "7B q_proj N8192": (8192, 4096, 4096, 1),
    "7B up_proj N8192": (8192, 4096, 11008, 1),
    "7B down_proj N8192": (8192, 11008, 4096, 1),
    "7B q_proj N8192 K3": (8192, 4096, 4096, 3),
    "1B q_proj N4096": (4096, 2048, 2048, 1),
    "1B lm_head N4096": (4096, 2048, 32000, 1),
    "7B q_proj N512": (512, 4096, 4096, 1),
}
#: the shapes also timed with a float32 direction on bf16 activations (the hi + lo split)
SPLIT_SHAPES = ("7B q_proj N8192", "1B q_proj N4096")
ROWS = {
    # name: (op, N, width, K[, vocab]); every case moves >= 256 MB
    "embed N32768 d4096": ("embedding_dot", 32768, 4096, 1, 32000),
    "norm N32768 d4096": ("norm_dot", 32768, 4096, 1),
    "row_dot N16384 C4096": ("row_dot", 16384, 4096, 1),
    "embed N32768 d4096 K3": ("embedding_dot", 32768, 4096, 3, 32000),
    "norm N32768 d4096 K3": ("norm_dot", 32768, 4096, 3),
    "sketch N2M k64 uniform": ("segment_outer", 1 << 21, 64, 1),
    "sketch N2M k64 ragged": ("segment_outer", 1 << 21, 64, 1),
}
QUICK_LINEAR = {"tiny N48": (48, 48, 72, 1), "tiny N48 K3": (48, 72, 48, 3)}
QUICK_SPLIT = ("tiny N48",)
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
E2E_CASES = [(8, 512, 1, "bf16"), (32, 128, 1, "bf16"), (8, 512, 3, "bf16"), (32, 128, 3, "bf16"), (8, 512, 1, "fp32")]
QUICK_CASES = [(2, 16, 1, "bf16"), (2, 16, 2, "bf16"), (2, 16, 1, "fp32")]
BATCHES = [1, 4, 16]
#: the MoE row (issue 20): a tiny Mixtral (hidden, layers, experts, top-k, expert width, vocab) and its batch (B, T)
MOE_MODEL, MOE_BATCH = (512, 4, 8, 2, 1024, 32000), (8, 128)
QUICK_MOE_MODEL, QUICK_MOE_BATCH = (64, 1, 4, 2, 64, 256), (2, 16)
SAMPLES = 16  # samples of the op benchmarks' uniform segments
#: seconds one timing sample lasts at least (R back-to-back calls per event pair)
SAMPLE_S = 2e-3
#: R at most
MAX_INNER = 200
#: the reference's tile size for its agreement check (large: few launches)
REF_TILE_BYTES = 1 << 30


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, dev: torch.device, repeats: int, inner: int | None = None) -> float:
    """Median seconds per call of ``fn``: after two warm-up calls, ``repeats`` samples of R calls back to back
    between one pair of CUDA events (R so that a sample lasts about SAMPLE_S; ``inner`` fixes it), each sample's
    time divided by R. On the CPU, wall time of R calls the same way."""
    fn()
    fn()
    _sync(dev)
    if inner is None:  # one call, timed alone, sizes R
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        one = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, min(MAX_INNER, math.ceil(SAMPLE_S / one))) if dev.type == "cuda" else 1
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
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
            out[name] = 2 * m**3 / timeit(lambda a=a, b=b: a @ b, dev, 5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


class _LargeRefTiles:
    """The reference backend with REF_TILE_BYTES tiles while inside (few launches for its agreement checks)."""

    def __enter__(self):
        from geffect_fast.ops import reference

        self.prev = reference.TILE_BYTES
        reference.TILE_BYTES = REF_TILE_BYTES

    def __exit__(self, *exc):
        from geffect_fast.ops import reference

        reference.TILE_BYTES = self.prev


def _linear_variants(dev: torch.device, every_config: bool, mode: int):
    """(label, callable(a, g, v, T, B) -> out_w) of every linear_dot route usable here; ``every_config``: also
    Triton's fused kernel at each config of its table launched in dot ``mode`` on this device."""
    from geffect_fast.ops import dispatch
    from geffect_fast.ops.contract import segment_sum
    from geffect_fast.ops.triton import _common as tri
    from geffect_fast.ops.triton import linear_dot as tld

    out = []
    info = dispatch.backends(dev)
    if not info["cuda"]["reason"]:
        out.append(("cuda (cuBLAS+epilogue)", lambda *a: dispatch._kernel("cuda", "linear_dot")(*a)[0]))
    if not info["triton"]["reason"]:

        def fused(config=None):
            def run(a, g, v, T, B):
                if config is None:
                    return tld.linear_dot_kernel(a, g, v, T, B)[0]
                N, i = a.shape
                x1, x2, m = (a, g, v.transpose(1, 2)) if i >= g.shape[1] else (g, a, v)
                tok = torch.empty(v.shape[0], N, dtype=torch.float32, device=a.device)
                with tri.on_device(a):
                    tld._launch_fused(x1, m, x2, tok, config=config)
                return segment_sum(tok, T, B)

            return run

        out.append(("triton fused (heuristic)", fused()))
        if every_config:
            tma = dev.type == "cuda" and tri.uses_tma(mode, tri.arch_of(dev))
            for name in tri.linear_configs(mode, tri.arch_of(dev), tma):
                out.append((f"triton fused [{name}]", fused(name)))

        def gemm_route(a, g, v, T, B):
            prev = tri.LINEAR_ROUTE
            tri.LINEAR_ROUTE = "gemm"
            try:
                return tld.linear_dot_kernel(a, g, v, T, B)[0]
            finally:
                tri.LINEAR_ROUTE = prev

        out.append(("triton gemm route (cuBLAS+Triton epilogue)", gemm_route))
    return out


def _which_fused(a, g, v) -> str:
    """The fused kernel's config and load path for these operands ("wide tma", "large ptr", ...)."""
    from geffect_fast.ops.triton import _common as tri
    from geffect_fast.ops.triton import linear_dot as tld

    N, i = a.shape
    x1, x2, m = (a, g, v.transpose(1, 2)) if i >= g.shape[1] else (g, a, v)
    mode = tri.half_split_mode(x1.dtype, m.dtype)
    tma, _ = tld._use_tma(x1, m, x2, mode)
    return f"{tri.linear_config(N, m.shape[2], m.shape[0], a.device, mode, tma)} {'tma' if tma else 'ptr'}"


class Budget:
    """Wall seconds left for this run (``--budget``); cases past it are left out with a row saying so."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def bench_linear(
    dev, shapes: dict, split_shapes, repeats: int, budget: Budget, flush, every_config: bool = False
) -> list[dict]:
    """linear_dot per shape in bf16, each split shape also with a float32 direction (right after its bf16 case);
    ``every_config``: Triton's fused kernel at each config of its table too."""
    from geffect_fast.ops import reference

    rows: list[dict] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = []
    for s in shapes:
        cases += [(s, "bf16")] + ([(s, "bf16+fp32 dir")] if s in split_shapes else [])
    for shape, label in cases:
        N, i, o, K = shapes[shape]
        base = dict(shape=shape, dtype=label, N=N, i=i, o=o, K=K)
        if budget.left() < 5:
            rows.append(dict(base, route="(left out)", error="budget spent"))
            flush(rows)
            continue
        vdt = torch.float32 if "fp32" in label else torch.bfloat16
        a = torch.randn(N, i, generator=gen).to(device=dev, dtype=torch.bfloat16)
        g = torch.randn(N, o, generator=gen).to(device=dev, dtype=torch.bfloat16)
        v = (torch.randn(K, o, i, generator=gen) / i**0.5).to(device=dev, dtype=vdt)
        T, B = N // SAMPLES, SAMPLES
        with _LargeRefTiles():
            ref = reference.linear_dot_kernel(a.double(), g.double(), v.double(), T, B)[0]
        flops = 2.0 * N * i * o * K
        gemms = 2 if vdt == torch.float32 else 1  # the split: two 16-bit GEMMs by design
        # the weight-gradient GEMM, once per direction (and per half of a split direction)
        t_gemm = timeit(lambda a=a, g=g: g.T @ a, dev, repeats) * K * gemms
        what = "cuBLAS gᵀa (baseline)" + (" ×2: hi + lo" if gemms == 2 else "")
        rows.append(dict(base, route=what, ms=t_gemm * 1e3, tflops=flops * gemms / t_gemm / 1e12, vs_gemm=1.0))
        mode = 1 if vdt == torch.float32 else 0
        for name, fn in _linear_variants(dev, every_config=every_config, mode=mode):
            try:
                out = fn(a, g, v, T, B)
                err = _rel(out, ref)
                t = timeit(lambda fn=fn, a=a, g=g, v=v, T=T, B=B: fn(a, g, v, T, B), dev, repeats)
            except Exception as e:  # a failing route gets a row saying why
                rows.append(dict(base, route=name, error=f"{type(e).__name__}: {e}"[:200]))
                print(f"{shape:<22}{label:<15}{name:<44} ERROR {rows[-1]['error']}", flush=True)
                continue
            row = dict(base, route=name, ms=t * 1e3, tflops=flops / t / 1e12, vs_gemm=t_gemm / t, rel_err=err)
            if name == "triton fused (heuristic)":
                row["config"] = _which_fused(a, g, v)
            rows.append(row)
            print(f"{shape:<22}{label:<15}{name:<44}{t * 1e3:9.3f} ms  {flops / t / 1e12:7.1f} TFLOP/s  "
                  f"vs gemm {t_gemm / t:5.2f}  err {err:.1e}", flush=True)  # fmt: skip
        del a, g, v, ref
        flush(rows)
    return rows


def bench_rows(dev, shapes: dict, ceil: dict, repeats: int, budget: Budget, flush) -> list[dict]:
    from geffect_fast.ops import dispatch, reference

    rows: list[dict] = []
    gen = torch.Generator(device="cpu").manual_seed(1)
    bw = ceil["bandwidth_Bps"]
    for shape, (op, N, d, K, *rest) in shapes.items():
        if budget.left() < 5:
            rows.append(dict(shape=shape, op=op, backend="(left out)", error="budget spent"))
            flush(rows)
            continue
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
        with _LargeRefTiles():
            ref_args = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args)
            ref = getattr(reference, op)(*ref_args)
            ref = ref[0] if isinstance(ref, tuple) else ref
            del ref_args
        for backend in ("cuda", "triton"):
            why = dispatch.backends(dev)[backend]["reason"]
            if why:
                rows.append(dict(shape=shape, op=op, backend=backend, error=why))
                continue
            fn = dispatch._kernel(backend, op)  # what the engine calls at every tap
            try:
                out = fn(*args)
                out = out[0] if isinstance(out, tuple) else out
                err = _rel(out, ref)
                t = timeit(lambda fn=fn, args=args: fn(*args), dev, repeats)
            except Exception as e:
                rows.append(dict(shape=shape, op=op, backend=backend, error=f"{type(e).__name__}: {e}"[:200]))
                print(f"{shape:<28}{backend:<8} ERROR {rows[-1]['error']}", flush=True)
                continue
            rows.append(dict(shape=shape, op=op, backend=backend, K=K, mbytes=nbytes / 2**20, ms=t * 1e3,
                             gbps=nbytes / t / 1e9, of_copy=nbytes / t / bw, rel_err=err))  # fmt: skip
            print(f"{shape:<28}{backend:<8}{t * 1e3:9.3f} ms  {nbytes / t / 1e9:8.0f} GB/s  "
                  f"{100 * nbytes / t / bw:5.1f}% of copy  err {err:.1e}", flush=True)  # fmt: skip
        del args, ref
        flush(rows)
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


def bench_e2e(dev, spec: tuple, cases: list, batches: list[int], repeats: int, budget: Budget, flush):
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

    e2e: list[dict] = []
    sweep: list[dict] = []
    for Bn, T, K, vdt in cases:
        case = f"B{Bn} T{T} K{K} dir {vdt}"
        if budget.left() < 8:
            e2e.append(dict(case=case, K=K, error="budget spent"))
            flush(e2e, sweep)
            continue
        batch = batch_of(Bn, T)
        d = _direction(model, K, torch.bfloat16 if vdt == "bf16" else torch.float32, seed=K)
        ours = {}

        def measure(backend="auto", ours=ours, d=d, batch=batch):
            ours[backend] = gf.measure(model, d, {"r": batch}, per_instance=True, backend=backend)

        t_plain = timeit(plain(batch), dev, repeats, inner=1)
        m_plain = _peak(dev, plain(batch))
        t_ours = timeit(measure, dev, repeats, inner=1)
        m_ours = _peak(dev, measure)
        row = dict(case=case, K=K, params=nparams, plain_ms=t_plain * 1e3, ours_ms=t_ours * 1e3,
                   ours_over_plain=t_ours / t_plain, plain_peak_mib=m_plain, ours_peak_mib=m_ours,
                   backend=ours["auto"].meta["backend"])  # fmt: skip
        if K == 1:  # the reference once per case, at K = 1, with large tiles
            with _LargeRefTiles():
                measure("reference")
            a, r = ours["auto"].instances["r"], ours["reference"].instances["r"]
            row["agree_vs_reference"] = float(((a - r).abs() / r.abs().amax(0).clamp_min(1e-30)).max())
        e2e.append(row)
        print(f"{case:<26} plain {t_plain * 1e3:8.2f} ms  ours {t_ours * 1e3:8.2f} ms  x{t_ours / t_plain:5.2f}  "
              f"peak {m_plain:7.0f}/{m_ours:7.0f} MiB  agree {row.get('agree_vs_reference', float('nan')):.1e}",
              flush=True)  # fmt: skip
        del d, ours
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        flush(e2e, sweep)
    d = _direction(model, 1, torch.bfloat16, seed=7)
    T = 128 if spec is E2E_MODEL else 16
    for Bn in batches:
        if budget.left() < 4:
            break
        batch = batch_of(Bn, T, seed=Bn)
        t_plain = timeit(plain(batch), dev, repeats, inner=1)
        ours = lambda batch=batch: gf.measure(model, d, {"r": batch}, per_instance=True)  # noqa: E731
        t_ours = timeit(ours, dev, repeats, inner=1)
        sweep.append(dict(B=Bn, T=T, plain_ms=t_plain * 1e3, ours_ms=t_ours * 1e3, ours_over_plain=t_ours / t_plain))
        print(f"B{Bn:<3} T{T}  plain {t_plain * 1e3:8.2f} ms  ours {t_ours * 1e3:8.2f} ms  x{t_ours / t_plain:5.2f}",
              flush=True)  # fmt: skip
        flush(e2e, sweep)
    if budget.left() >= 8:  # last: the MoE row (experts and routers per sample, eager experts)
        moe, (Bm, Tm) = (MOE_MODEL, MOE_BATCH) if spec is E2E_MODEL else (QUICK_MOE_MODEL, QUICK_MOE_BATCH)
        e2e.append(_moe_row(dev, moe, Bm, Tm, repeats))
        flush(e2e, sweep)
    return e2e, sweep


def _moe_row(dev: torch.device, spec: tuple, Bn: int, T: int, repeats: int) -> dict:
    """measure() vs plain forward+backward through MoE layers (bf16, K = 1): a row of the e2e table."""
    import geffect_fast as gf
    from benchmarks._common import padded_batch
    from benchmarks.bench_moe import mixtral_model as mixtral

    hidden, layers, experts, top_k, inter, vocab = spec
    with torch.device(dev):
        model = mixtral(hidden, layers, experts, top_k, inter, vocab).to(torch.bfloat16)
    batch = {k: t.to(dev) for k, t in padded_batch(Bn, T, vocab, torch.Generator().manual_seed(0)).items()}
    d = _direction(model, 1, torch.bfloat16, seed=11)

    def plain():
        gf.risk(model, batch).backward()
        for p in model.parameters():
            p.grad = None

    def measure():
        gf.measure(model, d, {"r": batch}, per_instance=True)

    t_plain, t_ours = timeit(plain, dev, repeats, inner=1), timeit(measure, dev, repeats, inner=1)
    row = dict(case=f"MoE Mixtral {experts}x top-{top_k} B{Bn} T{T} K1 dir bf16", K=1,
               params=sum(p.numel() for p in model.parameters()), plain_ms=t_plain * 1e3, ours_ms=t_ours * 1e3,
               ours_over_plain=t_ours / t_plain, plain_peak_mib=_peak(dev, plain), ours_peak_mib=_peak(dev, measure),
               backend="auto")  # fmt: skip
    print(f"{row['case']:<26} plain {t_plain * 1e3:8.2f} ms  ours {t_ours * 1e3:8.2f} ms  x{t_ours / t_plain:5.2f}",
          flush=True)  # fmt: skip
    return row


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


class Writer:
    """Rewrites the CSVs and the summary of this run after every case (a run cut short keeps what was done)."""

    def __init__(self, out: Path, head: str, command: str, sections: str):
        self.out, self.head, self.command = out, head, command
        self.summary = out / f"summary_{sections.replace(',', '_')}.md"
        self.lin: list[dict] = []
        self.rws: list[dict] = []
        self.e2e: list[dict] = []
        self.sweep: list[dict] = []

    def linear(self, rows):
        self.lin = rows
        self.write()

    def rows(self, rows):
        self.rws = rows
        self.write()

    def end_to_end(self, e2e, sweep):
        self.e2e, self.sweep = e2e, sweep
        self.write()

    def write(self) -> None:
        from benchmarks._common import write_csv

        for name, rows in (
            ("ops_gpu.csv", self.lin + self.rws),
            ("e2e_gpu.csv", self.e2e),
            ("batch_gpu.csv", self.sweep),
        ):
            if rows:
                keys = list(dict.fromkeys(k for r in rows for k in r))
                tmp = self.out / f".{name}.tmp"
                write_csv(tmp, rows, keys)
                tmp.replace(self.out / name)
        lines = [f"# GPU benchmark: {self.head}", "", f"`{self.command}`", ""]
        if self.lin:
            lines += ["## linear_dot against the same-shape cuBLAS GEMM (target vs_gemm ≥ 0.75; the split against "
                      "two GEMMs)", ""]  # fmt: skip
            lines += _table(self.lin, [("shape", "shape", ""), ("dtype", "dtype", ""), ("route", "route", ""),
                                       ("config", "config", ""), ("ms", "ms", ".3f"), ("TFLOP/s", "tflops", ".0f"),
                                       ("vs gemm", "vs_gemm", ".2f"), ("rel err", "rel_err", ".1e")])  # fmt: skip
        if self.rws:
            lines += ["", "## memory-bound ops against the copy bandwidth (target ≥ 60%)", ""]
            lines += _table(self.rws, [("shape", "shape", ""), ("backend", "backend", ""), ("MB", "mbytes", ".0f"),
                                       ("ms", "ms", ".3f"), ("GB/s", "gbps", ".0f"), ("of copy", "of_copy", ".0%"),
                                       ("rel err", "rel_err", ".1e")])  # fmt: skip
        if self.e2e:
            params = next((r["params"] for r in self.e2e if "params" in r), 0)
            lines += ["", f"## measure(per_instance=True) vs plain forward+backward, Llama {params / 1e9:.2f}B "
                      "bf16 (target ≤ 1.10× at K = 1)", ""]  # fmt: skip
            lines += _table(self.e2e, [("case", "case", ""), ("plain ms", "plain_ms", ".2f"),
                                       ("ours ms", "ours_ms", ".2f"), ("ours/plain", "ours_over_plain", ".2f"),
                                       ("plain peak MiB", "plain_peak_mib", ".0f"),
                                       ("ours peak MiB", "ours_peak_mib", ".0f"),
                                       ("agree (K = 1)", "agree_vs_reference", ".1e")])  # fmt: skip
        if self.sweep:
            lines += ["", "## host overhead: ours/plain against batch size", ""]
            lines += _table(self.sweep, [("B", "B", ""), ("T", "T", ""), ("plain ms", "plain_ms", ".2f"),
                                         ("ours ms", "ours_ms", ".2f"),
                                         ("ours/plain", "ours_over_plain", ".2f")])  # fmt: skip
        tmp = self.summary.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.summary)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and model (a dry run of the script)")
    ap.add_argument("--repeats", type=int, default=10, help="timing samples per case (median)")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--only", default="ops,e2e", help="sections to run (comma list: ops, e2e)")
    ap.add_argument("--budget", type=float, default=math.inf, help="wall seconds; later cases are left out")
    args = ap.parse_args(argv)
    budget = Budget(args.budget)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    unknown = only - {"ops", "e2e"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; use ops, e2e")
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    ceil = ceilings(dev, args.quick) if "ops" in only else None
    head = f"{card}, torch {torch.__version__}"
    if ceil:
        head += (f": copy {ceil['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 GEMM {ceil['bf16_flops'] / 1e12:.0f} "
                 f"TFLOP/s, fp32 GEMM {ceil['fp32_flops'] / 1e12:.1f} TFLOP/s (measured)")  # fmt: skip
    print(head, flush=True)
    command = f"python -m benchmarks.bench_gpu {' '.join(argv if argv is not None else sys.argv[1:])}"
    w = Writer(out, head, command, ",".join(sorted(only)))
    if "ops" in only:
        (out / "ceilings.txt").write_text(head + "\n")
        lin = QUICK_LINEAR if args.quick else LINEAR
        split = QUICK_SPLIT if args.quick else SPLIT_SHAPES
        rows = QUICK_ROWS if args.quick else ROWS
        # in order of value: the first linear shape (each config) and its split, the memory-bound ops, the rest
        first = dict([next(iter(lin.items()))])
        done = bench_linear(dev, first, split, args.repeats, budget, w.linear, every_config=True)
        w.rows(bench_rows(dev, rows, ceil, args.repeats, budget, w.rows))
        rest = {k: s for k, s in lin.items() if k not in first}
        more = bench_linear(dev, rest, split, args.repeats, budget, lambda r: w.linear(done + r))
        w.linear(done + more)
    if "e2e" in only:
        bench_e2e(
            dev,
            QUICK_MODEL if args.quick else E2E_MODEL,
            QUICK_CASES if args.quick else E2E_CASES,
            BATCHES[:2] if args.quick else BATCHES,
            max(3, args.repeats // 2),
            budget,
            w.end_to_end,
        )
    print(w.summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
