"""The CUDA kernels (csrc/cuda) run without a GPU: compiled as C++ against a host emulation of the CUDA runtime
(tests/ops/cuda_emulation: the lanes of a warp as coroutines that meet at every shuffle), driven through the cuda
backend's Python wrappers on CPU tensors and compared with the torch reference. This checks the launchers, the
vector-path rule and every kernel's index arithmetic — vector and scalar paths, tails, groups of directions,
padding ids, 64-bit offsets, the device guard — wherever a C++ compiler is; what only a GPU can show (the
intrinsics, timing, torch's streams and devices) is tests/ops/test_cuda.py's part, on a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EMU = Path(__file__).with_name("cuda_emulation")
sys.path.insert(0, str(EMU))
import emu_build  # noqa: E402


def test_cuda_kernels_under_host_emulation(tmp_path):
    if emu_build.compiler() is None:
        pytest.skip("no C++17 compiler with ucontext (c++ or $CXX) to build the emulated CUDA kernels with")
    so = emu_build.build(ROOT, tmp_path, jobs=2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, str(EMU / "worker.py"), str(so)], capture_output=True, text=True, env=env, timeout=900
    )
    assert r.returncode == 0, f"worker died (rc {r.returncode}): {r.stderr[-3000:]}"
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) >= 275, len(results)  # every check ran
    bad = {k: e for k, e in results.items() if not (isinstance(e, list) and e[0] <= e[1])}
    assert not bad, bad
