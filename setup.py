"""Build of bert-emd: the pure-Python packages and the compiled extension bert_emd._C.

Switches (environment variables):
  BERT_EMD_FORCE_CPU=1   build the CPU kernels only, even where CUDA is available.
  FORCE_CUDA=1           build the CUDA kernels even if no GPU is visible (needs nvcc and a
                         CUDA build of torch).
  TORCH_CUDA_ARCH_LIST   GPU architectures, default "8.0;9.0".
  MAX_JOBS               parallel compile jobs (default: number of CPUs, at most 4).
  BERT_EMD_DEBUG=1       -O0 -g.

Build without isolation after torch is installed:  pip install --no-build-isolation .
(with build isolation pip would fetch a CUDA torch into its build environment).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn(
            "torch is not installed in the build environment: building bert-emd without its "
            "compiled extension (only the 'torch' and 'triton' backends will be available). "
            "Install torch first and build with `pip install --no-build-isolation .`",
            stacklevel=1,
        )
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    debug = _truthy("BERT_EMD_DEBUG")
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-std=c++20", "-fopenmp", "-DBERT_EMD_EXT"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link = ["-fopenmp"]

    want_cuda = not _truthy("BERT_EMD_FORCE_CPU")
    cuda_torch = torch.version.cuda is not None
    have_nvcc = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc"))
    use_cuda = False
    if want_cuda and (_truthy("FORCE_CUDA") or torch.cuda.is_available() or (cuda_torch and have_nvcc)):
        if not have_nvcc:
            warnings.warn("CUDA requested but nvcc was not found (set CUDA_HOME): building CPU only.",
                          stacklevel=1)
        elif not cuda_torch:
            warnings.warn(
                f"CUDA requested but torch {torch.__version__} is a CPU build: a CUDA extension "
                "can only be built against a CUDA build of torch. Building CPU only.",
                stacklevel=1,
            )
        else:
            use_cuda = True
    elif want_cuda and cuda_torch and not have_nvcc:
        warnings.warn("torch has CUDA but nvcc was not found: building the CPU kernels only.",
                      stacklevel=1)

    ext_kwargs = dict(include_dirs=include_dirs)
    if use_cuda:
        # torch's CUDA headers include cuSPARSE/cuBLAS headers that ship with torch's nvidia
        # wheels rather than with every CUDA toolkit: add that folder ourselves.
        import site

        for base in site.getsitepackages() + [site.getusersitepackages()]:
            for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
                p = os.path.join(base, sub)
                if os.path.isdir(p):
                    include_dirs.append(p)
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DBERT_EMD_WITH_CUDA",
                      "-lineinfo"]
        ext = CUDAExtension(
            "bert_emd._C",
            sources,
            extra_compile_args={"cxx": cxx_flags + ["-DBERT_EMD_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=extra_link,
            **ext_kwargs,
        )
    else:
        ext = CppExtension(
            "bert_emd._C", sources, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link, **ext_kwargs,
        )
    print(f"bert-emd: building bert_emd._C with {'CPU+CUDA' if use_cuda else 'CPU'} kernels "
          f"(torch {torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages("python") + ["emd_kernels"],
    package_dir={"": "python", "emd_kernels": "emd_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
