"""Triton kernels and launchers of the fused attention cost matrices (no autograd, no
registration: ``bert_emd.ops.attention_costs`` wraps them as ``bert_emd::attention_costs_*_triton``).

Maths. Side X (M layers, head size d_X) and side Y (N layers, d_Y), queries and keys
[B, H, L, d] per layer; a[b,k] = 0 for a real key and ``mask_value`` for a padded one; w[b,q,k] =
mask[b,q] mask[b,k] the token mask of the mean (1 without it); f(x) = 0 where x <= floor, else x:

    scores       X_i[q,k] = (Q_i[q] . K_i[k]) / sqrt(d_X) + a[k]
    probs        P_i[q,k] = exp(X_i[q,k] - lse_i[q]),   lse_i[q] = log sum_k exp X_i[q,k]
    forward      D_ij     = (1/n) sum_{b,h,q,k} w (f(X_i) - f(Y_j))^2,   n = sum w
    backward     gX_i     = (2/n) w [X_i > floor] (f(X_i) sum_j G_ij - sum_j G_ij f(Y_j))
                 dS_i     = gX_i  (scores)   or   P_i * (gX_i - delta_i[q]),
                 delta_i[q] = sum_k gX_i[q,k] P_i[q,k]  (probs: the softmax backward)
                 dQ_i     = dS_i K_i / sqrt(d_X),   dK_i = dS_i^T Q_i / sqrt(d_X)

No L x L map ever reaches memory: every kernel forms its score tiles [BQ, BK] on chip from Q and
K tiles (flash-attention style) and keeps them there. The M layers of side X form one 3-D tile
[M_PAD, BQ, BK] (one batched ``tl.dot``), the N layers of side Y stream through it one at a time.
The teacher's gradient, when wanted, is the same backward with the sides swapped and G^T.

Cost per (b, h), with E = L^2 map entries, p = itemsize of Q/K (F = FLOPs, R = bytes read from
DRAM, W = written; K tiles are re-read from L2 once per query block):

    scores forward  F = 2 E (M d_X + N d_Y)  [QK^T, tensor cores]  +  3 E M N  [sub, mul, add]
                    R = p L (M d_X + N d_Y) (Q and K once),   W = 4 (L / BQ) M N (partial sums)
    probs forward   one more QK^T sweep for the row log-sum-exp (below) and 2 E (M + N) exp:
                    F = 4 E (M d_X + N d_Y) + 3 E M N + 2 E (M + N) exp;  W += 4 L (M + N) (lse)
    backward        dQ kernel: 2 (probs) or 1 sweep(s) of recomputed tiles, dK kernel: 1 sweep;
                    each sweep 2 E (M d_X + N d_Y) + 2 E M N; plus 2 E M d_X per dQ and per dK
    materialising   W = 4 E (M + N) (fp32 maps) and R = 4 E (M + N) again in ``layer_costs``
                    (probs: + 8 E (M + N) for the softmax), i.e. O(L^2) bytes against O(L).

Why ``probs`` takes a first pass for the row log-sum-exp instead of an online formulation: the
squared difference of two probabilities needs both normalisers before it can be formed. Online,
sum_k (p - t)^2 = A_i / Z_i^2 + A_j / Z_j^2 - 2 C_ij / (Z_i Z_j) with running rescaled sums A_i =
sum e^{2 x}, C_ij = sum e^{x_i + y_j} (M N of them per row) -- the expansion this project avoids
(it cancels when P_i is close to T_j, which is what distillation drives towards), and it cannot
apply ``attention_floor`` (f needs p itself). The two-pass form computes every difference
directly at the price of one more QK^T sweep: 2 E (M d_X + N d_Y) FLOPs on tensor cores and
re-reading K from L2, no extra DRAM traffic beyond the 4 L (M + N) bytes of lse (kept for the
backward, which then needs no lse pass of its own).

Inputs are read through their strides (the per-head views [B, H, L, d] of a projection output
[B, L, H*d] need no copy); all layers of one list share one stride vector (layers that differ are
made contiguous). The M + N (+ gradient) layers are passed as a table of ``data_ptr()``s (int64),
cast to typed pointers in the kernel; the table starts with four float64 constants (bit-cast):
1/sqrt(d_X), 1/sqrt(d_Y), ``mask_value``, ``attention_floor``.

Live boxes. ``box`` [B, 4] (int32: r0, r1, k0, k1 per sample, from
``bert_emd.ops.attention_costs``) bounds the query rows and keys that can add anything: outside
it every entry is provably dead (weight 0, or a padded key whose score the mask pushes below the
floor / whose probability underflows to exactly 0). Key loops run over k0:k1 only, and a program
whose rows (dQ, forward) or keys (dK) hold nothing live skips its sweeps (its outputs are zeros),
so right-padded samples of length c cost c / L of the key sweeps. The log-sum-exp pass keeps every
row (its lse is exact: the skipped keys add exp(.) = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._launch import TL_DTYPE, launches_on_input_device, upload

__all__ = ["attention_costs_fwd", "attention_costs_bwd", "block_sizes"]

# At most this many X layers per launch (None: all at once). The 3-D X tiles live in shared
# memory and registers, so a launch the GPU cannot hold (OutOfResources: e.g. 8+ fp64 layers, or
# head size 128 on an A100) is retried with the X layers in two halves, recursively: every X
# layer's costs and gradients are independent of the others', so the split is exact.
MAX_X_LAYERS: int | None = None



# ------------------------------------------------------------------------------------ helpers
@triton.jit
def _consts(tab, ACC: tl.constexpr):
    # 1/sqrt(d_X), 1/sqrt(d_Y), mask_value, floor: float64 bit patterns, rounded once to ACC
    sx = tl.load(tab + 0).to(tl.float64, bitcast=True).to(ACC)
    sy = tl.load(tab + 1).to(tl.float64, bitcast=True).to(ACC)
    mv = tl.load(tab + 2).to(tl.float64, bitcast=True).to(ACC)
    fl = tl.load(tab + 3).to(tl.float64, bitcast=True).to(ACC)
    return sx, sy, mv, fl


@triton.jit
def _ptrs3(base, b, h, i0, i1, sb, sh, s0, s1):
    # [P, R0, R1] element pointers of P layers (base [P] typed pointers) at rows i0, cols i1
    off = b * sb + h * sh + i0[:, None] * s0 + i1[None, :] * s1
    return base[:, None, None] + off[None, :, :]


@triton.jit
def _keys(am_ptr, tm_ptr, b, L, offs_k, kin, mask_value, ACC: tl.constexpr,
          HAS_AM: tl.constexpr, HAS_TM: tl.constexpr):
    # additive key mask a[k] ([BK], 0 for real keys) and whether key k counts in the mean
    add = tl.zeros(offs_k.shape, dtype=ACC)
    if HAS_AM:
        real = tl.load(am_ptr + b * L + offs_k, mask=kin, other=1.0) != 0
        add = tl.where(real, add, mask_value)
    ok = kin
    if HAS_TM:
        ok = ok & (tl.load(tm_ptr + b * L + offs_k, mask=kin, other=0.0) != 0)
    return add, ok


@triton.jit
def _rows_ok(tm_ptr, b, L, offs_q, qin, HAS_TM: tl.constexpr):
    ok = qin
    if HAS_TM:
        ok = ok & (tl.load(tm_ptr + b * L + offs_q, mask=qin, other=0.0) != 0)
    return ok


@triton.jit
def _load_kx_t(xk_base, xrow, b, h, dx, offs_k, kin, DX, xk_sb, xk_sh, xk_sl, xk_sd, DOT: tl.constexpr):
    # K^T of every X layer: [MX_PAD, DX_PAD, BK], in the dot's operand dtype
    m = xrow[:, None, None] & ((dx < DX)[:, None] & kin[None, :])[None]
    return tl.load(_ptrs3(xk_base, b, h, dx, offs_k, xk_sb, xk_sh, xk_sd, xk_sl), mask=m, other=0.0).to(DOT)


@triton.jit
def _load_x_rows(x_base, xrow, b, h, offs, inr, dx, DX, sb, sh, sl, sd, DOT: tl.constexpr):
    # queries (or keys) of every X layer at rows ``offs``: [MX_PAD, R, DX_PAD]
    m = xrow[:, None, None] & (inr[:, None] & (dx < DX)[None, :])[None]
    return tl.load(_ptrs3(x_base, b, h, offs, dx, sb, sh, sl, sd), mask=m, other=0.0).to(DOT)


@triton.jit
def _y_scores(yq_tab, yk_tab, j, b, h, offs_q, offs_k, qin, kin, dy, DY,
              yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd, sy, add,
              Y_DTYPE: tl.constexpr, Y_DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    # scores of Y layer j on the tile: [BQ, BK] = Q_j K_j^T / sqrt(d_Y) + a
    yq = tl.load(yq_tab + j).to(tl.pointer_type(Y_DTYPE))
    yk = tl.load(yk_tab + j).to(tl.pointer_type(Y_DTYPE))
    din = dy < DY
    qy = tl.load(yq + b * yq_sb + h * yq_sh + offs_q[:, None] * yq_sl + dy[None, :] * yq_sd,
                 mask=qin[:, None] & din[None, :], other=0.0).to(Y_DOT)
    kyt = tl.load(yk + b * yk_sb + h * yk_sh + dy[:, None] * yk_sd + offs_k[None, :] * yk_sl,
                  mask=din[:, None] & kin[None, :], other=0.0).to(Y_DOT)
    return tl.dot(qy, kyt, input_precision=PREC, out_dtype=ACC) * sy + add[None, :]


@triton.jit
def _program(BLOCK: tl.constexpr, H, L, MX, MX_PAD: tl.constexpr, DX_PAD: tl.constexpr, DY_PAD: tl.constexpr):
    # (block offsets [BLOCK] along L, b*h, b, h, layer index [MX_PAD], its mask, head dims) of
    # a program of grid (B*H, L blocks): B*H on axis 0, whose limit is 2**31 - 1 (axis 1 allows
    # 65535); int64, so that every offset built from it, (layer * B*H + bh) * L included, is
    bh = tl.program_id(0).to(tl.int64)
    offs = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ix = tl.arange(0, MX_PAD)
    dx = tl.arange(0, DX_PAD).to(tl.int64)
    dy = tl.arange(0, DY_PAD).to(tl.int64)
    return offs, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), ix, ix < MX, dx, dy


@triton.jit
def _live_box(box_ptr, b, offs, AXIS: tl.constexpr):
    # (r0, r1, k0, k1) of sample b, and whether ``offs`` (rows if AXIS == 0, keys if 1) holds a
    # live one: a program without one leaves its sweeps empty
    r0 = tl.load(box_ptr + b * 4 + 0)
    r1 = tl.load(box_ptr + b * 4 + 1)
    k0 = tl.load(box_ptr + b * 4 + 2)
    k1 = tl.load(box_ptr + b * 4 + 3)
    if AXIS == 0:
        hit = tl.sum(((offs >= r0) & (offs < r1)).to(tl.int32), axis=0) > 0
    else:
        hit = tl.sum(((offs >= k0) & (offs < k1)).to(tl.int32), axis=0) > 0
    return r0, r1, k0, k1, hit


@triton.jit
def _layer_tables(tab, MX, NY, ix, xrow, X_DTYPE: tl.constexpr, HAS_OUT: tl.constexpr):
    # the pointer table's X query and key bases [MX_PAD], its Y query and key tables, and (HAS_OUT:
    # the backward's tables) the X outputs after them, dQ or dK; else the query bases stand in
    xq_base = tl.load(tab + 4 + ix, mask=xrow, other=0).to(tl.pointer_type(X_DTYPE))
    xk_base = tl.load(tab + 4 + MX + ix, mask=xrow, other=0).to(tl.pointer_type(X_DTYPE))
    yq_tab = tab + 4 + 2 * MX
    out_base = xq_base
    if HAS_OUT:
        out_base = tl.load(yq_tab + 2 * NY + ix, mask=xrow, other=0).to(tl.pointer_type(X_DTYPE))
    return xq_base, xk_base, yq_tab, yq_tab + NY, out_base


@triton.jit
def _g_rows(g_ptr, b, g_sb, g_si, g_sj, ix, xrow, NY, MX_PAD: tl.constexpr, ACC: tl.constexpr):
    # G[b, :, 0]'s addresses by X layer, and the row sums sum_j G_ij [MX_PAD]
    g_row = g_ptr + b * g_sb + ix * g_si
    rs = tl.zeros((MX_PAD,), dtype=ACC)
    for j in range(NY):
        rs += tl.load(g_row + j * g_sj, mask=xrow, other=0.0).to(ACC)
    return g_row, rs


@triton.jit
def _store_x_rows(out_base, val, b, h, H, L, DX, offs, inr, dx, xrow, X_DTYPE: tl.constexpr):
    # val [MX_PAD, R, DX_PAD] at rows ``offs`` of the X gradients, written contiguous [B, H, L, d_X]
    out = out_base[:, None, None] + ((b * H + h) * L * DX + offs[:, None] * DX + dx[None, :])[None, :, :]
    tl.store(out, val.to(X_DTYPE), mask=xrow[:, None, None] & (inr[:, None] & (dx < DX)[None, :])[None])


@triton.jit
def _grad_tile(
    qx, kxt, lse_x, xrow, valid, add, rs, c, g_row, g_sj,
    yq_tab, yk_tab, lse_y_ptr, bh, b, h, L, BH, NY, offs_q, offs_k, qin, kin, dy, DY,
    yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd, sx, sy, floor,
    Y_DTYPE: tl.constexpr, Y_DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    PROBS: tl.constexpr, HAS_FLOOR: tl.constexpr,
):
    # Recomputes the X tiles V_i (scores, or probs from the stored lse) [MX_PAD, BQ, BK] and the
    # gradient of the costs w.r.t. them:
    #   gX_i = c keep_i (f(V_i) sum_j G_ij - sum_j G_ij f(W_j)),  keep_i = valid & V_i > floor
    # streaming the N Y tiles W_j (2 BQ BK (M_PAD + 1) FLOPs per j on top of their QK^T).
    v = tl.dot(qx, kxt, input_precision=PREC, out_dtype=ACC) * sx + add[None, None, :]
    if PROBS:
        v = tl.exp(v - lse_x[:, :, None])
    keep = valid[None, :, :] & xrow[:, None, None]
    if HAS_FLOOR:
        keep = keep & (v > floor)
    fv = tl.where(keep, v, 0.0)
    sgy = tl.zeros(v.shape, dtype=ACC)
    for j in range(NY):
        w = _y_scores(yq_tab, yk_tab, j, b, h, offs_q, offs_k, qin, kin, dy, DY,
                      yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd, sy, add, Y_DTYPE, Y_DOT, ACC, PREC)
        if PROBS:
            ly = tl.load(lse_y_ptr + (j * BH + bh) * L + offs_q, mask=qin, other=0.0)
            w = tl.exp(w - ly[:, None])
        wk = valid
        if HAS_FLOOR:
            wk = wk & (w > floor)
        fw = tl.where(wk, w, 0.0)
        g = tl.load(g_row + j * g_sj, mask=xrow, other=0.0).to(ACC)  # G[:, j]
        sgy += g[:, None, None] * fw[None, :, :]
    gx = tl.where(keep, c * (fv * rs[:, None, None] - sgy), 0.0)
    return v, gx


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _attention_costs_fwd_kernel(
    tab,  # *i64 [4 + 2 MX + 2 NY]: constants, X queries, X keys, Y queries, Y keys
    am_ptr,  # *fp32 [B, L] 1 = real key (HAS_AM): the additive mask
    tm_ptr,  # *fp32 [B, L] 1 = real token (HAS_TM): the mean's token mask
    box_ptr,  # *i32 [B, 4] live rows r0:r1 and keys k0:k1 per sample
    part_ptr,  # *ACC [B*H, QB, MX, NY] partial sums per query block
    lse_ptr,  # *ACC [MX + NY, B*H, L] row log-sum-exp (PROBS)
    MX, NY, H, L, DX, DY, BH,
    xq_sb, xq_sh, xq_sl, xq_sd, xk_sb, xk_sh, xk_sl, xk_sd,
    yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd,
    MX_PAD: tl.constexpr, NY_PAD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    DX_PAD: tl.constexpr, DY_PAD: tl.constexpr,
    X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, X_DOT: tl.constexpr, Y_DOT: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
    PROBS: tl.constexpr, HAS_AM: tl.constexpr, HAS_TM: tl.constexpr, HAS_FLOOR: tl.constexpr,
):
    # One program per (b*h, query block): part[bh, qb, i, j] = sum over its rows q and all keys k
    # of w (f(V_i[q,k]) - f(W_j[q,k]))^2, V/W the X/Y scores or probs.
    # Per program: F = 2 BQ L (M d_X + N d_Y) (x2 with PROBS) + 3 BQ L M N;
    # reads BQ (M d_X + N d_Y) query and L (M d_X + N d_Y) key elements (keys from L2).
    qb = tl.program_id(1)
    offs_q, bh, b, h, ix, xrow, dx, dy = _program(BQ, H, L, MX, MX_PAD, DX_PAD, DY_PAD)
    sx, sy, mask_value, floor = _consts(tab, ACC)
    qin = offs_q < L
    ar_k = tl.arange(0, BK).to(tl.int64)
    jy = tl.arange(0, NY_PAD)
    _r0, _r1, klo, khi, live_rows = _live_box(box_ptr, b, offs_q, 0)
    kend = tl.where(live_rows, khi, klo)  # pass 2 sweeps nothing without a live row
    xq_base, xk_base, yq_tab, yk_tab, _ = _layer_tables(tab, MX, NY, ix, xrow, X_DTYPE, False)
    qx = _load_x_rows(xq_base, xrow, b, h, offs_q, qin, dx, DX, xq_sb, xq_sh, xq_sl, xq_sd, X_DOT)  # read once
    row_ok = _rows_ok(tm_ptr, b, L, offs_q, qin, HAS_TM)

    lse_x = tl.zeros((MX_PAD, BQ), dtype=ACC)
    lse_y = tl.zeros((NY_PAD, BQ), dtype=ACC)
    if PROBS:  # pass 1: online row log-sum-exp of every layer (the header says why a pass)
        m_x = tl.full((MX_PAD, BQ), float("-inf"), dtype=ACC)
        l_x = tl.zeros((MX_PAD, BQ), dtype=ACC)
        for k0 in range(klo, khi, BK):
            offs_k = k0 + ar_k
            kin = offs_k < khi
            add, _ok = _keys(am_ptr, tm_ptr, b, L, offs_k, kin, mask_value, ACC, HAS_AM, False)
            kxt = _load_kx_t(xk_base, xrow, b, h, dx, offs_k, kin, DX, xk_sb, xk_sh, xk_sl, xk_sd, X_DOT)
            v = tl.dot(qx, kxt, input_precision=PREC, out_dtype=ACC) * sx + add[None, None, :]
            v = tl.where(kin[None, None, :], v, float("-inf"))
            m_new = tl.maximum(m_x, tl.max(v, axis=2))
            l_x = l_x * tl.exp(m_x - m_new) + tl.sum(tl.exp(v - m_new[:, :, None]), axis=2)
            m_x = m_new
        lse_x = m_x + tl.log(l_x)
        for j in range(NY):
            m_y = tl.full((BQ,), float("-inf"), dtype=ACC)
            l_y = tl.zeros((BQ,), dtype=ACC)
            for k0 in range(klo, khi, BK):
                offs_k = k0 + ar_k
                kin = offs_k < khi
                add, _ok = _keys(am_ptr, tm_ptr, b, L, offs_k, kin, mask_value, ACC, HAS_AM, False)
                w = _y_scores(yq_tab, yk_tab, j, b, h, offs_q, offs_k, qin, kin, dy, DY,
                              yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd, sy, add,
                              Y_DTYPE, Y_DOT, ACC, PREC)
                w = tl.where(kin[None, :], w, float("-inf"))
                m_new = tl.maximum(m_y, tl.max(w, axis=1))
                l_y = l_y * tl.exp(m_y - m_new) + tl.sum(tl.exp(w - m_new[:, None]), axis=1)
                m_y = m_new
            lse_y = tl.where(jy[:, None] == j, (m_y + tl.log(l_y))[None, :], lse_y)
        tl.store(lse_ptr + (ix[:, None] * BH + bh) * L + offs_q[None, :], lse_x,
                 mask=xrow[:, None] & qin[None, :])
        tl.store(lse_ptr + ((MX + jy[:, None]) * BH + bh) * L + offs_q[None, :], lse_y,
                 mask=(jy < NY)[:, None] & qin[None, :])

    # pass 2: every pair's squared differences, formed directly on the tile
    acc = tl.zeros((MX_PAD, NY_PAD), dtype=ACC)
    for k0 in range(klo, kend, BK):
        offs_k = k0 + ar_k
        kin = offs_k < kend
        add, col_ok = _keys(am_ptr, tm_ptr, b, L, offs_k, kin, mask_value, ACC, HAS_AM, HAS_TM)
        valid = row_ok[:, None] & col_ok[None, :]
        kxt = _load_kx_t(xk_base, xrow, b, h, dx, offs_k, kin, DX, xk_sb, xk_sh, xk_sl, xk_sd, X_DOT)
        v = tl.dot(qx, kxt, input_precision=PREC, out_dtype=ACC) * sx + add[None, None, :]
        if PROBS:
            v = tl.exp(v - lse_x[:, :, None])
        if HAS_FLOOR:
            v = tl.where(v <= floor, 0.0, v)
        v = tl.where(valid[None, :, :], v, 0.0)  # dead entries are 0 on both sides: add nothing
        for j in range(NY):
            w = _y_scores(yq_tab, yk_tab, j, b, h, offs_q, offs_k, qin, kin, dy, DY,
                          yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd, sy, add,
                          Y_DTYPE, Y_DOT, ACC, PREC)
            if PROBS:
                ly = tl.sum(tl.where(jy[:, None] == j, lse_y, 0.0), axis=0)  # row j of lse_y
                w = tl.exp(w - ly[:, None])
            if HAS_FLOOR:
                w = tl.where(w <= floor, 0.0, w)
            w = tl.where(valid, w, 0.0)
            d = v - w[None, :, :]  # direct differences: no |v|^2 + |w|^2 - 2 v.w cancellation
            s = tl.sum(tl.sum(d * d, axis=2), axis=1)  # [MX_PAD]
            acc = tl.where(jy[None, :] == j, acc + s[:, None], acc)
    out = part_ptr + ((bh * tl.num_programs(1) + qb) * MX + ix[:, None]) * NY + jy[None, :]
    tl.store(out, acc, mask=xrow[:, None] & (jy < NY)[None, :])


@triton.jit
def _attention_costs_bwd_dq_kernel(
    tab,  # *i64 [4 + 3 MX + 2 NY]: constants, X queries, X keys, Y queries, Y keys, dQ_X outputs
    am_ptr, tm_ptr,  # *fp32 [B, L]
    box_ptr,  # *i32 [B, 4] live rows and keys per sample
    g_ptr,  # *ACC G [B, MX, NY] (g_sb = 0: one G for every sample), any strides
    c_ptr,  # *ACC [B] 2 / n (n of the sample, or of the batch)
    lse_x_ptr, lse_y_ptr,  # *ACC [MX, B*H, L], [NY, B*H, L] (PROBS)
    delta_ptr,  # *ACC [MX, B*H, L] out: rowsum(gX * P) (PROBS), read by the dK kernel
    MX, NY, H, L, DX, DY, BH, g_sb, g_si, g_sj,
    xq_sb, xq_sh, xq_sl, xq_sd, xk_sb, xk_sh, xk_sl, xk_sd,
    yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd,
    MX_PAD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    DX_PAD: tl.constexpr, DY_PAD: tl.constexpr,
    X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, X_DOT: tl.constexpr, Y_DOT: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
    PROBS: tl.constexpr, HAS_AM: tl.constexpr, HAS_TM: tl.constexpr, HAS_FLOOR: tl.constexpr,
):
    # One program per (b*h, query block): dQ_i[q] = (1/sqrt(d_X)) sum_k dS_i[q,k] K_i[k].
    # PROBS first sweeps the keys for delta_i[q] (then stored for the dK kernel), then sweeps
    # again for dQ: F = (1 or 2) x [2 BQ L (M d_X + N d_Y) + 2 BQ L M N] + 2 BQ L M d_X.
    offs_q, bh, b, h, ix, xrow, dx, dy = _program(BQ, H, L, MX, MX_PAD, DX_PAD, DY_PAD)
    sx, sy, mask_value, floor = _consts(tab, ACC)
    qin = offs_q < L
    ar_k = tl.arange(0, BK).to(tl.int64)
    _r0, _r1, klo, khi, live_rows = _live_box(box_ptr, b, offs_q, 0)
    kend = tl.where(live_rows, khi, klo)  # no live row: dQ = 0, nothing to sweep
    xq_base, xk_base, yq_tab, yk_tab, dq_base = _layer_tables(tab, MX, NY, ix, xrow, X_DTYPE, True)
    qx = _load_x_rows(xq_base, xrow, b, h, offs_q, qin, dx, DX, xq_sb, xq_sh, xq_sl, xq_sd, X_DOT)
    row_ok = _rows_ok(tm_ptr, b, L, offs_q, qin, HAS_TM)
    g_row, rs = _g_rows(g_ptr, b, g_sb, g_si, g_sj, ix, xrow, NY, MX_PAD, ACC)
    c = tl.load(c_ptr + b)
    lse_off = (ix[:, None] * BH + bh) * L + offs_q[None, :]
    xq_ok = xrow[:, None] & qin[None, :]
    lse_x = tl.zeros((MX_PAD, BQ), dtype=ACC)
    delta = tl.zeros((MX_PAD, BQ), dtype=ACC)
    if PROBS:
        lse_x = tl.load(lse_x_ptr + lse_off, mask=xq_ok, other=0.0)
        for k0 in range(klo, kend, BK):
            offs_k = k0 + ar_k
            kin = offs_k < kend
            add, col_ok = _keys(am_ptr, tm_ptr, b, L, offs_k, kin, mask_value, ACC, HAS_AM, HAS_TM)
            valid = row_ok[:, None] & col_ok[None, :]
            kxt = _load_kx_t(xk_base, xrow, b, h, dx, offs_k, kin, DX, xk_sb, xk_sh, xk_sl, xk_sd, X_DOT)
            p, gx = _grad_tile(qx, kxt, lse_x, xrow, valid, add, rs, c, g_row, g_sj,
                               yq_tab, yk_tab, lse_y_ptr, bh, b, h, L, BH, NY, offs_q, offs_k, qin, kin,
                               dy, DY, yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd, sx, sy,
                               floor, Y_DTYPE, Y_DOT, ACC, PREC, PROBS, HAS_FLOOR)
            delta += tl.sum(gx * p, axis=2)
        tl.store(delta_ptr + lse_off, delta, mask=xq_ok)
    dq = tl.zeros((MX_PAD, BQ, DX_PAD), dtype=ACC)
    for k0 in range(klo, kend, BK):
        offs_k = k0 + ar_k
        kin = offs_k < kend
        add, col_ok = _keys(am_ptr, tm_ptr, b, L, offs_k, kin, mask_value, ACC, HAS_AM, HAS_TM)
        valid = row_ok[:, None] & col_ok[None, :]
        kxt = _load_kx_t(xk_base, xrow, b, h, dx, offs_k, kin, DX, xk_sb, xk_sh, xk_sl, xk_sd, X_DOT)
        p, gx = _grad_tile(qx, kxt, lse_x, xrow, valid, add, rs, c, g_row, g_sj,
                           yq_tab, yk_tab, lse_y_ptr, bh, b, h, L, BH, NY, offs_q, offs_k, qin, kin,
                           dy, DY, yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd, sx, sy,
                           floor, Y_DTYPE, Y_DOT, ACC, PREC, PROBS, HAS_FLOOR)
        if PROBS:
            ds = p * (gx - delta[:, :, None])
        else:
            ds = gx
        kx = _load_x_rows(xk_base, xrow, b, h, offs_k, kin, dx, DX, xk_sb, xk_sh, xk_sl, xk_sd, X_DOT)
        dq += tl.dot(ds.to(X_DTYPE).to(X_DOT), kx, input_precision=PREC, out_dtype=ACC)
    _store_x_rows(dq_base, dq * sx, b, h, H, L, DX, offs_q, qin, dx, xrow, X_DTYPE)


@triton.jit
def _attention_costs_bwd_dk_kernel(
    tab,  # *i64 [4 + 3 MX + 2 NY]: constants, X queries, X keys, Y queries, Y keys, dK_X outputs
    am_ptr, tm_ptr,
    box_ptr,  # *i32 [B, 4] live rows and keys per sample
    g_ptr, c_ptr, lse_x_ptr, lse_y_ptr,
    delta_ptr,  # *ACC [MX, B*H, L] in (PROBS), from the dQ kernel
    MX, NY, H, L, DX, DY, BH, g_sb, g_si, g_sj,
    xq_sb, xq_sh, xq_sl, xq_sd, xk_sb, xk_sh, xk_sl, xk_sd,
    yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd,
    MX_PAD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    DX_PAD: tl.constexpr, DY_PAD: tl.constexpr,
    X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, X_DOT: tl.constexpr, Y_DOT: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
    PROBS: tl.constexpr, HAS_AM: tl.constexpr, HAS_TM: tl.constexpr, HAS_FLOOR: tl.constexpr,
):
    # One program per (b*h, key block): dK_i[k] = (1/sqrt(d_X)) sum_q dS_i[q,k] Q_i[q], sweeping
    # the query blocks (no atomics: deterministic). F = 2 BK L (M d_X + N d_Y) + 2 BK L M N
    # + 2 BK L M d_X.
    offs_k, bh, b, h, ix, xrow, dx, dy = _program(BK, H, L, MX, MX_PAD, DX_PAD, DY_PAD)
    sx, sy, mask_value, floor = _consts(tab, ACC)
    kout = offs_k < L  # rows of dK written (zeros for dead keys)
    rlo, rhi, klo, khi, live_keys = _live_box(box_ptr, b, offs_k, 1)
    kin = kout & (offs_k >= klo) & (offs_k < khi)
    rend = tl.where(live_keys, rhi, rlo)  # no live key: dK = 0, nothing to sweep
    ar_q = tl.arange(0, BQ).to(tl.int64)
    xq_base, xk_base, yq_tab, yk_tab, dk_base = _layer_tables(tab, MX, NY, ix, xrow, X_DTYPE, True)
    kxt = _load_kx_t(xk_base, xrow, b, h, dx, offs_k, kin, DX, xk_sb, xk_sh, xk_sl, xk_sd, X_DOT)  # read once
    add, col_ok = _keys(am_ptr, tm_ptr, b, L, offs_k, kin, mask_value, ACC, HAS_AM, HAS_TM)
    g_row, rs = _g_rows(g_ptr, b, g_sb, g_si, g_sj, ix, xrow, NY, MX_PAD, ACC)
    c = tl.load(c_ptr + b)
    dk = tl.zeros((MX_PAD, BK, DX_PAD), dtype=ACC)
    for q0 in range(rlo, rend, BQ):
        offs_q = q0 + ar_q
        qin = offs_q < rend
        row_ok = _rows_ok(tm_ptr, b, L, offs_q, qin, HAS_TM)
        valid = row_ok[:, None] & col_ok[None, :]
        qx = _load_x_rows(xq_base, xrow, b, h, offs_q, qin, dx, DX, xq_sb, xq_sh, xq_sl, xq_sd, X_DOT)
        lse_off = (ix[:, None] * BH + bh) * L + offs_q[None, :]
        xq_ok = xrow[:, None] & qin[None, :]
        lse_x = tl.zeros((MX_PAD, BQ), dtype=ACC)
        if PROBS:
            lse_x = tl.load(lse_x_ptr + lse_off, mask=xq_ok, other=0.0)
        p, gx = _grad_tile(qx, kxt, lse_x, xrow, valid, add, rs, c, g_row, g_sj,
                           yq_tab, yk_tab, lse_y_ptr, bh, b, h, L, BH, NY, offs_q, offs_k, qin, kin,
                           dy, DY, yq_sb, yq_sh, yq_sl, yq_sd, yk_sb, yk_sh, yk_sl, yk_sd, sx, sy,
                           floor, Y_DTYPE, Y_DOT, ACC, PREC, PROBS, HAS_FLOOR)
        if PROBS:
            delta = tl.load(delta_ptr + lse_off, mask=xq_ok, other=0.0)
            # keys outside the box or past L were read as zeros: their p is not the true (0) one
            ds = tl.where(kin[None, None, :], p * (gx - delta[:, :, None]), 0.0)
        else:
            ds = gx
        dk += tl.dot(tl.permute(ds, (0, 2, 1)).to(X_DTYPE).to(X_DOT), qx, input_precision=PREC, out_dtype=ACC)
    _store_x_rows(dk_base, dk * sx, b, h, H, L, DX, offs_k, kout, dx, xrow, X_DTYPE)


# ---------------------------------------------------------------------------------- launchers
def _pad(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _dot_pad(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))  # tl.dot needs every dim >= 16


def block_sizes(L: int, m_pad: int, d_pad: int, device: torch.device,
                block: int | None = None) -> tuple[int, int, int]:
    """(BQ, BK, num_warps) for the 3-D side of ``m_pad`` layers with head size ``d_pad`` (padded).

    Under the interpreter (CPU tensors) each program costs about 1 ms: few, large blocks. On a
    GPU the 3-D register tiles [m_pad, BQ, BK], [m_pad, BQ, d_pad] and [m_pad, d_pad, BK] bound
    the blocks (at most ~32 fp32 registers per thread each; not yet tuned on hardware): a
    TinyBERT-4 student (m_pad 4, d 26 -> 32) gets 32 x 32 blocks and 4 warps, a 6-layer d = 64
    student 16 x 16 and 8 warps. ``block`` forces BQ = BK (tests use it to cross several blocks).
    """
    if block is not None:
        bq = bk = max(16, triton.next_power_of_2(block))
    elif device.type == "cpu":
        bq = bk = min(64, _dot_pad(L))
    else:
        bq = 32 if m_pad * d_pad <= 128 else 16
        bk = 32 if m_pad * d_pad <= 256 else 16
    biggest = m_pad * max(bq * bk, bq * d_pad, d_pad * bk)
    warps = 4 if biggest <= 4096 else 8
    return bq, bk, warps


def _acc_dtype(*sides: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for s in sides for x in s) else torch.float32


def _uniform(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One stride vector per list: layers whose strides differ (size-1 dims aside) are copied."""
    ref = xs[0]

    def same(a: torch.Tensor) -> bool:
        return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), ref.stride()))

    return list(xs) if all(same(x) for x in xs) else [x.contiguous() for x in xs]


