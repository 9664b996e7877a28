"""Pure-PyTorch reference of ``bert_emd.attention_costs``: materialise every attention map, then
``layer_costs`` (the ``torch`` backend, the test oracle and the benchmark baseline).

Definitions (student layers i = 1..M with queries and keys Q_i, K_i [B, H, L, d_S], teacher layers
j = 1..N with [B, H, L, d_T]; a the additive key mask of ``attention_mask``):

    scores  X_i[b,h,q,k] = (Q_i[b,h,q] . K_i[b,h,k]) / sqrt(d_S) + a[b,k],
            a[b,k] = 0 for a real key, ``mask_value`` (the original's -10000) for a padded one;
            exactly what ``bert_emd.nn.hooks.AttentionScoreCapture.scores`` returns
    probs   P_i = softmax over k of X_i (what eager attention of Hugging Face models returns
            before dropout)
    costs   D_ij = layer_costs(X or P) = sum_e w[e] (f(X_i[e]) - f(Y_j[e]))^2 / sum_e w[e],
            f(x) = 0 where x <= attention_floor, w[b,h,q,k] = mask[b,q] mask[b,k] (1 without
            ``mask``); per batch element with ``per_sample``.

Gradient (explicit, the formulas the fused kernels implement), with c = 2 / n:

    gX_i  = c w [X_i > floor] (f(X_i) sum_j G_ij - sum_j G_ij f(Y_j))   (layer_costs_grad)
    dS_i  = gX_i                                   (scores)
          = P_i * (gX_i - rowsum_k(gX_i * P_i))   (probs: the softmax backward)
    dQ_i  = dS_i K_i / sqrt(d_S),   dK_i = dS_i^T Q_i / sqrt(d_S)

Everything is computed in float32 (float64 when any input is float64) whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layer_costs import layer_costs_grad, layer_costs_loop

__all__ = [
    "acc_dtype",
    "additive_key_mask",
    "materialize",
    "attention_lse",
    "attention_costs_materialized",
    "attention_costs_materialized_grad",
]


def acc_dtype(*sides: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when any tensor of the given sides is float64, else float32."""
    wide = any(x.dtype == torch.float64 for side in sides for x in side)
    return torch.float64 if wide else torch.float32


def additive_key_mask(attention_mask: torch.Tensor, mask_value: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] token mask (non-zero = real) -> additive key mask [B, 1, 1, L]: 0 real, ``mask_value`` padded.

    For 0/1 (or bool) masks this is ``bert_emd.nn.hooks.additive_mask``, value for value.
    """
    real = attention_mask != 0
    return torch.where(real, 0.0, float(mask_value)).to(dtype)[:, None, None, :]


def materialize(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    source: str = "scores",
    attention_mask: torch.Tensor | None = None,
    mask_value: float = -10000.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One layer's attention map [B, H, L, L] from its queries and keys [B, H, L, d].

    scores = (q k^T) * d**-0.5 + additive mask (the operation order of the score hooks);
    probs = softmax(scores, -1).

    Args:
        q, k: [B, H, L, d] queries and keys of one layer.
        source: ``"scores"`` or ``"probs"``.
        attention_mask: [B, L] token mask the model was given (non-zero = real token), or None.
        mask_value: additive value at padded keys.
        dtype: compute dtype (default: the inputs' dtype).
    """
    dtype = dtype or q.dtype
    d = q.shape[-1]
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * (d**-0.5)
    if attention_mask is not None:
        s = s + additive_key_mask(attention_mask, mask_value, dtype)
    return torch.softmax(s, dim=-1) if source == "probs" else s


def attention_lse(
    qs: Sequence[torch.Tensor],
    ks: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None,
    mask_value: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Row log-sum-exp of the scores of each layer: [len(qs), B, H, L] in ``dtype``."""
    return torch.stack([
        torch.logsumexp(materialize(q, k, attention_mask=attention_mask, mask_value=mask_value, dtype=dtype), -1)
        for q, k in zip(qs, ks)
    ])


def _maps(qs, ks, source, attention_mask, mask_value, dtype) -> list[torch.Tensor]:
    return [materialize(q, k, source=source, attention_mask=attention_mask, mask_value=mask_value, dtype=dtype)
            for q, k in zip(qs, ks)]


def attention_costs_materialized(
    sq: Sequence[torch.Tensor],
    sk: Sequence[torch.Tensor],
    tq: Sequence[torch.Tensor],
    tk: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    mask_value: float = -10000.0,
    source: str = "scores",
    per_sample: bool = False,
    attention_floor: float | None = None,
) -> torch.Tensor:
    """D [M, N] (or [B, M, N]): materialise all M + N maps [B, H, L, L], then ``layer_costs_loop``.

    Args:
        sq, sk: M student queries / keys [B, H, L, d_S].
        tq, tk: N teacher queries / keys [B, H, L, d_T].
        attention_mask: [B, L] token mask given to the models (the additive mask of the maps).
        mask: [B, L] token mask of the mean (query and key both real), or None (every entry).
        mask_value, source, per_sample, attention_floor: see the module docstring.
    """
    acc = acc_dtype(sq, tq)
    S = _maps(sq, sk, source, attention_mask, mask_value, acc)
    T = _maps(tq, tk, source, attention_mask, mask_value, acc)
    return layer_costs_loop(S, T, mask, per_sample, attention_floor)


def attention_costs_materialized_grad(
    grad: torch.Tensor,
    sq: Sequence[torch.Tensor],
    sk: Sequence[torch.Tensor],
    tq: Sequence[torch.Tensor],
    tk: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    mask_value: float = -10000.0,
    source: str = "scores",
    per_sample: bool = False,
    attention_floor: float | None = None,
    need_student: bool = True,
    need_teacher: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Explicit gradient of :func:`attention_costs_materialized` given G [M, N] (or [B, M, N]).

    Returns:
        (dQ_S, dK_S, dQ_T, dK_T): lists of gradients in the dtype and shape of each input; a side
        that is not needed gets empty lists.
    """
    acc = acc_dtype(sq, tq)
    probs = source == "probs"
    S = _maps(sq, sk, source, attention_mask, mask_value, acc)
    T = _maps(tq, tk, source, attention_mask, mask_value, acc)
    gS, gT = layer_costs_grad(grad, S, T, mask, per_sample, attention_floor, need_teacher)

    def to_qk(g_maps, maps, qs, ks):
        dq, dk = [], []
        for g, p, q, k in zip(g_maps, maps, qs, ks):
            ds = p * (g - (g * p).sum(-1, keepdim=True)) if probs else g
            scale = q.shape[-1] ** -0.5
            dq.append((torch.matmul(ds, k.to(acc)) * scale).to(q.dtype))
            dk.append((torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale).to(k.dtype))
        return dq, dk

    dsq, dsk = to_qk(gS, S, sq, sk) if need_student else ([], [])
    dtq, dtk = to_qk(gT, T, tq, tk) if need_teacher else ([], [])
    return dsq, dsk, dtq, dtk
