"""Input checks of the transport ops (``emd``, exact and Sinkhorn) on their Python paths: the
``torch`` and ``triton`` backends, and the error path of the CUDA kernel (which reports invalid
input as a status). The messages match the C++ checks in ``csrc/emd_common.h`` word for word
where they overlap. The references in ``bert_emd.reference`` keep their own, minimal checks: the
test oracle shares no code with the ops it checks beyond the maths it defines."""

from __future__ import annotations

import math

import torch

__all__ = ["MASS_REL_TOL", "check_emd_inputs", "check_sinkhorn_args"]

MASS_REL_TOL = 1e-6


def _broadcast_weights(name: str, w: torch.Tensor | None, cost: torch.Tensor, length: int, len_name: str):
    batch = tuple(cost.shape[:-2])
    if w is None:
        return torch.full((*batch, length), 1.0 / length, dtype=cost.dtype, device=cost.device)
    if not w.is_floating_point():
        raise ValueError(f"emd: {name} must be a floating-point tensor, got dtype {w.dtype}")
    if w.device != cost.device:
        raise ValueError(f"emd: {name} must be on the same device as cost ({cost.device}), got {w.device}")
    if w.dim() < 1 or w.shape[-1] != length:
        raise ValueError(
            f"emd: {name} must have shape [..., {len_name}={length}] broadcastable to cost's batch shape "
            f"{list(batch)}, got shape {list(w.shape)}"
        )
    lead = w.shape[:-1]
    ok = len(lead) <= len(batch) and all(
        s in (1, t) for s, t in zip(lead, batch[len(batch) - len(lead):])
    )
    if not ok:
        raise ValueError(
            f"emd: {name} of shape {list(w.shape)} does not broadcast to cost's batch shape "
            f"{list(batch)} + [{length}]"
        )
    return w.to(cost.dtype).expand(*batch, length)


def check_emd_inputs(
    cost: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, *, raise_errors: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate (cost [..., M, N], a [..., M] | None, b [..., N] | None).

    Returns (a, b) broadcast to the batch shape (uniform where None) and, when ``raise_errors``
    is False, a bool tensor [B] marking invalid problems (else None after raising on the first).
    """
    if not isinstance(cost, torch.Tensor):
        raise ValueError(f"emd: cost must be a tensor, got {type(cost).__name__}")
    if cost.dim() < 2:
        raise ValueError(f"emd: cost must have shape [..., M, N] (at least 2 dims), got shape {list(cost.shape)}")
    if cost.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"emd: cost must be float32 or float64, got dtype {cost.dtype}")
    M, N = cost.shape[-2:]
    if M < 1 or N < 1:
        raise ValueError(f"emd: cost must have M >= 1 rows and N >= 1 columns, got shape {list(cost.shape)}")
    a_full = _broadcast_weights("a", a, cost, M, "M")
    b_full = _broadcast_weights("b", b, cost, N, "N")
    C = cost.detach().reshape(-1, M, N)
    A = a_full.detach().reshape(-1, M).double()
    B = b_full.detach().reshape(-1, N).double()
    bad_cost = ~torch.isfinite(C).flatten(1).all(1)
    bad_a = ~(torch.isfinite(A) & (A >= 0)).all(1)
    bad_b = ~(torch.isfinite(B) & (B >= 0)).all(1)
    sa, sb = A.sum(1), B.sum(1)
    zero = ~((sa > 0) & (sb > 0))
    rel = (sa - sb).abs() / torch.maximum(sa, sb)
    unbalanced = rel > MASS_REL_TOL
    invalid = bad_cost | bad_a | bad_b | zero | unbalanced
    if not raise_errors:
        return a_full, b_full, invalid.cpu()
    if C.shape[0] and bool(invalid.any()):
        t = int(invalid.nonzero()[0, 0])
        where = f" (batch element {t})" if C.shape[0] > 1 else ""
        if bad_cost[t]:
            raise ValueError(f"emd: cost contains NaN or Inf{where}")
        if bad_a[t]:
            raise ValueError(f"emd: a must be finite and non-negative{where}")
        if bad_b[t]:
            raise ValueError(f"emd: b must be finite and non-negative{where}")
        if zero[t]:
            raise ValueError(
                f"emd: a and b must have positive total mass, got sum(a)={float(sa[t]):g} and "
                f"sum(b)={float(sb[t]):g}{where}"
            )
        raise ValueError(
            f"emd: a and b must have equal total mass (balanced transport): sum(a)={float(sa[t]):g} and "
            f"sum(b)={float(sb[t]):g} differ by {float(rel[t]):g} relative (tolerance {MASS_REL_TOL:g})"
            f"{where}. Normalise both to the same total."
        )
    return a_full, b_full, None


def check_sinkhorn_args(reg: float, max_iter: int, tol: float) -> None:
    """ValueError unless reg > 0 (finite), max_iter >= 0 and tol >= 0 (finite)."""
    if not (isinstance(reg, (int, float)) and math.isfinite(reg) and reg > 0):
        raise ValueError(f"emd: reg must be a finite float > 0 for method='sinkhorn', got {reg!r}")
    if max_iter < 0:
        raise ValueError(f"emd: max_iter must be >= 0, got {max_iter}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"emd: tol must be a finite float >= 0, got {tol!r}")
