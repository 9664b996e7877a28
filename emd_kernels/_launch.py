"""What every Triton launcher of this package needs around a launch.

Triton launches on the *current* CUDA device and its current stream, not on the device of the
tensors it is given (and ``torch.library.custom_op`` sets no device guard): inputs on cuda:1
while cuda:0 is current would run a kernel built for cuda:0's GPU on cuda:1's pointers.
:func:`on_device` makes the tensors' device current for the launch. Small host tables go up
with :func:`upload`, from pinned memory without blocking: a copy from pageable memory waits for
the GPU to drain, a host stall in every call.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import triton.language as tl

# torch dtype -> Triton element type of the kernels' constexpr dtype arguments
TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}

F = TypeVar("F", bound=Callable[..., Any])


def on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Context that makes ``device`` the current CUDA device (nothing for other devices, e.g. the
    CPU under ``TRITON_INTERPRET=1``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``: pinned and non-blocking on CUDA (no host sync; the
    caching host allocator keeps the pinned buffer alive until the copy has run)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _first_tensor(args: tuple) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    raise TypeError("no tensor argument to take the launch device from")


def launches_on_input_device(fn: F) -> F:
    """Decorator of a launcher: runs it with the device of its first tensor argument (or of the
    first tensor of a leading list argument) current, see :func:`on_device`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with on_device(_first_tensor(args).device):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
