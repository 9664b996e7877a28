"""``bert_emd::cost_attention_step``: the cost-attention rule of one training step in one op.

The rule (:mod:`bert_emd.nn.cost_attention`) is a few dozen flops on vectors of a dozen layers;
written as tensor ops it dispatches about 45 small ops a feature, and on a tiny step that host
time rivals the rest of the loss. The kernels (``csrc/core/cost_attention.h``, run by the CPU
kernel and by a one-thread CUDA kernel) compute it in one call; the pure-PyTorch rule
(:mod:`bert_emd.reference.cost_attention`) is their oracle and runs wherever they do not (a build
without them, other devices). Backends: ``cpu``, ``cuda`` (the C++ op), ``torch`` (the reference);
``bert-emd info`` lists which runs here. No gradient (the weights are buffers, updated under
no_grad); one fake kernel, so the op traces under ``torch.compile`` and ``FakeTensorMode``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backends, _ext
from ..reference.cost_attention import NORMALIZE_CODES, cost_attention_step_reference
from ._common import call_below_autograd, eager

__all__ = ["cost_attention_step"]

_OPNAME = "bert_emd::cost_attention_step"


def _fake(plan, cost, student_weight, teacher_weight, features, normalize, temperature, eps):
    return (student_weight.new_empty(student_weight.shape, dtype=torch.float64),
            teacher_weight.new_empty(teacher_weight.shape, dtype=torch.float64))


def _register() -> None:
    if hasattr(torch.ops.bert_emd, "cost_attention_step"):  # (an extension built before the op lacks it)
        torch.library.register_fake(_OPNAME)(_fake)


_ext.on_load(_register)


def cost_attention_step(
    plan: Tensor,
    cost: Tensor,
    student_weight: Tensor,
    teacher_weight: Tensor,
    *,
    features: int = 1,
    normalize: str = "double_softmax",
    temperature: float = 1.0,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """New layer weights from one step's plans and costs (no gradient; nothing is stored).

    Args:
        plan: flows F [features * B, M, N] (or [M, N], [B, M, N] for one feature): ``features``
            features (attention, hidden) stacked, each with B problems (one, or one per example:
            their contributions are averaged).
        cost: the costs D solved for, same shape.
        student_weight, teacher_weight: the current weights [M], [N] (any float dtype).
        features: how many features ``plan`` stacks; their proposals are averaged before the
            outer step (one pair of weights shared by the features).
        normalize, temperature, eps: the rule (:class:`bert_emd.nn.CostAttention`).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"torch"`` (the reference).
    Returns:
        (student [M], teacher [N]) float64 on the weights' device: the new weights, or the
        current ones when the step's costs are not finite.
    """
    code = NORMALIZE_CODES.get(normalize)
    if code is None:
        raise ValueError(f"cost_attention_step: normalize must be one of {tuple(NORMALIZE_CODES)}, got {normalize!r}")
    name = _backends.select("cost_attention", backend, plan.device)
    if name == "torch":
        return cost_attention_step_reference(plan, cost, student_weight, teacher_weight, features, normalize,
                                             float(temperature), float(eps))
    op = torch.ops.bert_emd.cost_attention_step.default
    args = (plan, cost, student_weight, teacher_weight, int(features), code, float(temperature), float(eps))
    if eager(plan):
        return call_below_autograd(op, name, *args)
    return op(*args)
