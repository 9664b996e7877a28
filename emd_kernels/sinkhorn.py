"""Batched log-domain Sinkhorn in Triton: one program per transport problem, every iteration in
one launch, the whole M x N problem held in registers (M, N <= 64).

Maths (python/bert_emd/reference/sinkhorn.py is the readable version; same schedule, same
iterates up to rounding). With Cr = C / reg and potentials phi = f / reg, psi = g / reg,
    P_ij = exp(phi_i + psi_j - Cr_ij)
    row update:    phi_i = log a_i - LSE_j(psi_j - Cr_ij)       (rows of P sum to a)
    column LSE:    lc_j  = LSE_i(phi_i - Cr_ij)                  (columns sum to exp(lc + psi))
    error:         err   = sum_j |exp(lc_j + psi_j) - b_j| / sum(a)
    column update: psi_j = log b_j - lc_j
psi = 0, phi = row update, lc, err; while err > tol and it < max_iter: column update, row
update, lc, err. Each program stops on its own error. Every LSE is max-shifted, so nothing
overflows for any C / reg. Rows / columns with zero weight (and the padding up to the block
size) get Cr = +inf: their terms are exp(-inf) = 0 and they take no part; their duals are the
soft c-transform -reg * LSE over the active lines, as in the reference.

Precision: ``compute_dtype`` float64 (default, any input dtype) matches the CPU kernel and
reaches tol = 1e-12. float32 is faster on GPUs but its marginal error floors near 1e-7 relative
(and higher when C / reg is large: the exponent then carries |C / reg| * 6e-8 absolute error);
it stays stable (no NaN/Inf) but reports status 1 when ``tol`` is below that floor.

No validation, autograd or registration here (see bert_emd.ops.sinkhorn): the launcher takes
already-validated [B, M, N] / [B, M] / [B, N] tensors (any strides, stride 0 included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launches_on_input_device, upload

__all__ = ["MAX_SIZE", "sinkhorn_triton", "launch_config"]

MAX_SIZE = 64  # largest M or N held on chip


@triton.jit
def _lse(x, AXIS: tl.constexpr):
    """log-sum-exp of a 2-D block over AXIS; -inf (not NaN) where every entry is -inf."""
    m = tl.max(x, AXIS)
    m = tl.where(m == float("-inf"), tl.zeros_like(m), m)
    s = tl.sum(tl.exp(x - tl.expand_dims(m, AXIS)), AXIS)
    return tl.where(s > 0, m + tl.log(tl.where(s > 0, s, 1.0)), float("-inf"))


@triton.jit
def _sinkhorn_kernel(
    C, A, Bw, P, U, V, VAL, ST, PARAMS,
    M, N, max_iter,
    s_cb, s_cm, s_cn, s_ab, s_am, s_bb, s_bn,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rin = rows < M
    cin = cols < N
    in2 = rin[:, None] & cin[None, :]
    reg = tl.load(PARAMS).to(COMPUTE)
    tol = tl.load(PARAMS + 1).to(COMPUTE)
    c_ptrs = C + pid * s_cb + rows[:, None] * s_cm + cols[None, :] * s_cn
    c = tl.load(c_ptrs, mask=in2, other=0.0).to(COMPUTE)

    if HAS_A:
        a = tl.load(A + pid * s_ab + rows * s_am, mask=rin, other=0.0).to(COMPUTE)
    else:
        a = tl.where(rin, tl.full([BLOCK_M], 1.0, COMPUTE) / M, 0.0)  # 1/M in COMPUTE precision
    if HAS_B:
        b = tl.load(Bw + pid * s_bb + cols * s_bn, mask=cin, other=0.0).to(COMPUTE)
    else:
        b = tl.where(cin, tl.full([BLOCK_N], 1.0, COMPUTE) / N, 0.0)
    mass = tl.sum(a, 0)
    b = b * (mass / tl.sum(b, 0))  # absorbs a rounding-level mass mismatch
    ron = a > 0
    con = b > 0
    la = tl.log(tl.where(ron, a, 1.0))
    lb = tl.log(tl.where(con, b, 1.0))
    inf = float("inf")
    cq = c / reg
    cr = tl.where(ron[:, None] & con[None, :], cq, inf)  # off lines never contribute

    psi = tl.zeros([BLOCK_N], dtype=COMPUTE)
    phi = tl.where(ron, la - _lse(psi[None, :] - cr, 1), 0.0)
    lc = _lse(phi[:, None] - cr, 0)
    err = tl.sum(tl.where(con, tl.abs(tl.exp(lc + psi) - b), 0.0), 0) / mass
    it = 0
    while (err > tol) & (it < max_iter):  # a NaN error compares False and stops too
        psi = tl.where(con, lb - lc, 0.0)
        phi = tl.where(ron, la - _lse(psi[None, :] - cr, 1), 0.0)
        lc = _lse(phi[:, None] - cr, 0)
        err = tl.sum(tl.where(con, tl.abs(tl.exp(lc + psi) - b), 0.0), 0) / mass
        it += 1

    plan = tl.where(ron[:, None] & con[None, :], tl.exp(phi[:, None] + psi[None, :] - cr), 0.0)
    value = tl.sum(tl.sum(plan * c, 1), 0)
    # duals: the potentials on active lines, the soft c-transform on zero-weight ones
    u_off = -_lse(psi[None, :] - tl.where(rin[:, None] & con[None, :], cq, inf), 1)
    v_off = -_lse(phi[:, None] - tl.where(ron[:, None] & cin[None, :], cq, inf), 0)
    u = reg * tl.where(ron, phi, u_off)
    v = reg * tl.where(con, psi, v_off)
    status = tl.where(err <= tol, 0, tl.where(err == err, 1, 2))

    out = P + pid * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, plan.to(P.dtype.element_ty), mask=in2)
    tl.store(U + pid * M + rows, u.to(U.dtype.element_ty), mask=rin)
    tl.store(V + pid * N + cols, v.to(V.dtype.element_ty), mask=cin)
    tl.store(VAL + pid, value.to(VAL.dtype.element_ty))
    tl.store(ST + pid, status.to(tl.int32))


def launch_config(M: int, N: int) -> dict[str, int]:
    """Block sizes (powers of two >= 4) and warps for an M x N problem."""
    bm = max(4, triton.next_power_of_2(M))
    bn = max(4, triton.next_power_of_2(N))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": max(1, min(8, bm * bn // 256))}


@launches_on_input_device
def sinkhorn_triton(
    cost: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    reg: float,
    max_iter: int,
    tol: float,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch one program per problem.

    Args:
        cost: [B, M, N] float32/float64, finite, M and N <= :data:`MAX_SIZE` (any strides).
        a: [B, M] non-negative weights or None (uniform); b: [B, N] or None. Equal positive
            masses (validated by the caller).
        reg: > 0. max_iter: >= 0 column+row update pairs. tol: L1 column-marginal error
            relative to the mass.
        compute_dtype: torch.float64 (default) or torch.float32, see the module docstring.

    Returns:
        value [B], plan [B, M, N], u [B, M], v [B, N] in cost's dtype; status [B] int32
        (0 converged, 1 max_iter reached, 2 NaN encountered).
    """
    B, M, N = cost.shape
    if M > MAX_SIZE or N > MAX_SIZE:
        raise ValueError(f"sinkhorn_triton: M and N must be <= {MAX_SIZE}, got {M} x {N}")
    dev, dt = cost.device, cost.dtype
    value = torch.empty(B, device=dev, dtype=dt)
    plan = torch.empty(B, M, N, device=dev, dtype=dt)
    u = torch.empty(B, M, device=dev, dtype=dt)
    v = torch.empty(B, N, device=dev, dtype=dt)
    status = torch.empty(B, device=dev, dtype=torch.int32)
    if B == 0:
        return value, plan, u, v, status
    # reg and tol travel as float64 through memory: a Python float argument would be fp32.
    params = upload(torch.tensor([reg, tol], dtype=torch.float64), dev)
    a_arg = a if a is not None else params  # placeholder pointer, never read (HAS_A False)
    b_arg = b if b is not None else params
    cfg = launch_config(M, N)
    _sinkhorn_kernel[(B,)](
        cost, a_arg, b_arg, plan, u, v, value, status, params,
        M, N, min(int(max_iter), 2**31 - 1),  # an i32 in the kernel
        cost.stride(0), cost.stride(1), cost.stride(2),
        a.stride(0) if a is not None else 0, a.stride(1) if a is not None else 0,
        b.stride(0) if b is not None else 0, b.stride(1) if b is not None else 0,
        HAS_A=a is not None, HAS_B=b is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        COMPUTE=tl.float64 if compute_dtype == torch.float64 else tl.float32,
        num_warps=cfg["num_warps"],
    )
    return value, plan, u, v, status
