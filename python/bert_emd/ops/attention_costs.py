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
from ._common import SUPPORTED_DTYPES, grad_flags, live_spans
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
    sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor = inputs
    _, lse = output
    ctx.bwd = bwd
    ctx.M, ctx.N = len(sq), len(tq)
    ctx.has_am, ctx.has_mask = attention_mask is not None, mask is not None
    ctx.options = (mask_value, probs, per_sample, attention_floor)
    extra = [t for t in (attention_mask, mask) if t is not None]
    ctx.save_for_backward(*sq, *sk, *tq, *tk, lse, *extra)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad, _grad_lse):
    saved = list(ctx.saved_tensors)
    M, N = ctx.M, ctx.N
    sq, sk = saved[:M], saved[M : 2 * M]
    tq, tk = saved[2 * M : 2 * M + N], saved[2 * M + N : 2 * M + 2 * N]
    lse = saved[2 * M + 2 * N]
    rest = saved[2 * M + 2 * N + 1 :]
    attention_mask = rest.pop(0) if ctx.has_am else None
    mask = rest.pop(0) if ctx.has_mask else None
    flags = [grad_flags(f, n) for f, n in zip(ctx.needs_input_grad[:4], (M, M, N, N))]
    need_s = any(flags[0]) or any(flags[1])
    need_t = any(flags[2]) or any(flags[3])
    out = [[None] * n for n in (M, M, N, N)]  # the structure of the inputs, always
    if (need_s or need_t) and grad is not None:
        op = getattr(torch.ops.bert_emd, ctx.bwd).default
        grads = op(grad, sq, sk, tq, tk, lse, attention_mask, mask, *ctx.options, need_s, need_t)
        for k, (g, f) in enumerate(zip(grads, flags)):
            if g:
                out[k] = [gi if fi else None for gi, fi in zip(g, f)]
    return (*out, None, None, None, None, None, None)


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


# ----------------------------------------------------------------------------------- dispatch
def _select(backend: str, device: torch.device) -> str:
    return _backends.select("attention_costs", backend, device)


# ------------------------------------------------------------------------------- validation
QK = tuple[torch.Tensor, torch.Tensor]


def _as_qk(name: str, x) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(queries, keys) lists from M (q, k) pairs or from a pair of stacked [M, B, H, L, d] tensors."""
    if isinstance(x, torch.Tensor) or isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise ValueError(
            f"attention_costs: {name} must be a sequence of (query, key) pairs [B, H, L, d_head] (one per "
            f"layer) or a pair (Q, K) of stacked tensors [layers, B, H, L, d_head], got {type(x).__name__}"
        )
    items = list(x)
    if len(items) == 2 and all(isinstance(t, torch.Tensor) and t.dim() == 5 for t in items):
        return list(items[0].unbind(0)), list(items[1].unbind(0))
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


def _check_side(name: str, qs: list[torch.Tensor], ks: list[torch.Tensor], device: torch.device) -> None:
    ref = qs[0]
    for i, (q, k) in enumerate(zip(qs, ks)):
        for what, t in (("query", q), ("key", k)):
            if t.dim() != 4:
                raise ValueError(
                    f"attention_costs: {name}[{i}] {what} must have shape [B, H, L, d_head], got {list(t.shape)}"
                )
            if t.dtype not in SUPPORTED_DTYPES:
                raise ValueError(
                    f"attention_costs: {name}[{i}] {what} must be float32, float64, float16 or bfloat16, "
                    f"got {t.dtype}"
                )
            if t.dtype != ref.dtype:
                raise ValueError(
                    f"attention_costs: every {name} query and key must have one dtype: {name}[0] query is "
                    f"{ref.dtype} but {name}[{i}] {what} is {t.dtype}"
                )
            if t.device != device:
                raise ValueError(
                    f"attention_costs: {name}[{i}] {what} must be on {device} (the device of the first "
                    f"student query), got {t.device}"
                )
            if t.shape != ref.shape:
                raise ValueError(
                    f"attention_costs: {name}[{i}] {what} must have the shape {list(ref.shape)} of {name}[0] "
                    f"query (all queries and keys of one side share [B, H, L, d_head]), got {list(t.shape)}"
                )
    if ref.shape[-1] < 1:
        raise ValueError(f"attention_costs: {name} head size d_head must be >= 1, got shape {list(ref.shape)}")


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
        the tiles.

    Raises:
        ValueError: invalid shapes (different head counts or lengths included), dtypes, devices or
            arguments; the message names them.
        bert_emd.BackendError: an explicitly requested backend cannot run these inputs.
    """
    sq, sk = _as_qk("student_qk", student_qk)
    tq, tk = _as_qk("teacher_qk", teacher_qk)
    device = sq[0].device
    _check_side("student_qk", sq, sk, device)
    _check_side("teacher_qk", tq, tk, device)
    Bs, Hs, Ls, _ = sq[0].shape
    Bt, Ht, Lt, _ = tq[0].shape
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
    fwd, _ = _OPS[name]
    cost, _lse = getattr(torch.ops.bert_emd, fwd).default(
        sq, sk, tq, tk, attention_mask, mask, mv, source == "probs", per_sample, floor
    )
    return cost
