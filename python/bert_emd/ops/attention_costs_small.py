"""The ``cpu`` backend of ``bert_emd.attention_costs`` on small problems: every layer at once.

When the differences of every student and every teacher map, [M, N, B, H, L, L], hold at most
1/16 of the chunked path's budget (``attention_costs_cpu.CPU_CHUNK_ELEMENTS``: 2^18 elements, 1 MiB
in float32, by default; a per-step call on a few short sequences), the chunked path's
fixed costs (its chunk loop, a product per layer and chunk, the fused kernels' per-layer
arguments) are most of its time. Here the maps of all layers of a side come from one batched
product, the costs from their broadcast differences (formed directly, as the fused kernels do:
close layers do not cancel), and the backward in closed form by batched products:

    dA_i = 2 [f(A_i) > floor] (a_i f(A_i) - sum_j Gn_ij f(B_j)),   a_i = sum_j Gn_ij,

Gn = dL/dD / n (per sample), A the weighted maps of the side, B the other side's; then the
softmax backward (probs), dQ = dA K d**-0.5 and dK = dA^T Q d**-0.5. Nothing is skipped: entries
that provably add nothing (see ``_common``) add exactly nothing when computed too. Same values as
the chunked path, to rounding.

The groups of queries and keys are lists of layers (the op's schema) or stacked tensors
[layers, B, H, L, d] (the eager path of ``bert_emd.attention_costs``); gradients come back in the
form of their group. Called by ``bert_emd.ops.attention_costs_cpu``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..reference.attention_costs import additive_key_mask

__all__ = ["fits", "fwd", "bwd", "layers"]

Group = torch.Tensor | Sequence[torch.Tensor]


def fits(M: int, N: int, B: int, H: int, L: int, budget: int) -> bool:
    """Whether a problem of M student and N teacher layers [B, H, L, .] is small: its
    [M, N, B, H, L, L] differences hold at most ``budget`` / 16 elements (see above)."""
    return B > 0 and H > 0 and L > 0 and M * N * B * H * L * L <= budget // 16


def layers(g: Group) -> list[torch.Tensor]:
    """A group as a list of layers (a stacked one split: views)."""
    return list(g.unbind(0)) if isinstance(g, torch.Tensor) else list(g)


def _stacked(g: Group, acc: torch.dtype) -> torch.Tensor:
    x = g if isinstance(g, torch.Tensor) else torch.stack(list(g))
    return x if x.dtype == acc else x.to(acc)


def _maps(qs: Group, ks: Group, acc, add: torch.Tensor | None, probs: bool):
    """(maps [layers, B, H, L, L], stacked Q, stacked K): A = Q K^T d**-0.5 + a, or its softmax."""
    q, k = _stacked(qs, acc), _stacked(ks, acc)
    x = torch.matmul(q, k.mT).mul_(q.shape[-1] ** -0.5)
    if add is not None:  # + 0 on real keys changes nothing
        x.add_(add[None, :, None, None, :])
    return (torch.softmax(x, -1) if probs else x), q, k


def _key_add(attention_mask: torch.Tensor | None, mask_value: float, acc) -> torch.Tensor | None:
    """The additive key mask [B, L] (None: nothing to add)."""
    if attention_mask is None or mask_value == 0.0:
        return None
    return additive_key_mask(attention_mask, mask_value, acc)[:, 0, 0, :]


def _weights(mask: torch.Tensor | None, acc) -> torch.Tensor | None:
    """[B, 1, L, L] 0/1: query and key both real (None without a mask)."""
    if mask is None:
        return None
    m = (mask != 0).to(acc)
    return m[:, None, :, None] * m[:, None, None, :]


def _counts(mask: torch.Tensor, H: int, L: int, acc) -> torch.Tensor:
    c = (mask != 0).to(acc).sum(1)
    return H * c * c


def _floored(x: torch.Tensor, floor: float | None, in_place: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(f(x), x > floor): entries <= floor become 0 (NaN stays, as in the kernels); its gradient
    is 0 where not x > floor (None: no floor)."""
    if floor is None:
        return x, None
    keep = x > floor
    low = x <= floor
    return (x.masked_fill_(low, 0.0) if in_place else x.masked_fill(low, 0.0)), keep


def _layers_shape(g: Group) -> torch.Size:
    return g.shape[1:] if isinstance(g, torch.Tensor) else g[0].shape


