"""``bert_emd.attention_costs``: attention cost matrices from queries and keys, without
materialising the attention maps (docs/design.md).

D_ij = layer_costs(A^S_i, A^T_j) of the maps A = QK^T / sqrt(d_head) + additive padding mask
(``source="scores"``) or their softmax over keys (``"probs"``), computed tile by tile so that no
[B, H, L, L] map is ever stored: memory grows with L only through Q and K.

Registration (once for every backend, ``torch.library.custom_op``):
  * ``bert_emd::attention_costs_{fwd,bwd}_torch``  -- materialise the maps, then the layer_costs
    reference (``bert_emd.reference.attention_costs``): the oracle and the fallback;
  * ``bert_emd::attention_costs_{fwd,bwd}_cpu``    -- chunked PyTorch: query blocks of all layers
    at a time ([chunk, W] tiles of bounded size, W the sample's live keys: padded keys that
    provably add nothing are skipped), the costs of each chunk by the fused ``layer_costs``
    kernel, the backward recomputing the chunks -- or, for ``scores`` where the floor provably
    never acts and at long rows, Gram products of Q and K with no tile at all;
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
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from .. import _backends
from ..reference.attention_costs import (
    acc_dtype,
    additive_key_mask,
    attention_costs_materialized,
    attention_costs_materialized_grad,
    attention_lse,
)
from ._common import LAYER_COSTS_OPS, SUPPORTED_DTYPES, grad_flags

__all__ = ["attention_costs"]

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
# The cpu backward of ``scores`` by Gram products of Q and K where that is exact and cheaper
# (``_bwd_lowrank_side``); False: always recompute the tiles.
LOWRANK_BACKWARD = True
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


# ------------------------------------------------------------------------------ cpu (chunked)
# Maths: D_ij = (1/n) sum over chunks c of S_ij(c), S_ij(c) = sum over the chunk's entries of
# w (f(A^S_i) - f(A^T_j))^2 (n per sample, or over the batch); the gradient of a chunk's tiles is
# layer_costs' fused one, (2/n) w [A^S_i > floor] (f(A^S_i) sum_j G_ij - sum_j G_ij f(A^T_j)),
# then the softmax backward (probs) and dQ = dA K d**-0.5, dK = dA^T Q d**-0.5.
# Why this shape: per chunk (whole rows of all layers), one BLAS call per layer forms the score
# tile with the scale fused (baddbmm, alpha = d**-0.5, beta = 0), the padding mask is added to the
# padded keys' columns only, torch's vectorised softmax turns scores into probs (never exp_ on
# -10000 entries: the generic exp is 10-30x slower on underflowing inputs), and the fused C++
# layer_costs kernels read every tile once for all M * N pairs, forward (the costs) and backward
# (the gradient of each tile, floor and all). Rows are whole (all live keys: only keys that
# provably add nothing are left out, see ``_padded_keys_vanish``), so the backward recomputes
# probs from the scores directly and needs no log-sum-exp: this backend returns an empty lse.
class _Chunk(NamedTuple):
    """Samples b0:b1, heads h0:h1, query rows q0:q1 and key columns k0:k1 of every layer."""

    b0: int
    b1: int
    h0: int
    h1: int
    q0: int
    q1: int
    k0: int
    k1: int

    @property
    def entries(self) -> int:
        """Heads x query rows x keys of the chunk, per sample (its entries per layer and sample)."""
        return (self.h1 - self.h0) * (self.q1 - self.q0) * (self.k1 - self.k0)


def _balanced(n: int, most: int) -> int:
    """Block size <= ``most`` that cuts n into the fewest, equal-as-possible blocks (512 rows with
    room for 480: two blocks of 256, not 480 and a ragged 32 that runs BLAS at a fraction of the
    speed)."""
    blocks = -(-n // max(1, min(most, n)))
    return -(-n // blocks)


Box = tuple[int, int, int, int]  # live query rows r0:r1 and key columns k0:k1 of one sample


def _chunks(B: int, H: int, L: int, layers: int, boxes: Sequence[Box] | None = None) -> Iterator[_Chunk]:
    """Blocks whose ``layers`` tiles [nb, nh, cq, W] hold at most CPU_CHUNK_ELEMENTS elements
    together (at least one row). Rows grow first, then heads, then samples: the score GEMMs
    [cq, d] x [d, W] get as many rows as the budget allows (a 40-row tile of all 12 heads runs
    BLAS at half the speed of a 480-row tile of one head). ``boxes`` (default: everything) limits
    each sample to its live rows and keys (``_live_boxes``); a block of several samples covers
    the union of theirs (what lies outside a sample's own box adds exactly nothing); samples with
    an empty box are never touched (blocks stop at them: the backward leaves them to the Gram
    products)."""
    boxes = list(boxes) if boxes is not None else [(0, L, 0, L)] * B
    nonempty = [bx[1] > bx[0] and bx[3] > bx[2] for bx in boxes]
    live = [bx for bx, ok in zip(boxes, nonempty) if ok]
    if not live:
        return
    per_layer = max(1, CPU_CHUNK_ELEMENTS // max(layers, 1))
    R = max(r1 - r0 for r0, r1, _, _ in live)
    W = max(k1 - k0 for _, _, k0, k1 in live)
    nb = 1
    if per_layer // W >= R and per_layer // (R * W) >= H:  # a whole sample fits: group samples
        nb = _balanced(B, max(1, per_layer // (H * R * W)))
    groups, b = [], 0
    while b < B:  # blocks of up to nb consecutive samples with boxes
        if not nonempty[b]:
            b += 1
            continue
        e = b
        while e < B and e - b < nb and nonempty[e]:
            e += 1
        groups.append((b, e))
        b = e
    for b0, b1 in groups:
        group = boxes[b0:b1]
        r0, r1 = min(bx[0] for bx in group), max(bx[1] for bx in group)
        k0, k1 = min(bx[2] for bx in group), max(bx[3] for bx in group)
        cq = _balanced(r1 - r0, max(1, per_layer // (k1 - k0)))
        nh = _balanced(max(H, 1), max(1, per_layer // (cq * (k1 - k0)))) if cq >= r1 - r0 else 1
        for h0 in range(0, H, nh):
            for q0 in range(r0, r1, cq):
                yield _Chunk(b0, b1, h0, min(H, h0 + nh), q0, min(r1, q0 + cq), k0, k1)


# Keys and rows that provably add nothing are never computed. An entry adds exactly nothing to
# the costs and their gradient when its weight is 0 (``mask``: query or key not real), or when
# its key is padded (``attention_mask``) and the padding value pushes it out of reach on both
# sides: with ``scores`` below the floor (f = 0, gradient 0) whenever
#     |q . k| d**-0.5 <= d**-0.5 max|q| max|k_padded| < floor - mask_value   (Cauchy-Schwarz),
# with ``probs`` to an exp that underflows to exactly 0 whenever
#     x_padded - max_row x <= d**-0.5 max|q| (max|k_padded| + max|k|) + mask_value < -110 (f32).
# The bound costs one pass over Q and K (O(L) per layer, against the O(L^2) tiles) and is checked
# per sample with a 1% margin for rounding; when it fails (huge activations, a tiny mask_value,
# NaN) the sample's padded keys are computed as before. For right padding with lengths c_b this
# cuts each sample's work to c_b / L of the keys (and rows to c_b with a ``mask``), exactly.
_UNDERFLOW = {torch.float32: -110.0, torch.float64: -760.0}  # exp(x) == 0 below (with margin)


class _Norms:
    """Row norms |q|, |k| [B, H, L] of every layer of both sides, computed on first use (one pass
    over Q and K, shared by the bounds of the forward's skipping and the backward's Gram products)."""

    def __init__(self, sq, sk, tq, tk, acc: torch.dtype):
        self.sides, self.acc = ((sq, sk), (tq, tk)), acc
        self._layers: list[tuple[float, torch.Tensor, torch.Tensor]] | None = None

    def _max(self, n: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        if where is not None:
            n = torch.where(where.to(n.device)[:, None, :], n, torch.zeros((), dtype=n.dtype, device=n.device))
        return n.amax(dim=(1, 2)) if n.numel() else n.new_zeros(n.shape[0])

    def worst(self, rows: torch.Tensor | None, keys: torch.Tensor | None, plus_all_keys: bool = False) -> torch.Tensor:
        """[B] float64: max over layers of d**-0.5 max_rows |q| (max_keys |k| (+ max_all |k|)),
        the bound on |q . k| d**-0.5 over those rows and keys (``where`` masks [B, L], None: all)."""
        if self._layers is None:
            self._layers = [(qs[0].shape[-1] ** -0.5, torch.linalg.vector_norm(q.to(self.acc), dim=-1),
                             torch.linalg.vector_norm(k.to(self.acc), dim=-1))
                            for qs, ks in self.sides for q, k in zip(qs, ks)]
        q0 = self.sides[0][0][0]
        worst = torch.zeros(q0.shape[0], dtype=torch.float64, device=q0.device)  # on device: no sync
        for scale, qn, kn in self._layers:
            reach = self._max(kn, keys) + (self._max(kn, None) if plus_all_keys else 0.0)
            worst = torch.maximum(worst, (scale * self._max(qn, rows) * reach).double())
        return worst


def _padded_keys_vanish(norms: _Norms, attention_mask, mask_value, probs, attention_floor, acc) -> torch.Tensor:
    """[B] bool (on the inputs' device): sample b's padded keys provably add nothing on either
    side (see above)."""
    padded = attention_mask.to(norms.sides[0][0][0].device) == 0
    no = torch.zeros(padded.shape[0], dtype=torch.bool, device=padded.device)
    if padded.device.type == "cpu" and not bool(padded.any()):  # (no host sync on an accelerator)
        return no
    if probs:
        limit = _UNDERFLOW.get(acc, -110.0)
        if not mask_value < limit:
            return no
    elif attention_floor is None or not mask_value < attention_floor:
        return no
    worst = norms.worst(None, padded, plus_all_keys=probs)
    mv = float(mask_value)
    if probs:  # the row max is a real key's: some key must be real
        return (1.01 * worst + mv < limit) & (~padded).any(dim=1)
    floor = float(attention_floor)
    return 1.01 * worst + mv + 1e-5 * (abs(mv) + abs(floor)) < floor


def _live_masks(norms: _Norms, attention_mask, mask, mask_value, probs, attention_floor, acc):
    """(rows, cols) [B, L] bool on the inputs' device: the query rows and keys of each sample
    outside which every entry of every layer provably adds nothing (see above)."""
    q0 = norms.sides[0][0][0]
    B, _, L, _ = q0.shape
    rows = torch.ones(B, L, dtype=torch.bool, device=q0.device)
    cols = rows
    if mask is not None:
        rows = mask.to(q0.device) != 0
        if not probs:  # probs still need the weight-0 keys for the softmax normaliser
            cols = rows
    if attention_mask is not None:
        vanish = _padded_keys_vanish(norms, attention_mask, mask_value, probs, attention_floor, acc)
        cols = cols & ~((attention_mask.to(q0.device) == 0) & vanish[:, None])
    return rows, cols


def _spans(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[B, 4] int32 boxes (r0, r1, k0, k1): the spans of the live rows and keys, (0, 0) if none."""
    L = rows.shape[1]

    def span(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        some = m.any(dim=1)
        first = m.to(torch.int32).argmax(dim=1)
        last = L - m.flip(1).to(torch.int32).argmax(dim=1)
        return torch.where(some, first, 0), torch.where(some, last, 0)

    return torch.stack([*span(rows), *span(cols)], dim=1).to(torch.int32)


class _Live(NamedTuple):
    """Which query rows and keys of each sample can add something ([B, L] bool, CPU), and the
    box (r0, r1, k0, k1) spanning them."""

    rows: torch.Tensor
    cols: torch.Tensor
    boxes: list[Box]


def _live(norms: _Norms, attention_mask, mask, mask_value, probs, attention_floor, acc) -> _Live:
    """The live rows and keys (``_live_masks``) and their boxes, on the CPU."""
    rows, cols = _live_masks(norms, attention_mask, mask, mask_value, probs, attention_floor, acc)
    rows, cols = rows.cpu(), cols.cpu()
    return _Live(rows, cols, [tuple(bx) for bx in _spans(rows, cols).tolist()])


def _live_boxes(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, attention_floor, acc) -> list[Box] | None:
    """Per sample (r0, r1, k0, k1): the query rows and keys outside which every entry of every
    layer provably adds nothing (see above); None when nothing can be skipped."""
    if mask is None and attention_mask is None:
        return None
    L = sq[0].shape[2]
    norms = _Norms(sq, sk, tq, tk, acc)
    boxes = _live(norms, attention_mask, mask, mask_value, probs, attention_floor, acc).boxes
    return None if all(bx == (0, L, 0, L) for bx in boxes) else boxes


def _layer_cost_ops(device: torch.device):
    """The (forward, backward) layer_costs ops for CPU tiles: the C++ kernels when built, else the
    PyTorch reference."""
    name = _backends.select("layer_costs", "auto", device)
    fwd, bwd = LAYER_COSTS_OPS[name]
    return getattr(torch.ops.bert_emd, fwd).default, getattr(torch.ops.bert_emd, bwd).default


class _Side:
    """Queries and keys of one side, and the maps of a chunk computed into reused buffers."""

    def __init__(self, qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor], acc: torch.dtype, probs: bool):
        self.qs, self.ks, self.acc, self.probs = list(qs), list(ks), acc, probs
        self.scale = qs[0].shape[-1] ** -0.5
        self.flat: torch.Tensor | None = None  # reused storage: chunks of different shapes share it
        self.flat_tmp: torch.Tensor | None = None

    def q(self, i: int, c: _Chunk) -> torch.Tensor:
        """Layer i's queries of chunk c as [nb * nh, cq, d] in the accumulation dtype."""
        q = self.qs[i][c.b0 : c.b1, c.h0 : c.h1, c.q0 : c.q1].to(self.acc)
        return q.reshape(-1, q.shape[-2], q.shape[-1])

    def k(self, i: int, c: _Chunk) -> torch.Tensor:
        """Layer i's keys k0:k1 of chunk c's samples and heads as [nb * nh, W, d]."""
        k = self.ks[i][c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.k1].to(self.acc)
        return k.reshape(-1, k.shape[-2], k.shape[-1])

    def _view(self, attr: str, shape: tuple[int, ...]) -> torch.Tensor:
        need = math.prod(shape)
        flat = getattr(self, attr)
        if flat is None or flat.numel() < need:
            flat = torch.empty(need, dtype=self.acc, device=self.qs[0].device)
            setattr(self, attr, flat)
        return flat[:need].view(shape)

    def maps(self, c: _Chunk, add: _KeyMask | None) -> torch.Tensor:
        """[layers, nb, nh, cq, W]: A = (q k^T) d**-0.5 + a (the score hooks' order) or softmax_k(A)."""
        nb, nh, cq, W = c.b1 - c.b0, c.h1 - c.h0, c.q1 - c.q0, c.k1 - c.k0
        shape = (len(self.qs), nb, nh, cq, W)
        buf = self._view("flat", shape)
        tmp = self._view("flat_tmp", shape[1:]) if self.probs else None
        for i in range(len(self.qs)):
            x = tmp if self.probs else buf[i]
            q, kt = self.q(i, c), self.k(i, c).transpose(-1, -2)
            x3 = x.view(nb * nh, cq, W)
            # beta = 0: x's stale content is ignored (NaN included); alpha scales the product
            torch.baddbmm(x3, q, kt, beta=0.0, alpha=self.scale, out=x3)
            if add is not None:
                for b in range(nb):  # only the padded keys' columns (a slice when they are contiguous)
                    cols, value = add.within(c.b0 + b, c.k0, c.k1)
                    if cols is not None:
                        x[b, ..., cols].add_(value)
            if self.probs:
                torch.ops.aten._softmax.out(x, -1, False, out=buf[i])
        return buf


class _KeyMask:
    """The additive key mask of ``attention_mask`` by sample: ``columns[b]`` = (where, value) with
    ``where`` the slice of padded keys when they are contiguous (right or left padding), else the
    full [L] additive row, or None when sample b has no padded key. Adding only the padded columns
    saves a pass over every tile (and a copy: baddbmm would first broadcast the mask into its output)."""

    def __init__(self, attention_mask: torch.Tensor, mask_value: float, acc: torch.dtype):
        add = additive_key_mask(attention_mask, mask_value, acc)[:, 0, 0, :]  # [B, L]
        self.columns: list[tuple[slice | None, float | torch.Tensor]] = []
        padded = (attention_mask == 0).cpu()
        for b in range(add.shape[0]):
            idx = padded[b].nonzero().flatten().tolist()
            if not idx or mask_value == 0.0:
                self.columns.append((None, 0.0))
            elif idx[-1] - idx[0] + 1 == len(idx):
                self.columns.append((slice(idx[0], idx[-1] + 1), float(add[b, idx[0]])))
            else:
                self.columns.append((slice(None), add[b]))

    def within(self, b: int, k0: int, k1: int) -> tuple[slice | None, float | torch.Tensor]:
        """Sample b's padded columns and their value, relative to the key window k0:k1."""
        cols, value = self.columns[b]
        if cols is None:
            return None, 0.0
        if isinstance(value, torch.Tensor):
            return slice(None), value[k0:k1]
        lo, hi = max(cols.start, k0) - k0, min(cols.stop, k1) - k0
        return (slice(lo, hi), value) if lo < hi else (None, 0.0)


def _chunk_weights(mask: torch.Tensor | None, c: _Chunk, acc) -> torch.Tensor | None:
    if mask is None:
        return None
    m = (mask[c.b0 : c.b1] != 0).to(acc)
    return m[:, None, c.q0 : c.q1, None] * m[:, None, None, c.k0 : c.k1]  # [nb, 1, cq, W]


def _counts(mask: torch.Tensor | None, B: int, H: int, L: int, acc, device) -> torch.Tensor:
    """n [B]: the entries each sample's mean runs over (H c^2 with c real tokens, H L^2 without a mask)."""
    if mask is None:
        return torch.full((B,), float(H * L * L), dtype=acc, device=device)
    c = (mask != 0).to(acc).sum(1)
    return H * c * c


def _fwd_cpu(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor):
    M, N = len(sq), len(tq)
    B, H, L, _ = sq[0].shape
    acc = acc_dtype(sq, tq)
    device = sq[0].device
    lc_fwd, _ = _layer_cost_ops(device)
    S, T = _Side(sq, sk, acc, probs), _Side(tq, tk, acc, probs)
    add = _KeyMask(attention_mask, mask_value, acc) if attention_mask is not None else None
    sums = torch.zeros((B, M, N), dtype=acc, device=device)
    boxes = _live_boxes(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, attention_floor, acc)
    for c in _chunks(B, H, L, M + N + 1, boxes):
        xs, ys = S.maps(c, add), T.maps(c, add)
        w = _chunk_weights(mask, c, acc)
        if w is not None:  # masked entries become 0 on both sides (f(0) = 0): they add nothing
            xs.mul_(w)
            ys.mul_(w)
        # the chunk's per-sample means over its nh * cq * L entries, back to sums
        part = lc_fwd(list(xs.unbind(0)), list(ys.unbind(0)), None, True, attention_floor)
        sums[c.b0 : c.b1] += part * float(c.entries)
    n = _counts(mask, B, H, L, acc, device)
    cost = sums / n[:, None, None] if per_sample else sums.sum(0) / n.sum()
    return cost, sq[0].new_empty((0,), dtype=acc)


def _bwd_cpu_side(Gn, X: _Side, Y: _Side, add, mask, attention_floor, boxes, dq, dk) -> None:
    """dQ, dK of side X (into ``dq``, ``dk``) for Gn [B, MX, NY] = dL/dD_ij / n_b (the gradient of
    each sample's sums), for the samples and boxes of ``boxes``, by recomputing the tiles.

    Per chunk: V = X's maps and W = Y's (recomputed), gX = the fused layer_costs gradient of the
    chunk's tiles (floor and weights included) for G_chunk = Gn * (nh cq W) (its per-sample mean's
    normaliser), dS = gX (scores) or P (gX - rowsum(gX P)) (probs: torch's fused softmax
    backward), dQ = dS K d**-0.5 and dK += dS^T Q d**-0.5 (BLAS). Working set: about 2 MX + NY
    tiles (3 MX + NY with probs and a mask, whose softmax backward needs the unweighted P).
    """
    MX, NY = len(X.qs), len(Y.qs)
    B, H, L, _ = X.qs[0].shape
    acc = X.acc
    _, lc_bwd = _layer_cost_ops(X.qs[0].device)
    keep_raw = X.probs and mask is not None
    for c in _chunks(B, H, L, (3 if keep_raw else 2) * MX + NY + 2, boxes):
        nb, nh, cq, W = c.b1 - c.b0, c.h1 - c.h0, c.q1 - c.q0, c.k1 - c.k0
        v, fw = X.maps(c, add), Y.maps(c, add)  # [MX | NY, nb, nh, cq, W]
        w = _chunk_weights(mask, c, acc)
        vw = v
        if w is not None:
            fw.mul_(w)
            vw = v * w if keep_raw else v.mul_(w)
        g_chunk = Gn[c.b0 : c.b1] * float(c.entries)
        gx, _ = lc_bwd(g_chunk, list(vw.unbind(0)), list(fw.unbind(0)), None, True, attention_floor, False)
        for i in range(MX):
            g = gx[i]
            if X.probs:  # dS = P (gX - rowsum(gX P)), P the unweighted probs
                g = torch.ops.aten._softmax_backward_data(g, v[i], -1, acc)
            g3 = g.reshape(nb * nh, cq, W)
            k, q = X.k(i, c), X.q(i, c)
            # as (K^T dS^T)^T and (Q^T dS)^T: BLAS runs [d, L] x [L, cq] about 1.5x faster than
            # [cq, L] x [L, d] for a narrow d (26 in TinyBERT)
            dq_t = torch.bmm(k.transpose(1, 2), g3.transpose(1, 2)).view(nb, nh, -1, cq)
            dq[i][c.b0 : c.b1, c.h0 : c.h1, c.q0 : c.q1] = dq_t.transpose(-1, -2).mul(X.scale)
            dk_t = torch.bmm(q.transpose(1, 2), g3).view(nb, nh, -1, W)
            dk[i][c.b0 : c.b1, c.h0 : c.h1, c.k0 : c.k1].add_(dk_t.transpose(-1, -2), alpha=X.scale)


# The scores gradient without maps. Where f is the identity on every live entry of a sample (no
# floor, or every live score provably above it: the bound of ``_padded_keys_vanish``, now from
# below) the gradient of its tiles is linear in the maps, and the additive mask cancels
# (sum_j G_ij = a_i), so with rho, kappa its live rows and keys (0/1), X~ = diag(rho) X_Q and
# K~ = diag(kappa) K, per head:
#     dQ_i = 2 s_X rho * (a_i s_X Q_i (K~_i^T K~_i) - sum_j G_ij s_Y Q^Y_j (K~^Y_j^T K~_i))
#     dK_i = 2 s_X kappa * (a_i s_X K_i (Q~_i^T Q~_i) - sum_j G_ij s_Y K^Y_j (Q~^Y_j^T Q~_i))
# (s = d**-0.5, G = Gn of the sample): Gram products of Q and K in place of the L x L tiles,
# 2 (r + w) d_Y (M d_X) multiply-adds per head and other layer j (r rows, w keys) against the
# recompute's r w (3 M d_X + N d_Y + 3 M N); TinyBERT-4 against BERT-base: fewer above L ~ 260,
# half at L = 512, in BLAS calls with inner dimensions w, r and d_Y instead of d_X = 26.
def _scores_linear(norms: _Norms, attention_mask, mask_value, attention_floor, live: _Live) -> torch.Tensor:
    """[B] bool: f is the identity on every live entry of sample b, on both sides."""
    B = live.rows.shape[0]
    if attention_floor is None:
        return torch.ones(B, dtype=torch.bool)
    worst = norms.worst(live.rows, live.cols)
    low = torch.zeros(B, dtype=torch.float64)  # the lowest additive mask value on a live key
    if attention_mask is not None:
        padded_live = (live.cols & (attention_mask == 0).cpu()).any(dim=1)
        low = torch.where(padded_live, min(0.0, float(mask_value)), 0.0).double()
    floor = float(attention_floor)
    return -1.01 * worst + low - 1e-5 * (abs(floor) + low.abs()) > floor


def _lowrank_pays(live: _Live, b: int, MX: int, NY: int, dX: int, dY: int) -> bool:
    """The Gram-product gradient of sample b costs fewer multiply-adds than recomputing its tiles."""
    r0, r1, k0, k1 = live.boxes[b]
    r, w = r1 - r0, k1 - k0
    lowrank = 2 * (r + w) * (NY * dY * MX * dX + MX * dX * dX)
    recompute = r * w * (3 * MX * dX + NY * dY + 3 * MX * NY)
    return r > 0 and w > 0 and lowrank < recompute


def _bwd_lowrank_side(Gn, X: _Side, Y: _Side, live: _Live, samples: Sequence[int], dq, dk) -> None:
    """dQ, dK of side X for the given samples by the Gram products above (scores only)."""
    MX, NY = len(X.qs), len(Y.qs)
    dX = X.qs[0].shape[-1]
    acc = X.acc
    for b in samples:
        r0, r1, k0, k1 = live.boxes[b]
        rho, kap = live.rows[b, r0:r1], live.cols[b, k0:k1]
        rho_w = None if bool(rho.all()) else rho.to(device=X.qs[0].device, dtype=acc)[None, :, None]
        kap_w = None if bool(kap.all()) else kap.to(device=X.qs[0].device, dtype=acc)[None, :, None]

        def rows_of(t: torch.Tensor, rho_w=rho_w, r0=r0, r1=r1, b=b) -> torch.Tensor:  # [H, r, d]
            x = t[b, :, r0:r1].to(acc)
            return x if rho_w is None else x * rho_w

        def keys_of(t: torch.Tensor, kap_w=kap_w, k0=k0, k1=k1, b=b) -> torch.Tensor:  # [H, w, d]
            x = t[b, :, k0:k1].to(acc)
            return x if kap_w is None else x * kap_w

        xq, xk = [rows_of(q) for q in X.qs], [keys_of(k) for k in X.ks]
        XQ, XK = torch.cat(xq, -1), torch.cat(xk, -1)  # [H, r | w, MX dX]
        g = Gn[b]  # [MX, NY]
        a = g.sum(1) * X.scale
        dQ = torch.cat([torch.bmm(xq[i], torch.bmm(xk[i].mT, xk[i])).mul_(a[i]) for i in range(MX)], -1)
        dK = torch.cat([torch.bmm(xk[i], torch.bmm(xq[i].mT, xq[i])).mul_(a[i]) for i in range(MX)], -1)
        for j in range(NY):
            yq, yk = rows_of(Y.qs[j]), keys_of(Y.ks[j])
            gj = (g[:, j] * Y.scale).repeat_interleave(dX)  # G_ij s_Y over layer i's columns
            dQ.baddbmm_(yq, torch.bmm(yk.mT, XK).mul_(gj), alpha=-1.0)
            dK.baddbmm_(yk, torch.bmm(yq.mT, XQ).mul_(gj), alpha=-1.0)
        dQ.mul_(2 * X.scale)
        dK.mul_(2 * X.scale)
        if rho_w is not None:
            dQ.mul_(rho_w)
        if kap_w is not None:
            dK.mul_(kap_w)
        for i in range(MX):
            dq[i][b, :, r0:r1] = dQ[..., i * dX : (i + 1) * dX]
            dk[i][b, :, k0:k1] = dK[..., i * dX : (i + 1) * dX]


def _bwd_cpu(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample, attention_floor,
             need_student, need_teacher):
    B, H, L, _ = sq[0].shape
    acc = acc_dtype(sq, tq)
    device = sq[0].device
    n = _counts(mask, B, H, L, acc, device)
    G = grad.to(acc)
    if per_sample:  # a sample without real tokens has NaN costs and no gradient
        Gn = torch.where(n[:, None, None] > 0, G / n[:, None, None], torch.zeros_like(G))
    else:
        total = n.sum()
        Gn = (G / total if total > 0 else torch.zeros_like(G)).expand(B, *G.shape)
    add = _KeyMask(attention_mask, mask_value, acc) if attention_mask is not None else None
    norms = _Norms(sq, sk, tq, tk, acc)
    live = _live(norms, attention_mask, mask, mask_value, probs, attention_floor, acc)
    linear = (torch.zeros(B, dtype=torch.bool) if probs or not LOWRANK_BACKWARD else
              _scores_linear(norms, attention_mask, mask_value, attention_floor, live))
    out: list[list[torch.Tensor]] = [[], [], [], []]
    for slot, need, (xq, xk), (yq, yk), GX in ((0, need_student, (sq, sk), (tq, tk), Gn),
                                               (2, need_teacher, (tq, tk), (sq, sk), Gn.transpose(-1, -2))):
        if not need:
            continue
        SX, SY = _Side(xq, xk, acc, probs), _Side(yq, yk, acc, probs)
        dims = (len(xq), len(yq), xq[0].shape[-1], yq[0].shape[-1])
        lowrank = {b for b in range(B) if linear[b] and _lowrank_pays(live, b, *dims)}
        dq = [torch.zeros(q.shape, dtype=acc, device=device) for q in xq]
        dk = [torch.zeros(t.shape, dtype=acc, device=device) for t in xk]
        if lowrank:
            _bwd_lowrank_side(GX, SX, SY, live, sorted(lowrank), dq, dk)
        if len(lowrank) < B:
            boxes = [(0, 0, 0, 0) if b in lowrank else bx for b, bx in enumerate(live.boxes)]
            _bwd_cpu_side(GX, SX, SY, add, mask, attention_floor, boxes, dq, dk)
        out[slot] = [g.to(q.dtype) for g, q in zip(dq, xq)]
        out[slot + 1] = [g.to(t.dtype) for g, t in zip(dk, xk)]
    return tuple(out)


# ------------------------------------------------------------------------------------ triton
def _triton_box(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, attention_floor) -> torch.Tensor | None:
    """The live boxes [B, 4] as a device tensor for the Triton kernels (computed on the device,
    no host sync); None without masks (everything is live)."""
    if mask is None and attention_mask is None:
        return None
    acc = acc_dtype(sq, tq)
    norms = _Norms(sq, sk, tq, tk, acc)
    return _spans(*_live_masks(norms, attention_mask, mask, mask_value, probs, attention_floor, acc))


def _fwd_triton(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor):
    from emd_kernels.attention_costs import attention_costs_fwd

    box = _triton_box(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, attention_floor)
    return attention_costs_fwd(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample,
                               attention_floor, block=TRITON_BLOCK, box=box)


def _bwd_triton(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample, attention_floor,
                need_student, need_teacher):
    from emd_kernels.attention_costs import attention_costs_bwd

    box = _triton_box(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, attention_floor)
    return attention_costs_bwd(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample,
                               attention_floor, need_student, need_teacher, block=TRITON_BLOCK, box=box)


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