def _table(consts: Sequence[float], layers: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 table: the float64 bit patterns of ``consts``, then every layer's data_ptr()."""
    head = torch.tensor([float(c) for c in consts], dtype=torch.float64).view(torch.int64)
    ptrs = torch.tensor([x.data_ptr() for x in layers], dtype=torch.int64)
    return upload(torch.cat([head, ptrs]), device)


def _float_mask(m: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return (m != 0).to(torch.float32).contiguous() if m is not None else dummy


def _counts(mask: torch.Tensor | None, B: int, H: int, L: int, acc: torch.dtype, device) -> torch.Tensor:
    """n_b = H c_b^2 (c_b real tokens of sample b), or H L^2 without a mask: [B]."""
    if mask is None:
        return torch.full((B,), float(H * L * L), dtype=acc, device=device)
    c = (mask != 0).to(acc).sum(1)
    return H * c * c


def _side_args(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor]) -> tuple[int, ...]:
    return (*q[0].stride(), *k[0].stride())


# fp32 inputs: full fp32 products (as torch.matmul without TF32); fp16 / bf16 inputs run on the
# tensor cores whatever this says (with fp32 accumulation).
_PREC = "ieee"


def _dot_dtype(dtype: torch.dtype, device: torch.device):
    """Operand dtype of ``tl.dot`` for inputs of ``dtype``: the input's own, except bfloat16 under
    the interpreter, whose dot mis-reads bfloat16 (numpy has none): there the tiles are widened
    to float32 first, which gives the same products (bf16 x bf16 is exact in fp32) and fp32 sums."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        return tl.float32
    return TL_DTYPE[dtype]


def _box(box: torch.Tensor | None, B: int, L: int, device: torch.device) -> torch.Tensor:
    """The live boxes as int32 [B, 4] on ``device`` (None: every row and key of every sample)."""
    if box is None:  # filled on the device: no host-to-device copy per call
        full = torch.zeros((B, 4), dtype=torch.int32, device=device)
        full[:, 1::2] = L
        return full
    if tuple(box.shape) != (B, 4):
        raise ValueError(f"box must be [B, 4] = [{B}, 4] (r0, r1, k0, k1 per sample), got {tuple(box.shape)}")
    return box.to(device=device, dtype=torch.int32).clamp(0, L).contiguous()


def _split(n: int, most: int | None) -> list[tuple[int, int]]:
    """Consecutive groups [i0, i1) of at most ``most`` of n layers (one group if None)."""
    most = n if most is None else max(1, most)
    return [(i, min(n, i + most)) for i in range(0, n, most)] or [(0, 0)]


def _halving(run, n: int, what: str):
    """``run(i0, i1)`` for the X layers i0:i1, retried on halves when the GPU lacks the resources
    for that many layers in one launch; returns the list of the runs' results in layer order."""
    def go(i0: int, i1: int) -> list:
        try:
            return [run(i0, i1)]
        except OutOfResources as e:
            if i1 - i0 <= 1:
                raise RuntimeError(
                    f"attention_costs: the Triton {what} kernel does not fit this GPU even for one layer ({e}); "
                    "use backend='torch' or smaller head sizes / a narrower dtype") from e
            mid = (i0 + i1) // 2
            return go(i0, mid) + go(mid, i1)

    return [r for i0, i1 in _split(n, MAX_X_LAYERS) for r in go(i0, i1)]


@launches_on_input_device
def attention_costs_fwd(
    sq: Sequence[torch.Tensor], sk: Sequence[torch.Tensor],
    tq: Sequence[torch.Tensor], tk: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None, mask: torch.Tensor | None, mask_value: float,
    probs: bool, per_sample: bool, attention_floor: float | None, *, block: int | None = None,
    box: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D [M, N] or [B, M, N], lse [M + N, B, H, L] or [0]) for validated inputs.

    ``box`` [B, 4]: each sample's live rows and keys (module docstring); entries outside must add
    nothing, which the caller guarantees (None: everything is computed).

    One launch per group of student layers (one group unless the GPU needs smaller ones:
    ``MAX_X_LAYERS``), then a deterministic torch sum of the [B*H, L/BQ, M, N] partial sums and
    the division by n. float32 results (float64 when an input is float64).
    """
    M = len(sq)
    B, H, L, _ = sq[0].shape
    device = sq[0].device
    acc = _acc_dtype(sq, tq)
    sq, sk, tq, tk = _uniform(sq), _uniform(sk), _uniform(tq), _uniform(tk)
    bx = _box(box, B, L, device)

    def run(i0: int, i1: int):
        return _fwd_launch(sq[i0:i1], sk[i0:i1], tq, tk, attention_mask, mask, mask_value, probs, attention_floor,
                           block, bx, acc)

    parts = _halving(run, M, "forward")
    sums = torch.cat([p[0] for p in parts], dim=1)  # [B, M, N]
    lse = torch.cat([p[1] for p in parts] + [parts[0][2]]) if probs else sums.new_empty((0,))
    n = _counts(mask, B, H, L, acc, device)
    cost = sums / n[:, None, None] if per_sample else sums.sum(0) / n.sum()
    return cost, lse


def _fwd_launch(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, attention_floor, block, bx, acc):
    """One forward launch for the X layers sq/sk: (sums [B, MX, N], lse_X [MX, B, H, L], lse_Y)."""
    M, N = len(sq), len(tq)
    B, H, L, DS = sq[0].shape
    DT = tq[0].shape[-1]
    device = sq[0].device
    m_pad, n_pad = _pad(M), _pad(N)
    ds_pad, dt_pad = _dot_pad(DS), _dot_pad(DT)
    bq, bk, warps = block_sizes(L, m_pad, ds_pad, device, block)
    qb = triton.cdiv(L, bq)
    BH = B * H
    lse = torch.empty((M + N, B, H, L) if probs else (0,), dtype=acc, device=device)
    part = torch.zeros((BH, qb, M, N), dtype=acc, device=device)
    if BH > 0 and L > 0 and M > 0:
        floor = float(attention_floor) if attention_floor is not None else 0.0
        tab = _table((DS**-0.5, DT**-0.5, mask_value, floor), sq + sk + tq + tk, device)
        am = _float_mask(attention_mask, part)
        tm = _float_mask(mask, part)
        _attention_costs_fwd_kernel[(BH, qb)](
            tab, am, tm, bx, part, lse if probs else part,
            M, N, H, L, DS, DT, BH, *_side_args(sq, sk), *_side_args(tq, tk),
            MX_PAD=m_pad, NY_PAD=n_pad, BQ=bq, BK=bk, DX_PAD=ds_pad, DY_PAD=dt_pad,
            X_DTYPE=TL_DTYPE[sq[0].dtype], Y_DTYPE=TL_DTYPE[tq[0].dtype],
            X_DOT=_dot_dtype(sq[0].dtype, device), Y_DOT=_dot_dtype(tq[0].dtype, device), ACC=TL_DTYPE[acc],
            PREC=_PREC, PROBS=probs, HAS_AM=attention_mask is not None,
            HAS_TM=mask is not None, HAS_FLOOR=attention_floor is not None, num_warps=warps,
        )
    sums = part.view(B, H * qb, M, N).sum(1)  # [B, M, N], fixed order: deterministic
    return sums, lse[:M], lse[M:]


def _bwd_side(
    G: torch.Tensor, g_strides: tuple[int, int, int],
    xq: list[torch.Tensor], xk: list[torch.Tensor], yq: list[torch.Tensor], yk: list[torch.Tensor],
    lse_x: torch.Tensor, lse_y: torch.Tensor, c: torch.Tensor,
    attention_mask, mask, mask_value: float, probs: bool, attention_floor: float | None, block: int | None,
    box: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """dQ, dK of the X side (contiguous, X's dtype) for G [B|1, MX, NY] read through g_strides,
    one pair of launches per group of X layers (``_halving``)."""
    bx = _box(box, xq[0].shape[0], xq[0].shape[2], xq[0].device)

    def run(i0: int, i1: int):
        # G's rows i0:i1: the same strides from an offset base (no copy)
        g = G.as_strided((1,), (1,), G.storage_offset() + i0 * g_strides[1])
        lx = lse_x[i0:i1] if probs else lse_x
        return _bwd_launch(g, g_strides, xq[i0:i1], xk[i0:i1], yq, yk, lx, lse_y, c, attention_mask, mask,
                           mask_value, probs, attention_floor, block, bx)

    parts = _halving(run, len(xq), "backward")
    return [t for p in parts for t in p[0]], [t for p in parts for t in p[1]]


def _bwd_launch(
    G: torch.Tensor, g_strides: tuple[int, int, int],
    xq: list[torch.Tensor], xk: list[torch.Tensor], yq: list[torch.Tensor], yk: list[torch.Tensor],
    lse_x: torch.Tensor, lse_y: torch.Tensor, c: torch.Tensor,
    attention_mask, mask, mask_value: float, probs: bool, attention_floor: float | None, block: int | None,
    bx: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The dQ and dK launches for the X layers xq/xk."""
    MX, NY = len(xq), len(yq)
    B, H, L, DX = xq[0].shape
    DY = yq[0].shape[-1]
    device = xq[0].device
    acc = c.dtype
    dq = [torch.empty(x.shape, dtype=x.dtype, device=device) for x in xq]
    dk = [torch.empty(x.shape, dtype=x.dtype, device=device) for x in xk]
    BH = B * H
    if BH == 0 or L == 0:
        return dq, dk
    xq, xk, yq, yk = _uniform(xq), _uniform(xk), _uniform(yq), _uniform(yk)
    m_pad = _pad(MX)
    dx_pad, dy_pad = _dot_pad(DX), _dot_pad(DY)
    bq, bk, warps = block_sizes(L, m_pad, dx_pad, device, block)
    floor = float(attention_floor) if attention_floor is not None else 0.0
    consts = (DX**-0.5, DY**-0.5, mask_value, floor)
    delta = torch.empty((MX, BH, L) if probs else (1,), dtype=acc, device=device)
    am = _float_mask(attention_mask, c)
    tm = _float_mask(mask, c)
    common = dict(
        MX_PAD=m_pad, BQ=bq, BK=bk, DX_PAD=dx_pad, DY_PAD=dy_pad,
        X_DTYPE=TL_DTYPE[xq[0].dtype], Y_DTYPE=TL_DTYPE[yq[0].dtype],
        X_DOT=_dot_dtype(xq[0].dtype, device), Y_DOT=_dot_dtype(yq[0].dtype, device), ACC=TL_DTYPE[acc],
        PREC=_PREC, PROBS=probs, HAS_AM=attention_mask is not None,
        HAS_TM=mask is not None, HAS_FLOOR=attention_floor is not None, num_warps=warps,
    )
    sizes = (MX, NY, H, L, DX, DY, BH, *g_strides, *_side_args(xq, xk), *_side_args(yq, yk))
    lx = lse_x if probs else c
    ly = lse_y if probs else c
    tab = _table(consts, xq + xk + yq + yk + dq, device)
    _attention_costs_bwd_dq_kernel[(BH, triton.cdiv(L, bq))](tab, am, tm, bx, G, c, lx, ly, delta, *sizes, **common)
    tab = _table(consts, xq + xk + yq + yk + dk, device)
    _attention_costs_bwd_dk_kernel[(BH, triton.cdiv(L, bk))](tab, am, tm, bx, G, c, lx, ly, delta, *sizes, **common)
    return dq, dk


@launches_on_input_device
def attention_costs_bwd(
    grad: torch.Tensor,
    sq: Sequence[torch.Tensor], sk: Sequence[torch.Tensor],
    tq: Sequence[torch.Tensor], tk: Sequence[torch.Tensor],
    lse: torch.Tensor, attention_mask: torch.Tensor | None, mask: torch.Tensor | None,
    mask_value: float, probs: bool, per_sample: bool, attention_floor: float | None,
    need_student: bool, need_teacher: bool, *, block: int | None = None, box: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(dQ_S, dK_S, dQ_T, dK_T) from G [M, N] (or [B, M, N]); a side not needed gets [] lists.

    Two launches per side (dQ, then dK). The teacher's gradient is the same computation with the
    sides swapped and G transposed (read through its strides, no copy).
    """
    M = len(sq)
    B, H, L, _ = sq[0].shape
    device = sq[0].device
    acc = _acc_dtype(sq, tq)
    G = grad.to(acc)
    n = _counts(mask, B, H, L, acc, device)
    if not per_sample:
        n = n.sum().expand(B)
    c = torch.where(n > 0, 2.0 / n, torch.zeros_like(n)).contiguous()
    if per_sample:
        gs = G.stride()
    else:
        gs = (0, *G.stride())
    lse_s, lse_t = (lse[:M].reshape(M, B * H, L), lse[M:].reshape(-1, B * H, L)) if probs else (lse, lse)
    args = (attention_mask, mask, mask_value, probs, attention_floor, block, box)
    dsq, dsk, dtq, dtk = [], [], [], []
    if need_student:
        dsq, dsk = _bwd_side(G, gs, list(sq), list(sk), list(tq), list(tk), lse_s, lse_t, c, *args)
    if need_teacher:
        dtq, dtk = _bwd_side(G, (gs[0], gs[2], gs[1]), list(tq), list(tk), list(sq), list(sk),
                             lse_t, lse_s, c, *args)
    return dsq, dsk, dtq, dtk
