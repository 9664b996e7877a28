"""Pure-PyTorch reference of batched entropic optimal transport (log-domain Sinkhorn).

The readable version of the algorithm that the C++ (``csrc/cpu/sinkhorn_cpu.cpp``) and Triton
(``emd_kernels/sinkhorn.py``) kernels implement; it is the test oracle, the benchmark
baseline and the fallback for any device. Float64 inside whatever the input dtype.

Problem (per batch element), with reg > 0:
    P* = argmin_P <P, C> + reg * sum_ij P_ij (log P_ij - 1)   s.t.  P 1 = a,  P^T 1 = b.
Its solution has the form P_ij = exp((f_i + g_j - C_ij) / reg) for dual potentials f, g (in
cost units; POT's ``reg * log_u``, ``reg * log_v``). Log-domain Sinkhorn alternates the exact
row and column projections, each a log-sum-exp over one axis, so nothing overflows for any
C / reg (we test reg = 1e-3 with costs up to 1e3):
    f_i <- reg * log a_i - reg * LSE_j((g_j - C_ij) / reg)      (rows of P now sum to a)
    g_j <- reg * log b_j - reg * LSE_i((f_i - C_ij) / reg)      (columns of P now sum to b)
Schedule, identical in all backends:
    g = 0; f = row update
    loop:  lc_j = LSE_i((f_i - C_ij) / reg)                   (log column sums at g = 0)
           err  = sum_j |exp(lc_j + g_j / reg) - b_j| / sum(a)  (L1 column error of the
                                                               current plan; rows are exact)
           stop if err <= tol (status 0) or after max_iter loops (status 1; NaN err: 2)
           g = reg * (log b - lc);  f = row update
So ``max_iter`` counts column+row update pairs, the stopping test costs nothing extra (it
reuses the column log-sum-exp of the next update), and every problem of a batch stops on its
own error. The returned plan has exact row sums and column sums within ``tol``.

Zero weights: rows (columns) with a_i = 0 (b_j = 0) carry no mass and take no part in the
iteration (their log weight is -inf). Their duals, -inf in POT, are returned as the soft
c-transform u_i = -reg * LSE_j((v_j - C_ij) / reg) over the active columns (v likewise), which
is finite and tends to the exact c-transform min_j (C_ij - v_j) as reg -> 0.
Masses that differ by up to 1e-6 relative are reconciled by rescaling b to a's mass.

Outputs: value = <P, C> (the transport cost of the entropic plan, without the entropy term,
as POT's ``sinkhorn2``), plan P, u = f, v = g, status. Gradient convention (attached by
``bert_emd.ops.sinkhorn``, envelope theorem on the regularised problem, as POT's
``ot.solve(..., reg, grad="envelope")``): d/dC = P, d/da = u - mean(u), d/db = v - mean(v).
"""

from __future__ import annotations

import math

import torch

from ._problem import invalid_problems, problem_weights

__all__ = ["sinkhorn_reference", "sinkhorn_log"]

STATUS_CONVERGED, STATUS_MAX_ITER, STATUS_INVALID = 0, 1, 2


