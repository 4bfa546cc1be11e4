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


def _cuda_libs() -> tuple[Path, Path] | None:
    """(include, lib) folders holding cuSOLVER and cuBLAS: the nvidia-* wheels, or a CUDA toolkit."""
    import sysconfig

    candidates = []
    if os.environ.get("SPECTRUM_FAST_CUDA_INCLUDE") and os.environ.get("SPECTRUM_FAST_CUDA_LIB"):
        candidates.append((Path(os.environ["SPECTRUM_FAST_CUDA_INCLUDE"]), Path(os.environ["SPECTRUM_FAST_CUDA_LIB"])))
    # purelib is the target environment's site-packages, also inside pip's isolated build
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        root = Path(site) / "nvidia" / "cu13"
        candidates.append((root / "include", root / "lib"))
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates.append((Path(cuda_home) / "include", Path(cuda_home) / "lib64"))
    for inc, lib in candidates:
        if (inc / "cusolverDn.h").is_file() and (inc / "cublas_v2.h").is_file() and any(lib.glob("libcusolver.so*")):
            return inc, lib
    return None


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
    if _cuda_libs() is None:
        return "cuSOLVER/cuBLAS headers and libraries not found (pip install nvidia-cusolver nvidia-cublas)"
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
        libs = _cuda_libs()
        if libs:
            args += [f"-DSPECTRUM_FAST_CUDA_INCLUDE={libs[0]}", f"-DSPECTRUM_FAST_CUDA_LIB={libs[1]}"]
        if cuda_home:
            args += [f"-DCUDAToolkit_ROOT={cuda_home}", f"-DCMAKE_CUDA_COMPILER={Path(cuda_home) / 'bin' / 'nvcc'}"]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_temp), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_temp), "--parallel"], check=True)


setup(ext_modules=[CMakeExtension("spectrum_fast._C")], cmdclass={"build_ext": CMakeBuild})
