"""Build ``_C_cuda`` from csrc/ with the host emulation of ``cuda_runtime.h`` beside this file (C++17, no nvcc, no
GPU): each ``kernel<<<grid, block, smem, stream>>>(args)`` is rewritten as a call of ``gfemu::make_launch``, and
the .cu files compile as C++ with everything else unchanged — the launchers, the vector-path rule, the kernels'
index arithmetic and the pybind11 bindings are the ones the GPU build uses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SHIM = Path(__file__).parent
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<(.+?)>>>\(")


def compiler() -> str | None:
    """A C++17 compiler with POSIX ucontext (the emulated lanes of a warp are coroutines), or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None
    probe = "#include <ucontext.h>\n#include <tuple>\nint main() { ucontext_t c; return getcontext(&c); }\n"
    r = subprocess.run(
        [cxx, "-std=c++17", "-x", "c++", "-", "-o", os.devnull], input=probe, capture_output=True, text=True
    )
    return cxx if r.returncode == 0 else None


def build(root: Path, out: Path, jobs: int = 2) -> Path:
    """The emulated module built from ``root``/csrc into ``out``; returns the path of the shared object."""
    import pybind11

    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++17 compiler with ucontext")
    src = out / "csrc"
    shutil.copytree(root / "csrc", src)
    units = []
    for f in sorted((src / "cuda").iterdir()):
        if f.suffix in (".cu", ".cuh"):
            f.write_text(LAUNCH.sub(r"::gfemu::make_launch(\1, \2)(", f.read_text()))
        if f.suffix == ".cu":
            units.append(f.rename(f.with_suffix(".cu.cpp")))
        elif f.suffix == ".cpp":
            units.append(f)
    inc = [f"-I{SHIM}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    objs, running = [], []
    for f in units:
        obj = f.with_suffix(".o")
        cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-pthread", *inc, "-c", str(f), "-o", str(obj)]
        running.append((subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True), f))
        objs.append(str(obj))
        while len(running) >= jobs or (running and f == units[-1]):
            proc, name = running.pop(0)
            _, err = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"compiling {name.name} for the emulation failed:\n{err[-4000:]}")
    so = out / f"_C_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
    r = subprocess.run([cxx, "-shared", "-pthread", *objs, "-o", str(so)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"linking the emulation failed:\n{r.stderr[-4000:]}")
    return so


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