def _masked_lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over ``dim`` that returns -inf (not NaN) where every entry is -inf."""
    m = x.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - m).exp().sum(dim).log() + m.squeeze(dim)


def sinkhorn_log(
    C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve a batch of valid problems in float64.

    Args:
        C: [B, M, N] finite costs. a: [B, M], b: [B, N] non-negative weights with equal
            positive masses (within 1e-6 relative). reg > 0, max_iter >= 0, tol >= 0.

    Returns:
        (value [B], plan [B, M, N], u [B, M], v [B, N], status [B] int32), float64.
    """
    C, a, b = C.double(), a.double(), b.double()
    mass = a.sum(-1, keepdim=True)
    b = b * (mass / b.sum(-1, keepdim=True))  # absorb a rounding-level mass mismatch
    row_on, col_on = a > 0, b > 0
    la = torch.where(row_on, a.log(), -math.inf)  # log weights; -inf switches a row/column off
    lb = torch.where(col_on, b.log(), -math.inf)
    Cr = C / reg

    def row_update(g: torch.Tensor) -> torch.Tensor:  # g scaled by 1/reg, as the result
        return la - _masked_lse(g[:, None, :] - Cr, 2)

    def col_lse(f: torch.Tensor) -> torch.Tensor:
        return _masked_lse(f[:, :, None] - Cr, 1)

    # Potentials are kept divided by reg (phi = f / reg, psi = g / reg) inside the loop.
    psi = torch.where(col_on, 0.0, -math.inf).to(C)
    phi = row_update(psi)
    lc = col_lse(phi)
    err = ((lc + psi).exp() - b).abs().sum(-1) / mass[:, 0]
    running = err > tol  # NaN err compares False: such a problem stops (status 2 below)
    it = 0
    while it < max_iter and bool(running.any()):
        # Only running problems move: each stops on its own error, not the worst of the batch.
        psi = torch.where(running[:, None], lb - lc, psi)
        phi = torch.where(running[:, None], row_update(psi), phi)
        lc_new = col_lse(phi)
        err = torch.where(running, ((lc_new + psi).exp() - b).abs().sum(-1) / mass[:, 0], err)
        lc = torch.where(running[:, None], lc_new, lc)
        running = running & (err > tol)
        it += 1

    plan = (phi[:, :, None] + psi[:, None, :] - Cr).exp()
    value = (plan * C).sum((1, 2))
    # Finite duals for switched-off rows / columns: the soft c-transform over the active ones.
    phi = torch.where(row_on, phi, -_masked_lse(psi[:, None, :] - Cr, 2))
    psi = torch.where(col_on, psi, -_masked_lse(phi.masked_fill(~row_on, -math.inf)[:, :, None] - Cr, 1))
    status = torch.full_like(err, STATUS_MAX_ITER, dtype=torch.int32)
    status[err <= tol] = STATUS_CONVERGED
    status[~torch.isfinite(err)] = STATUS_INVALID
    return value, plan, reg * phi, reg * psi, status


def sinkhorn_reference(
    cost: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    reg: float,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched log-domain Sinkhorn on any device, same contract as ``bert_emd::sinkhorn``.

    Args:
        cost: [..., M, N] float32/float64. a: [..., M] or None (uniform 1/M), b: [..., N] or
            None (uniform 1/N), broadcastable to cost's batch shape. reg > 0; max_iter >= 0
            column+row update pairs; tol: L1 column-marginal error relative to the mass.

    Returns:
        (value [...], plan [..., M, N], u [..., M], v [..., N]) in cost's dtype and
        status [...] int32 (0 converged, 1 max_iter reached).

    Raises:
        ValueError: reg <= 0, max_iter < 0, tol < 0, or an invalid problem (NaN/Inf cost,
            negative weights, unequal masses). Shapes, dtypes and devices are taken as given:
            the op (``bert_emd.ops.sinkhorn``) checks them, and names the invalid value, first.
    """
    if not (reg > 0 and max_iter >= 0 and tol >= 0):
        raise ValueError(f"sinkhorn (reference): needs reg > 0, max_iter >= 0, tol >= 0, got {reg}, {max_iter}, {tol}")
    a_full, b_full = problem_weights(cost, a, b)
    errors = invalid_problems(cost, a_full, b_full)
    if bool(errors.any()):
        raise ValueError(f"sinkhorn (reference): problem {int(errors.nonzero()[0, 0])} of the batch is invalid")
    batch, (M, N) = cost.shape[:-2], cost.shape[-2:]
    value, plan, u, v, status = sinkhorn_log(
        cost.detach().reshape(-1, M, N), a_full.detach().reshape(-1, M), b_full.detach().reshape(-1, N),
        float(reg), int(max_iter), float(tol),
    )
    dt = cost.dtype
    return (
        value.to(dt).reshape(batch),
        plan.to(dt).reshape(*batch, M, N),
        u.to(dt).reshape(*batch, M),
        v.to(dt).reshape(*batch, N),
        status.reshape(batch),
    )
