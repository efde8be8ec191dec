"""benchmarks/gpu_static.py: every kernel auto can pick compiles for sm_90a and sm_80 without a GPU, with no
spills, and every bf16/fp16 linear_dot config uses tensor-core instructions (wgmma on sm_90a, mma on sm_80)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def static_rows(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:  # pragma: no cover - the test extras install it
        pytest.fail("triton is not installed: the static GPU check needs its compiler")
    out = tmp_path_factory.mktemp("static") / "gpu_static.json"
    # The module this test process imports: the subprocess runs from the repository root, where the source tree
    # (no built module under a non-editable install) would shadow the installed package.
    spec = importlib.util.find_spec("geffect_fast._C_cuda")
    cuda = ["--cuda-module", spec.origin] if spec is not None and spec.origin else []
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_static", "--json", str(out), *cuda],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_schema_and_coverage(static_rows):
    from geffect_fast.ops.triton import _common

    keys = {"kernel", "config", "arch", "registers", "spill_bytes", "tensor_core_ops"}
    assert all(keys <= set(r) for r in static_rows)
    triton_rows = [r for r in static_rows if r["kernel"].startswith("triton:")]
    kernels = {r["kernel"] for r in triton_rows}
    assert kernels == {
        f"triton:{k}_kernel" for k in ("linear_dot", "row_dot", "embedding_dot", "norm_dot", "segment_outer")
    }
    for arch in ("sm_90a", "sm_80"):
        names = {r["config"].split()[0] for r in triton_rows if r["arch"] == arch and "linear" in r["kernel"]}
        assert names == set(_common.LINEAR_CONFIGS), (arch, names)
    if importlib.util.find_spec("geffect_fast._C_cuda") is not None:
        assert any(r["kernel"].startswith("cuda:") for r in static_rows), "the built CUDA module was not read"


def test_no_spills_and_tensor_cores(static_rows):
    for r in static_rows:
        assert r["registers"] and r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, r
    half = [
        r
        for r in static_rows
        if r["kernel"] == "triton:linear_dot_kernel" and any(t in r["config"] for t in (" bf16 ", " fp16 ", "split"))
    ]
    assert len(half) >= 2 * 3 * 4
    for r in half:
        assert r["tensor_core_ops"] > 0, r


def test_the_check_can_fail():
    """The exit criteria themselves: a spilling or tensor-core-free half config is reported."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_static import problems

    ok = {"kernel": "k", "config": "c bf16 v", "arch": "sm_90a", "registers": 128, "spill_bytes": 0,
          "tensor_core_ops": 4, "expect_tensor_cores": True}  # fmt: skip
    assert problems([ok]) == []
    assert "spills" in problems([{**ok, "spill_bytes": 16}])[0]
    assert "no tensor-core" in problems([{**ok, "tensor_core_ops": 0}])[0]
