"""``bert_emd.attention_costs``: attention cost matrices from queries and keys, without
materialising the attention maps (docs/design.md).

D_ij = layer_costs(A^S_i, A^T_j) of the maps A = QK^T / sqrt(d_head) + additive padding mask
(``source="scores"``) or their softmax over keys (``"probs"``), computed tile by tile so that no
[B, H, L, L] map is ever stored: memory grows with L only through Q and K.

Registration (once for every backend, ``torch.library.custom_op``):
  * ``bert_emd::attention_costs_{fwd,bwd}_torch``  -- materialise the maps, then the layer_costs
    reference (``bert_emd.reference.attention_costs``): the oracle and the fallback;
  * ``bert_emd::attention_costs_{fwd,bwd}_cpu``    -- chunked PyTorch, the backend of
    ``bert_emd.ops.attention_costs_cpu``: query blocks of all layers at a time, padded keys that
    provably add nothing skipped, the costs of each chunk by the fused ``layer_costs`` kernel,
    the backward recomputing the chunks or, where exact and cheaper, Gram products of Q and K;
  * ``bert_emd::attention_costs_{fwd,bwd}_triton`` -- the flash-attention-style Triton kernels of
    ``emd_kernels.attention_costs``.
Every forward op returns (cost, lse) -- lse the row log-sum-exp [M + N, B, H, L] of every layer
with ``probs`` (kept for the backward, O(L) memory), else an empty tensor; the ``cpu`` backend
forms whole rows and recomputes probs directly, so its lse is always empty -- and all share one
autograd rule, which calls the backward op of its own backend (tiles recomputed, never stored).
In eager mode on plain tensors the public function applies that rule itself (:class:`_Eager`)
around the backend called directly (``_common.eager``); the ``cpu`` backend then reads stacked
(Q, K) as they are and, for a small problem, keeps its maps for the backward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .. import _backends
from ..reference.attention_costs import (
    acc_dtype,
    attention_costs_materialized,
    attention_costs_materialized_grad,
    attention_lse,
)
from . import attention_costs_small as small
from ._common import SUPPORTED_DTYPES, eager, grad_flags, live_spans
from .attention_costs_cpu import attention_costs_bwd_cpu, attention_costs_fwd_cpu

__all__ = ["attention_costs"]

_SOURCES = ("scores", "probs")
_FWD_SCHEMA = ("(Tensor[] sq, Tensor[] sk, Tensor[] tq, Tensor[] tk, Tensor? attention_mask, Tensor? mask, "
               "float mask_value, bool probs, bool per_sample, float? attention_floor) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad, Tensor[] sq, Tensor[] sk, Tensor[] tq, Tensor[] tk, Tensor lse, "
               "Tensor? attention_mask, Tensor? mask, float mask_value, bool probs, bool per_sample, "
               "float? attention_floor, bool need_student, bool need_teacher) "
               "-> (Tensor[], Tensor[], Tensor[], Tensor[])")

# Block size forced on the Triton kernels (None: chosen by ``emd_kernels.attention_costs``).
TRITON_BLOCK: int | None = None


# ----------------------------------------------------------------------------- registration
def _fwd_fake(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor):
    M, N = len(sq), len(tq)
    B, H, L, _ = sq[0].shape
    acc = acc_dtype(sq, tq)
    cost = sq[0].new_empty((B, M, N) if per_sample else (M, N), dtype=acc)
    lse = sq[0].new_empty((M + N, B, H, L) if probs else (0,), dtype=acc)
    return cost, lse


def _fwd_fake_no_lse(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor):
    cost, _ = _fwd_fake(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor)
    return cost, sq[0].new_empty((0,), dtype=cost.dtype)


def _bwd_fake(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample, attention_floor,
              need_student, need_teacher):
    def like(xs, need):
        return [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in xs] if need else []

    return like(sq, need_student), like(sk, need_student), like(tq, need_teacher), like(tk, need_teacher)


def _setup_context(ctx, inputs, output, *, bwd: str):
    _save(ctx, inputs, output[1], bwd)
    ctx.mark_non_differentiable(output[1])


def _save(ctx, inputs, lse, bwd: str) -> None:
    """What the rule's backward needs: the layers (each group a list of layers, or on the eager
    path of the ``cpu`` backend one stacked tensor), lse, the masks and the options."""
    attention_mask, mask = inputs[4], inputs[5]
    ctx.bwd = bwd
    ctx.options = inputs[6:]  # mask_value, probs, per_sample, attention_floor
    ctx.has_am, ctx.has_mask = attention_mask is not None, mask is not None
    spec, flat = [], []
    for g in inputs[:4]:
        if isinstance(g, torch.Tensor):  # stacked: 0
            spec.append(0)
            flat.append(g)
        else:
            spec.append(len(g))
            flat.extend(g)
    ctx.spec = spec
    if attention_mask is not None:
        flat.append(attention_mask)
    if mask is not None:
        flat.append(mask)
    ctx.save_for_backward(lse, *flat)


def _backward(ctx, grad, _grad_lse):
    op = getattr(torch.ops.bert_emd, ctx.bwd).default
    return (*_grads(ctx, grad, ctx.needs_input_grad[:4], op), None, None, None, None, None, None)


def _any(flag) -> bool:
    return flag if isinstance(flag, bool) else any(flag)


def _grads(ctx, grad, needs, bwd_op, lists: bool = True) -> list:
    """The rule's gradients of the groups (sq, sk, tq, tk), each in the form of the saved group: a
    list (None where not needed) or one tensor (None if not needed); ``needs``: their
    ``needs_input_grad`` entries (a flag per layer, or one for all). ``bwd_op``, the backward of
    the forward's backend, takes groups as lists (``lists``) or as saved."""
    saved = ctx.saved_tensors
    lse, groups, i = saved[0], [], 1
    for n in ctx.spec:
        groups.append(saved[i] if n == 0 else list(saved[i : i + n]))
        i += n or 1
    attention_mask = saved[i] if ctx.has_am else None
    mask = saved[i + ctx.has_am] if ctx.has_mask else None
    need_s = _any(needs[0]) or _any(needs[1])
    need_t = _any(needs[2]) or _any(needs[3])
    out: list = [None if n == 0 else [None] * n for n in ctx.spec]  # the structure of the groups, always
    if (need_s or need_t) and grad is not None:
        args = [small.layers(g) for g in groups] if lists else groups
        grads = bwd_op(grad, *args, lse, attention_mask, mask, *ctx.options, need_s, need_t)
        for k, (g, f, n) in enumerate(zip(grads, needs, ctx.spec)):
            if isinstance(g, torch.Tensor):  # a stacked group's, computed as one (one flag)
                out[k] = g if _any(f) else None
            elif not g:  # none computed: that side needs none
                continue
            elif n == 0:  # a stacked group given to the backend as layers
                out[k] = torch.stack(g) if _any(f) else None
            else:
                out[k] = [gi if fi else None for gi, fi in zip(g, grad_flags(f, n))]
    return out


