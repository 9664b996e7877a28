"""Loading of the compiled extension ``bert_emd._C`` and what it was built with.

Importing this module never queries CUDA; it only tries to import the shared library, which
registers the C++ kernels of every op under ``torch.ops.bert_emd``.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["extension_error", "has_extension", "build_info"]

_ERROR: str | None = None
try:  # registers TORCH_LIBRARY(bert_emd) schemas and the CPU / CUDA kernels
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on how the package was built
    _ERROR = f"bert_emd._C could not be imported ({exc}); rebuild with `pip install --no-build-isolation .`"


def has_extension() -> bool:
    """True when the compiled kernels (``bert_emd._C``) are loaded."""
    return _ERROR is None


def extension_error() -> str | None:
    """Why the compiled extension is missing, or None when it is loaded."""
    return _ERROR


@functools.lru_cache(maxsize=1)
def build_info() -> dict[str, str]:
    """Key/value facts the extension was compiled with (``cuda``, ``openmp``, ``cuda_max_nodes``)."""
    if not has_extension():
        return {}
    raw = torch.ops.bert_emd.build_info()
    return dict(kv.split("=", 1) for kv in raw.split(";") if kv)


def built_with_cuda() -> bool:
    return build_info().get("cuda") == "1"


def cuda_max_nodes() -> int:
    return int(build_info().get("cuda_max_nodes", "0"))
