"""Triton kernels and launchers of the fused layer cost matrices (no autograd, no registration:
``bert_emd.ops.layer_costs`` wraps them as ``bert_emd::layer_costs_{fwd,bwd}_triton``).

Maths (student layers S_1..S_M, teacher layers T_1..T_N of one shape [B, ...]; w the token mask
of an element, f(x) = 0 where x <= floor else x, n = sum of w; per sample with ``per_sample``):

    forward   D_ij    = (1/n) sum_e w[e] (f(S_i[e]) - f(T_j[e]))^2
    backward  dS_i[e] = (2/n) w[e] [S_i[e] > floor] (f(S_i[e]) sum_j G_ij - sum_j G_ij f(T_j[e]))
              dT_j[e] = (2/n) w[e] [T_j[e] > floor] (f(T_j[e]) sum_i G_ij - sum_i G_ij f(S_i[e]))

Layout: each layer is read through its strides as a canonical [B, D1, D2, D3] view (see
:func:`geometry`): a contiguous input is one flat run, hidden states with a mask are
[B, 1, L, d] (query mask on D2), attention maps [B, H, L, L] (query mask on D2, key mask on
D3). The layers of one side are passed as a table of their ``data_ptr()`` (int64) and cast to
typed pointers in the kernel, so a tuple of layers (what HF returns) is read without stacking.
Copies happen only when the layers of one side have different strides (the non-contiguous ones
are made contiguous) or when more than three non-mergeable dims remain.

Forward, grid (B, programs per sample): a program walks ITERS blocks of BLOCK elements; per
block it loads every layer once ([M_PAD, BLOCK] student and [N_PAD, BLOCK] teacher tiles, one
read of each input element) and adds the [M_PAD, N_PAD, BLOCK] squared differences
elementwise, so the only cross-thread reduction is the one after its last block. A second small
kernel adds the programs' partials (one program per output entry, fixed order: deterministic)
and divides by n. Backward, grid (B, blocks per sample): one block of every layer is loaded
once and both gradients come out of the same registers (sum_j G_ij T_j and sum_i G_ij S_i as
[M_PAD, N_PAD, BLOCK] broadcasts reduced over the layer axis).

Limits: at most 2**31 - 1 elements per sample (flat in-sample indices are int32); the floor is
passed as a float32 scalar (for float64 inputs the comparison x <= floor uses the float32
rounding of the floor, e.g. -100 exactly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._launch import TL_DTYPE, launches_on_input_device, upload

__all__ = ["geometry", "layer_costs_fwd", "layer_costs_bwd", "Geometry"]



# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _view_offsets(r, b, D2, D3, sb, s1, s2, s3, CONTIG: tl.constexpr):
    # element offset of flat in-sample index r of sample b in a [B, D1, D2, D3] strided view
    if CONTIG:
        return b * sb + r
    k = (r % D3).to(tl.int64)
    row = r // D3
    return b * sb + (row // D2).to(tl.int64) * s1 + (row % D2).to(tl.int64) * s2 + k * s3


@triton.jit
def _live(r, b, LEN, D2, D3, L, mask_ptr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr):
    # in range and, with a token mask, query (D2 index) and key (D3 index) both real
    live = r < LEN
    if MASK_Q:
        q = ((r // D3) % D2).to(tl.int64)
        live = live & (tl.load(mask_ptr + b * L + q, mask=live, other=0.0) != 0)
    if MASK_K:
        k = (r % D3).to(tl.int64)
        live = live & (tl.load(mask_ptr + b * L + k, mask=live, other=0.0) != 0)
    return live


@triton.jit
def _load_tile(tab, rows, nrows, off, live, DTYPE: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr,
               HAS_FLOOR: tl.constexpr, floor):
    # [ROWS, BLOCK] tile of layers tab[rows] at element offsets off (dead entries 0), f applied;
    # also returns the row base pointers (for the gradients) and keep = live & x > floor
    base = tl.load(tab + rows, mask=rows < nrows, other=0).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every layer starts on 16 bytes: lets the loads vectorise
        base = tl.multiple_of(base, 16)
    m = (rows < nrows)[:, None] & live[None, :]
    x = tl.load(base[:, None] + off[None, :], mask=m, other=0.0).to(ACC)
    keep = m
    if HAS_FLOOR:
        keep = m & (x > floor)
        x = tl.where(x <= floor, 0.0, x)
    return x, keep


@triton.jit
def _layer_costs_fwd_kernel(
    ptr_tab,  # *i64 [M + N]: data_ptr() of every student, then every teacher layer
    mask_ptr,  # *fp32 [B, L] 0/1 (read only with MASK_Q / MASK_K)
    part_ptr,  # *ACC [M_PAD * N_PAD, B * tiles]: per-program pair sums, one row per pair
    M, N, LEN, D2, D3, L,  # layer counts; elements per sample and the view's inner sizes
    s_sb, s_s1, s_s2, s_s3,  # student element strides of the [B, D1, D2, D3] view
    t_sb, t_s1, t_s2, t_s3,
    floor, ITERS,  # blocks per program
    M_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, ACC: tl.constexpr,
    S_CONTIG: tl.constexpr, T_CONTIG: tl.constexpr,
    MASK_Q: tl.constexpr, MASK_K: tl.constexpr, HAS_FLOOR: tl.constexpr, ALIGNED: tl.constexpr,
):
    # part[i, j, b * tiles + tile] = sum over the program's live elements e of (f(S_i[e]) - f(T_j[e]))^2.
    # Each block loads all M + N layers at once ([M_PAD, BLOCK] and [N_PAD, BLOCK]: every input
    # element read once) and adds the [M_PAD, N_PAD, BLOCK] squared differences elementwise;
    # the one reduction over BLOCK happens after the last block.
    b = tl.program_id(0).to(tl.int64)  # samples on axis 0 (limit 2**31 - 1; axis 1 allows 65535)
    tile = tl.program_id(1)
    offs_m = tl.arange(0, M_PAD)
    offs_n = tl.arange(0, N_PAD)
    acc = tl.zeros((M_PAD, N_PAD, BLOCK), dtype=ACC)
    for it in range(ITERS):
        r = (tile * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        live = _live(r, b, LEN, D2, D3, L, mask_ptr, MASK_Q, MASK_K)
        off_s = _view_offsets(r, b, D2, D3, s_sb, s_s1, s_s2, s_s3, S_CONTIG)
        off_t = _view_offsets(r, b, D2, D3, t_sb, t_s1, t_s2, t_s3, T_CONTIG)
        S, _ = _load_tile(ptr_tab, offs_m, M, off_s, live, S_DTYPE, ACC, ALIGNED, HAS_FLOOR, floor)
        T, _ = _load_tile(ptr_tab + M, offs_n, N, off_t, live, T_DTYPE, ACC, ALIGNED, HAS_FLOOR, floor)
        d = S[:, None, :] - T[None, :, :]  # direct differences: no |s|^2 + |t|^2 - 2 s.t cancellation
        acc += d * d  # dead elements and padded rows are 0 - 0
    nrows = tl.num_programs(0) * tl.num_programs(1)
    out = part_ptr + b * tl.num_programs(1) + tile
    tl.store(out + (offs_m[:, None] * N_PAD + offs_n[None, :]) * nrows, tl.sum(acc, axis=2))


@triton.jit
def _layer_costs_reduce_kernel(
    part_ptr,  # *ACC [M_PAD * N_PAD, rows]
    out_ptr,  # *ACC [B_out, M, N]
    cnt_ptr,  # *ACC [B_out] element counts (read only with HAS_CNT)
    n_all,  # int: the count when it is the same for every output (no mask)
    rows, rows_per_out, M, N,
    N_PAD: tl.constexpr, RB: tl.constexpr, ACC: tl.constexpr, HAS_CNT: tl.constexpr,
):
    # out[p, i, j] = sum of the rows_per_out partials of output p for pair (i, j), divided by n_p
    # (0/0 = NaN, the mean of nothing, as torch.mean). One program per (p, i, j): contiguous
    # loads, a fixed summation order (deterministic).
    p = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    i = q // N
    j = q % N
    base = part_ptr + (i * N_PAD + j).to(tl.int64) * rows + p * rows_per_out
    acc = tl.zeros((RB,), dtype=ACC)
    for r0 in range(0, rows_per_out, RB):
        rr = r0 + tl.arange(0, RB)
        acc += tl.load(base + rr, mask=rr < rows_per_out, other=0.0)
    if HAS_CNT:
        n = tl.load(cnt_ptr + p)
    else:
        n = n_all.to(ACC)  # an exact integer, converted here (float arguments are fp32)
    tl.store(out_ptr + p * M * N + q, tl.sum(acc, axis=0) / n)


@triton.jit
def _layer_costs_bwd_kernel(
    ptr_tab,  # *i64 [2M + 2N]: student, teacher, student-gradient, teacher-gradient layers
    mask_ptr, g_ptr, scale_ptr,  # *fp32 [B, L]; *ACC G [B|1, M, N]; *ACC 2/n [B] (PER_SCALE)
    M, N, LEN, D2, D3, L,
    s_sb, s_s1, s_s2, s_s3,
    t_sb, t_s1, t_s2, t_s3,
    floor, n_all, g_bstride,  # c = 2/n_all unless PER_SCALE; g_bstride 0 when one G serves all
    M_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK: tl.constexpr,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, ACC: tl.constexpr,
    S_CONTIG: tl.constexpr, T_CONTIG: tl.constexpr,
    MASK_Q: tl.constexpr, MASK_K: tl.constexpr, HAS_FLOOR: tl.constexpr, NEED_T: tl.constexpr,
    PER_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
):
    # dS_i = c keep_S (f(S_i) sum_j G_ij - sum_j G_ij f(T_j))
    # dT_j = c keep_T (f(T_j) sum_i G_ij - sum_i G_ij f(S_i)),   c = 2/n, keep = live & x > floor
    # One block of every layer is loaded once; both gradients come out of the same registers.
    b = tl.program_id(0).to(tl.int64)  # samples on axis 0 (limit 2**31 - 1; axis 1 allows 65535)
    tile = tl.program_id(1)
    r = tile * BLOCK + tl.arange(0, BLOCK)
    inb = r < LEN
    live = _live(r, b, LEN, D2, D3, L, mask_ptr, MASK_Q, MASK_K)
    off_s = _view_offsets(r, b, D2, D3, s_sb, s_s1, s_s2, s_s3, S_CONTIG)
    off_t = _view_offsets(r, b, D2, D3, t_sb, t_s1, t_s2, t_s3, T_CONTIG)
    out_off = b * LEN + r  # gradients are written contiguous
    offs_m = tl.arange(0, M_PAD)
    offs_n = tl.arange(0, N_PAD)
    S, keep_s = _load_tile(ptr_tab, offs_m, M, off_s, live, S_DTYPE, ACC, ALIGNED, HAS_FLOOR, floor)
    T, keep_t = _load_tile(ptr_tab + M, offs_n, N, off_t, live, T_DTYPE, ACC, ALIGNED, HAS_FLOOR, floor)
    if PER_SCALE:
        c = tl.load(scale_ptr + b)
    else:
        c = 2.0 / n_all.to(ACC)
    gmask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    G = tl.load(g_ptr + b * g_bstride + offs_m[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(ACC)
    out_m = (offs_m < M)[:, None] & inb[None, :]
    gs = c * (S * tl.sum(G, axis=1)[:, None] - tl.sum(G[:, :, None] * T[None, :, :], axis=1))
    gs_base = tl.load(ptr_tab + M + N + offs_m, mask=offs_m < M, other=0).to(tl.pointer_type(S_DTYPE))
    if ALIGNED:
        gs_base = tl.multiple_of(gs_base, 16)
    tl.store(gs_base[:, None] + out_off[None, :], tl.where(keep_s, gs, 0.0).to(S_DTYPE), mask=out_m)
    if NEED_T:
        gt = c * (T * tl.sum(G, axis=0)[:, None] - tl.sum(G[:, :, None] * S[:, None, :], axis=0))
        gt_base = tl.load(ptr_tab + 2 * M + N + offs_n, mask=offs_n < N, other=0).to(tl.pointer_type(T_DTYPE))
        if ALIGNED:
            gt_base = tl.multiple_of(gt_base, 16)
        out_n = (offs_n < N)[:, None] & inb[None, :]
        tl.store(gt_base[:, None] + out_off[None, :], tl.where(keep_t, gt, 0.0).to(T_DTYPE), mask=out_n)


# ----------------------------------------------------------------------------------- geometry
class Geometry:
    """Canonical [B, D1, D2, D3] view of both sides (see the module docstring)."""

    __slots__ = ("student", "teacher", "B", "D1", "D2", "D3", "s_st", "t_st", "mask_q", "mask_k")

    def __init__(self, student, teacher, B, D1, D2, D3, s_st, t_st, mask_q, mask_k):
        self.student, self.teacher = student, teacher
        self.B, self.D1, self.D2, self.D3 = B, D1, D2, D3
        self.s_st, self.t_st = s_st, t_st
        self.mask_q, self.mask_k = mask_q, mask_k

    @property
    def len(self) -> int:
        return self.D1 * self.D2 * self.D3

    def contig(self, st: Sequence[int]) -> bool:
        """True when the in-sample offset of flat index r is r (strides of a contiguous view)."""
        inner = 1
        for size, stride in zip((self.D3, self.D2, self.D1), (st[3], st[2], st[1])):
            if size > 1 and stride != inner:
                return False
            inner *= size
        return True


def _uniform(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One stride vector per side: if layers differ (size-1 dims aside), copy the odd ones."""
    ref = xs[0]

    def same(a: torch.Tensor) -> bool:
        return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), ref.stride()))

    if all(same(x) for x in xs):
        return xs
    return [x.contiguous() for x in xs]


