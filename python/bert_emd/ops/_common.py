"""Private helpers shared by the op modules of ``bert_emd.ops``, so that no op module reaches
into another's private names:

  * the dtypes the cost ops accept and the per-layer ``needs_input_grad`` flags of ``Tensor[]``
    arguments (``layer_costs``, ``attention_costs``);
  * the autograd rule of the transport ops (``emd``'s exact method and Sinkhorn: envelope
    gradients, the plan and duals saved as constants);
  * the names of the ``layer_costs`` ops per backend (``layer_costs`` dispatches to them, the
    ``cpu`` backend of ``attention_costs`` runs them on its tiles).

The methods behind them: docs/design.md; the ops' contracts: docs/ops.md.
"""

from __future__ import annotations

import torch

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
