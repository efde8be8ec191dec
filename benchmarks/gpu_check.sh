#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (H100/H200, no network): one run of at most 6 minutes, build included,
# so that a rerun fits in the lease.
#
#   bash benchmarks/gpu_check.sh             # from anywhere; results in $OUT (default ./gpu_out)
#   bash benchmarks/gpu_check.sh --dry-run   # print each step and its budget, run nothing
#   bash benchmarks/gpu_check.sh --simulate  # every step on this CPU at toy sizes (tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --simulate --dry-run   # the simulation's steps and budget
#   bash benchmarks/gpu_check.sh --steps ops,e2e        # a rerun of some steps only (build first if it is named)
#
# Steps, in order of value, each under its own time budget (a step that runs out is cut, the next one starts):
#   build    the extension for sm_90a only, nvcc jobs in parallel; if it fails, every later step still runs on
#            the routes that need no extension (Triton, cuBLAS + Triton epilogue, torch) from the source tree
#   tests    op correctness: the op and GPU tests on CUDA tensors (pytest-xdist where installed; interrupted
#            shortly before the step's limit, so that pytest still prints what failed)
#   ops      benchmarks/bench_gpu.py --only ops: per-op rates against cuBLAS and the copy bandwidth measured in
#            the same run
#   e2e      benchmarks/bench_gpu.py --only e2e: measure() against plain forward+backward on a ~1B Llama
#   host     benchmarks/bench_host.py: the fixed per-call cost, the taps' machinery per tap, ours/plain over B
#   factored benchmarks/bench_factored.py: dense and factored routes against the cost model's choice
#   suite    benchmarks/run.py on one case against the peers installed here (opacus only where it imports)
#   memory   benchmarks/check_memory.py: the memory model against the allocator's peaks
# (a MoE step joins when the library measures MoE layers.)
#
# Every step writes its files into one working folder as it goes, and $OUT/gpu_check.tgz is refreshed while a
# step runs (every REFRESH_S seconds) and after it: a run killed at any point returns what was done. The
# output ends with the verdict block (benchmarks/gpu_verdict.py, at most 3,000 characters, first line
# "GPU CHECK VERDICT"): each target, its measured value, pass or miss, each step's exit code and time.
set -uo pipefail
MODE=gpu
DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --simulate) MODE=sim ;;
    --steps) ONLY=${2:-}; [ -n "$ONLY" ] || { echo "--steps needs a comma list of steps" >&2; exit 2; }; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--simulate] [--dry-run] [--steps build,ops,...]" >&2; exit 2 ;;
  esac
  shift
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
JOBS=$(nproc 2>/dev/null || echo 4)
REFRESH_S=${REFRESH_S:-15}
# no network on the GPU machine: pip and Hugging Face must not try it; the source tree is importable whether
# or not the build succeeds (the extension modules land in it when it does)
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
W='<workdir>'  # the dry run makes nothing
[ "$DRY" = 1 ] || W=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PEERS="ours[auto],plain_fwd_bwd,per_sample_loop"
if [ "$MODE" = gpu ] && "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("opacus") is None)' >/dev/null 2>&1; then PEERS="$PEERS,opacus"; fi
FAIL_BUILD="echo 'build failed on purpose (GPU_CHECK_FAIL_BUILD=1)'; exit 1"