def fwd(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor, acc, keep=None):
    """(cost, empty lse) of the forward op for a small problem (``fits``). ``keep``: a list that
    receives the maps and stacked queries and keys of both sides, for :func:`bwd` to reuse (the
    eager path: a small problem's maps are cheaper kept than recomputed)."""
    B, H, L, _ = _layers_shape(sq)
    add = _key_add(attention_mask, mask_value, acc)
    X, *qk_s = _maps(sq, sk, acc, add, probs)
    Y, *qk_t = _maps(tq, tk, acc, add, probs)
    if keep is not None:
        keep.extend([(X, *qk_s), (Y, *qk_t)])
    w = _weights(mask, acc)
    if w is not None:  # masked entries become 0 on both sides (f(0) = 0): they add nothing
        X, Y = (X * w, Y * w) if keep is not None else (X.mul_(w), Y.mul_(w))
    X, _ = _floored(X, attention_floor, keep is None or w is not None)
    Y, _ = _floored(Y, attention_floor, keep is None or w is not None)
    # [B, M, 1, ...] - [B, 1, N, ...] (transposed views): the sums come out [B, M, N], contiguous
    sums = (X.transpose(0, 1).unsqueeze(2) - Y.transpose(0, 1).unsqueeze(1)).square_().sum((3, 4, 5))
    if mask is None:  # every sample's mean runs over H L^2 entries
        n = float(H * L * L)
        cost = sums / n if per_sample else sums.sum(0) / (B * n)
    else:
        n = _counts(mask, H, L, acc)
        cost = sums / n[:, None, None] if per_sample else sums.sum(0) / n.sum()
    return cost, X.new_empty((0,))


def bwd(grad, sq, sk, tq, tk, attention_mask, mask, mask_value, probs, per_sample, attention_floor,
        need_student, need_teacher, acc, kept=None):
    """The gradients of the backward op for a small problem (``fits``), each group in its form
    (``kept``: what :func:`fwd` kept, else the maps are recomputed)."""
    B, H, L, _ = _layers_shape(sq)
    G = grad if grad.dtype == acc else grad.to(acc)
    if mask is None:
        Gn = G / float(H * L * L if per_sample else B * H * L * L)
    elif per_sample:  # a sample without real tokens has NaN costs and no gradient
        n = _counts(mask, H, L, acc)
        Gn = torch.where(n[:, None, None] > 0, G / n[:, None, None], torch.zeros_like(G))
    else:
        total = _counts(mask, H, L, acc).sum()
        Gn = torch.where(total > 0, G / total, torch.zeros_like(G))
    add = _key_add(attention_mask, mask_value, acc)
    w = _weights(mask, acc)
    sides = []
    for i, (qs, ks) in enumerate(((sq, sk), (tq, tk))):
        A, q, k = kept[i] if kept else _maps(qs, ks, acc, add, probs)  # A: unweighted, for the softmax backward
        Aw = A if w is None else (A * w if probs or kept else A.mul_(w))
        F, keep = _floored(Aw, attention_floor, Aw is not A)
        sides.append((qs, ks, A, q, k, F, keep))
    out: list = [[], [], [], []]
    for slot, need, X, Y, GX in ((0, need_student, sides[0], sides[1], Gn),
                                 (2, need_teacher, sides[1], sides[0], Gn.mT)):
        if not need:
            continue
        qs, ks, A, q, k, F, keep = X
        FY = Y[5]
        GX = GX * (2.0 * q.shape[-1] ** -0.5)  # the 2 of the square and the scale of the product
        if GX.dim() == 2:  # one matrix for every sample
            a = GX.sum(1).view(-1, 1, 1, 1, 1)
            GY = torch.mm(GX, FY.view(FY.shape[0], -1)).view(F.shape)
        else:  # [B, MX, NY]: per sample
            a = GX.sum(2).T[:, :, None, None, None]
            GY = torch.bmm(GX, FY.transpose(0, 1).reshape(GX.shape[0], GX.shape[2], -1)).transpose(0, 1)
            GY = GY.reshape(F.shape)
        g = (F * a).sub_(GY)
        if keep is not None:
            g.masked_fill_(~keep, 0.0)
        if probs:  # dS = P (g - rowsum(g P)), P the unweighted probs
            g = torch.ops.aten._softmax_backward_data(g, A, -1, acc)
        out[slot] = _like(torch.matmul(g, k), qs)
        out[slot + 1] = _like(torch.matmul(g.mT, q), ks)
    return tuple(out)


def _like(x: torch.Tensor, group: Group):
    """Gradients [layers, B, H, L, d] in the form and dtype of ``group``: one tensor for a stacked
    group, else one new tensor per layer."""
    if isinstance(group, torch.Tensor):
        return x if x.dtype == group.dtype else x.to(group.dtype)
    return [g if g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(torch.unbind_copy(x), group)]