# --------------------------------------------------------------------- torch (materialising)
def _fwd_torch(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor):
    source = "probs" if probs else "scores"
    cost = attention_costs_materialized(sq, sk, tq, tk, attention_mask, mask, mask_value, source, per_sample,
                                        attention_floor)
    acc = acc_dtype(sq, tq)
    if probs:
        lse = torch.cat([attention_lse(sq, sk, attention_mask, mask_value, acc),
                         attention_lse(tq, tk, attention_mask, mask_value, acc)])
    else:
        lse = sq[0].new_empty((0,), dtype=acc)
    return cost, lse


def _bwd_torch(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample, attention_floor,
               need_student, need_teacher):
    return attention_costs_materialized_grad(
        grad, sq, sk, tq, tk, attention_mask, mask, mask_value, "probs" if probs else "scores", per_sample,
        attention_floor, need_student, need_teacher)


# ------------------------------------------------------------------------------------ triton
def _fwd_triton(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor):
    from emd_kernels.attention_costs import attention_costs_fwd

    box = live_spans(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, attention_floor)
    return attention_costs_fwd(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample,
                               attention_floor, block=TRITON_BLOCK, box=box)


def _bwd_triton(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample, attention_floor,
                need_student, need_teacher):
    from emd_kernels.attention_costs import attention_costs_bwd

    box = live_spans(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, attention_floor)
    return attention_costs_bwd(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample,
                               attention_floor, need_student, need_teacher, block=TRITON_BLOCK, box=box)