def _coalesce(shape, s0, s1, first: int):
    sizes, st0, st1 = [], [], []
    for d in range(first, len(shape)):
        if shape[d] == 1:
            continue
        if sizes and st0[-1] == s0[d] * shape[d] and st1[-1] == s1[d] * shape[d]:
            sizes[-1] *= shape[d]
            st0[-1], st1[-1] = s0[d], s1[d]
        else:
            sizes.append(shape[d])
            st0.append(s0[d])
            st1.append(s1[d])
    return sizes, st0, st1


def geometry(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor | None,
    per_sample: bool,
) -> Geometry:
    """Canonical [B, D1, D2, D3] view of validated inputs (same rules as the CPU kernel)."""
    s = _uniform(list(student))
    t = _uniform(list(teacher))
    shape = tuple(s[0].shape)
    nd = len(shape)
    if mask is not None:
        L = shape[2] if nd == 4 else shape[1]

        def view(x: torch.Tensor) -> list[int]:
            st = x.stride()
            if nd == 2:
                return [st[0], 0, 0, st[1]]
            if nd == 3:
                return [st[0], 0, st[1], st[2]]
            return list(st)

        if nd == 2:
            return Geometry(s, t, shape[0], 1, 1, L, view(s[0]), view(t[0]), False, True)
        if nd == 3:
            return Geometry(s, t, shape[0], 1, L, shape[2], view(s[0]), view(t[0]), True, False)
        return Geometry(s, t, shape[0], shape[1], L, L, view(s[0]), view(t[0]), True, True)
    # Without per_sample the batch dim merges too: a contiguous input is one flat run.
    first, max_dims = (1, 3) if per_sample else (0, 4)
    sizes, st0, st1 = _coalesce(shape, s[0].stride(), t[0].stride(), first)
    if len(sizes) > max_dims:  # documented copy: too many non-mergeable dims
        s = [x.contiguous() for x in s]
        t = [x.contiguous() for x in t]
        sizes, st0, st1 = _coalesce(shape, s[0].stride(), t[0].stride(), first)
    pad = max_dims - len(sizes)
    sizes, st0, st1 = [1] * pad + sizes, [0] * pad + st0, [0] * pad + st1
    if per_sample:
        sizes = [shape[0]] + sizes
        st0 = [s[0].stride(0)] + st0
        st1 = [t[0].stride(0)] + st1
    return Geometry(s, t, sizes[0], sizes[1], sizes[2], sizes[3], st0, st1, False, False)


