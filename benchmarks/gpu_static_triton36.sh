#!/usr/bin/env bash
# The static GPU check (benchmarks/gpu_static.py) under the GPU image's Triton, 3.6, rather than CI's: a
# throwaway virtual environment holding triton 3.6 and numpy < 2.4 only, in front of the current environment's
# packages (torch, geffect_fast) through a .pth file. Not a CI test: it doubles the check's ~3 minutes.
#
#   bash benchmarks/gpu_static_triton36.sh            # -> benchmarks/results/gpu_static_triton36.{json,md}
#   bash benchmarks/gpu_static_triton36.sh --tests    # first the Triton op tests under 3.6's CPU interpreter
#   TR36=/tmp/tr36 PYTHON=.venv/bin/python bash benchmarks/gpu_static_triton36.sh
# (3.6's interpreter needs numpy < 2.4: with the GPU image's numpy 2.5 it fails on every kernel; on the GPU,
# where kernels are compiled, numpy's version does not matter.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TR36=${TR36:-/tmp/tr36}
if [ ! -x "$TR36/bin/python" ] || ! "$TR36/bin/python" -c 'import triton, sys; sys.exit(not triton.__version__.startswith("3.6"))' 2>/dev/null; then
  "$PY" -m venv "$TR36"
  "$TR36/bin/pip" install -q "triton==3.6.*" "numpy<2.4"
fi
site=$("$TR36/bin/python" -c 'import site; print(site.getsitepackages()[0])')
"$PY" -c 'import site; print(site.getsitepackages()[0])' >"$site/zz_outer_env.pth"  # torch etc., after triton 3.6
"$TR36/bin/python" -c 'import triton, torch; print("triton", triton.__version__, "torch", torch.__version__)'
if [ "${1:-}" = --tests ]; then
  shift
  TRITON_INTERPRET=1 "$TR36/bin/python" -m pytest -q -p no:cacheprovider tests/ops -k triton \
    --ignore=tests/ops/test_cuda_emulated.py
fi
# the built CUDA module the outer environment imports (run from the repository root the source tree shadows a
# non-editable install)
cuda=$(cd / && "$PY" -c 'import importlib.util as u; s = u.find_spec("geffect_fast._C_cuda"); print(s.origin if s else "")' 2>/dev/null || true)
exec "$TR36/bin/python" -m benchmarks.gpu_static ${cuda:+--cuda-module "$cuda"} \
  --json benchmarks/results/gpu_static_triton36.json --md benchmarks/results/gpu_static_triton36.md "$@"
