"""The GPU check's plumbing, on the CPU: gpu_check.sh fits its 8-minute budget, and bench_gpu.py runs end to end
(Triton under its interpreter, tiny shapes) and writes its tables — so the first run on a lent GPU does not
spend its minutes on a crash."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_budgets_within_8_minutes():
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    steps = dict(re.findall(r"^\s+(\w+)\s+(\d+)", r.stdout, re.M))
    assert set(steps) == {"build", "tests", "bench", "factored", "host", "suite", "memory", "total"}, r.stdout
    assert sum(int(v) for k, v in steps.items() if k != "total") + 10 == int(steps["total"]) <= 480
    assert "GEFFECT_FAST_CUDA_ARCHS=90a-real" in r.stdout  # one architecture: the build fits


def test_bench_gpu_dry_run(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--device", "cpu", "--quick", "--repeats", "1", "--out",
         str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for section in ("linear_dot against the same-shape cuBLAS GEMM", "memory-bound ops", "measure(per_instance=True)",
                    "host overhead"):  # fmt: skip
        assert section in summary
    rows = list(csv.DictReader(open(tmp_path / "ops_gpu.csv")))
    routes = {r["route"] for r in rows if r.get("route")}
    assert {"triton fused (heuristic)", "triton gemm route (cuBLAS+Triton epilogue)"} <= routes
    for row in rows:
        if row.get("rel_err"):
            assert float(row["rel_err"]) < 1e-4, row  # every route agrees with float64 (bf16 split included)
    e2e = list(csv.DictReader(open(tmp_path / "e2e_gpu.csv")))
    assert len(e2e) == 2 and all(float(x["agree_vs_reference"]) < 1e-3 for x in e2e)
