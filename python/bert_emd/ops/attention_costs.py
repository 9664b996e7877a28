"""``bert_emd.attention_costs``: attention cost matrices from queries and keys, without
materialising the attention maps (DESIGN.md section 2, issue #7).

D_ij = layer_costs(A^S_i, A^T_j) of the maps A = QK^T / sqrt(d_head) + additive padding mask
(``source="scores"``) or their softmax over keys (``"probs"``), computed tile by tile so that no
[B, H, L, L] map is ever stored: memory grows with L only through Q and K.

Registration (once for every backend, ``torch.library.custom_op``):
  * ``bert_emd::attention_costs_{fwd,bwd}_torch``  -- materialise the maps, then the layer_costs
    reference (``bert_emd.reference.attention_costs``): the oracle and the fallback;
  * ``bert_emd::attention_costs_{fwd,bwd}_cpu``    -- chunked PyTorch: query blocks of all layers
    at a time ([chunk, L] tiles of bounded size), the costs of each chunk by the fused
    ``layer_costs`` kernel, the backward recomputing the chunks;
  * ``bert_emd::attention_costs_{fwd,bwd}_triton`` -- the flash-attention-style Triton kernels of
    ``emd_kernels.attention_costs``.
Every forward op returns (cost, lse) -- lse the row log-sum-exp [M + N, B, H, L] of every layer
with ``probs`` (kept for the backward, O(L) memory), else an empty tensor -- and shares one fake
kernel and one autograd rule, which calls the backward op of its own backend (tiles recomputed,
never stored).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .. import _backends
from ..reference.attention_costs import (
    acc_dtype,
    additive_key_mask,
    attention_costs_materialized,
    attention_costs_materialized_grad,
    attention_lse,
)
from .layer_costs import layer_costs

__all__ = ["attention_costs"]

_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SOURCES = ("scores", "probs")
_FWD_SCHEMA = ("(Tensor[] sq, Tensor[] sk, Tensor[] tq, Tensor[] tk, Tensor? attention_mask, Tensor? mask, "
               "float mask_value, bool probs, bool per_sample, float? attention_floor) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad, Tensor[] sq, Tensor[] sk, Tensor[] tq, Tensor[] tk, Tensor lse, "
               "Tensor? attention_mask, Tensor? mask, float mask_value, bool probs, bool per_sample, "
               "float? attention_floor, bool need_student, bool need_teacher) "
               "-> (Tensor[], Tensor[], Tensor[], Tensor[])")

# Elements of all M + N layer tiles of one chunk of the ``cpu`` backend together (16 MiB in
# float32): the working set of a chunk, whatever L and B are (the backward holds about 3x this).
CPU_CHUNK_ELEMENTS = 1 << 22
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


def _flags(flag, n: int) -> list[bool]:
    return [bool(f) for f in flag] if isinstance(flag, (list, tuple)) else [bool(flag)] * n


def _backward(ctx, grad, _grad_lse):
    saved = list(ctx.saved_tensors)
    M, N = ctx.M, ctx.N
    sq, sk = saved[:M], saved[M : 2 * M]
    tq, tk = saved[2 * M : 2 * M + N], saved[2 * M + N : 2 * M + 2 * N]
    lse = saved[2 * M + 2 * N]
    rest = saved[2 * M + 2 * N + 1 :]
    attention_mask = rest.pop(0) if ctx.has_am else None
    mask = rest.pop(0) if ctx.has_mask else None
    flags = [_flags(f, n) for f, n in zip(ctx.needs_input_grad[:4], (M, M, N, N))]
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


# ------------------------------------------------------------------------------ cpu (chunked)
def _chunking(B: int, H: int, L: int, layers: int) -> tuple[int, int]:
    """(samples, query rows) per chunk so that ``layers`` tiles [bc, H, cq, L] hold at most
    CPU_CHUNK_ELEMENTS elements together (at least one query row of one sample)."""
    per_layer = max(1, CPU_CHUNK_ELEMENTS // max(layers, 1))
    row = max(1, H * L)
    cq = min(max(L, 1), max(1, per_layer // row))
    bc = min(max(B, 1), max(1, per_layer // (row * L))) if cq >= L else 1
    return bc, cq


class _Side:
    """Queries and keys of one side, and the maps of a chunk computed into reused buffers."""

    def __init__(self, qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor], acc: torch.dtype):
        self.qs, self.ks, self.acc = list(qs), list(ks), acc
        self.scale = qs[0].shape[-1] ** -0.5
        self.buf: torch.Tensor | None = None

    def maps(self, b0: int, b1: int, q0: int, q1: int, add: torch.Tensor | None, lse: torch.Tensor | None,
             lse_out: torch.Tensor | None) -> torch.Tensor:
        """[layers, bc, H, cq, L] scores (or probs) of queries q0:q1 of samples b0:b1.

        probs: from ``lse`` [layers, B, H, L] when given, else computing it (into ``lse_out``)."""
        shape = (len(self.qs), b1 - b0, self.qs[0].shape[1], q1 - q0, self.ks[0].shape[2])
        if self.buf is None or self.buf.shape != shape:
            self.buf = torch.empty(shape, dtype=self.acc, device=self.qs[0].device)
        for i, (q, k) in enumerate(zip(self.qs, self.ks)):
            x = self.buf[i]
            torch.matmul(q[b0:b1, :, q0:q1].to(self.acc), k[b0:b1].to(self.acc).transpose(-1, -2), out=x)
            x.mul_(self.scale)  # the score hooks' order: (q k^T) * d**-0.5, then + mask
            if add is not None:
                x.add_(add[b0:b1])
            if lse_out is not None:  # softmax in place (as torch.softmax: max, exp, sum, divide) and its lse
                m = x.amax(-1, keepdim=True)
                s = x.sub_(m).exp_().sum(-1, keepdim=True)
                x.div_(s)
                torch.add(m[..., 0], s[..., 0].log_(), out=lse_out[i, b0:b1, :, q0:q1])
            elif lse is not None:
                x.sub_(lse[i, b0:b1, :, q0:q1, None]).exp_()
        return self.buf


def _chunk_weights(mask: torch.Tensor | None, b0: int, b1: int, q0: int, q1: int, acc) -> torch.Tensor | None:
    if mask is None:
        return None
    m = (mask[b0:b1] != 0).to(acc)
    return m[:, None, q0:q1, None] * m[:, None, None, :]  # [bc, 1, cq, L]


def _fwd_cpu(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor):
    M, N = len(sq), len(tq)
    B, H, L, _ = sq[0].shape
    acc = acc_dtype(sq, tq)
    device = sq[0].device
    S, T = _Side(sq, sk, acc), _Side(tq, tk, acc)
    add = additive_key_mask(attention_mask, mask_value, acc) if attention_mask is not None else None
    lse = torch.empty((M + N, B, H, L) if probs else (0,), dtype=acc, device=device)
    sums = torch.zeros((B, M, N), dtype=acc, device=device)
    bc, cq = _chunking(B, H, L, M + N)
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        for q0 in range(0, L, cq):
            q1 = min(L, q0 + cq)
            xs = S.maps(b0, b1, q0, q1, add, None, lse[:M] if probs else None)
            ys = T.maps(b0, b1, q0, q1, add, None, lse[M:] if probs else None)
            w = _chunk_weights(mask, b0, b1, q0, q1, acc)
            if w is not None:  # masked entries become 0 on both sides (f(0) = 0): they add nothing
                xs.mul_(w)
                ys.mul_(w)
            # the fused layer_costs kernel reads each tile once for all M * N pairs
            part = layer_costs(xs, ys, per_sample=True, attention_floor=attention_floor)
            sums[b0:b1] += part * float(H * (q1 - q0) * L)
    if mask is None:
        n = torch.full((B,), float(H * L * L), dtype=acc, device=device)
    else:
        c = (mask != 0).to(acc).sum(1)
        n = H * c * c
    cost = sums / n[:, None, None] if per_sample else sums.sum(0) / n.sum()
    return cost, lse


def _bwd_cpu_side(G, c, X: _Side, Y: _Side, lse_x, lse_y, add, mask, probs, per_sample, attention_floor):
    """dQ, dK of side X for G [B, MX, NY] (per sample) or [MX, NY], c [B] = 2/n.

    Per chunk: V = X's maps and W = Y's (recomputed, scores or probs from lse), then
    gX = c keep (V sum_j G_ij - sum_j G_ij f(W_j)) (f(V) = V where keep), dS (softmax backward
    for probs), dQ = dS K / sqrt(d), dK += dS^T Q / sqrt(d). Working set: about 3 MX + NY tiles.
    """
    MX, NY = len(X.qs), len(Y.qs)
    B, H, L, _ = X.qs[0].shape
    acc = X.acc
    dq = [torch.zeros(q.shape, dtype=acc, device=q.device) for q in X.qs]
    dk = [torch.zeros(k.shape, dtype=acc, device=k.device) for k in X.ks]
    rs = G.sum(-1)  # sum_j G_ij: [B, MX] or [MX]
    bc, cq = _chunking(B, H, L, 3 * MX + NY + 1)
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        nb = b1 - b0
        for q0 in range(0, L, cq):
            q1 = min(L, q0 + cq)
            v = X.maps(b0, b1, q0, q1, add, lse_x, None)  # [MX, nb, H, cq, L] V (raw: keep and P need it)
            fw = Y.maps(b0, b1, q0, q1, add, lse_y, None)  # [NY, ...] W, made f(W) in place
            wgt = _chunk_weights(mask, b0, b1, q0, q1, acc)
            keep = None if attention_floor is None else v > attention_floor
            if attention_floor is not None:
                fw.masked_fill_(fw <= attention_floor, 0.0)
            if wgt is not None:
                fw.mul_(wgt)
                keep = (wgt != 0) if keep is None else keep & (wgt != 0)
            if per_sample:  # sum_j G[b, i, j] f(W_j): [nb, MX, NY] @ [nb, NY, E] -> [MX, nb, ...] (a view)
                sgy = torch.matmul(G[b0:b1], fw.view(NY, nb, -1).transpose(0, 1)).transpose(0, 1).view(v.shape)
                r = rs[b0:b1].t().reshape(MX, nb, 1, 1, 1)
            else:
                sgy = torch.matmul(G, fw.view(NY, -1)).view(v.shape)
                r = rs.reshape(MX, 1, 1, 1, 1)
            gx = sgy.neg_().addcmul_(v, r).mul_(c[b0:b1].reshape(1, nb, 1, 1, 1))  # in place
            if keep is not None:
                gx.masked_fill_(~keep, 0.0)
            if probs:  # dS = P (gX - rowsum(gX P))
                gx.sub_((gx * v).sum(-1, keepdim=True)).mul_(v)
            for i in range(MX):
                k = X.ks[i][b0:b1].to(acc)
                q = X.qs[i][b0:b1, :, q0:q1].to(acc)
                dq[i][b0:b1, :, q0:q1] = torch.matmul(gx[i], k).mul_(X.scale)
                dk[i][b0:b1].add_(torch.matmul(gx[i].transpose(-1, -2), q), alpha=X.scale)
    return [g.to(q.dtype) for g, q in zip(dq, X.qs)], [g.to(k.dtype) for g, k in zip(dk, X.ks)]


def _bwd_cpu(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample, attention_floor,
             need_student, need_teacher):
    M = len(sq)
    B, H, L, _ = sq[0].shape
    acc = acc_dtype(sq, tq)
    device = sq[0].device
    G = grad.to(acc)
    if mask is None:
        n = torch.full((B,), float(H * L * L), dtype=acc, device=device)
    else:
        cnt = (mask != 0).to(acc).sum(1)
        n = H * cnt * cnt
    if not per_sample:
        n = n.sum().expand(B)
    c = torch.where(n > 0, 2.0 / n, torch.zeros_like(n))
    add = additive_key_mask(attention_mask, mask_value, acc) if attention_mask is not None else None
    lse_s, lse_t = (lse[:M], lse[M:]) if probs else (None, None)
    opts = (add, mask, probs, per_sample, attention_floor)
    dsq, dsk, dtq, dtk = [], [], [], []
    if need_student:
        dsq, dsk = _bwd_cpu_side(G, c, _Side(sq, sk, acc), _Side(tq, tk, acc), lse_s, lse_t, *opts)
    if need_teacher:
        dtq, dtk = _bwd_cpu_side(G.transpose(-1, -2), c, _Side(tq, tk, acc), _Side(sq, sk, acc), lse_t, lse_s, *opts)
    return dsq, dsk, dtq, dtk


# ------------------------------------------------------------------------------------ triton
def _fwd_triton(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor):
    from emd_kernels.attention_costs import attention_costs_fwd

    return attention_costs_fwd(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample,
                               attention_floor, block=TRITON_BLOCK)


def _bwd_triton(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample, attention_floor,
                need_student, need_teacher):
    from emd_kernels.attention_costs import attention_costs_bwd

    return attention_costs_bwd(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample,
                               attention_floor, need_student, need_teacher, block=TRITON_BLOCK)


_IMPLS = {
    "torch": (_fwd_torch, _bwd_torch),
    "cpu": (_fwd_cpu, _bwd_cpu),
    "triton": (_fwd_triton, _bwd_triton),
}
_OPS = {b: (f"attention_costs_fwd_{b}", f"attention_costs_bwd_{b}") for b in _IMPLS}

for _backend, (_fwd, _bwd) in _IMPLS.items():
    _f, _b = _OPS[_backend]
    torch.library.custom_op(f"bert_emd::{_f}", _fwd, mutates_args=(), schema=_FWD_SCHEMA)
    torch.library.custom_op(f"bert_emd::{_b}", _bwd, mutates_args=(), schema=_BWD_SCHEMA)
    torch.library.register_fake(f"bert_emd::{_f}")(_fwd_fake)
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
            if t.dtype not in _SUPPORTED:
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
