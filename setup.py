"""Build driver: runs the CMake project (CMakeLists.txt, the one build definition of csrc/) and puts the
extension modules next to the Python package. Project metadata lives in pyproject.toml.

Environment variables:

* ``GEFFECT_FAST_CUDA``: ``auto`` (default: build the CUDA module when nvcc is found), ``1`` (required:
  fail without nvcc), ``0`` (skip it).
* ``GEFFECT_FAST_CUDA_ARCHS``: CUDA architectures (default ``80-real;90-real;90-virtual``).
* ``GEFFECT_FAST_CPU_ARCH``: ``-march`` of the CPU kernels (default ``native``: the building machine; set it
  to e.g. ``x86-64-v3`` when the build is run elsewhere than where it runs).
* ``GEFFECT_FAST_BUILD_JOBS``: parallel compile jobs (default: the CPU count).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def find_nvcc() -> str | None:
    """nvcc to build the CUDA module with, per GEFFECT_FAST_CUDA (auto / 1 / 0)."""
    mode = os.environ.get("GEFFECT_FAST_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return None
    candidates = [shutil.which("nvcc")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(str(Path(os.environ[env]) / "bin" / "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    if mode in ("1", "on", "true", "yes"):
        raise RuntimeError("GEFFECT_FAST_CUDA=1 but nvcc was not found (PATH, CUDA_HOME, /usr/local/cuda)")
    print("geffect_fast: nvcc not found; building the CPU kernels only", file=sys.stderr)
    return None


class CMakeExtension(Extension):
    """One CMake target of the project at the repository root (CMakeLists.txt)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])
        self.target = name.rsplit(".", 1)[-1]


class CMakeBuild(build_ext):
    _configured: set[str] = set()

    def build_extension(self, ext: Extension) -> None:
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake = _cmake()
        key = f"{build_temp}|{extdir}"
        if key not in self._configured:
            subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_temp), *_configure_args(extdir)], check=True)
            self._configured.add(key)
        jobs = os.environ.get("GEFFECT_FAST_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_temp), "--target", ext.target, "--parallel", jobs], check=True)


def _cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is not None:
        return cmake
    try:
        import cmake as cmake_pkg  # the PyPI cmake package
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("cmake is needed to build geffect_fast's kernels (pip install cmake)") from e
    return str(Path(cmake_pkg.CMAKE_BIN_DIR) / "cmake")


def _configure_args(extdir: Path) -> list[str]:
    import pybind11

    args = [
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    if NVCC:
        args += ["-DGEFFECT_FAST_CUDA=1", f"-DCMAKE_CUDA_COMPILER={NVCC}"]
    else:
        args.append("-DGEFFECT_FAST_CUDA=0")
    for var in ("GEFFECT_FAST_CUDA_ARCHS", "GEFFECT_FAST_CPU_ARCH"):
        if os.environ.get(var):
            args.append(f"-D{var}={os.environ[var]}")
    try:
        import ninja

        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
    except ImportError:
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
    return args


NVCC = find_nvcc()
extensions = [CMakeExtension("geffect_fast._C_cpu")]
if NVCC:
    extensions.append(CMakeExtension("geffect_fast._C_cuda"))

setup(ext_modules=extensions, cmdclass={"build_ext": CMakeBuild})