_IMPLS = {
    "torch": (_fwd_torch, _bwd_torch),
    "cpu": (attention_costs_fwd_cpu, attention_costs_bwd_cpu),
    "triton": (_fwd_triton, _bwd_triton),
}
_OPS = {b: (f"attention_costs_fwd_{b}", f"attention_costs_bwd_{b}") for b in _IMPLS}

for _backend, (_fwd, _bwd) in _IMPLS.items():
    _f, _b = _OPS[_backend]
    torch.library.custom_op(f"bert_emd::{_f}", _fwd, mutates_args=(), schema=_FWD_SCHEMA)
    torch.library.custom_op(f"bert_emd::{_b}", _bwd, mutates_args=(), schema=_BWD_SCHEMA)
    torch.library.register_fake(f"bert_emd::{_f}")(_fwd_fake_no_lse if _backend == "cpu" else _fwd_fake)
    torch.library.register_fake(f"bert_emd::{_b}")(_bwd_fake)
    torch.library.register_autograd(
        f"bert_emd::{_f}", _backward, setup_context=functools.partial(_setup_context, bwd=_b)
    )


# ------------------------------------------------------------------------------ eager calls
def _regroup(tensors: tuple, counts: tuple[int, ...], stacked: tuple[bool, ...], split: bool) -> list:
    """(sq, sk, tq, tk) from the flat inputs: ``counts`` tensors per group; a stacked group
    ([layers, B, H, L, d], one tensor) stays stacked unless ``split``."""
    out, i = [], 0
    for n, st in zip(counts, stacked):
        out.append((list(tensors[i].unbind(0)) if split else tensors[i]) if st else list(tensors[i : i + n]))
        i += n
    return out


class _Eager(torch.autograd.Function):
    """The op's autograd rule (:func:`_save`, :func:`_grads`) around its backend called directly:
    what the registered op computes in eager mode, without the dispatcher's Python layers
    (``_common.eager``). A stacked group [layers, B, H, L, d] is one input, given to the ``cpu``
    backend as it is (split for the others, no autograd ``unbind``), its gradient one tensor.
    ``how`` = (backend, tensors per group, stacked per group, mask_value, probs, per_sample,
    attention_floor)."""

    @staticmethod
    def forward(ctx, how, attention_mask, mask, *tensors):
        backend, counts, stacked = how[:3]
        groups = _regroup(tensors, counts, stacked, split=backend != "cpu")
        inputs = (*groups, attention_mask, mask, *how[3:])
        ctx.kept = [] if backend == "cpu" else None  # a small problem's maps, for the backward
        with torch._C._AutoDispatchBelowAutograd():
            cost, lse = (attention_costs_fwd_cpu(*inputs, keep=ctx.kept) if backend == "cpu"
                         else _IMPLS[backend][0](*inputs))
        _save(ctx, inputs, lse, _OPS[backend][1])
        ctx.how = how
        return cost

    @staticmethod
    def backward(ctx, grad):
        backend, counts, stacked = ctx.how[:3]
        flat = ctx.needs_input_grad[3:]
        if len(flat) == 4:  # one tensor a group
            needs = flat
        else:
            needs, i = [], 0
            for n, st in zip(counts, stacked):
                needs.append(flat[i] if st else flat[i : i + n])
                i += n
        if torch.is_grad_enabled() or not eager(grad):  # create_graph, or a mode: the registered op
            grads = _grads(ctx, grad, needs, getattr(torch.ops.bert_emd, ctx.bwd).default)
        else:
            bwd = functools.partial(attention_costs_bwd_cpu, kept=ctx.kept) if ctx.kept else _IMPLS[backend][1]
            with torch._C._AutoDispatchBelowAutograd():
                grads = _grads(ctx, grad, needs, bwd, lists=backend != "cpu")
        ctx.kept = None
        out: list = [None, None, None]
        for g, st in zip(grads, stacked):
            if st and isinstance(g, list):  # split for the backend
                g = None if g[0] is None else torch.stack(g)
            out.extend([g] if st else g)
        return tuple(out)


