"""Private helpers shared by the op modules of ``bert_emd.ops``, so that no op module reaches
into another's private names:

  * the dtypes the cost ops accept and the per-layer ``needs_input_grad`` flags of ``Tensor[]``
    arguments (``layer_costs``, ``attention_costs``);
  * the autograd rule of the transport ops (``emd``'s exact method and Sinkhorn: envelope
    gradients, the plan and duals saved as constants);
  * the names of the ``layer_costs`` ops per backend (``layer_costs`` dispatches to them, the
    ``cpu`` backend of ``attention_costs`` runs them on its tiles);
  * which query rows and keys of ``attention_costs`` provably add nothing (both its ``cpu`` and
    ``triton`` backends skip them).

The methods behind them: docs/design.md; the ops' contracts: docs/ops.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..reference.attention_costs import acc_dtype

#: dtypes of the layers, queries and keys that ``layer_costs`` and ``attention_costs`` accept
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def grad_flags(flag, n: int) -> list[bool]:
    """One bool per tensor of a ``Tensor[]`` argument of n tensors, from its ``needs_input_grad``
    entry (a flag per tensor, or one flag for all)."""
    return [bool(f) for f in flag] if isinstance(flag, (list, tuple)) else [bool(flag)] * n


# --------------------------------------------------------------------- transport autograd rule
# Envelope theorem: the optimal plan and duals are constants of the backward,
#   d value / d cost = plan,   d value / d a = u - mean(u),   d value / d b = v - mean(v)
# (centred duals: the gradient w.r.t. the weights is tangent to the simplex). Every transport op
# takes (cost, a, b, *options) and returns (value, plan, u, v, status).
def transport_setup_context(ctx, inputs, output) -> None:
    """``setup_context`` of every transport op: saves plan, u, v; only value is differentiable."""
    a, b = inputs[1], inputs[2]
    _, plan, u, v, _ = output
    ctx.a_shape = None if a is None else a.shape
    ctx.b_shape = None if b is None else b.shape
    ctx.a_dtype = None if a is None else a.dtype
    ctx.b_dtype = None if b is None else b.dtype
    ctx.save_for_backward(plan, u, v)
    ctx.mark_non_differentiable(*output[1:])


def transport_grads(ctx, g_value: torch.Tensor):
    """(d cost, d a, d b) for the gradient ``g_value`` [...] of the value (None where not needed);
    an op's backward appends None for each of its options."""
    plan, u, v = ctx.saved_tensors
    g_cost = g_a = g_b = None
    if ctx.needs_input_grad[0]:
        g_cost = g_value[..., None, None] * plan
    if ctx.needs_input_grad[1]:
        g_a = (g_value[..., None] * (u - u.mean(-1, keepdim=True))).sum_to_size(ctx.a_shape).to(ctx.a_dtype)
    if ctx.needs_input_grad[2]:
        g_b = (g_value[..., None] * (v - v.mean(-1, keepdim=True))).sum_to_size(ctx.b_shape).to(ctx.b_dtype)
    return g_cost, g_a, g_b


# ------------------------------------------------------------------------- layer_costs ops
#: backend -> (forward op, backward op) names in ``torch.ops.bert_emd``
LAYER_COSTS_OPS = {
    "cpu": ("layer_costs_fwd", "layer_costs_bwd"),
    "torch": ("layer_costs_fwd_torch", "layer_costs_bwd_torch"),
    "triton": ("layer_costs_fwd_triton", "layer_costs_bwd_triton"),
}


# ------------------------------------------------------ attention_costs: what adds nothing
Box = tuple[int, int, int, int]  # live query rows r0:r1 and key columns k0:k1 of one sample


# Keys and rows that provably add nothing are never computed. An entry adds exactly nothing to
# the costs and their gradient when its weight is 0 (``mask``: query or key not real), or when
# its key is padded (``attention_mask``) and the padding value pushes it out of reach on both
# sides: with ``scores`` below the floor (f = 0, gradient 0) whenever
#     |q . k| d**-0.5 <= d**-0.5 max|q| max|k_padded| < floor - mask_value   (Cauchy-Schwarz),
# with ``probs`` to an exp that underflows to exactly 0 whenever
#     x_padded - max_row x <= d**-0.5 max|q| (max|k_padded| + max|k|) + mask_value < -110 (f32).
# The bound costs one pass over Q and K (O(L) per layer, against the O(L^2) tiles) and is checked
# per sample with a 1% margin for rounding; when it fails (huge activations, a tiny mask_value,
# NaN) the sample's padded keys are computed as before. For right padding with lengths c_b this
# cuts each sample's work to c_b / L of the keys (and rows to c_b with a ``mask``), exactly.
UNDERFLOW = {torch.float32: -110.0, torch.float64: -760.0}  # exp(x) == 0 below (with margin)


