"""Runs the cuda backend (geffect_fast/ops/cuda.py) on CPU tensors through the host-emulated ``_C_cuda`` built by
emu_build.py (its path in argv[1]) against the torch reference, and prints one JSON line: {check: [error, tolerance]}
or {check: "the exception"}. Run in a subprocess by tests/ops/test_cuda_emulated.py: a misaligned vector load or
a warp that stops meeting at a shuffle aborts the process."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ops: the shared layout cases
from cuda_cases import DTYPES, LAYOUTS, acc, nan, view, width  # noqa: E402

from geffect_fast.ops import cuda, gemm
from geffect_fast.ops import pairwise as pw
from geffect_fast.ops import reference as ref

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
results: dict[str, object] = {}


def load(path: str):
    spec = importlib.util.spec_from_file_location("_C_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def use_emulation(ext) -> None:
    """The backend's kernels from ``ext``, its tensors on the CPU (one device; no CUDA stream)."""

    def device(*tensors):
        devs = {t.device for t in tensors if t is not None}
        assert len(devs) == 1, devs
        return devs.pop()

    cuda._ext = ext
    cuda._device = device
    cuda._launch = lambda fn, *args, device: fn(*args, 0, 0)
    torch.cuda.device = lambda d: contextlib.nullcontext()


def check(name: str, got, want, dtype) -> None:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        results[name] = "non-finite output (an element was never written)"
        return
    results[name] = [((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item(), TOL[dtype]]


def run(name: str, fn) -> None:
    try:
        fn(name)
    except Exception:
        results[name] = traceback.format_exc(limit=3)


def expect_path(name, ran, vector):
    if ran != vector:
        raise AssertionError(f"{name}: the {'vector' if ran else 'scalar'} path ran")


def row_dot_case(dtype, layout, vector, K):
    def fn(name):
        gen = torch.Generator().manual_seed(K)
        n, C = 21, width(layout)
        x, p = view((n, C), dtype, layout, gen), view((K, n, C), acc(dtype), layout, gen)
        out = nan((K, n), acc(dtype))
        expect_path(name, cuda.row_dot_tokens(p, x, out, vectorize=layout != "forced-scalar"), vector)
        check(name, out, (p.double() * x.double()).sum(-1), dtype)

    return fn


def embedding_case(tg, tv, layout, vector, K):
    def fn(name):
        gen = torch.Generator().manual_seed(K + 1)
        n, vocab, pad, d = 19, 11, 4, width(layout)
        g, v = view((n, d), tg, layout, gen), view((K, vocab, d), tv, layout, gen)
        ids = torch.randint(-1, vocab + 1, (n,), generator=gen)  # -1 and vocab: outside the table -> 0
        ids[::3] = pad
        out = nan((K, n), acc(tg) if tv != torch.float64 else torch.float64)
        got = cuda._embedding_tokens(ids.int(), g, v, out, pad, vectorize=layout != "forced-scalar")
        expect_path(name, got, vector)
        ok = (ids >= 0) & (ids < vocab)
        want = ref.embedding_dot(ids.clamp(0, vocab - 1), g, v, 1, n, pad) * ok
        check(name, out, want, torch.float64 if torch.float64 in (tg, tv) else tg)

    return fn


def norm_case(ta, tv, layout, vector, K, which):
    def fn(name):
        gen = torch.Generator().manual_seed(K + 2)
        n, d = 17, width(layout)
        xh, g = view((n, d), ta, layout, gen), view((n, d), ta, layout, gen)
        vw = view((K, d), tv, layout, gen) if which != "bias" else None
        vb = view((K, d), tv, layout, gen) if which != "weight" else None
        a = torch.float64 if torch.float64 in (ta, tv) else torch.float32
        ow = nan((K, n), a) if vw is not None else None
        ob = nan((K, n), a) if vb is not None else None
        expect_path(name, cuda._norm_tokens(xh, g, vw, vb, ow, ob, vectorize=layout != "forced-scalar"), vector)
        ww, wb = ref.norm_dot(xh, g, vw, vb, 1, n)
        dt = torch.float64 if a == torch.float64 else ta
        for o, w, part in ((ow, ww, "w"), (ob, wb, "b")):
            if o is not None:
                check(f"{name}/{part}", o, w, dt)

    return fn


def ops_case(dtype, K, kind):
    """The public ops, per-sample sums included: uniform segments or ragged ids; linear_dot in several chunks."""

    def fn(name):
        gen = torch.Generator().manual_seed(K + 3)
        N, B = 40, 4
        seg = 10 if kind == "uniform" else torch.randint(0, B - 1, (N,), generator=gen)
        a, g = torch.randn(N, 24, generator=gen).to(dtype), torch.randn(N, 40, generator=gen).to(dtype)
        v, vb = torch.randn(K, 40, 24, generator=gen).to(dtype), torch.randn(K, 40, generator=gen).to(dtype)
        old = gemm.CHUNK_BYTES, gemm.MIN_CHUNK_ROWS
        gemm.CHUNK_BYTES, gemm.MIN_CHUNK_ROWS = 1, 16  # 3 chunks of P
        try:
            got = cuda.linear_dot(a, g, v, seg, B, vb)
        finally:
            gemm.CHUNK_BYTES, gemm.MIN_CHUNK_ROWS = old
        for o, w, part in zip(got, ref.linear_dot(a, g, v, seg, B, vb), "wb"):
            check(f"{name}/linear_{part}", o, w, dtype)
        ids = torch.randint(0, 9, (N,), generator=gen)
        E = torch.randn(K, 9, 40, generator=gen).to(dtype)
        check(
            f"{name}/embedding",
            cuda.embedding_dot(ids, g, E, seg, B, 2),
            ref.embedding_dot(ids, g, E, seg, B, 2),
            dtype,
        )
        for o, w, part in zip(
            cuda.norm_dot(a, a, v[:, 0], vb[:, :24], seg, B), ref.norm_dot(a, a, v[:, 0], vb[:, :24], seg, B), "wb"
        ):
            check(f"{name}/norm_{part}", o, w, dtype)
        check(f"{name}/segment_outer", cuda.segment_outer(a, g, seg, B), pw.segment_outer(a, g, seg, B), dtype)

    return fn


def kernels_case(dtype, K):
    """The unchecked kernels the engine calls at every tap (uniform segments, an int T) against the checked ops
    with the equivalent ids and the reference; linear_dot's P in several chunks."""

    def fn(name):
        gen = torch.Generator().manual_seed(K + 7)
        B, T = 3, 11
        N = B * T
        ids_seg = torch.arange(B).repeat_interleave(T)
        a, g = torch.randn(N, 40, generator=gen).to(dtype), torch.randn(N, 24, generator=gen).to(dtype)
        v, vb = torch.randn(K, 24, 40, generator=gen).to(dtype), torch.randn(K, 24, generator=gen).to(dtype)
        old = gemm.CHUNK_BYTES, gemm.MIN_CHUNK_ROWS
        gemm.CHUNK_BYTES, gemm.MIN_CHUNK_ROWS = 1, 8  # 5 chunks of P: 8, 8, 8, 8 and 1 rows
        try:
            got = cuda.linear_dot_kernel(a, g, v, T, B, vb)
            checked = cuda.linear_dot(a, g, v, ids_seg, B, vb)
        finally:
            gemm.CHUNK_BYTES, gemm.MIN_CHUNK_ROWS = old
        for o, c, w, part in zip(got, checked, ref.linear_dot(a, g, v, ids_seg, B, vb), "wb"):
            check(f"{name}/linear_{part}", o, w, dtype)
            check(f"{name}/linear_{part}_vs_checked", o, c, dtype)
        ids = torch.randint(0, 9, (N,), generator=gen)
        E = torch.randn(K, 9, 24, generator=gen).to(dtype)
        got = cuda.embedding_dot_kernel(ids, g, E, T, B, 2)
        check(f"{name}/embedding", got, ref.embedding_dot(ids, g, E, ids_seg, B, 2), dtype)
        check(f"{name}/embedding_vs_checked", got, cuda.embedding_dot(ids, g, E, ids_seg, B, 2), dtype)
        x = torch.randn(N, 24, generator=gen).to(dtype)
        got = cuda.norm_dot_kernel(x, g, vb, vb, T, B)
        for o, c, w, part in zip(
            got, cuda.norm_dot(x, g, vb, vb, ids_seg, B), ref.norm_dot(x, g, vb, vb, ids_seg, B), "wb"
        ):
            check(f"{name}/norm_{part}", o, w, dtype)
            check(f"{name}/norm_{part}_vs_checked", o, c, dtype)

    return fn


def device_guard(name):
    """A launch on device 1 with device 0 current leaves 0 current, also when the launcher raises."""
    ext = cuda._ext
    xh, g, vw = torch.randn(20, 16), torch.randn(20, 16), torch.randn(2, 16)
    out = nan((2, 20), torch.float32)
    args = (cuda.mat(xh), cuda.mat(g), cuda.mat(vw), cuda.mat(None), cuda._out(out), cuda._out(None), 20, 16, 2)
    assert ext.current_device() == 0
    ext.norm_dot(*args, False, True, 1, 0)
    assert ext.current_device() == 0, "not restored after a launch"
    try:
        ext.norm_dot(*args, True, True, 1, 0)  # acc64 with float32 inputs: raises after the guard
        raise AssertionError("no error")
    except ValueError:
        pass
    assert ext.current_device() == 0, "not restored after an error"
    check(name, out, ref.norm_dot(xh, g, vw, None, 1, 20)[0], torch.float32)


def offsets_past_2_pow_31(name):
    """Rows whose element offsets pass 2^31 (pages never written cost no memory)."""
    gen = torch.Generator().manual_seed(5)
    n, C, stride = 3, 64, 2**31 + 64
    src = torch.randn(n, C, generator=gen).to(torch.bfloat16)
    x = torch.empty((n - 1) * stride + C, dtype=torch.bfloat16).as_strided((n, C), (stride, 1))
    x.copy_(src)
    p = torch.randn(2, n, C, generator=gen)
    out = nan((2, n), torch.float32)
    expect_path(name, cuda.row_dot_tokens(p, x, out), True)
    check(f"{name}/row_dot", out, (p.double() * src.double()).sum(-1), torch.bfloat16)
    del x
    vocab = 2**31 // C + 5
    V = torch.empty(1, vocab, C, dtype=torch.bfloat16)
    ids = torch.tensor([vocab - 1, 0, vocab - 2])
    rows = torch.randn(1, n, C, generator=gen).to(torch.bfloat16)
    V[:, ids] = rows
    out = nan((1, n), torch.float32)
    expect_path(name, cuda._embedding_tokens(ids, src, V, out), True)
    check(f"{name}/embedding", out, (rows[0].double() * src.double()).sum(-1)[None], torch.bfloat16)


def main() -> None:
    use_emulation(load(sys.argv[1]))
    cap = cuda._ext.max_k_per_launch()
    for dtype in DTYPES:
        for layout, vector in LAYOUTS:
            for K in (3, 2 * cap + 1):
                run(f"row_dot/{dtype}/{layout}/K{K}", row_dot_case(dtype, layout, vector, K))
    pairs = [(t, t) for t in DTYPES] + [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float64),
        (torch.float32, torch.bfloat16),
    ]
    for tg, tv in pairs:
        for layout, vector in LAYOUTS:
            run(f"embedding/{tg}-{tv}/{layout}", embedding_case(tg, tv, layout, vector, 2))
            for which in ("both", "weight", "bias"):
                run(f"norm/{tg}-{tv}/{layout}/{which}", norm_case(tg, tv, layout, vector, 2, which))
        run(f"embedding/{tg}-{tv}/K{2 * cap + 1}", embedding_case(tg, tv, "aligned", True, 2 * cap + 1))
        run(f"norm/{tg}-{tv}/K{2 * cap + 1}", norm_case(tg, tv, "aligned", True, 2 * cap + 1, "both"))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for kind in ("uniform", "ragged"):
            run(f"ops/{dtype}/{kind}", ops_case(dtype, 2 * cap + 1, kind))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        run(f"kernels/{dtype}", kernels_case(dtype, 2 * cap + 1))
    run("device_guard", device_guard)
    run("offsets_past_2_pow_31", offsets_past_2_pow_31)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
