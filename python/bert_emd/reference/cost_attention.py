"""The cost-attention rule of one step as plain tensor ops: the oracle of the ``cost_attention_step``
kernels (``csrc/core/cost_attention.h``), and what runs where they do not (a build without them,
other devices). The rule and its conventions: :mod:`bert_emd.nn.cost_attention`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NORMALIZE_CODES", "contributions", "propose", "finalize", "cost_attention_step_reference"]

#: the ``normalize`` argument of the ``cost_attention_step`` op (an int in its schema)
NORMALIZE_CODES = {"sum": 0, "softmax": 1, "double_softmax": 2}


def contributions(plan: Tensor, cost: Tensor) -> tuple[Tensor, Tensor]:
    """c^S [M] = sum_j F_ij D_ij, c^T [N] = sum_i F_ij D_ij of ``plan``, ``cost`` [..., M, N]
    (leading dims averaged), in float64."""
    fd = plan.detach().double() * cost.detach().double()
    cs, ct = fd.sum(-1), fd.sum(-2)
    if fd.dim() > 2:
        cs = cs.reshape(-1, cs.shape[-1]).mean(0)
        ct = ct.reshape(-1, ct.shape[-1]).mean(0)
    return cs, ct


def _inverse_cost_ratio(contribution: Tensor, weight: Tensor) -> Tensor:
    """w_hat = sum(r) / r with r = contribution / weight, along the last dim ([..., K]: one row
    per feature); entries with r == 0 stay 0 (original)."""
    r = contribution / weight
    total = r.sum(-1, keepdim=True)
    nonzero = r != 0
    w_hat = torch.where(nonzero, total / torch.where(nonzero, r, 1.0), 0.0)
    # float64 cannot overflow for fp32-sized costs, but keep a finite value whatever the input;
    # NaN (a NaN cost) stays NaN so that finalize() keeps the previous weights.
    big = torch.finfo(w_hat.dtype).max / (4 * w_hat.shape[-1])
    return torch.nan_to_num(w_hat, nan=float("nan"), posinf=big)


def _sum_normalize(w: Tensor) -> Tensor:
    s = w.sum(-1, keepdim=True)
    # All-zero w_hat (every layer at zero cost): leave zeros; the eps floor then makes it uniform.
    # A NaN sum (a NaN cost) stays NaN, so that finalize() keeps the previous weights.
    zero = s == 0
    return torch.where(zero, 0.0, w / torch.where(zero, 1.0, s))


def _inner(w_hat: Tensor, normalize: str, temperature: float) -> Tensor:
    if normalize == "sum":
        return _sum_normalize(w_hat)
    return torch.softmax(w_hat / temperature, dim=-1)


def propose(cs: Tensor, ct: Tensor, ws: Tensor, wt: Tensor, normalize: str,
            temperature: float) -> tuple[Tensor, Tensor]:
    """w_hat, then ``sum``/``softmax(./T)``, for contributions c^S [M] or [F, M] and c^T [N] or
    [F, N] from the current weights ws [M], wt [N]: float64 proposals of the same shapes."""
    ws, wt = ws.double(), wt.double()
    return (_inner(_inverse_cost_ratio(cs.to(ws), ws), normalize, temperature),
            _inner(_inverse_cost_ratio(ct.to(wt), wt), normalize, temperature))


def _floor(w: Tensor, eps: float) -> Tensor:
    w = w.clamp_min(eps)
    return w / w.sum()


def finalize(ps: Tensor, pt: Tensor, ws: Tensor, wt: Tensor, normalize: str, eps: float) -> tuple[Tensor, Tensor]:
    """Outer step (the second softmax of ``double_softmax``), eps floor, renormalise: the new
    weights (float64), or the current ``ws``, ``wt`` if either side is not finite (decided on
    the device)."""
    if normalize == "double_softmax":
        ps = torch.softmax(ps, dim=-1)
        pt = torch.softmax(pt, dim=-1)
    ps = _floor(ps.double(), eps)
    pt = _floor(pt.double(), eps)
    ok = torch.isfinite(ps).all() & torch.isfinite(pt).all()
    return torch.where(ok, ps, ws.double()), torch.where(ok, pt, wt.double())


def cost_attention_step_reference(plan: Tensor, cost: Tensor, ws: Tensor, wt: Tensor, features: int,
                                  normalize: str, temperature: float, eps: float) -> tuple[Tensor, Tensor]:
    """The rule for ``features`` features stacked in ``plan``, ``cost`` [features * B, M, N] (or
    [M, N] for one problem): each feature's contributions (mean over its B problems) propose from
    ``ws`` [M], ``wt`` [N]; the proposals are averaged, then :func:`finalize`."""
    M, N = plan.shape[-2:]
    fd = plan.detach().double().reshape(features, -1, M, N) * cost.detach().double().reshape(features, -1, M, N)
    cs, ct = fd.sum(-1).mean(1), fd.sum(-2).mean(1)  # [F, M], [F, N]
    ps, pt = propose(cs, ct, ws, wt, normalize, temperature)
    return finalize(ps.mean(0), pt.mean(0), ws, wt, normalize, eps)