# ----------------------------------------------------------------------------------- dispatch
def _select(backend: str, device: torch.device) -> str:
    return _backends.select("attention_costs", backend, device)


# ------------------------------------------------------------------------------- validation
QK = tuple[torch.Tensor, torch.Tensor]


Group = torch.Tensor | list[torch.Tensor]  # the queries (or keys) of a side: stacked, or one tensor a layer


def _as_qk(name: str, x) -> tuple[Group, Group]:
    """(queries, keys) from M (q, k) pairs (lists) or from a pair of stacked [M, B, H, L, d]
    tensors (kept stacked; :func:`_layers` splits them where lists are needed)."""
    if type(x) not in (tuple, list) and (isinstance(x, (torch.Tensor, str, bytes)) or not isinstance(x, Sequence)):
        raise ValueError(
            f"attention_costs: {name} must be a sequence of (query, key) pairs [B, H, L, d_head] (one per "
            f"layer) or a pair (Q, K) of stacked tensors [layers, B, H, L, d_head], got {type(x).__name__}"
        )
    items = list(x)
    if len(items) == 2 and all(isinstance(t, torch.Tensor) and t.dim() == 5 for t in items):
        if items[0].shape[0] != items[1].shape[0] or items[0].shape[0] == 0:
            raise ValueError(
                f"attention_costs: {name} stacked queries and keys must hold the same number (>= 1) of layers, "
                f"got {items[0].shape[0]} and {items[1].shape[0]}"
            )
        return items[0], items[1]
    if not items:
        raise ValueError(f"attention_costs: {name} must hold at least one (query, key) pair, got none")
    qs, ks = [], []
    for i, pair in enumerate(items):
        ok = isinstance(pair, Sequence) and not isinstance(pair, torch.Tensor) and len(pair) == 2
        if not ok or not all(isinstance(t, torch.Tensor) for t in pair):
            raise ValueError(
                f"attention_costs: {name}[{i}] must be a (query, key) pair of tensors [B, H, L, d_head], got "
                f"{type(pair).__name__}"
            )
        qs.append(pair[0])
        ks.append(pair[1])
    return qs, ks


def _check_side(name: str, qs: Group, ks: Group, device: torch.device) -> torch.Size:
    """Every query and key of a side: [B, H, L, d], a supported dtype, the dtype and shape of the
    side's first query, on ``device``. Returns that shape."""
    stacked = isinstance(qs, torch.Tensor)
    ref_dtype, shape = (qs.dtype, qs.shape[1:]) if stacked else (qs[0].dtype, qs[0].shape)
    ok = len(shape) == 4 and ref_dtype in SUPPORTED_DTYPES
    if ok and stacked:  # the common cases in a few attribute reads per layer; details on a mismatch
        ok = (ks.dtype is ref_dtype and qs.device == device and ks.device == device and ks.shape[1:] == shape)
    elif ok:
        ok = all(t.dtype is ref_dtype and t.device == device and t.shape == shape for t in (*qs, *ks))
    if not ok:
        def describe(x: Group) -> list[tuple]:
            if isinstance(x, torch.Tensor):
                return [(x.dim() - 1, x.dtype, x.device, x.shape[1:])] * x.shape[0]
            return [(t.dim(), t.dtype, t.device, t.shape) for t in x]

        _explain_side(name, describe(qs), describe(ks), device)
    if shape[-1] < 1:
        raise ValueError(f"attention_costs: {name} head size d_head must be >= 1, got shape {list(shape)}")
    return shape


