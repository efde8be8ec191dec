#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (H100/H200, no network): one run of at most 8 minutes, build included.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT (default ./gpu_out)
#   bash benchmarks/gpu_check.sh --dry-run  # here, on a CPU: print each step and its budget, run nothing
#
# Steps, each under its own time budget (a step that runs out is cut and the next one starts):
#   build   the extension for sm_90a only, nvcc jobs in parallel (one translation unit per op)
#   tests   the op tests with Triton and CUDA on CUDA tensors, the GPU tests (pytest-xdist where installed)
#   bench   benchmarks/bench_gpu.py: per-op rates against cuBLAS and the copy bandwidth measured in the same
#           run, measure() against plain forward+backward on a ~1B Llama, ours/plain against batch size
#   factored benchmarks/bench_factored.py: one layer's dense and factored routes (float32, bf16) against the
#           cost model's choice, and from_objective + measure dense/factored/auto on 1-block Llamas (h 2048, 4096)
#   host    benchmarks/bench_host.py: the fixed per-call cost, the taps' machinery per tap, ours/plain at B = 1…16
#   suite   benchmarks/run.py --device cuda on one case against the peers (directions built on the GPU)
#   memory  benchmarks/memory_model.py --device cuda: the memory model against the allocator's peaks
# Everything (logs, CSV, JSON, Markdown) is packed into one file, $OUT/gpu_check.tgz; the summary tables
# print at the end, with each step's exit code and time.
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
JOBS=$(nproc 2>/dev/null || echo 4)
W=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1

# name | budget (s) | command
STEPS=(
  "build|120|GEFFECT_FAST_CUDA=1 GEFFECT_FAST_CUDA_ARCHS=90a-real GEFFECT_FAST_BUILD_JOBS=$JOBS $PY -m pip install --no-build-isolation --no-deps -e . && $PY -c 'import geffect_fast as gf, json; print(json.dumps(gf.backends(\"cuda\")))'"
  "tests|110|$PY -m pytest -q -p no:cacheprovider --maxfail=25 \$($PY -c 'import xdist' 2>/dev/null && echo -n '-n 8') --ignore=tests/ops/test_cuda_emulated.py tests/ops tests/test_gpu.py tests/test_backends.py"
  "bench|120|$PY -m benchmarks.bench_gpu --out $W --repeats 20"
  "factored|25|$PY -m benchmarks.bench_factored --device cuda --dtypes float32,bfloat16 --repeats 5 --budget 18 --out $W"
  "host|20|$PY -m benchmarks.bench_host --device cuda --repeats 10 --out $W"
  "suite|50|$PY -m benchmarks.run --device cuda --repeats 3 --timeout 50 --cases 'llama-135M B16 T256' --out $W --methods 'ours[auto],ours[triton],ours[cuda],plain_fwd_bwd,per_sample_loop,opacus'"
  "memory|25|$PY -m benchmarks.memory_model --device cuda --out $W"
)
TOTAL=10  # machine facts and packing
for s in "${STEPS[@]}"; do TOTAL=$((TOTAL + $(cut -d'|' -f2 <<<"$s"))); done

if [ $DRY = 1 ]; then
  echo "gpu_check dry run: steps and budgets (seconds)"
  for s in "${STEPS[@]}"; do printf '  %-7s %4s  %s\n' "$(cut -d'|' -f1 <<<"$s")" "$(cut -d'|' -f2 <<<"$s")" "$(cut -d'|' -f3- <<<"$s")"; done
  printf '  %-7s %4s\n' total "$TOTAL"
  rmdir "$W"
  [ "$TOTAL" -le 480 ] || { echo "over the 8-minute budget" >&2; exit 1; }
  exit 0
fi

mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
  nvcc --version | tail -1
  echo "cpus $JOBS"
} >"$W/machine.txt" 2>&1
cat "$W/machine.txt"

: >"$W/steps.txt"
for s in "${STEPS[@]}"; do
  name=$(cut -d'|' -f1 <<<"$s"); budget=$(cut -d'|' -f2 <<<"$s"); cmd=$(cut -d'|' -f3- <<<"$s")
  echo "== $name (budget ${budget}s)"
  t0=$(date +%s)
  timeout --kill-after=5 "$budget" bash -c "$cmd" >"$W/$name.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  tail -3 "$W/$name.log"
  echo "$name rc=$rc ${dt}s (budget ${budget}s)$([ $rc = 124 ] && echo ' TIMED OUT')" | tee -a "$W/steps.txt"
  if [ "$name" = build ] && [ $rc != 0 ]; then
    tail -40 "$W/build.log"
    break  # nothing else can run without the extension
  fi
done

tar czf "$OUT/gpu_check.tgz" -C "$W" . 2>/dev/null
echo
echo "== summary ($(head -2 "$W/machine.txt" | tail -1 | cut -d, -f1)); all files in $OUT/gpu_check.tgz"
grep -v '^$' "$W/summary.md" 2>/dev/null | grep -v '^`' || echo "no benchmark summary: see bench.log"
grep '^|' "$W/host_cuda.md" 2>/dev/null
grep -E "^(\| [0-9]|The model picks|- I)" "$W/factored_gpu.md" 2>/dev/null | cut -c1-160
grep '^|' "$W/suite_gpu.md" 2>/dev/null | cut -c1-160
grep -E '^\| [0-9]' "$W/memory_model_cuda.md" 2>/dev/null | cut -c1-120
grep -E "passed|failed|error" "$W/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -15
cat "$W/steps.txt"
