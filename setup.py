"""Builds csrc/ into the extension module pyssl._C.

CPU sources (csrc/*_cpu.cpp) are always built with OpenMP. CUDA sources (csrc/*_cuda.cu)
join the build only when the installed torch was built with CUDA and nvcc is present; on a CPU
torch they are compile-checked by the test suite instead (tests/test_build.py).
"""
import glob
import importlib.util
import os

from setuptools import setup

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
import torch

here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_srchash", os.path.join(here, "pyssl", "_srchash.py"))
_srchash = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_srchash)
SOURCE_HASH = _srchash.source_hash(os.path.join(here, "csrc"))
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))

cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno", f"-DPYSSL_SOURCE_HASH={SOURCE_HASH}"]
# The extension is built on the machine that runs it (make installs in place); PYSSL_NATIVE=0
# builds a portable binary instead.
if os.environ.get("PYSSL_NATIVE", "1") == "1":
    cxx_flags.append("-march=native")
with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and cu_sources
if with_cuda:
    ext = CUDAExtension(
        "pyssl._C",
        cpp_sources + cu_sources,
        extra_compile_args={"cxx": cxx_flags + ["-DPYSSL_WITH_CUDA"],
                            "nvcc": ["-O3", "-DPYSSL_WITH_CUDA", f"-DPYSSL_SOURCE_HASH={SOURCE_HASH}"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension("pyssl._C", cpp_sources, extra_compile_args=cxx_flags,
                       extra_link_args=["-fopenmp"])

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