def _explain_side(name: str, qs: list[tuple], ks: list[tuple], device: torch.device) -> None:
    """Raise the ValueError for the first query or key of a side that does not match (each given
    as (dim, dtype, device, shape))."""
    _, ref_dtype, _, ref_shape = qs[0]
    for i, (q, k) in enumerate(zip(qs, ks)):
        for what, (dim, dtype, dev, shape) in (("query", q), ("key", k)):
            if dim != 4:
                raise ValueError(
                    f"attention_costs: {name}[{i}] {what} must have shape [B, H, L, d_head], got {list(shape)}"
                )
            if dtype not in SUPPORTED_DTYPES:
                raise ValueError(
                    f"attention_costs: {name}[{i}] {what} must be float32, float64, float16 or bfloat16, "
                    f"got {dtype}"
                )
            if dtype != ref_dtype:
                raise ValueError(
                    f"attention_costs: every {name} query and key must have one dtype: {name}[0] query is "
                    f"{ref_dtype} but {name}[{i}] {what} is {dtype}"
                )
            if dev != device:
                raise ValueError(
                    f"attention_costs: {name}[{i}] {what} must be on {device} (the device of the first "
                    f"student query), got {dev}"
                )
            if shape != ref_shape:
                raise ValueError(
                    f"attention_costs: {name}[{i}] {what} must have the shape {list(ref_shape)} of {name}[0] "
                    f"query (all queries and keys of one side share [B, H, L, d_head]), got {list(shape)}"
                )
    raise AssertionError("no mismatching query or key")  # pragma: no cover


def _check_mask(name: str, m, B: int, L: int, device: torch.device) -> None:
    if m is None:
        return
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"attention_costs: {name} must be a torch.Tensor [B, L] or None, got {type(m).__name__}")
    if tuple(m.shape) != (B, L):
        raise ValueError(f"attention_costs: {name} must have shape [B, L] = [{B}, {L}], got {list(m.shape)}")
    if m.device != device:
        raise ValueError(f"attention_costs: {name} must be on {device} (the queries' device), got {m.device}")
    if m.is_complex():
        raise ValueError(f"attention_costs: {name} must be bool, integer or floating point (0/1), got {m.dtype}")


def _number(name: str, v, allow_none: bool) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"attention_costs: {name} must be a float{' or None' if allow_none else ''}, got "
                         f"{type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"attention_costs: {name} must be finite, got {v}")
    return float(v)