class Norms:
    """Row norms |q|, |k| [B, H, L] of every layer of both sides, computed on first use (one pass
    over Q and K, shared by the bounds of the forward's skipping and the backward's Gram products)."""

    def __init__(self, sq, sk, tq, tk, acc: torch.dtype):
        self.sides, self.acc = ((sq, sk), (tq, tk)), acc
        self._layers: list[tuple[float, torch.Tensor, torch.Tensor]] | None = None

    def _max(self, n: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        if where is not None:
            n = torch.where(where.to(n.device)[:, None, :], n, torch.zeros((), dtype=n.dtype, device=n.device))
        return n.amax(dim=(1, 2)) if n.numel() else n.new_zeros(n.shape[0])

    def worst(self, rows: torch.Tensor | None, keys: torch.Tensor | None, plus_all_keys: bool = False) -> torch.Tensor:
        """[B] float64: max over layers of d**-0.5 max_rows |q| (max_keys |k| (+ max_all |k|)),
        the bound on |q . k| d**-0.5 over those rows and keys (``where`` masks [B, L], None: all)."""
        if self._layers is None:
            self._layers = [(qs[0].shape[-1] ** -0.5, torch.linalg.vector_norm(q.to(self.acc), dim=-1),
                             torch.linalg.vector_norm(k.to(self.acc), dim=-1))
                            for qs, ks in self.sides for q, k in zip(qs, ks)]
        q0 = self.sides[0][0][0]
        worst = torch.zeros(q0.shape[0], dtype=torch.float64, device=q0.device)  # on device: no sync
        for scale, qn, kn in self._layers:
            reach = self._max(kn, keys) + (self._max(kn, None) if plus_all_keys else 0.0)
            worst = torch.maximum(worst, (scale * self._max(qn, rows) * reach).double())
        return worst


def padded_keys_vanish(norms: Norms, attention_mask, mask_value, probs, attention_floor, acc) -> torch.Tensor:
    """[B] bool (on the inputs' device): sample b's padded keys provably add nothing on either
    side (see above)."""
    padded = attention_mask.to(norms.sides[0][0][0].device) == 0
    no = torch.zeros(padded.shape[0], dtype=torch.bool, device=padded.device)
    if padded.device.type == "cpu" and not bool(padded.any()):  # (no host sync on an accelerator)
        return no
    if probs:
        limit = UNDERFLOW.get(acc, -110.0)
        if not mask_value < limit:
            return no
    elif attention_floor is None or not mask_value < attention_floor:
        return no
    worst = norms.worst(None, padded, plus_all_keys=probs)
    mv = float(mask_value)
    if probs:  # the row max is a real key's: some key must be real
        return (1.01 * worst + mv < limit) & (~padded).any(dim=1)
    floor = float(attention_floor)
    return 1.01 * worst + mv + 1e-5 * (abs(mv) + abs(floor)) < floor


def live_masks(norms: Norms, attention_mask, mask, mask_value, probs, attention_floor, acc):
    """(rows, cols) [B, L] bool on the inputs' device: the query rows and keys of each sample
    outside which every entry of every layer provably adds nothing (see above)."""
    q0 = norms.sides[0][0][0]
    B, _, L, _ = q0.shape
    rows = torch.ones(B, L, dtype=torch.bool, device=q0.device)
    cols = rows
    if mask is not None:
        rows = mask.to(q0.device) != 0
        if not probs:  # probs still need the weight-0 keys for the softmax normaliser
            cols = rows
    if attention_mask is not None:
        vanish = padded_keys_vanish(norms, attention_mask, mask_value, probs, attention_floor, acc)
        cols = cols & ~((attention_mask.to(q0.device) == 0) & vanish[:, None])
    return rows, cols


def spans(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[B, 4] int32 boxes (r0, r1, k0, k1): the spans of the live rows and keys, (0, 0) if none."""
    L = rows.shape[1]

    def span(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        some = m.any(dim=1)
        first = m.to(torch.int32).argmax(dim=1)
        last = L - m.flip(1).to(torch.int32).argmax(dim=1)
        return torch.where(some, first, 0), torch.where(some, last, 0)

    return torch.stack([*span(rows), *span(cols)], dim=1).to(torch.int32)


class Live(NamedTuple):
    """Which query rows and keys of each sample can add something ([B, L] bool, CPU), and the
    box (r0, r1, k0, k1) spanning them."""

    rows: torch.Tensor
    cols: torch.Tensor
    boxes: list[Box]


def live_region(norms: Norms, attention_mask, mask, mask_value, probs, attention_floor, acc) -> Live:
    """The live rows and keys (``live_masks``) and their boxes, on the CPU."""
    rows, cols = live_masks(norms, attention_mask, mask, mask_value, probs, attention_floor, acc)
    rows, cols = rows.cpu(), cols.cpu()
    return Live(rows, cols, [tuple(bx) for bx in spans(rows, cols).tolist()])


def live_spans(sq, sk, tq, tk, attention_mask, mask, mask_value, probs, attention_floor) -> torch.Tensor | None:
    """The live boxes [B, 4] (``spans`` of ``live_masks``) as a device tensor, computed on the
    device (no host sync); None without masks (everything is live). For the Triton kernels."""
    if mask is None and attention_mask is None:
        return None
    acc = acc_dtype(sq, tq)
    norms = Norms(sq, sk, tq, tk, acc)
    return spans(*live_masks(norms, attention_mask, mask, mask_value, probs, attention_floor, acc))
