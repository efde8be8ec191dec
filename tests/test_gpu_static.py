"""benchmarks/gpu_static.py: every kernel the dispatcher can launch compiles for sm_90a and sm_80 without a GPU,
with no spills, and every launched bf16/fp16 linear_dot config uses tensor-core instructions (wgmma on sm_90a,
mma on sm_80). CI compiles the launched rows only (--launched-only); benchmarks/results/gpu_static.md holds all,
under CI's Triton and the GPU image's (gpu_static_triton36.md, benchmarks/gpu_static_triton36.sh)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    """benchmarks/<name>.py loaded from its file: an installed package (opacus ships one) may own the name
    ``benchmarks`` in this process."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_repo_benchmarks_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


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
        [sys.executable, "-m", "benchmarks.gpu_static", "--launched-only", "--json", str(out), *cuda],
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
    for arch, major in (("sm_90a", 9), ("sm_80", 8)):
        rows = [r for r in triton_rows if r["arch"] == arch and "linear" in r["kernel"]]
        assert all(r["launched"] for r in rows)
        names = {r["config"].split()[0] for r in rows}
        want = {n for mode in range(4) for n in _common.linear_configs(mode, major)}
        assert names == want, (arch, names, want)  # every config the launcher can pick there, no other
        paths = {" ".join(r["config"].split()[6:]) for r in rows}
        assert paths == ({"tma", "ptr", "ptr ragged-r"} if major == 9 else {"ptr", "ptr ragged-r"}), paths
    if importlib.util.find_spec("geffect_fast._C_cuda") is not None:
        assert any(r["kernel"].startswith("cuda:") for r in static_rows), "the built CUDA module was not read"


def test_no_spills_and_tensor_cores(static_rows):
    problems = _bench_module("gpu_static").problems

    assert problems(static_rows) == []
    for r in static_rows:
        assert r["registers"] and r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, r
    half = [
        r
        for r in static_rows
        if r["kernel"] == "triton:linear_dot_kernel" and any(t in r["config"] for t in (" bf16 ", " fp16 ", "split"))
    ]
    assert len(half) >= 2 * 3 * 5
    for r in half:
        assert r["tensor_core_ops"] > 0, r


def test_the_check_can_fail():
    """The exit criteria themselves: a spilling or tensor-core-free half config is reported."""
    problems = _bench_module("gpu_static").problems

    ok = {"kernel": "k", "config": "c bf16 v", "arch": "sm_90a", "registers": 128, "spill_bytes": 0,
          "tensor_core_ops": 4, "expect_tensor_cores": True, "launched": True}  # fmt: skip
    assert problems([ok]) == []
    assert "spills" in problems([{**ok, "spill_bytes": 16}])[0]
    assert "no tensor-core" in problems([{**ok, "tensor_core_ops": 0}])[0]
    # a config the dispatcher never launches on that arch is reported in the table, not failed
    assert problems([{**ok, "spill_bytes": 16, "tensor_core_ops": 0, "launched": False}]) == []


def test_launched_flags_follow_the_launcher():
    """launched is what the launcher can pick: the 128×256 tile on sm_90a with TMA only, never on sm_80."""
    variants = _bench_module("gpu_static").variants

    rows = [v for v in variants() if "linear" in v.kernel]
    wide = [v for v in rows if v.config.startswith("wide ")]
    assert {(v.arch, v.config.split()[-1], v.launched) for v in wide} == {
        ("sm_90a", "tma", True), ("sm_90a", "ptr", False), ("sm_90a", "ragged-r", False),
        ("sm_80", "ptr", False), ("sm_80", "ragged-r", False),
    }  # fmt: skip
    assert all(v.launched for v in rows if v.config.startswith(("large ", "small ")))
    assert not any(v.constexprs["TMA"] for v in rows if v.arch == "sm_80" or v.constexprs["MODE"] == 3)
