"""Run each Triton kernel on views whose element offsets pass 2^31 (tests/ops/test_large_offsets.py runs this
in a subprocess: 32-bit offset arithmetic reads far outside the tensor and may crash the process).

The views are ``as_strided`` over one ``torch.empty`` storage of ~2^31 half-precision elements: on the CPU,
pages never written cost no memory. Prints one JSON object {case: relative error against the reference}.
"""

import json
import os
import sys

import torch  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from geffect_fast.ops import reference as ref  # noqa: E402

S = 2**30 + 16  # a stride that fits in int32; twice it does not
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def far_rows(rows: int, cols: int, dtype=torch.float16) -> torch.Tensor:
    """[rows, cols] with row stride S (row 2 starts past 2^31 elements), random values in the used places."""
    store = torch.empty(S * (rows - 1) + cols, dtype=dtype, device=DEV)
    view = store.as_strided((rows, cols), (S, 1))
    view.copy_(torch.randn(rows, cols, device=DEV).to(dtype))
    return view


def far_directions(K: int, rows: int, cols: int, dtype=torch.float16) -> torch.Tensor:
    """[K, rows, cols] with direction stride S (direction 2 starts past 2^31 elements)."""
    store = torch.empty(S * (K - 1) + rows * cols, dtype=dtype, device=DEV)
    view = store.as_strided((K, rows, cols), (S, cols, 1))
    view.copy_(torch.randn(K, rows, cols, device=DEV).to(dtype))
    return view


def rel(ours, want) -> float:
    ours, want = ours.double().cpu(), want.double().cpu()
    return float((ours - want).abs().max() / want.abs().max())


def main() -> None:
    from geffect_fast.ops.triton import _common, embedding_dot, linear_dot, norm_dot, row_dot, segment_outer

    out = {}
    gen = torch.Generator().manual_seed(0)
    seg = torch.tensor([0, 1, 1], device=DEV)
    h = torch.float16
    for route in ("fused", "gemm"):
        _common.LINEAR_ROUTE = route
        for name, (i, o) in {"x1": (40, 24), "x2": (24, 40)}.items():  # the far tensor g on either side
            g = far_rows(3, o)
            a = torch.randn(3, i, generator=gen).to(device=DEV, dtype=h)
            v = torch.randn(1, o, i, generator=gen).to(device=DEV, dtype=h)
            vb = torch.randn(1, o, generator=gen).to(device=DEV, dtype=h)
            want = ref.linear_dot(a.cpu(), g.cpu(), v.cpu(), seg.cpu(), 2, vb.cpu())
            got = linear_dot.linear_dot(a, g, v, seg, 2, vb)
            out[f"linear_dot/{route}/g-as-{name}"] = max(rel(got[0], want[0]), rel(got[1], want[1]))
        v = far_directions(3, 20, 16)  # direction k = 2 starts past 2^31
        a = torch.randn(5, 16, generator=gen).to(device=DEV, dtype=h)
        g = torch.randn(5, 20, generator=gen).to(device=DEV, dtype=h)
        got, _ = linear_dot.linear_dot(a, g, v, 5, 1)
        out[f"linear_dot/{route}/far-direction"] = rel(got, ref.linear_dot(a.cpu(), g.cpu(), v.cpu(), 5, 1)[0])
    _common.LINEAR_ROUTE = "fused"
    x = far_rows(3, 33)
    p = torch.randn(2, 3, 33, generator=gen).to(DEV)
    out["row_dot"] = rel(row_dot.row_dot(p, x, seg, 2), ref.row_dot(p.cpu(), x.cpu(), seg.cpu(), 2))
    v = far_directions(3, 11, 33)
    ids = torch.tensor([0, 10, 4, 7], device=DEV)
    g = torch.randn(4, 33, generator=gen).to(device=DEV, dtype=h)
    got = embedding_dot.embedding_dot(ids, g, v, 1, 4)
    out["embedding_dot"] = rel(got, ref.embedding_dot(ids.cpu(), g.cpu(), v.cpu(), 1, 4))
    xh, g = far_rows(3, 33), far_rows(3, 33)
    vw = torch.randn(2, 33, generator=gen).to(device=DEV, dtype=h)
    got = norm_dot.norm_dot(xh, g, vw, vw, seg, 2)
    want = ref.norm_dot(xh.cpu(), g.cpu(), vw.cpu(), vw.cpu(), seg.cpu(), 2)
    out["norm_dot"] = max(rel(got[0], want[0]), rel(got[1], want[1]))
    u = far_rows(3, 9)
    w = torch.randn(3, 5, generator=gen).to(device=DEV, dtype=h)
    got = segment_outer.segment_outer(u, w, seg, 2)
    out["segment_outer"] = rel(got, ref.segment_outer(u.cpu(), w.cpu(), seg.cpu(), 2))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
