#!/usr/bin/env bash
# GPU check, for a lent GPU machine (see DEVELOPERS.md): build the extension there, run the GPU tests
# (CUDA and Triton backends against the reference, bf16/fp32/fp64, large shapes, measure() end to end),
# then the kernel and end-to-end benchmarks. Full results and logs go to $OUT; a short table is printed
# last. Budget: under 10 minutes on an H100 (build ~1, tests <= 2.5, kernels and e2e <= 4, suite <= 2.5).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; OUT defaults to ./gpu_out
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/machine.txt"

echo "== build (pip install --no-build-isolation --no-deps -e .)"
start=$(date +%s)
if ! GEFFECT_FAST_CUDA=1 GEFFECT_FAST_CUDA_ARCHS="90a-real;80-real" $PY -m pip install --no-build-isolation --no-deps -e . \
    >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED (log: $OUT/build.log)"
  exit 1
fi
echo "built in $(( $(date +%s) - start ))s"
$PY -c "import geffect_fast as gf, json; print(json.dumps(gf.backends('cuda')))" | tee "$OUT/backends.json"

echo "== GPU tests"
TRITON_INTERPRET=0 timeout 150 $PY -m pytest -q -x tests/ops tests/test_gpu.py -p no:cacheprovider \
  2>&1 | tee "$OUT/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks"
timeout 240 $PY -m benchmarks.bench_gpu --out "$OUT" 2>&1 | tee "$OUT/bench.log" | grep -v '^|' || true
echo "== the benchmark suite against peers, GPU cases"
timeout 150 $PY -m benchmarks.run --device cuda --repeats 3 --timeout 60 --out "$OUT" \
  --methods "ours[auto],ours[cuda],ours[triton],plain_fwd_bwd,per_sample_loop,official_protocol,torch.func_vmap,opacus" \
  2>&1 | tee "$OUT/suite.log" | grep -v '^|' || true

echo "== memory model against the CUDA allocator's peaks"
timeout 90 $PY -m benchmarks.memory_model --device cuda --out "$OUT" 2>&1 | tail -3 || true

echo
echo "== summary (tests exit code: $tests_rc)"
cat "$OUT/summary.md" 2>/dev/null || echo "no summary: see $OUT/bench.log"
grep '^|' "$OUT/suite_gpu.md" 2>/dev/null | cut -c1-150 || true
grep -E '^\| [0-9]' "$OUT/memory_model_cuda.md" 2>/dev/null | cut -c1-120 || true
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