# name | budget (s) | command; OVERHEAD: machine facts, packing after every step, the verdict
if [ "$MODE" = sim ]; then
  export TRITON_INTERPRET=1
  OVERHEAD=20
  BUILD="P11=\$($PY -c 'import pybind11; print(pybind11.get_cmake_dir())') && cmake -S . -B $W/build -DGEFFECT_FAST_CUDA=0 -DPython_EXECUTABLE=\$(command -v $PY) -Dpybind11_DIR=\$P11 -DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$W/build/lib && cmake --build $W/build --target _C_cpu --parallel $JOBS && ls $W/build/lib"
  STEPS=(
    "build|90|${GPU_CHECK_FAIL_BUILD:+$FAIL_BUILD; }$BUILD"
    "tests|60|$PY -m pytest -q -p no:cacheprovider -rfE tests/test_gpu.py tests/ops/test_segments.py::test_unchecked_kernels_with_uniform_segments_equal_the_checked_ops_with_ids"
    "ops|60|$PY -m benchmarks.bench_gpu --device cpu --quick --only ops --repeats 1 --budget 50 --out $W"
    "e2e|45|$PY -m benchmarks.bench_gpu --device cpu --quick --only e2e --repeats 1 --budget 35 --out $W"
    "host|45|$PY -m benchmarks.bench_host --device cpu --model llama-tiny --T 16 --batches 1,2 --repeats 2 --threads 1 --out $W --tag _check"
    "factored|45|$PY -m benchmarks.bench_factored --device cpu --quick --repeats 1 --budget 15 --out $W"
    "suite|60|$PY -m benchmarks.run --device cpu --small --repeats 1 --timeout 45 --cases 'llama-tiny B1 T32' --methods 'ours[auto],plain_fwd_bwd' --out $W"
    "memory|45|$PY -m benchmarks.check_memory --device cpu --quick --out $W"
  )
else
  export TRITON_INTERPRET=0
  OVERHEAD=15
  XDIST=$(( JOBS < 16 ? JOBS : 16 ))  # Triton compiles the tests' kernels: one worker per core (a CUDA context each)
  BUILD="GEFFECT_FAST_CUDA=1 GEFFECT_FAST_CUDA_ARCHS=90a-real GEFFECT_FAST_BUILD_JOBS=$JOBS $PY -m pip install --no-index --no-build-isolation --no-deps -e . && $PY -c 'import geffect_fast as gf, json; print(json.dumps(gf.backends(\"cuda\")))'"
  STEPS=(
    "build|60|${GPU_CHECK_FAIL_BUILD:+$FAIL_BUILD; }$BUILD"
    "tests|65|timeout -s INT 57 $PY -m pytest -q -p no:cacheprovider -rfE --maxfail=50 \$($PY -c 'import xdist' 2>/dev/null && echo -n '-n $XDIST') --ignore=tests/ops/test_cuda_emulated.py tests/ops tests/test_gpu.py tests/test_backends.py"
    "ops|80|$PY -m benchmarks.bench_gpu --only ops --repeats 10 --budget 72 --out $W"
    "e2e|55|$PY -m benchmarks.bench_gpu --only e2e --repeats 10 --budget 48 --out $W"
    "host|20|$PY -m benchmarks.bench_host --device cuda --model llama-10M --T 128 --batches 1,4,16 --repeats 8 --threads 4 --out $W --tag _check"
    "factored|20|$PY -m benchmarks.bench_factored --device cuda --dtypes float32,bfloat16 --repeats 3 --budget 14 --out $W"
    "suite|30|$PY -m benchmarks.run --device cuda --repeats 3 --timeout 12 --cases 'llama-135M B16 T256' --methods '$PEERS' --out $W"
    "memory|15|$PY -m benchmarks.check_memory --device cuda --out $W"
  )
