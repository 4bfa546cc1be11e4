"""Build script: the pure-Python package always installs; the native engine only where CUDA is.

SPECTRUM_FAST_CUDA=auto (default) builds ``spectrum_fast._C`` when ``nvcc`` and ``cmake`` are found and
skips it otherwise; =1 requires it (the build stops with the reason); =0 never builds it.
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


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _missing() -> str | None:
    """Why the native engine cannot be built here, or None."""
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if not shutil.which("cmake"):
        return "cmake not found (pip install cmake)"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 not importable (pip install pybind11, or build without --no-build-isolation)"
    return None


class CMakeBuild(build_ext):
    def run(self) -> None:
        mode = os.environ.get("SPECTRUM_FAST_CUDA", "auto").lower()
        reason = "SPECTRUM_FAST_CUDA=0" if mode in ("0", "off", "no") else _missing()
        if reason:
            if mode in ("1", "on", "yes"):
                sys.exit(f"spectrum_fast: SPECTRUM_FAST_CUDA=1 but the native engine cannot be built: {reason}")
            print(f"spectrum_fast: skipping the native CUDA engine: {reason}", file=sys.stderr)
            return
        try:
            super().run()
        except (subprocess.CalledProcessError, OSError) as e:
            if mode in ("1", "on", "yes"):
                raise
            print(f"spectrum_fast: native CUDA engine failed to build, installing without it: {e}", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        if not cuda_home and Path("/usr/local/cuda/bin/nvcc").exists():
            cuda_home = "/usr/local/cuda"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if cuda_home:
            args.append(f"-DCUDAToolkit_ROOT={cuda_home}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_temp), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_temp), "--parallel"], check=True)


setup(ext_modules=[CMakeExtension("spectrum_fast._C")], cmdclass={"build_ext": CMakeBuild})
