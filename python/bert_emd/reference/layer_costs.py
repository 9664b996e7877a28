"""Pure-PyTorch references of ``bert_emd.layer_costs`` (the ``torch`` backend and the test oracle).

Definitions (student layers S_1..S_M, teacher layers T_1..T_N, all of one shape [B, ...]):

    f(x)    = 0 where x <= attention_floor, else x        (identity without a floor)
    w[e]    = token mask of element e (1 without a mask): hidden states [B, L, d] use mask[b, l],
              attention maps [B, H, L, L] use mask[b, q] * mask[b, k], 2-d inputs [B, L] mask[b, l]
    D_ij    = sum_e w[e] (f(S_i[e]) - f(T_j[e]))^2 / sum_e w[e]        ([M, N])
    per_sample: the same sums taken per batch element               ([B, M, N])

An empty mean (no element, or every position masked) is NaN, as ``torch.mean`` of an empty
tensor. Sums run in float32 for float16 / bfloat16 / float32 inputs and in float64 when either
side is float64.

Functions:
  * :func:`layer_costs_loop` -- the definition above, one pair at a time (M*N passes over the
    data), written plainly: the oracle and the ``torch`` backend.
  * :func:`layer_costs_grad` -- its gradient, the formula the fused kernels implement.
  * :func:`layer_costs_original` -- the original BERT-EMD code's loop (``MSELoss`` per pair, the
    ``torch.where(x <= -1e2, 0, x)`` masking redone inside the loop), for benchmarks and the
    low-precision error budget.
  * :func:`layer_costs_vectorized` -- a vectorised PyTorch formulation (stack + one matmul per
    side through |s|^2 + |t|^2 - 2 s.t), the fast way to write it in plain PyTorch; it loses
    accuracy when layers are close (cancellation), so it is a benchmark baseline, not an oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "layer_costs_loop",
    "layer_costs_grad",
    "layer_costs_original",
    "layer_costs_vectorized",
    "mask_weights",
]


def _acc_dtype(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.dtype:
    wide = student[0].dtype == torch.float64 or teacher[0].dtype == torch.float64
    return torch.float64 if wide else torch.float32


def mask_weights(mask: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Element weights w (0/1) broadcastable to a layer of ``shape`` from a [B, L] token mask.

    [B, L] -> w[b, l]; [B, L, d] -> w[b, l, 1]; [B, H, L, L] -> w[b, 1, q, 1] * w[b, 1, 1, k].
    Any non-zero mask entry marks a real token.
    """
    m = (mask != 0).to(dtype)
    if len(shape) == 2:
        return m
    if len(shape) == 3:
        return m[:, :, None]
    if len(shape) == 4:
        return m[:, None, :, None] * m[:, None, None, :]
    raise ValueError(f"layer_costs: a mask needs layers of 2, 3 or 4 dims, got shape {list(shape)}")


def _floor(x: torch.Tensor, attention_floor: float | None) -> torch.Tensor:
    if attention_floor is None:
        return x
    return torch.where(x <= attention_floor, torch.zeros_like(x), x)