# ----------------------------------------------------------------------------- public API
def attention_costs(
    student_qk: Sequence[QK] | QK,
    teacher_qk: Sequence[QK] | QK,
    *,
    mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    source: str = "scores",
    attention_floor: float | None = None,
    per_sample: bool = False,
    mask_value: float = -10000.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention cost matrix D_ij = mean (A^S_i - A^T_j)^2 from queries and keys, never storing a map.

    Equals ``layer_costs(maps_S, maps_T, mask=mask, per_sample=..., attention_floor=...)`` on the
    materialised maps A = Q K^T / sqrt(d_head) + a (``source="scores"``, a the additive padding
    mask: 0 for real keys, ``mask_value`` for padded ones, as the score hooks of
    ``bert_emd.distill.hooks`` build them) or A = softmax(that) over keys (``"probs"``: eager
    attention's maps before dropout), without writing any [B, H, L, L] map to memory.

    Args:
        student_qk: the M student layers' (query, key) pairs, each [B, H, L, d_S] (e.g. the
            per-head views [B, L, H, d] -> [B, H, L, d] of the projection outputs, read in place),
            or a pair (Q, K) of stacked tensors [M, B, H, L, d_S]. float32, float64, float16 or
            bfloat16; any strides.
        teacher_qk: the N teacher layers' pairs [B, H, L, d_T]. d_T may differ from d_S (different
            hidden sizes); B, H and L must be equal (heads are compared one by one).
        mask: optional [B, L] token mask of the mean (non-zero = real): entries whose query and key
            are both real count, as ``layer_costs``' mask of attention maps. None: every entry.
        attention_mask: optional [B, L] token mask the models were given (non-zero = real): padded
            keys get ``mask_value`` added to their scores (and so ~0 probability). None: no padding.
        source: ``"scores"`` (pre-softmax, the original BERT-EMD) or ``"probs"`` (post-softmax).
        attention_floor: entries <= floor become 0 on both sides before differencing (the
            original uses -100 on scores, which zeroes the padded keys); their gradient is 0.
        per_sample: one matrix per batch element, [B, M, N].
        mask_value: additive score of padded keys (the original's -10000).
        backend: ``"auto"``, ``"cpu"`` (chunked PyTorch, CPU tensors), ``"triton"`` (CUDA, or CPU
            under ``TRITON_INTERPRET=1``) or ``"torch"`` (materialise the maps, then the
            ``layer_costs`` reference: the oracle, O(L^2) memory).

    Returns:
        D [M, N] (or [B, M, N]), float32 (float64 if an input is float64). NaN where the mean runs
        over nothing (B = 0, or a sample without real tokens). Differentiable w.r.t. the queries and
        keys of both sides (the teacher's only when they require grad); the backward recomputes
        the tiles. On CUDA tensors neither pass synchronises with the host.

    Raises:
        ValueError: invalid shapes (different head counts or lengths included), dtypes, devices or
            arguments; the message names them.
        bert_emd.BackendError: an explicitly requested backend cannot run these inputs.
    """
    sq, sk = _as_qk("student_qk", student_qk)
    tq, tk = _as_qk("teacher_qk", teacher_qk)
    first = sq if isinstance(sq, torch.Tensor) else sq[0]
    device = first.device
    Bs, Hs, Ls, _ = _check_side("student_qk", sq, sk, device)
    Bt, Ht, Lt, _ = _check_side("teacher_qk", tq, tk, device)
    if Hs != Ht:
        raise ValueError(
            f"attention_costs: student has {Hs} attention heads, teacher {Ht}: attention maps are compared "
            "head by head and need equal head counts (hidden sizes, i.e. d_head, may differ)"
        )
    if Ls != Lt:
        raise ValueError(
            f"attention_costs: student sequence length {Ls} differs from the teacher's {Lt}: feed both models "
            "the same tokenised batch"
        )
    if Bs != Bt:
        raise ValueError(f"attention_costs: student batch size {Bs} differs from the teacher's {Bt}")
    _check_mask("mask", mask, Bs, Ls, device)
    _check_mask("attention_mask", attention_mask, Bs, Ls, device)
    if source not in _SOURCES:
        raise ValueError(f"attention_costs: source must be 'scores' or 'probs', got {source!r}")
    if not isinstance(per_sample, bool):
        raise ValueError(f"attention_costs: per_sample must be a bool, got {type(per_sample).__name__}")
    floor = _number("attention_floor", attention_floor, True)
    mv = _number("mask_value", mask_value, False)
    name = _select(backend, device)
    groups = (sq, sk, tq, tk)
    options = (attention_mask, mask, mv, source == "probs", per_sample, floor)
    if eager(first):
        stacked = tuple(isinstance(g, torch.Tensor) for g in groups)
        tensors = tuple(t for g, st in zip(groups, stacked) for t in ((g,) if st else g))
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, *options[:2])):
            counts = tuple(1 if st else len(g) for g, st in zip(groups, stacked))
            return _Eager.apply((name, counts, stacked, *options[2:]), *options[:2], *tensors)
        with torch._C._AutoDispatchBelowAutograd():  # the cpu backend reads stacked groups as they are
            cost, _lse = _IMPLS[name][0](*(g if name == "cpu" else small.layers(g) for g in groups), *options)
        return cost
    fwd, _ = _OPS[name]
    cost, _lse = getattr(torch.ops.bert_emd, fwd).default(*(small.layers(g) for g in groups), *options)
    return cost
