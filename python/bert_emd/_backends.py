"""Backend selection shared by every op: which implementations exist, which can run on the
given device, and why the others cannot (``bert-emd info`` prints the same reasons).

Backends:
  ``cpu``    C++ kernels in ``csrc/cpu`` (CPU tensors).
  ``cuda``   C++/CUDA kernels in ``csrc/cuda`` (CUDA tensors).
  ``triton`` Triton kernels in ``emd_kernels`` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
  ``torch``  the pure-PyTorch reference in ``bert_emd.reference`` (any device; the test oracle).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import _ext

BACKENDS = ("cpu", "cuda", "triton", "torch")

# Which backends implement which op, in the order ``auto`` tries them per device type.
_OP_BACKENDS: dict[str, dict[str, tuple[str, ...]]] = {
    "emd": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")},
    "layer_costs": {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
    "sinkhorn": {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
    "attention_costs": {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")},
    "cost_attention": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")},
}

# Ops whose ``cpu`` backend is PyTorch code (no kernel in bert_emd._C to look for).
_PYTHON_CPU_OPS = frozenset({"attention_costs"})

# The TORCH_LIBRARY op whose CPU / CUDA kernels implement the "cpu" / "cuda" backends.
_CPP_OPS = {"emd": "bert_emd::emd_exact", "layer_costs": "bert_emd::layer_costs_fwd", "sinkhorn": "bert_emd::sinkhorn",
            "cost_attention": "bert_emd::cost_attention_step"}


@functools.cache
def _has_kernel_cached(opname: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(opname, key)
    except RuntimeError:  # no such schema: an extension built before the op existed
        return False


def _has_kernel(opname: str, key: str) -> bool:
    return _has_kernel_cached(opname, key)


# Kernel registration is fixed once the extension is loaded: torch.compile may treat the answer
# as a constant instead of tracing the dispatcher query. This is exactly what
# ``torch._dynamo.assume_constant_result`` does, set by hand: importing dynamo for the decorator
# would cost about a second on every ``import bert_emd`` (a test checks the two agree).
_has_kernel._dynamo_marked_constant = True  # type: ignore[attr-defined]


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason(device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device_type == "cuda":
        return None
    if triton_interpret():
        return None
    return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"


def unavailable_reason(op: str, backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run ``op`` on tensors of ``device_type``, else why not."""
    if op not in _OP_BACKENDS:
        raise KeyError(f"unknown op {op!r}")
    implemented = {b for per_dev in _OP_BACKENDS[op].values() for b in per_dev}
    if backend not in implemented:
        return f"{op} has no {backend!r} implementation (it has: {', '.join(sorted(implemented))})"
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(device_type)
    if backend == "cpu" and op in _PYTHON_CPU_OPS:
        return None if device_type == "cpu" else f"the cpu backend needs CPU tensors, got {device_type}"
    if not _ext.has_extension():
        return _ext.extension_error()
    key = {"cpu": "CPU", "cuda": "CUDA"}[backend]
    if backend == "cuda" and not _ext.built_with_cuda():
        return "bert_emd._C was built without CUDA (CPU-only torch or no nvcc at build time)"
    if not _has_kernel(_CPP_OPS[op], key):
        return f"bert_emd._C has no {key} kernel for {_CPP_OPS[op]} (rebuild the extension)"
    if device_type != backend:
        return f"the {backend} backend needs {key} tensors, got {device_type}"
    return None


_SELECTED: dict[tuple[str, str, torch.device, bool], str] = {}


def select(op: str, backend: str, device: torch.device) -> str:
    """Resolve ``backend`` ("auto" or a name) for ``op`` on ``device``; raise if it cannot run.

    Successful resolutions are memoised (they depend only on what is built and, for an explicit
    ``"triton"`` only, on TRITON_INTERPRET), since this runs on every call of every op."""
    # keyed by the device itself: reading ``device.type`` builds a string (a C++ stream) per call
    key = (op, backend, device, backend == "triton" and triton_interpret())
    hit = _SELECTED.get(key)
    if hit is not None:
        return hit
    name = _select(op, backend, device.type)
    _SELECTED[key] = name
    return name


def _wants_compiled(op: str, backend: str, dev: str) -> bool:
    """Would resolving ``backend`` for ``op`` on ``dev`` look at a compiled C++/CUDA kernel?"""
    cpp = {"cpu", "cuda"} - ({"cpu"} if op in _PYTHON_CPU_OPS else set())
    candidates = _OP_BACKENDS[op].get(dev, ()) if backend == "auto" else (backend,)
    if op == "emd" and dev != "cpu":
        candidates = (*candidates, "cpu")  # the host route (see host_fallback)
    return any(b in cpp for b in candidates)


def _select(op: str, backend: str, dev: str) -> str:
    if not _ext.has_extension() and _wants_compiled(op, backend, dev):
        _ext.ensure()  # compile on first use (one progress line), or one warning if it cannot be had
    if backend == "auto":
        order = _OP_BACKENDS[op].get(dev, ("torch",))
        for name in order:
            if unavailable_reason(op, name, dev) is None:
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    why = unavailable_reason(op, backend, dev)
    if why is not None:
        others = [b for b in BACKENDS if unavailable_reason(op, b, dev) is None]
        raise BackendError(
            f"backend {backend!r} cannot run {op} on {dev} tensors: {why}. "
            f"Usable here: {', '.join(others) or 'none'}."
        )
    return backend


def host_fallback(op: str, device_type: str) -> bool:
    """``auto`` for ``op`` on ``device_type`` tensors would fall to the pure-PyTorch reference
    although the C++ CPU kernel is built (``bert_emd._C`` without CUDA kernels on a GPU machine:
    pip built it without nvcc). For ``emd`` the reference is a Python simplex per problem with a
    host read per pivot, so ``bert_emd.emd`` then copies the problems to the host, solves them with
    the CPU kernel and copies the results back (with a warning) instead."""
    return (op == "emd" and device_type != "cpu" and select(op, "auto", torch.device(device_type)) == "torch"
            and unavailable_reason(op, "cpu", "cpu") is None)


def explain(device_type: str) -> dict[str, dict[str, str | None]]:
    """{op: {backend: reason-or-None}} for ``device_type`` (used by ``bert-emd info``)."""
    out: dict[str, dict[str, str | None]] = {}
    for op in _OP_BACKENDS:
        out[op] = {b: unavailable_reason(op, b, device_type) for b in BACKENDS}
    return out
