"""``bert_emd.layer_costs``: fused teacher-student layer cost matrices (the method: docs/design.md).

D_ij = mean over elements of (f(S_i) - f(T_j))^2 for M student and N teacher layers, optionally
over real tokens only and per batch element; f floors attention scores (x <= floor -> 0).

Registration (once for every backend):
  * ``bert_emd::layer_costs_fwd`` / ``bert_emd::layer_costs_bwd`` -- schemas in ``csrc/ops.cpp``,
    CPU kernels in ``csrc/cpu/layer_costs_cpu.cpp``;
  * ``bert_emd::layer_costs_{fwd,bwd}_torch`` -- the pure-PyTorch reference
    (``bert_emd.reference.layer_costs``) as ``torch.library.custom_op`` with the same schemas;
  * ``bert_emd::layer_costs_{fwd,bwd}_triton`` -- the Triton launchers (``emd_kernels``), likewise.
Each forward op gets the same fake kernel (:func:`_fwd_fake`) and the same autograd rule
(:func:`_setup_context`, :func:`_backward`); the rule calls the backward op of its own backend
(the fused one-pass gradient), whose fake is :func:`_bwd_fake`. In eager mode on plain tensors
the public function applies that rule itself (:class:`_Eager`) around the backend called
directly, without the registered op's Python dispatcher layers (``_common.eager``); under
``torch.compile``, a dispatch mode or with tensor subclasses the registered op runs.

Gradient: grad_S_i = (2/n) w [S_i > floor] (f(S_i) sum_j G_ij - sum_j G_ij f(T_j)), and to the
teacher (only when a teacher layer requires grad) with the roles swapped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .. import _backends, _ext
from ..reference.layer_costs import layer_costs_grad, layer_costs_loop
from ._common import LAYER_COSTS_OPS as _OPS
from ._common import SUPPORTED_DTYPES, call_below_autograd, eager, grad_flags

__all__ = ["layer_costs"]

_FWD_SCHEMA = ("(Tensor[] student, Tensor[] teacher, Tensor? mask, bool per_sample, "
               "float? attention_floor) -> Tensor")
_BWD_SCHEMA = ("(Tensor grad, Tensor[] student, Tensor[] teacher, Tensor? mask, bool per_sample, "
               "float? attention_floor, bool need_teacher) -> (Tensor[], Tensor[])")


# ----------------------------------------------------------------------------- registration
def _out_dtype(student, teacher) -> torch.dtype:
    return torch.float64 if torch.float64 in (student[0].dtype, teacher[0].dtype) else torch.float32


def _fwd_fake(student, teacher, mask, per_sample, attention_floor):
    M, N = len(student), len(teacher)
    shape = (student[0].shape[0], M, N) if per_sample else (M, N)
    return student[0].new_empty(shape, dtype=_out_dtype(student, teacher))


def _bwd_fake(grad, student, teacher, mask, per_sample, attention_floor, need_teacher):
    gs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in student]
    gt = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in teacher] if need_teacher else []
    return gs, gt


def _setup_context(ctx, inputs, output, *, bwd: str):
    student, teacher, mask, per_sample, attention_floor = inputs
    ctx.bwd = bwd
    ctx.M, ctx.N = len(student), len(teacher)
    ctx.has_mask = mask is not None
    ctx.per_sample = per_sample
    ctx.attention_floor = attention_floor
    ctx.save_for_backward(*student, *teacher, *([mask] if mask is not None else []))


def _backward(ctx, grad):
    # needs_input_grad holds one flag per layer for the Tensor[] arguments
    flags_s, flags_t = ctx.needs_input_grad[:2]
    op = getattr(torch.ops.bert_emd, ctx.bwd).default
    return (*_grads(ctx, grad, flags_s, flags_t, op), None, None, None)


def _grads(ctx, grad, flag_s, flag_t, bwd_op) -> tuple[list, list]:
    """The rule's gradients (student list, teacher list; None where not needed) from the
    ``needs_input_grad`` entries of the two sides (a flag per layer, or one for all), by
    ``bwd_op`` (the backward of the forward's backend)."""
    saved = ctx.saved_tensors
    student = list(saved[: ctx.M])
    teacher = list(saved[ctx.M : ctx.M + ctx.N])
    mask = saved[-1] if ctx.has_mask else None
    flags_s, flags_t = grad_flags(flag_s, ctx.M), grad_flags(flag_t, ctx.N)
    need_s, need_t = any(flags_s), any(flags_t)
    gs, gt = [None] * ctx.M, [None] * ctx.N  # the structure of the inputs, always
    if need_s or need_t:
        all_s, all_t = bwd_op(grad, student, teacher, mask, ctx.per_sample, ctx.attention_floor, need_t)
        gs = [g if f else None for g, f in zip(all_s, flags_s)]
        if need_t:
            gt = [g if f else None for g, f in zip(all_t, flags_t)]
    return gs, gt


def _fwd_torch(student, teacher, mask, per_sample, attention_floor):
    return layer_costs_loop(student, teacher, mask, per_sample, attention_floor)


def _bwd_torch(grad, student, teacher, mask, per_sample, attention_floor, need_teacher):
    return layer_costs_grad(grad, student, teacher, mask, per_sample, attention_floor, need_teacher)


def _fwd_triton(student, teacher, mask, per_sample, attention_floor):
    from emd_kernels.layer_costs import layer_costs_fwd

    return layer_costs_fwd(student, teacher, mask, per_sample, attention_floor)


def _bwd_triton(grad, student, teacher, mask, per_sample, attention_floor, need_teacher):
    from emd_kernels.layer_costs import layer_costs_bwd

    return layer_costs_bwd(grad, student, teacher, mask, per_sample, attention_floor, need_teacher)


# Python implementations: ops with the C++ schemas (custom_op infers none for a tuple of lists).
for _suffix, _fwd, _bwd in (("torch", _fwd_torch, _bwd_torch), ("triton", _fwd_triton, _bwd_triton)):
    torch.library.custom_op(f"bert_emd::layer_costs_fwd_{_suffix}", _fwd, mutates_args=(),
                            schema=_FWD_SCHEMA)
    torch.library.custom_op(f"bert_emd::layer_costs_bwd_{_suffix}", _bwd, mutates_args=(),
                            schema=_BWD_SCHEMA)


def _register(fwd: str, bwd: str) -> None:
    torch.library.register_fake(f"bert_emd::{fwd}")(_fwd_fake)
    torch.library.register_fake(f"bert_emd::{bwd}")(_bwd_fake)
    torch.library.register_autograd(
        f"bert_emd::{fwd}", _backward, setup_context=functools.partial(_setup_context, bwd=bwd)
    )


for _backend, (_f, _b) in _OPS.items():
    if _backend != "cpu":
        _register(_f, _b)
_ext.on_load(lambda: _register(*_OPS["cpu"]))  # the C++ schemas exist once the kernels load


# ------------------------------------------------------------------------------ eager calls
def _direct(backend: str):
    """(forward, backward) of ``backend`` as plain calls below autograd: the C++ kernels, or the
    Python functions behind the ``custom_op`` ones."""
    fns = _DIRECT.get(backend)
    if fns is None:  # the C++ ops exist once the extension is loaded
        ops = tuple(getattr(torch.ops.bert_emd, n).default for n in _OPS[backend])
        fns = _DIRECT[backend] = tuple(functools.partial(call_below_autograd, op, backend) for op in ops)
    return fns


def _below_autograd(fn):
    def call(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return fn(*args)

    return call


_DIRECT = {b: (_below_autograd(f), _below_autograd(g))
           for b, (f, g) in (("torch", (_fwd_torch, _bwd_torch)), ("triton", (_fwd_triton, _bwd_triton)))}


def _split(tensors: tuple, ns: int, stacked: tuple[bool, bool]) -> tuple[list, list]:
    s_st, t_st = stacked
    S = list(tensors[0].unbind(0)) if s_st else list(tensors[:ns])
    T = list(tensors[ns].unbind(0)) if t_st else list(tensors[ns:])
    return S, T


def _join(grads: list, stacked: bool) -> list:
    """Gradients of one side in the form of its inputs: one stacked tensor for a stacked side
    (what ``unbind``'s backward makes of them)."""
    if not stacked:
        return grads
    return [None if grads[0] is None else torch.stack(grads)]


class _Eager(torch.autograd.Function):
    """The op's autograd rule (:func:`_setup_context`, :func:`_grads`) around its backend called
    directly: what the registered op computes in eager mode, without the dispatcher's Python
    layers (``_common.eager``). A stacked side [layers, B, ...] is one input, split inside the
    forward (no autograd ``unbind``), its gradient stacked."""

    @staticmethod
    def forward(ctx, backend, ns, stacked, mask, per_sample, floor, *tensors):
        S, T = _split(tensors, ns, stacked)
        out = _direct(backend)[0](S, T, mask, per_sample, floor)
        _setup_context(ctx, (S, T, mask, per_sample, floor), out, bwd=_OPS[backend][1])
        ctx.backend, ctx.ns, ctx.stacked = backend, ns, stacked
        return out

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[6:]
        ns, (s_st, t_st) = ctx.ns, ctx.stacked
        flag_s = needs[0] if s_st else needs[:ns]
        flag_t = needs[ns] if t_st else needs[ns:]
        if torch.is_grad_enabled() or not eager(grad):  # create_graph, or a mode: the registered op
            gs, gt = _grads(ctx, grad, flag_s, flag_t, getattr(torch.ops.bert_emd, ctx.bwd).default)
        else:
            gs, gt = _grads(ctx, grad, flag_s, flag_t, _direct(ctx.backend)[1])
        return (None,) * 6 + (*_join(gs, s_st), *_join(gt, t_st))


# ------------------------------------------------------------------------------- validation
def _as_layers(name: str, x) -> torch.Tensor | list[torch.Tensor]:
    """The layers of one side: a stacked tensor [num_layers, B, ...] as it is (split by
    :func:`_layers` where a list is needed), a sequence as a list of tensors."""
    if isinstance(x, torch.Tensor):
        if x.dim() < 2:
            raise ValueError(
                f"layer_costs: {name} must be a tensor [num_layers, B, ...] (at least 2 dims) or a "
                f"sequence of tensors [B, ...], got a tensor of shape {list(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"layer_costs: {name} must hold at least one layer tensor [B, ...], got none")
        return x
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise ValueError(
            f"layer_costs: {name} must be a tensor [num_layers, B, ...] or a sequence of tensors "
            f"[B, ...], got {type(x).__name__}"
        )
    layers = list(x)
    if not layers:
        raise ValueError(f"layer_costs: {name} must hold at least one layer tensor [B, ...], got none")
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"layer_costs: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return layers


def _layers(x: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(x.unbind(0)) if isinstance(x, torch.Tensor) else x  # views, no copy


def _check_layers(student, teacher) -> tuple[torch.device, torch.Size]:
    """Every layer of both sides: a supported dtype, one dtype per side, the device and shape of
    student[0]. Returns that (device, shape)."""
    s_st, t_st = isinstance(student, torch.Tensor), isinstance(teacher, torch.Tensor)
    ref = student if s_st else student[0]
    device, shape = ref.device, ref.shape[1:] if s_st else ref.shape
    if len(shape) < 1:
        raise ValueError("layer_costs: student[0] must have shape [B, ...] (at least 1 dim), got a 0-dim tensor")
    for name, x, st in (("student", student, s_st), ("teacher", teacher, t_st)):
        dtype = x.dtype if st else x[0].dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"layer_costs: {name}[0] must be float32, float64, float16 or bfloat16, got {dtype}")
        if st:
            if x.device != device or x.shape[1:] != shape:
                _explain(name, [(dtype, x.device, x.shape[1:])] * x.shape[0], device, shape)
            continue
        for t in x:  # the common case in a few attribute reads per layer; details on a mismatch
            if t.dtype is not dtype or t.device != device or t.shape != shape:
                _explain(name, [(t.dtype, t.device, t.shape) for t in x], device, shape)
    return device, shape


def _explain(name: str, layers: list, ref_device: torch.device, ref_shape: torch.Size) -> None:
    """Raise the ValueError for the first layer of a side that does not match."""
    dtype0 = layers[0][0]
    for i, (dtype, device, shape) in enumerate(layers):
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"layer_costs: {name}[{i}] must be float32, float64, float16 or bfloat16, got {dtype}"
            )
        if dtype != dtype0:
            raise ValueError(
                f"layer_costs: every {name} layer must have one dtype: {name}[0] is "
                f"{dtype0} but {name}[{i}] is {dtype}"
            )
        if device != ref_device:
            raise ValueError(
                f"layer_costs: {name}[{i}] must be on {ref_device} (the device of student[0]), "
                f"got {device}"
            )
        if shape != ref_shape:
            raise ValueError(
                f"layer_costs: {name}[{i}] must have the shape {list(ref_shape)} of student[0] "
                f"(student and teacher layers share one shape [B, ...]), got {list(shape)}"
            )
    raise AssertionError("no mismatching layer")  # pragma: no cover


def _check(student, teacher, mask, per_sample, attention_floor) -> None:
    ref_device, ref_shape = _check_layers(student, teacher)
    if not isinstance(per_sample, bool):
        raise ValueError(f"layer_costs: per_sample must be a bool, got {type(per_sample).__name__}")
    if attention_floor is not None:
        if isinstance(attention_floor, bool) or not isinstance(attention_floor, (int, float)):
            raise ValueError(
                f"layer_costs: attention_floor must be a float or None, got {type(attention_floor).__name__}"
            )
        if math.isnan(attention_floor):
            raise ValueError("layer_costs: attention_floor must be a number or None, got nan")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"layer_costs: mask must be a torch.Tensor [B, L] or None, got {type(mask).__name__}")
    shape = tuple(ref_shape)
    if len(shape) not in (2, 3, 4):
        raise ValueError(
            "layer_costs: mask needs layers of shape [B, L], [B, L, d] (hidden states) or "
            f"[B, H, L, L] (attention), got layers of shape {list(shape)}"
        )
    if len(shape) == 4 and shape[2] != shape[3]:
        raise ValueError(
            "layer_costs: mask needs attention maps [B, H, L, L] with equal query and key lengths, "
            f"got {list(shape)}"
        )
    L = shape[2] if len(shape) == 4 else shape[1]
    if tuple(mask.shape) != (shape[0], L):
        raise ValueError(f"layer_costs: mask must have shape [B, L] = [{shape[0]}, {L}], got {list(mask.shape)}")
    if mask.device != ref_device:
        raise ValueError(f"layer_costs: mask must be on {ref_device} (the layers' device), got {mask.device}")
    if mask.is_complex():
        raise ValueError(f"layer_costs: mask must be bool, integer or floating point (0/1), got {mask.dtype}")


# ----------------------------------------------------------------------------- public API
def layer_costs(
    student: torch.Tensor | Sequence[torch.Tensor],
    teacher: torch.Tensor | Sequence[torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
    per_sample: bool = False,
    attention_floor: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cost matrix between every student and teacher layer: D_ij = mean (S_i - T_j)^2.

    Reads each layer once (the per-pair loop it replaces reads each M*N times) and accumulates
    in float32; differences are formed directly, so close layers do not cancel.

    Args:
        student: [M, B, ...] tensor or a sequence of M tensors [B, ...] (e.g. HF
            ``hidden_states`` / ``attentions`` as returned: a tuple is read in place, never
            stacked). float32, float64, float16 or bfloat16; any strides, read as they are.
            A layer is copied (made contiguous) only if the layers of its side have different
            strides, or if, without a mask, more than three of its dims after the batch dim
            stay non-mergeable.
        teacher: [N, B, ...] or N tensors [B, ...] of the same shape [B, ...] (and device).
        mask: optional [B, L] token mask (bool, or numbers where non-zero means a real token).
            The mean then runs over real positions only: hidden states [B, L, d] over real
            tokens l; attention maps [B, H, L, L] over entries whose query and key are both real;
            [B, L] inputs over real l. Without it every element counts (the original's mean).
        per_sample: return one matrix per batch element, [B, M, N].
        attention_floor: if set, entries <= floor become 0 on both sides before differencing
            (the original uses -100 on pre-softmax scores carrying the -1e4 padding mask).
            Their gradient is 0.
        backend: ``"auto"``, ``"cpu"`` (C++), ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or ``"torch"`` (the pure-PyTorch reference).

    Returns:
        D [M, N], or [B, M, N] with ``per_sample``: float32, float64 if either side is float64.
        A mean over no element (B = 0, or every position masked) is NaN, as ``torch.mean``.
        Differentiable w.r.t. both sides (the teacher only when it requires grad), in one fused
        backward pass. On CUDA tensors neither pass synchronises with the host.

    Raises:
        ValueError: invalid shapes, dtypes, devices or arguments (the message names them).
        bert_emd.BackendError: an explicitly requested backend cannot run these inputs.
    """
    S = _as_layers("student", student)
    T = _as_layers("teacher", teacher)
    _check(S, T, mask, per_sample, attention_floor)
    floor = None if attention_floor is None else float(attention_floor)
    first = S if isinstance(S, torch.Tensor) else S[0]
    name = _backends.select("layer_costs", backend, first.device)
    if eager(first):
        s_st, t_st = isinstance(S, torch.Tensor), isinstance(T, torch.Tensor)
        tensors = (*([S] if s_st else S), *([T] if t_st else T))
        if torch.is_grad_enabled() and _any_requires_grad(tensors, mask):
            ns = 1 if s_st else len(S)
            return _Eager.apply(name, ns, (s_st, t_st), mask, per_sample, floor, *tensors)
        return _direct(name)[0](_layers(S), _layers(T), mask, per_sample, floor)
    fwd, _ = _OPS[name]
    return getattr(torch.ops.bert_emd, fwd).default(_layers(S), _layers(T), mask, per_sample, floor)


def _any_requires_grad(tensors: tuple, mask: torch.Tensor | None) -> bool:
    return any(t.requires_grad for t in tensors) or (mask is not None and mask.requires_grad)
