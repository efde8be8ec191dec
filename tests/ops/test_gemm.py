"""The GEMM route (ops/gemm.py: cuBLAS GEMM + epilogue): equal chunks of P in multiples of MIN_CHUNK_ROWS rows,
written straight into one preallocated buffer (``out=``, float32 output of 16-bit operands where torch has
``out_dtype``), checked on the CPU with torch's own epilogue against the reference."""

import pytest
import torch
from conftest import SPLIT_TOL, assert_matches, rel_err

from geffect_fast.ops import gemm
from geffect_fast.ops import reference as ref


@pytest.mark.parametrize(
    "N,K,c,itemsize", [(8192, 3, 4096, 4), (8192, 1, 4096, 4), (100, 1, 4096, 4), (8292, 3, 4096, 4), (5000, 2, 64, 8)]
)
def test_chunk_rows_are_equal_multiples_of_256_within_the_bound(N, K, c, itemsize):
    rows = gemm.chunk_rows(N, K, c, itemsize)
    assert rows % gemm.MIN_CHUNK_ROWS == 0 and rows >= gemm.MIN_CHUNK_ROWS
    assert K * rows * c * itemsize <= max(gemm.CHUNK_BYTES, K * gemm.MIN_CHUNK_ROWS * c * itemsize)
    chunks = -(-N // rows)
    unit = gemm.MIN_CHUNK_ROWS
    fewest = -(-N // max(unit, gemm.CHUNK_BYTES // (K * c * itemsize) // unit * unit))
    assert chunks == fewest  # no more chunks than the bound forces
    last = N - (chunks - 1) * rows
    assert 0 < last and rows - last < unit * chunks  # equal chunks up to the rounding: no 2-row tail


def test_the_out_dtype_probe_matches_what_torch_does():
    """The probe says yes exactly where torch.mm(out_dtype=float32, out=...) runs (no CPU build has it yet)."""
    x = torch.ones(2, 2, dtype=torch.bfloat16)
    try:
        torch.mm(x, x, out_dtype=torch.float32, out=torch.empty(2, 2))
        runs = True
    except (TypeError, RuntimeError, NotImplementedError):
        runs = False
    gemm._MM_OUT_DTYPE.clear()
    assert gemm._mm_out_dtype_ok(torch.device("cpu")) == runs


def test_chunk_rows_example_from_the_issue():
    """N 8192, K 3, c 4096, float32: 1365 rows (a tail of 2) before; now 6 chunks of 1280 and one of 512."""
    assert gemm.chunk_rows(8192, 3, 4096, 4) == 1280


class _Spy:
    """torch.mm / torch.addmm with ``out_dtype`` emulated on the CPU (torch has it only on CUDA): records every
    call's output buffer, and fails if a 16-bit product is asked for without ``out=``."""

    def __init__(self, monkeypatch, addmm_ok: bool = True):
        self.calls = []
        mm, addmm = torch.mm, torch.addmm

        def fake_mm(x, w, *, out_dtype=None, out=None):
            if out_dtype is None:
                return mm(x, w, out=out) if out is not None else mm(x, w)
            assert x.dtype == w.dtype and x.dtype in gemm.HALF and out_dtype == torch.float32
            if out is None:  # only the lo half of a split, where torch has no addmm out_dtype
                assert not addmm_ok, "P not written into the buffer"
                self.calls.append(("mm-fresh", 0, tuple(x.shape)))
                return mm(x.double(), w.double()).float()
            assert out.dtype == torch.float32
            self.calls.append(("mm", out.data_ptr(), tuple(out.shape)))
            return out.copy_(mm(x.double(), w.double()))

        def fake_addmm(c, x, w, *, out_dtype=None, out=None):
            if out_dtype is None:
                return addmm(c, x, w, out=out) if out is not None else addmm(c, x, w)
            assert out is not None and out is c and out.dtype == torch.float32
            self.calls.append(("addmm", out.data_ptr(), tuple(out.shape)))
            return out.add_(mm(x.double(), w.double()).float())

        monkeypatch.setattr(torch, "mm", fake_mm)
        monkeypatch.setattr(torch, "addmm", fake_addmm)
        monkeypatch.setattr(gemm, "_mm_out_dtype_ok", lambda device, op="mm": addmm_ok or op == "mm")


@pytest.mark.parametrize("addmm_ok", [True, False], ids=["addmm-out_dtype", "mm-out_dtype-only"])
@pytest.mark.parametrize(
    "vdtype", [torch.bfloat16, torch.float32, torch.float16], ids=["same", "split-bf16", "split-fp16"]
)
@pytest.mark.parametrize("N,i,o,K", [(83, 40, 24, 2), (70, 24, 56, 1)])
def test_gemm_writes_p_into_one_buffer(monkeypatch, vdtype, N, i, o, K, addmm_ok):
    spy = _Spy(monkeypatch, addmm_ok)
    monkeypatch.setattr(gemm, "CHUNK_BYTES", 1)
    monkeypatch.setattr(gemm, "MIN_CHUNK_ROWS", 16)  # 16-row chunks: 6 (or 5) chunks of P
    act = torch.float16 if vdtype == torch.float16 else torch.bfloat16
    gen = torch.Generator().manual_seed(N + i)
    a, g = torch.randn(N, i, generator=gen).to(act), torch.randn(N, o, generator=gen).to(act)
    v, vb = torch.randn(K, o, i, generator=gen).to(vdtype), torch.randn(K, o, generator=gen).to(vdtype)
    got_w, got_b = gemm.linear_dot_gemm(a, g, v, 3 if N % 3 == 0 else torch.arange(N) % 3, 3, vb,
                                        gemm.torch_row_dot_tokens)  # fmt: skip
    seg = 3 if N % 3 == 0 else torch.arange(N) % 3
    want_w, want_b = ref.linear_dot(a.double(), g.double(), v.double(), seg, 3, vb.double())
    if vdtype == torch.float32 or act == torch.float16 and vdtype != act:
        assert rel_err(got_w, want_w) <= SPLIT_TOL[act]
    else:
        assert_matches(got_w, want_w, act)
    assert_matches(got_b, want_b, torch.float32)
    chunks = -(-N // 16)
    split = vdtype != act
    per_chunk = K * (2 if split else 1)
    assert len(spy.calls) == chunks * per_chunk, spy.calls
    # one buffer: every chunk's products land at the same K addresses (the last, shorter chunk too)
    assert len({ptr for kind, ptr, _ in spy.calls if kind != "mm-fresh"}) == K
    lo = "addmm" if addmm_ok else "mm-fresh"
    assert [kind for kind, _, _ in spy.calls[:per_chunk]] == (["mm", lo] * K if split else ["mm"] * K)


def test_gemm_fallback_without_out_dtype_upcasts_into_the_buffer(monkeypatch):
    """Where torch has no out_dtype (CPU builds so far), 16-bit operands are upcast and P still goes into the
    buffer: same numbers."""
    monkeypatch.setattr(gemm, "CHUNK_BYTES", 1)
    monkeypatch.setattr(gemm, "MIN_CHUNK_ROWS", 16)
    monkeypatch.setattr(gemm, "_mm_out_dtype_ok", lambda device, op="mm": False)
    gen = torch.Generator().manual_seed(2)
    a, g = torch.randn(50, 32, generator=gen).bfloat16(), torch.randn(50, 20, generator=gen).bfloat16()
    v = torch.randn(2, 20, 32, generator=gen)
    got, _ = gemm.linear_dot_gemm(a, g, v, 10, 5, None, gemm.torch_row_dot_tokens)
    want, _ = ref.linear_dot(a.double(), g.double(), v.double(), 10, 5)
    assert rel_err(got, want) <= SPLIT_TOL[torch.bfloat16]
