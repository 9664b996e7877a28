"""The ``cpu`` backend of ``bert_emd.attention_costs``: chunked PyTorch on CPU tensors.

Query blocks of all layers at a time ([chunk, W] tiles of bounded size, W the sample's live
keys: padded keys that provably add nothing are skipped), the costs of each chunk by the fused
``layer_costs`` kernel, the backward recomputing the chunks -- or, for ``scores`` where the floor
provably never acts and at long rows, Gram products of Q and K with no tile at all. Rows are
whole, so the backward recomputes probs from the scores and this backend returns an empty lse.

:func:`attention_costs_fwd_cpu` and :func:`attention_costs_bwd_cpu` implement the schemas of
``bert_emd::attention_costs_{fwd,bwd}``; ``bert_emd.ops.attention_costs`` registers them as the
``bert_emd::attention_costs_{fwd,bwd}_cpu`` ops. Method and measurements: docs/design.md, docs/ops.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from .. import _backends
from ..reference.attention_costs import acc_dtype, additive_key_mask
from . import attention_costs_small as small
from ._common import LAYER_COSTS_OPS, Box, Live, Norms, live_region

__all__ = ["CPU_CHUNK_ELEMENTS", "LOWRANK_BACKWARD", "attention_costs_fwd_cpu", "attention_costs_bwd_cpu"]

# Elements of all M + N layer tiles of one chunk together (16 MiB in float32): the working set
# of a chunk, whatever L and B are (the backward holds about 3x this).
CPU_CHUNK_ELEMENTS = 1 << 22
# The backward of ``scores`` by Gram products of Q and K where that is exact and cheaper
# (``_bwd_lowrank_side``); False: always recompute the tiles.
LOWRANK_BACKWARD = True


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
# provably add nothing are left out, see ``_common.padded_keys_vanish``), so the backward
# recomputes probs from the scores directly and needs no log-sum-exp: this backend returns an
# empty lse.
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



def _live_boxes(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, attention_floor, acc) -> list[Box] | None:
    """Per sample (r0, r1, k0, k1): the query rows and keys outside which every entry of every
    layer provably adds nothing (see above); None when nothing can be skipped."""
    if mask is None and attention_mask is None:
        return None
    L = sq[0].shape[2]
    norms = Norms(sq, sk, tq, tk, acc)
    boxes = live_region(norms, attention_mask, mask, mask_value, probs, attention_floor, acc).boxes
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


def _sizes(sq, tq) -> tuple[int, int, int, int, int, torch.dtype]:
    """(M, N, B, H, L, accumulation dtype) of groups given as lists of layers or stacked."""
    if isinstance(sq, torch.Tensor) and isinstance(tq, torch.Tensor):  # one dtype a group
        acc = torch.float64 if torch.float64 in (sq.dtype, tq.dtype) else torch.float32
        return sq.shape[0], tq.shape[0], *sq.shape[1:4], acc
    sq, tq = small.layers(sq), small.layers(tq)
    return len(sq), len(tq), *sq[0].shape[:3], acc_dtype(sq, tq)


def attention_costs_fwd_cpu(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor,
                            keep: list | None = None):
    """The forward op's implementation. A group of queries or keys is a list of layers (the
    op's schema) or, on the eager path, one stacked tensor [layers, B, H, L, d]; there ``keep``
    (a list) receives what the backward of a small problem can reuse (``attention_costs_small``)."""
    M, N, B, H, L, acc = _sizes(sq, tq)
    if small.fits(M, N, B, H, L, CPU_CHUNK_ELEMENTS):
        return small.fwd(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor, acc,
                         keep)
    sq, sk, tq, tk = (small.layers(g) for g in (sq, sk, tq, tk))
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
# floor, or every live score provably above it: the bound of ``_common.padded_keys_vanish``, now
# from below) the gradient of its tiles is linear in the maps, and the additive mask cancels
# (sum_j G_ij = a_i), so with rho, kappa its live rows and keys (0/1), X~ = diag(rho) X_Q and
# K~ = diag(kappa) K, per head:
#     dQ_i = 2 s_X rho * (a_i s_X Q_i (K~_i^T K~_i) - sum_j G_ij s_Y Q^Y_j (K~^Y_j^T K~_i))
#     dK_i = 2 s_X kappa * (a_i s_X K_i (Q~_i^T Q~_i) - sum_j G_ij s_Y K^Y_j (Q~^Y_j^T Q~_i))
# (s = d**-0.5, G = Gn of the sample): Gram products of Q and K in place of the L x L tiles,
# 2 (r + w) d_Y (M d_X) multiply-adds per head and other layer j (r rows, w keys) against the
# recompute's r w (3 M d_X + N d_Y + 3 M N); TinyBERT-4 against BERT-base: fewer above L ~ 260,
# half at L = 512, in BLAS calls with inner dimensions w, r and d_Y instead of d_X = 26.
def _scores_linear(norms: Norms, attention_mask, mask_value, attention_floor, live: Live) -> torch.Tensor:
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


def _lowrank_pays(live: Live, b: int, MX: int, NY: int, dX: int, dY: int) -> bool:
    """The Gram-product gradient of sample b costs fewer multiply-adds than recomputing its tiles."""
    r0, r1, k0, k1 = live.boxes[b]
    r, w = r1 - r0, k1 - k0
    lowrank = 2 * (r + w) * (NY * dY * MX * dX + MX * dX * dX)
    recompute = r * w * (3 * MX * dX + NY * dY + 3 * MX * NY)
    return r > 0 and w > 0 and lowrank < recompute


def _bwd_lowrank_side(Gn, X: _Side, Y: _Side, live: Live, samples: Sequence[int], dq, dk) -> None:
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


def attention_costs_bwd_cpu(grad, sq, sk, tq, tk, lse, attention_mask, mask, mask_value, probs, per_sample,
                            attention_floor, need_student, need_teacher, kept: list | None = None):
    """The backward op's implementation (groups as :func:`attention_costs_fwd_cpu` takes them,
    ``kept`` what its ``keep`` received); the gradients of a group come in its form: a list of
    layers, or one stacked tensor."""
    M, N, B, H, L, acc = _sizes(sq, tq)
    if small.fits(M, N, B, H, L, CPU_CHUNK_ELEMENTS):
        return small.bwd(grad, sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor,
                         need_student, need_teacher, acc, kept)
    stacked = [isinstance(g, torch.Tensor) for g in (sq, sk, tq, tk)]
    sq, sk, tq, tk = (small.layers(g) for g in (sq, sk, tq, tk))
    device = sq[0].device
    n = _counts(mask, B, H, L, acc, device)
    G = grad.to(acc)
    if per_sample:  # a sample without real tokens has NaN costs and no gradient
        Gn = torch.where(n[:, None, None] > 0, G / n[:, None, None], torch.zeros_like(G))
    else:
        total = n.sum()
        Gn = (G / total if total > 0 else torch.zeros_like(G)).expand(B, *G.shape)
    add = _KeyMask(attention_mask, mask_value, acc) if attention_mask is not None else None
    norms = Norms(sq, sk, tq, tk, acc)
    live = live_region(norms, attention_mask, mask, mask_value, probs, attention_floor, acc)
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
    return tuple(torch.stack(g) if st and g else g for g, st in zip(out, stacked))