def layer_costs_loop(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    per_sample: bool = False,
    attention_floor: float | None = None,
) -> torch.Tensor:
    """D [M, N] (or [B, M, N] with ``per_sample``): one masked mean of squares per pair.

    Args:
        student: M tensors [B, ...].
        teacher: N tensors [B, ...] of the same shape.
        mask: optional [B, L] token mask (see :func:`mask_weights`).
        per_sample: return one matrix per batch element.
        attention_floor: entries <= floor become 0 on both sides before differencing.
    """
    acc = _acc_dtype(student, teacher)
    shape = student[0].shape
    dims = tuple(range(1, len(shape))) if per_sample else tuple(range(len(shape)))
    if mask is not None:
        w = mask_weights(mask, shape, acc).expand(shape)
        count = w.sum(dims)
    else:
        w = None
        n = shape[1:].numel() if per_sample else shape.numel()
        count = torch.full((shape[0],) if per_sample else (), float(n), dtype=acc, device=student[0].device)
    rows = []
    for s in student:
        s = _floor(s.to(acc), attention_floor)
        cols = []
        for t in teacher:
            t = _floor(t.to(acc), attention_floor)
            sq = (s - t) ** 2
            if w is not None:
                sq = torch.where(w != 0, sq, torch.zeros_like(sq))
            cols.append(sq.sum(dims) / count)
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def layer_costs_grad(
    grad: torch.Tensor,
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    per_sample: bool = False,
    attention_floor: float | None = None,
    need_teacher: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of :func:`layer_costs_loop` given the upstream gradient G.

    grad_S_i = (2/n) w [S_i > floor] (f(S_i) sum_j G_ij - sum_j G_ij f(T_j)), and the same for
    T_j with the roles swapped (only when ``need_teacher``; else an empty list).

    Args:
        grad: G [M, N], or [B, M, N] with ``per_sample``.
    Returns:
        (grads of the M student layers, grads of the N teacher layers or []), each in the dtype
        and shape of its input.
    """
    acc = _acc_dtype(student, teacher)
    shape = student[0].shape
    nd = len(shape)
    G = grad.to(acc)
    if mask is not None:
        w = mask_weights(mask, shape, acc).expand(shape)
        count = w.sum(tuple(range(1, nd)) if per_sample else tuple(range(nd)))
    else:
        w = None
        n = shape[1:].numel() if per_sample else shape.numel()
        count = torch.full((shape[0],) if per_sample else (), float(n), dtype=acc, device=grad.device)
    scale = torch.where(count > 0, 2.0 / count, torch.zeros_like(count))
    if per_sample:
        scale = scale.reshape((-1,) + (1,) * (nd - 1))

    def coef(k: torch.Tensor) -> torch.Tensor:  # G_ij (or its per-sample vector) shaped for layers
        return k.reshape((-1,) + (1,) * (nd - 1)) if per_sample else k

    def keep(x: torch.Tensor) -> torch.Tensor:
        k = torch.ones_like(x) if attention_floor is None else (x > attention_floor).to(acc)
        return k if w is None else k * (w != 0).to(acc)

    S = [s.to(acc) for s in student]
    T = [t.to(acc) for t in teacher]
    fS = [_floor(s, attention_floor) for s in S]
    fT = [_floor(t, attention_floor) for t in T]
    gs = []
    for i, s in enumerate(S):
        g = fS[i] * coef(G[..., i, :].sum(-1))
        for j in range(len(T)):
            g = g - coef(G[..., i, j]) * fT[j]
        gs.append((scale * keep(s) * g).to(student[i].dtype))
    gt = []
    if need_teacher:
        for j, t in enumerate(T):
            g = fT[j] * coef(G[..., :, j].sum(-1))
            for i in range(len(S)):
                g = g - coef(G[..., i, j]) * fS[i]
            gt.append((scale * keep(t) * g).to(teacher[j].dtype))
    return gs, gt


def layer_costs_original(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], attention_floor: float | None = None
) -> torch.Tensor:
    """The original BERT-EMD loop: ``MSELoss`` per pair, flooring redone inside the inner loop.

    Computes in the inputs' dtype, as the original does (bfloat16 inputs: a bfloat16 result).
    No token mask (the original averages padding too). Returns D [M, N].
    """
    loss_mse = torch.nn.MSELoss()
    distance_matrix = torch.zeros(len(student), len(teacher), dtype=student[0].dtype,
                                  device=student[0].device)
    for i in range(len(student)):
        student_att = student[i]
        for j in range(len(teacher)):
            teacher_att = teacher[j]
            if attention_floor is not None:
                student_att = torch.where(student_att <= attention_floor,
                                          torch.zeros_like(student_att), student_att)
                teacher_att = torch.where(teacher_att <= attention_floor,
                                          torch.zeros_like(teacher_att), teacher_att)
            distance_matrix[i, j] = loss_mse(student_att, teacher_att)
    return distance_matrix


def layer_costs_vectorized(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    per_sample: bool = False,
    attention_floor: float | None = None,
) -> torch.Tensor:
    """Vectorised PyTorch formulation: D = (|S_i|^2 + |T_j|^2 - 2 S_i . T_j) / n, one matmul.

    Stacks each side into [M, P] / [N, P] (one copy of the inputs), so it needs no loop over
    pairs; the expansion cancels when S_i is close to T_j (errors ~ eps * |S_i|^2 / D_ij).
    """
    acc = _acc_dtype(student, teacher)
    shape = student[0].shape
    B = shape[0]
    S = torch.stack([_floor(s.to(acc), attention_floor) for s in student])  # [M, B, ...]
    T = torch.stack([_floor(t.to(acc), attention_floor) for t in teacher])
    if mask is not None:
        w = mask_weights(mask, shape, acc).expand(shape)
        S = S * w
        T = T * w
        count = w.reshape(B, -1).sum(1)
    else:
        count = torch.full((B,), float(shape[1:].numel()), dtype=acc, device=S.device)
    if per_sample:
        S = S.reshape(len(student), B, -1).transpose(0, 1)  # [B, M, P]
        T = T.reshape(len(teacher), B, -1).transpose(0, 1)
        sq = (S * S).sum(-1)[:, :, None] + (T * T).sum(-1)[:, None, :]
        D = torch.baddbmm(sq, S, T.transpose(1, 2), alpha=-2.0)
        return D.clamp_min(0) / count[:, None, None]
    S = S.reshape(len(student), -1)
    T = T.reshape(len(teacher), -1)
    D = torch.addmm((S * S).sum(1)[:, None] + (T * T).sum(1)[None, :], S, T.t(), alpha=-2.0)
    return D.clamp_min(0) / count.sum()

