"""How the compiled extension is built: its sources, flags, and the cache key of a build.

One description serves both ways of building the kernels:

* ahead of time, by ``setup.py`` when torch is importable while the package is built
  (``pip install --no-build-isolation .``, ``make install``): the extension ``bert_emd._C`` goes
  into the installed package, with ``_C.build.json`` beside it naming the torch it was built for;
* on first use, by :mod:`bert_emd._ext` through ``torch.utils.cpp_extension`` when no usable
  ahead-of-time build is installed (a plain ``pip install``, whose isolated build environment has
  no torch): the library goes into a per-user cache, one folder per build key.

This module imports only the standard library at the top: ``setup.py`` loads it by file path, in
a build environment that may have no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BuildPlan", "cache_root", "sources_root", "plan", "META_NAME"]

#: File written beside an ahead-of-time build, naming the torch it was compiled against.
META_NAME = "_C.build.json"

_PKG = Path(__file__).resolve().parent


def truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def sources_root() -> Path | None:
    """The C++/CUDA sources: shipped inside the package as ``bert_emd/_csrc`` (wheels, sdists),
    or the checkout's ``csrc/`` for an editable install. None when neither is present."""
    for root in (_PKG / "_csrc", _PKG.parent.parent / "csrc"):
        if (root / "ops.cpp").is_file():
            return root
    return None


def cache_root() -> Path:
    """Where first-use builds live: ``$BERT_EMD_CACHE``, else ``$XDG_CACHE_HOME/bert_emd``, else
    ``~/.cache/bert_emd``."""
    if os.environ.get("BERT_EMD_CACHE"):
        return Path(os.environ["BERT_EMD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bert_emd"


def find_nvcc() -> str | None:
    """nvcc from ``$CUDA_HOME`` / ``$CUDA_PATH``, the PATH, or ``/usr/local/cuda`` (no CUDA query)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def find_cxx() -> str | None:
    """The C++ compiler torch's extension builder will call (``$CXX``, default ``c++``)."""
    return shutil.which(os.environ.get("CXX", "c++"))


@dataclass(frozen=True)
class BuildPlan:
    """Everything that determines the compiled library (and so its cache key)."""

    root: Path  #: the csrc folder
    cuda: bool  #: compile csrc/cuda/*.cu too
    torch_version: str
    torch_cuda: str | None
    debug: bool = False
    notes: tuple[str, ...] = field(default=())  #: why CUDA was left out, for messages

    @property
    def sources(self) -> list[Path]:
        files = [self.root / "ops.cpp", *sorted((self.root / "cpu").glob("*.cpp"))]
        if self.cuda:
            files += sorted((self.root / "cuda").glob("*.cu"))
        return files

    @property
    def cxx_flags(self) -> list[str]:
        flags = ["-O0", "-g"] if self.debug else ["-O3"]
        flags += ["-std=c++20", "-fopenmp", "-DBERT_EMD_EXT"]
        if self.cuda:
            flags.append("-DBERT_EMD_WITH_CUDA")
        return flags

    @property
    def nvcc_flags(self) -> list[str]:
        return ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DBERT_EMD_WITH_CUDA", "-lineinfo"]

    @property
    def ld_flags(self) -> list[str]:
        return ["-fopenmp"]

    def include_dirs(self) -> list[str]:
        dirs = [str(self.root)]
        if self.cuda:
            # torch's CUDA headers include cuSPARSE/cuBLAS headers that ship with torch's nvidia
            # wheels rather than with every CUDA toolkit
            import site

            for base in [*site.getsitepackages(), site.getusersitepackages()]:
                for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
                    if os.path.isdir(os.path.join(base, sub)):
                        dirs.append(os.path.join(base, sub))
        return dirs

    def source_hash(self) -> str:
        """sha256 over every source and header (by relative path and content)."""
        h = hashlib.sha256()
        files = sorted(p for p in self.root.rglob("*") if p.suffix in {".cpp", ".cu", ".h", ".cuh"})
        for p in files:
            h.update(str(p.relative_to(self.root)).encode())
            h.update(b"\0")
            h.update(p.read_bytes())
            h.update(b"\0")
        return h.hexdigest()

    def key(self) -> str:
        """Cache folder name: torch version, Python ABI, CPU/CUDA, and a hash of sources + flags."""
        h = hashlib.sha256()
        h.update(self.source_hash().encode())
        h.update(json.dumps([self.cxx_flags, self.nvcc_flags if self.cuda else [], self.ld_flags,
                             self.torch_cuda, os.environ.get("TORCH_CUDA_ARCH_LIST", "")]).encode())
        torch_tag = "".join(c if c.isalnum() or c in ".-" else "-" for c in self.torch_version)
        py = f"cp{sys.version_info.major}{sys.version_info.minor}"
        return f"torch{torch_tag}-{py}-{'cuda' if self.cuda else 'cpu'}-{h.hexdigest()[:16]}"


def plan(torch_version: str, torch_cuda: str | None, root: Path | None = None) -> BuildPlan:
    """The build for this torch: CUDA kernels when torch is a CUDA build and nvcc is found (or
    ``FORCE_CUDA=1``), unless ``BERT_EMD_FORCE_CPU=1``. Never queries a GPU."""
    root = root or sources_root()
    if root is None:
        raise FileNotFoundError("the bert-emd C++ sources (bert_emd/_csrc or csrc/) are not installed")
    notes: list[str] = []
    cuda = False
    if not truthy("BERT_EMD_FORCE_CPU") and (torch_cuda is not None or truthy("FORCE_CUDA")):
        if find_nvcc() is None:
            notes.append("torch has CUDA but nvcc was not found (set CUDA_HOME): CPU kernels only")
        elif torch_cuda is None:
            notes.append(f"FORCE_CUDA=1 but torch {torch_version} is a CPU build: CPU kernels only")
        else:
            cuda = True
    return BuildPlan(root=root, cuda=cuda, torch_version=torch_version, torch_cuda=torch_cuda,
                     debug=truthy("BERT_EMD_DEBUG"), notes=tuple(notes))


def write_meta(folder: Path, p: BuildPlan) -> None:
    """Record what an ahead-of-time build was compiled against (read back by the ABI guard)."""
    meta = {"torch": p.torch_version, "torch_cuda": p.torch_cuda, "cuda_kernels": p.cuda,
            "source_hash": p.source_hash()}
    (folder / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