fi
if [ -n "$ONLY" ]; then  # the steps named, in the check's own order
  KEEP=()
  for s in "${STEPS[@]}"; do [[ ",$ONLY," == *",$(cut -d'|' -f1 <<<"$s"),"* ]] && KEEP+=("$s"); done
  for n in ${ONLY//,/ }; do
    printf '%s\n' "${STEPS[@]}" | cut -d'|' -f1 | grep -qx "$n" || { echo "unknown step $n" >&2; exit 2; }
  done
  STEPS=("${KEEP[@]}")
fi
TOTAL=$OVERHEAD
for s in "${STEPS[@]}"; do TOTAL=$((TOTAL + $(cut -d'|' -f2 <<<"$s"))); done
LIMIT=360
[ "$MODE" = sim ] && LIMIT=480  # toy sizes on 2 CPU cores, one Python start per step

if [ "$DRY" = 1 ]; then
  echo "gpu_check dry run ($MODE): steps and budgets (seconds), in the order they run"
  echo "  env: PIP_NO_INDEX=$PIP_NO_INDEX PIP_DISABLE_PIP_VERSION_CHECK=$PIP_DISABLE_PIP_VERSION_CHECK HF_HUB_OFFLINE=$HF_HUB_OFFLINE PYTHONPATH=$ROOT (the source tree: steps run if the build fails)"
  for s in "${STEPS[@]}"; do printf '  %-8s %4s  %s\n' "$(cut -d'|' -f1 <<<"$s")" "$(cut -d'|' -f2 <<<"$s")" "$(cut -d'|' -f3- <<<"$s")"; done
  printf '  %-8s %4s  %s\n' overhead "$OVERHEAD" "machine facts, packing the tarball after every step, the verdict"
  printf '  %-8s %4s\n' total "$TOTAL"
  [ "$TOTAL" -le "$LIMIT" ] || { echo "over the $LIMIT-second budget" >&2; exit 1; }
  exit 0
fi

mkdir -p "$OUT"
pack() {  # the tarball, replaced atomically (a reader never sees half of one)
  tar czf "$OUT/.gpu_check.tgz.$BASHPID" -C "$W" --exclude=./build . 2>/dev/null && mv -f "$OUT/.gpu_check.tgz.$BASHPID" "$OUT/gpu_check.tgz"
}
T_START=$(date +%s)
{
  echo "mode $MODE"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null || echo "no GPU (nvidia-smi: none)"
  "$PY" - <<'EOF' 2>&1
import importlib.util, torch, numpy
tv = __import__("triton").__version__ if importlib.util.find_spec("triton") else "none"
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", tv, "numpy", numpy.__version__)
EOF
  (nvcc --version 2>/dev/null || echo "nvcc: none") | tail -1
  echo "cpus $JOBS"
} >"$W/machine.txt" 2>&1
cat "$W/machine.txt"
: >"$W/steps.tsv"
pack
for s in "${STEPS[@]}"; do
  name=$(cut -d'|' -f1 <<<"$s"); budget=$(cut -d'|' -f2 <<<"$s"); cmd=$(cut -d'|' -f3- <<<"$s")
  echo "== $name (budget ${budget}s)"
  t0=$(date +%s)
  # refresh the tarball while the step runs; on TERM a pack under way finishes first (no half-written file)
  (trap 'kill $nap 2>/dev/null; exit 0' TERM; while :; do sleep "$REFRESH_S" & nap=$!; wait $nap; pack; done) &
  refresher=$!
  timeout --kill-after=5 "$budget" bash -c "$cmd" >"$W/$name.log" 2>&1
  rc=$?
  kill "$refresher" 2>/dev/null
  wait "$refresher" 2>/dev/null
  dt=$(( $(date +%s) - t0 ))
  tail -3 "$W/$name.log" | cut -c1-200
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$budget" >>"$W/steps.tsv"
  echo "$name rc=$rc ${dt}s (budget ${budget}s)$([ $rc = 124 ] && echo ' TIMED OUT')"
  if [ "$name" = build ] && [ $rc != 0 ]; then
    tail -15 "$W/build.log" | cut -c1-200
    echo "build failed: the later steps run on the routes that need no extension (Triton, cuBLAS + Triton epilogue, torch)"
  fi
  pack
done
echo "== done in $(( $(date +%s) - T_START ))s; all files in $OUT/gpu_check.tgz"
"$PY" -m benchmarks.gpu_verdict "$W" $([ "$MODE" = sim ] && echo --simulated) >"$W/verdict.out" 2>&1 || echo "GPU CHECK VERDICT  (the verdict script failed: see verdict.out in the tarball)" >"$W/verdict.out"
pack
cp "$W/verdict.txt" "$OUT/verdict.txt" 2>/dev/null
echo
cat "$W/verdict.out"
rm -rf "$W"