def _counts(g: Geometry, mask: torch.Tensor, per_sample: bool, acc: torch.dtype) -> torch.Tensor:
    """Real-element count n_b per sample ([B]), or the total ([1]), from a mask (no host sync)."""
    c = (mask != 0).to(acc).sum(1)
    n = g.D1 * (c if g.mask_q else g.D2) * (c if g.mask_k else g.D3)
    return n if per_sample else n.sum().reshape(1)


def _launch_params(g: Geometry, M: int, N: int, device: torch.device, block: int | None,
                   iters: int | None) -> tuple[int, int, int, int, int]:
    """(M_PAD, N_PAD, BLOCK, num_warps, blocks per forward program)."""
    m_pad = triton.next_power_of_2(max(M, 1))
    n_pad = triton.next_power_of_2(max(N, 1))
    if device.type == "cpu":  # interpreter: ~1 ms per program, so few, large blocks
        blk = block or max(16, min(triton.next_power_of_2(max(g.len, 1)), 8192, (1 << 21) // (m_pad * n_pad)))
        return m_pad, n_pad, blk, 4, iters or 1
    # GPU: the [M_PAD, N_PAD, BLOCK] accumulator stays at <= 64 registers per thread of 4 warps
    blk = block or max(32, min(1024, 8192 // (m_pad * n_pad)))
    if iters is None:  # enough programs to fill the GPU, then more blocks per program
        target = 8 * _sm_count(device)
        iters = max(1, (g.B * triton.cdiv(g.len, blk)) // target)
    return m_pad, n_pad, blk, 4, iters


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _ptr_table(xs: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, bool]:
    """int64 table of data_ptr()s on ``device`` and whether all are 16-byte aligned.

    On CUDA the table goes up from pinned memory without blocking (a pageable copy would wait
    for the GPU to drain, serialising every call with the host)."""
    ptrs = [x.data_ptr() for x in xs]
    return upload(torch.tensor(ptrs, dtype=torch.int64), device), all(p % 16 == 0 for p in ptrs)


def _acc_dtype(student, teacher) -> torch.dtype:
    return torch.float64 if torch.float64 in (student[0].dtype, teacher[0].dtype) else torch.float32


def _common_args(g: Geometry, M: int, N: int, mask: torch.Tensor | None, dummy: torch.Tensor):
    maskf = (mask != 0).to(torch.float32).contiguous() if mask is not None else dummy
    L = maskf.shape[1] if mask is not None else 0
    return maskf, (M, N, g.len, g.D2, g.D3, L, *g.s_st, *g.t_st)


def _constexprs(g: Geometry, acc: torch.dtype, attention_floor: float | None, m_pad: int, n_pad: int,
                block: int, aligned: bool) -> dict:
    return dict(
        M_PAD=m_pad, N_PAD=n_pad, BLOCK=block,
        S_DTYPE=TL_DTYPE[g.student[0].dtype], T_DTYPE=TL_DTYPE[g.teacher[0].dtype], ACC=TL_DTYPE[acc],
        S_CONTIG=g.contig(g.s_st), T_CONTIG=g.contig(g.t_st),
        MASK_Q=g.mask_q, MASK_K=g.mask_k, HAS_FLOOR=attention_floor is not None, ALIGNED=aligned,
    )


def _check_len(g: Geometry, span: int) -> None:
    """Flat in-sample indices are int32 in the kernels, including those of the last program's
    blocks past the end (``span``: programs x blocks x block size, which must not wrap either)."""
    if g.len >= 2**31 or span >= 2**31:
        raise ValueError(f"layer_costs (triton): a sample holds {g.len} elements; at most 2**31 - 1 (less the "
                         "last program's blocks past the end) are supported")


# ---------------------------------------------------------------------------------- launchers
@launches_on_input_device
def layer_costs_fwd(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    mask: torch.Tensor | None,
    per_sample: bool,
    attention_floor: float | None,
    *,
    block: int | None = None,
    iters: int | None = None,
) -> torch.Tensor:
    """D [M, N] (or [B, M, N]) for validated inputs; float32, float64 if either side is float64.

    Two launches: the programs' pair sums, then their reduction and the division by n.
    ``block`` / ``iters`` override the block size and blocks per program (tests use them to
    force several programs per sample and several blocks per program).
    """
    M, N = len(student), len(teacher)
    B0 = student[0].shape[0]
    device = student[0].device
    acc = _acc_dtype(student, teacher)
    g = geometry(student, teacher, mask, per_sample)
    B_out = B0 if per_sample else 1
    out = torch.empty((B_out, M, N), dtype=acc, device=device)
    m_pad, n_pad, blk, warps, its = _launch_params(g, M, N, device, block, iters)
    tiles = triton.cdiv(triton.cdiv(g.len, blk), its) if g.B > 0 else 0
    _check_len(g, tiles * its * blk)
    rows = g.B * tiles
    part = torch.empty((m_pad * n_pad, max(rows, 1)), dtype=acc, device=device)
    if rows > 0:
        tab, aligned = _ptr_table(g.student + g.teacher, device)
        maskf, sizes = _common_args(g, M, N, mask, part)
        _layer_costs_fwd_kernel[(g.B, tiles)](
            tab, maskf, part, *sizes, float(attention_floor) if attention_floor is not None else 0.0, its,
            **_constexprs(g, acc, attention_floor, m_pad, n_pad, blk, aligned), num_warps=warps,
        )
    else:
        part.zero_()
    if B_out > 0:
        cnt = _counts(g, mask, per_sample, acc) if mask is not None else part
        n_all = g.len if per_sample else g.B * g.len
        rows_per_out = max(rows // B_out if per_sample else rows, 1)
        _layer_costs_reduce_kernel[(B_out, M * N)](
            part, out, cnt, n_all, max(rows, 1), rows_per_out, M, N,
            N_PAD=n_pad, RB=min(1024, triton.next_power_of_2(rows_per_out)),
            ACC=TL_DTYPE[acc], HAS_CNT=mask is not None, num_warps=4,
        )
    return out if per_sample else out[0]


@launches_on_input_device
def layer_costs_bwd(
    grad: torch.Tensor,
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    mask: torch.Tensor | None,
    per_sample: bool,
    attention_floor: float | None,
    need_teacher: bool,
    *,
    block: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients (student list, teacher list or [] without ``need_teacher``) from G [M, N] or
    [B, M, N], in one pass; each gradient is contiguous with its input's shape and dtype."""
    M, N = len(student), len(teacher)
    device = student[0].device
    acc = _acc_dtype(student, teacher)
    g = geometry(student, teacher, mask, per_sample)
    gs = [torch.empty(x.shape, dtype=x.dtype, device=device) for x in student]
    gt = [torch.empty(x.shape, dtype=x.dtype, device=device) for x in teacher] if need_teacher else []
    m_pad, n_pad, blk, warps, _ = _launch_params(g, M, N, device, block, 1)
    tiles = triton.cdiv(g.len, blk)
    _check_len(g, tiles * blk)
    if g.B == 0 or tiles == 0:
        return gs, gt
    G = grad.to(acc).contiguous()
    if mask is not None:
        cnt = _counts(g, mask, per_sample, acc)
        scale_t = torch.where(cnt > 0, 2.0 / cnt, torch.zeros_like(cnt))
        per_scale, n_all = per_sample, 0
        if not per_sample:  # one n for all samples: index 0 for every b
            scale_t = scale_t.expand(g.B).contiguous()
            per_scale = True
    else:
        n_all = g.len if per_sample else g.B * g.len
        scale_t, per_scale = G, False
    tab, aligned = _ptr_table(g.student + g.teacher + gs + (gt if need_teacher else gs[:1]), device)
    maskf, sizes = _common_args(g, M, N, mask, G)
    _layer_costs_bwd_kernel[(g.B, tiles)](
        tab, maskf, G, scale_t, *sizes,
        float(attention_floor) if attention_floor is not None else 0.0, n_all, M * N if per_sample else 0,
        **_constexprs(g, acc, attention_floor, m_pad, n_pad, blk, aligned), NEED_T=need_teacher,
        PER_SCALE=per_scale, num_warps=warps,
    )
    return gs, gt
