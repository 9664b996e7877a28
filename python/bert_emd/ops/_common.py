"""Private helpers shared by the op modules of ``bert_emd.ops``, so that no op module reaches
into another's private names:

  * when a call may take the eager path (its backend and autograd rule called directly, not the
    registered op: :func:`eager`), and the direct kernel call (:func:`call_below_autograd`);
  * the dtypes the cost ops accept and the per-layer ``needs_input_grad`` flags of ``Tensor[]``
    arguments (``layer_costs``, ``attention_costs``);
  * the autograd rule of the transport ops (``emd``'s exact method and Sinkhorn: envelope
    gradients, the plan and duals saved as constants), and its eager form (``EagerTransport``);
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


# ------------------------------------------------------------------------ eager fast path
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(t: torch.Tensor) -> bool:
    """True when a call on ``t`` (the first input; the others must be on its device and of its
    kind) may run its backend and autograd rule directly instead of through the registered op:
    eager mode on plain tensors. The registered op's dispatcher layers are Python here (the
    autograd kernel of ``torch.library.register_autograd`` flattens ``Tensor[]`` arguments with
    pytree, ``custom_op`` wraps every call), several times the cost of a small kernel.

    False, so that the registered op runs (its fake kernel, its registration as traced), under
    ``torch.compile``, under a ``TorchDispatchMode`` (``FakeTensorMode``, ``make_fx``), under a
    ``TorchFunctionMode``, inside functorch transforms, and for tensor subclasses (fake tensors,
    ``DTensor``, wrappers)."""
    return (type(t) in _PLAIN and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
            and not torch._C._is_torch_function_mode_enabled() and not torch._C._are_functorch_transforms_active())


_KERNEL_KEYS = {"cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)}


def call_below_autograd(op, backend: str, *args):
    """``op(*args)`` below autograd, on the eager path (:func:`eager`). For a C++ op's ``cpu`` or
    ``cuda`` kernel, a boxed redispatch straight to it (no autograd key, no argument parsing: a
    third of a 4 x 12 ``emd`` call), except while the profiler records (it records ops as they are
    called, not redispatched); otherwise the op under ``_AutoDispatchBelowAutograd``."""
    keys = _KERNEL_KEYS.get(backend)
    if keys is not None and not torch._C._autograd._profiler_enabled():
        return op.redispatch(keys, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def grad_flags(flag, n: int) -> list[bool]:
    """One bool per tensor of a ``Tensor[]`` argument of n tensors, from its ``needs_input_grad``
    entry (a flag per tensor, or one flag for all)."""
    return [bool(f) for f in flag] if isinstance(flag, (list, tuple)) else [bool(flag)] * n


# Device tensors are reshaped with methods (unsqueeze, view), not Python indexing, in the code the
# ops run on accelerators, and negated with ``logical_not``, not ``~``: ``t[..., None]`` and ``~t``
# set a device guard in torch's Python bindings, which a CPU-only torch lacks for CUDA, so
# tests/ops/test_no_host_sync.py could not walk them on fake CUDA tensors.

# --------------------------------------------------------------------- transport autograd rule
# Envelope theorem: the optimal plan and duals are constants of the backward,
#   d value / d cost = plan,   d value / d a = u - mean(u),   d value / d b = v - mean(v)
# (centred duals: the gradient w.r.t. the weights is tangent to the simplex). Every transport op
# takes (cost, a, b, *options) and returns (value, plan, u, v, status).
def transport_fake(cost: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Outputs of a transport op (``emd_exact``, ``sinkhorn``) on ``cost`` [..., M, N], shapes only:
    value [...], plan [..., M, N], duals [..., M] and [..., N], status [...] int32."""
    batch, (M, N) = cost.shape[:-2], cost.shape[-2:]
    return (
        cost.new_empty(batch),
        cost.new_empty((*batch, M, N)),
        cost.new_empty((*batch, M)),
        cost.new_empty((*batch, N)),
        cost.new_empty(batch, dtype=torch.int32),
    )


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


def transport_grads(ctx, g_value: torch.Tensor, needs=None):
    """(d cost, d a, d b) for the gradient ``g_value`` [...] of the value (None where not needed;
    ``needs``: the three flags, default the first three of ``ctx.needs_input_grad``); an op's
    backward appends None for each of its options."""
    plan, u, v = ctx.saved_tensors
    need_cost, need_a, need_b = ctx.needs_input_grad[:3] if needs is None else needs
    g_cost = g_a = g_b = None
    if need_cost:
        g_cost = g_value.unsqueeze(-1).unsqueeze(-1) * plan
    if need_a:
        g_a = (g_value.unsqueeze(-1) * (u - u.mean(-1, keepdim=True))).sum_to_size(ctx.a_shape).to(ctx.a_dtype)
    if need_b:
        g_b = (g_value.unsqueeze(-1) * (v - v.mean(-1, keepdim=True))).sum_to_size(ctx.b_shape).to(ctx.b_dtype)
    return g_cost, g_a, g_b


class EagerTransport(torch.autograd.Function):
    """The transport rule above around a backend op called below autograd: what a transport op
    registered with this rule computes in eager mode, without the Python autograd kernel of
    ``torch.library.register_autograd`` (see :func:`eager`). ``apply(op, backend, cost, a, b,
    *options)`` -> (value, plan, u, v, status)."""

    @staticmethod
    def forward(ctx, op, backend, cost, a, b, *options):
        out = call_below_autograd(op, backend, cost, a, b, *options)
        transport_setup_context(ctx, (cost, a, b), out)
        ctx.n_options = len(options)
        return out

    @staticmethod
    def backward(ctx, g_value, *unused):
        return (None, None, *transport_grads(ctx, g_value, ctx.needs_input_grad[2:5]), *([None] * ctx.n_options))


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
            n = torch.where(where.to(n.device).unsqueeze(1), n, torch.zeros((), dtype=n.dtype, device=n.device))
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
        return (1.01 * worst + mv < limit) & padded.logical_not().any(dim=1)
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
        cols = cols & ((attention_mask.to(q0.device) == 0) & vanish.unsqueeze(1)).logical_not()
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
