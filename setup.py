"""Build of bert-emd: the pure-Python packages, the C++/CUDA sources, and (when torch is
importable at build time) the compiled extension bert_emd._C.

A plain ``pip install .`` builds in an isolated environment without torch: the wheel is then
pure Python and carries the sources as ``bert_emd/_csrc``; the kernels are compiled for the
user's own torch on first use (``bert_emd._ext``) or by ``bert-emd build``. With torch importable
(``pip install --no-build-isolation .``, ``make install``) the extension is built here, ahead of
time, against that torch, and ``_C.build.json`` beside it records which torch that was.

Switches (environment variables), for both kinds of build:
  BERT_EMD_FORCE_CPU=1   build the CPU kernels only, even where CUDA is available.
  FORCE_CUDA=1           build the CUDA kernels even if no GPU is visible (needs nvcc and a
                         CUDA build of torch).
  TORCH_CUDA_ARCH_LIST   GPU architectures, default "8.0;9.0" ahead of time.
  MAX_JOBS               parallel compile jobs (default: number of CPUs, at most 4).
  BERT_EMD_DEBUG=1       -O0 -g.
  BERT_EMD_NO_AOT=1      do not build ahead of time even if torch is importable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent

# The build description shared with the first-use compile, loaded by path: importing the
# bert_emd package would need torch.
_spec = importlib.util.spec_from_file_location("_bert_emd_build", ROOT / "python" / "bert_emd" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _build  # dataclasses look the module up while the class is created
_spec.loader.exec_module(_build)


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (bert_emd/_csrc) for the first-use compile."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "bert_emd" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def _extensions():
    if _build.truthy("BERT_EMD_NO_AOT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        # the plain-pip route: no torch in the isolated build environment
        print("bert-emd: torch is not importable at build time: the C++ kernels will be compiled on "
              "first use for the torch that runs them (or with `bert-emd build`)", file=sys.stderr)
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    plan = _build.plan(torch.__version__, torch.version.cuda, ROOT / "csrc")
    for note in plan.notes:
        print(f"bert-emd: {note}", file=sys.stderr)
    sources = [str(s.relative_to(ROOT)) for s in plan.sources]
    if plan.cuda:
        ext = CUDAExtension("bert_emd._C", sources, include_dirs=plan.include_dirs(),
                            extra_compile_args={"cxx": plan.cxx_flags, "nvcc": plan.nvcc_flags},
                            extra_link_args=plan.ld_flags)
    else:
        ext = CppExtension("bert_emd._C", sources, include_dirs=plan.include_dirs(),
                           extra_compile_args={"cxx": plan.cxx_flags}, extra_link_args=plan.ld_flags)

    class BuildExtWithRecord(BuildExtension):
        """Write _C.build.json beside the library: the torch it was built for (the ABI guard)."""

        def run(self) -> None:
            super().run()
            for e in self.extensions:
                folder = Path(self.get_ext_fullpath(e.name)).parent
                folder.mkdir(parents=True, exist_ok=True)
                _build.write_meta(folder, plan)

        def get_outputs(self):
            outs = super().get_outputs()
            return outs + [str(Path(self.get_ext_fullpath(e.name)).parent / _build.META_NAME)
                           for e in self.extensions]

    print(f"bert-emd: building bert_emd._C with {'CPU+CUDA' if plan.cuda else 'CPU'} kernels "
          f"(torch {torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']})", file=sys.stderr)
    use_ninja = shutil.which("ninja") is not None
    return [ext], {"build_ext": BuildExtWithRecord.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources

setup(
    packages=find_packages("python") + ["emd_kernels"],
    package_dir={"": "python", "emd_kernels": "emd_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
