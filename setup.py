"""fmcomm: collective-communication optimization for foundation-model training.

The native extension ``fmcomm._C`` (csrc/) is optional: when it cannot be built (no
compiler, no pybind11), the package installs without it and runs on its torch
fallback; ``fmcomm.info()`` says which. FMCOMM_NATIVE=on (the run-time option that
means "fail without the native kernels") makes a failed native build an error too.

The CUDA kernels (csrc/cuda/ -> fmcomm/_cuda_kernels.so, loaded by
fmcomm/compression/cuda_kernels.py) are optional as well: built by build_ext when an
``nvcc`` is found ($CUDA_HOME/bin, else PATH), skipped with a message otherwise, and a
failed build is a message, not a failed install. The build-time variable
BUILD_FMCOMM_CUDA (not an FMCOMM_* run-time option) changes that: ``off`` never builds
them, ``on`` makes a missing nvcc or a failed build an error, ``auto`` (the default) is
as above. BUILD_FMCOMM_CUDA_ARCHS lists the GPU architectures (default ``80;90``:
machine code for sm_80 and sm_90, plus PTX of the last for newer GPUs).
"""
import os
import shutil
import subprocess
import sys
import time

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ext_modules = []
try:
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules.append(Pybind11Extension(
        "fmcomm._C",
        sources=["csrc/bindings.cpp", "csrc/cpu/reduce.cpp", "csrc/cpu/compress.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ))
except ImportError:
    print("fmcomm: pybind11 not installed; building without the native extension", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Build native parts when possible; never let them block installing the package."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure means "no native path"
            self._give_up(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._give_up(e)

    @staticmethod
    def _give_up(err):
        if os.environ.get("FMCOMM_NATIVE", "").lower() == "on":
            raise err
        print(f"fmcomm: native extension not built ({err}); using the torch fallback", file=sys.stderr)


ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_LIBRARY = os.path.join("fmcomm", "_cuda_kernels.so")
CUDA_SOURCES = ["csrc/cuda/compress.cu"]
CUDA_DEPENDS = CUDA_SOURCES + ["csrc/cuda/compress_math.cuh", "setup.py"]


def find_nvcc():
    """nvcc under $CUDA_HOME (or $CUDA_PATH), else the first on PATH; None if neither."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidate = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nvcc")


def built_for(archs):
    return " ".join([f"sm_{a}" for a in archs] + [f"compute_{archs[-1]}"])


def nvcc_command(nvcc, output, archs):
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX: newer GPUs
    return [
        nvcc, "-O3", "-std=c++17", "-shared", "-cudart", "static",
        # IEEE float arithmetic everywhere: no FMA contraction, no flush to zero
        "-fmad=false", "-ftz=false", "-prec-div=true",
        "-Xcompiler", "-fPIC", "-Xcompiler", "-ffp-contract=off", "-Xcompiler", "-fvisibility=hidden",
        # keep the static CUDA runtime's symbols private to this library
        "-Xlinker", "--exclude-libs,ALL",
        f"-DFMCOMM_CUDA_ARCHS=\"{built_for(archs)}\"",
        *gencode, "-I", os.path.join(ROOT, "csrc"),
        "-o", output, *[os.path.join(ROOT, src) for src in CUDA_SOURCES],
    ]


class BuildExtWithCuda(OptionalBuildExt):
    """build_ext, then the CUDA kernels' shared library (see the module docstring)."""

    def run(self):
        super().run()
        self._cuda_output = None
        self.build_cuda()

    def get_outputs(self):
        outputs = list(super().get_outputs())
        if getattr(self, "_cuda_output", None):
            outputs.append(self._cuda_output)
        return outputs

    def build_cuda(self):
        mode = os.environ.get("BUILD_FMCOMM_CUDA", "auto").strip().lower() or "auto"
        if mode not in ("auto", "on", "off"):
            raise SystemExit(f"BUILD_FMCOMM_CUDA={mode!r}: expected auto, on or off")
        if mode == "off":
            print("fmcomm: BUILD_FMCOMM_CUDA=off; CUDA kernels not built", file=sys.stderr)
            return
        nvcc = find_nvcc()
        if nvcc is None:
            return self._cuda_failed(mode, "no nvcc found ($CUDA_HOME/bin or PATH)")
        archs = [a.strip() for a in os.environ.get("BUILD_FMCOMM_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
                 if a.strip()]
        if not archs or not all(a.isdigit() for a in archs):
            raise SystemExit(f"BUILD_FMCOMM_CUDA_ARCHS={os.environ['BUILD_FMCOMM_CUDA_ARCHS']!r}: expected e.g. 80;90")
        if self.inplace or getattr(self, "editable_mode", False):
            output = os.path.join(ROOT, CUDA_LIBRARY)
        else:
            output = os.path.join(os.path.abspath(self.build_lib), CUDA_LIBRARY)
        marker = f"fmcomm-cuda-archs={built_for(archs)};".encode()  # compress.cu embeds it
        if not self.force and os.path.exists(output):
            newest = max(os.path.getmtime(os.path.join(ROOT, d)) for d in CUDA_DEPENDS)
            if os.path.getmtime(output) >= newest:
                with open(output, "rb") as f:
                    same_archs = marker in f.read()
                if same_archs:
                    print(f"fmcomm: CUDA kernels up to date ({output})", file=sys.stderr)
                    self._cuda_output = output
                    return
        os.makedirs(os.path.dirname(output), exist_ok=True)
        partial = output + ".partial"
        cmd = nvcc_command(nvcc, partial, archs)
        print(f"fmcomm: building the CUDA kernels with {nvcc} for sm_{', sm_'.join(archs)}", file=sys.stderr)
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as e:
            return self._cuda_failed(mode, f"could not run nvcc: {e}")
        if proc.returncode != 0:
            try:
                os.remove(partial)
            except OSError:
                pass
            tail = "\n".join(proc.stdout.strip().splitlines()[-30:])
            return self._cuda_failed(mode, f"nvcc exited {proc.returncode}:\n{tail}")
        os.replace(partial, output)  # never a half-written library under the loaded name
        self._cuda_output = output
        print(f"fmcomm: CUDA kernels built: {output} ({time.monotonic() - started:.0f} s)", file=sys.stderr)

    @staticmethod
    def _cuda_failed(mode, why):
        if mode == "on":
            raise SystemExit(f"fmcomm: BUILD_FMCOMM_CUDA=on but the CUDA kernels were not built: {why}")
        print(f"fmcomm: CUDA kernels not built ({why}); CUDA tensors use the torch fallback", file=sys.stderr)


setup(
    name="fmcomm",
    version="0.1.0",
    description="Collective-communication optimization for foundation-model training",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    if os.path.exists(os.path.join(os.path.dirname(__file__), "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The machine presets live in the top-level topology/ folder and install as fmcomm/_presets/.
    packages=find_packages(include=["fmcomm", "fmcomm.*"]) + ["fmcomm._presets"],
    package_dir={"fmcomm._presets": "topology"},
    package_data={"fmcomm._presets": ["*.json"], "fmcomm.tuning": ["*.json"], "fmcomm.moe": ["*.json"]},
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "test": ["pytest", "pytest-timeout"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtWithCuda},
    entry_points={"console_scripts": ["fmcomm=fmcomm.cli:main"]},
)
