"""What the transport references take as a problem: the weights broadcast to the batch (uniform
where None) and which problems of a batch are valid. The definition, nothing more: the ops check
their inputs first (``bert_emd.ops._validate``, whose messages name the argument and element),
so that the test oracle shares no validation code with the ops it checks. Called directly, a
reference raises one plain ``ValueError`` for an invalid problem."""

from __future__ import annotations

import torch

__all__ = ["MASS_REL_TOL", "problem_weights", "invalid_problems"]

#: relative difference of sum(a) and sum(b) a balanced problem tolerates (b is rescaled to a's mass)
MASS_REL_TOL = 1e-6


def problem_weights(
    cost: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [..., M], b [..., N]) in cost's dtype, expanded to cost's batch shape; None: uniform."""
    batch, (M, N) = cost.shape[:-2], cost.shape[-2:]

    def full(w: torch.Tensor | None, n: int) -> torch.Tensor:
        if w is None:
            return torch.full((*batch, n), 1.0 / n, dtype=cost.dtype, device=cost.device)
        return w.to(cost.dtype).expand(*batch, n)

    return full(a, M), full(b, N)


def invalid_problems(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] bool on the CPU (B the flattened batch): problem t is not a balanced transport problem
    -- a non-finite cost, a negative or non-finite weight, a zero mass on either side, or masses
    differing by more than :data:`MASS_REL_TOL` relative. ``a``, ``b`` as :func:`problem_weights`."""
    M, N = cost.shape[-2:]
    C = cost.detach().reshape(-1, M, N)
    A = a.detach().reshape(-1, M).double()
    B = b.detach().reshape(-1, N).double()
    ok = torch.isfinite(C).flatten(1).all(1)
    ok &= (torch.isfinite(A) & (A >= 0)).all(1) & (torch.isfinite(B) & (B >= 0)).all(1)
    sa, sb = A.sum(1), B.sum(1)
    ok &= (sa > 0) & (sb > 0)
    ok &= (sa - sb).abs() / torch.maximum(sa, sb) <= MASS_REL_TOL
    return (~ok).cpu()
