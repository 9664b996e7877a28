"""Cost attention: the BERT-EMD rule that re-weights student and teacher layers every step.

Given the optimal flow F (M x N) and the cost D (M x N) of the last transport problem, the
layer that carried much cost per unit of its weight gets a small weight next time:

    c^S_i = sum_j F_ij D_ij         (student, rows)      c^T_j = sum_i F_ij D_ij (teacher, columns)
    r_i   = c^S_i / w^S_i
    w_hat_i = (sum_k r_k) / r_i     (w_hat_i = 0 where r_i = 0, as the original code leaves it)

followed by a normalisation (``normalize``):

``"sum"``
    w = w_hat / sum(w_hat)  -- the current original code (``bert_emd/emd_task_distill.py``).
``"softmax"``
    w = softmax(w_hat / T_emd).
``"double_softmax"``
    w = softmax(softmax(w_hat / T_emd)) -- what the runs of the paper did: the earlier original
    code (``bert-emd/emd_task_distill.py``) applies ``softmax(w / T)`` inside
    ``get_new_layer_weight`` and then, with its default ``--add_softmax True``, a second plain
    softmax (no temperature) after the attention and hidden weights were averaged. The second
    softmax is therefore the *outer* step (:meth:`CostAttention.finalize`): when attention and
    hidden share one pair of weights, the two inner results are averaged first and the outer
    softmax is applied to the average, exactly as the original does.

Then, unlike the original, weights are floored at ``eps`` and renormalised, so a layer whose cost
is zero (r = 0, w_hat = 0, w = 0 under ``"sum"``) never gives 0/0 = NaN on the next step; a step
with a non-finite cost leaves the weights as they were.
A step's update runs as one op, ``bert_emd::cost_attention_step`` (:mod:`bert_emd.ops.cost_attention`:
C++ on the CPU, one CUDA thread on a GPU; the tensor-op rule of
:mod:`bert_emd.reference.cost_attention` elsewhere), on the weights' device: no ``.item()``, no
host round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..ops.cost_attention import cost_attention_step
from ..reference import cost_attention as _rule

__all__ = ["CostAttention", "Normalize"]

Normalize = Literal["sum", "softmax", "double_softmax"]
_NORMALIZE = ("sum", "softmax", "double_softmax")


class CostAttention(nn.Module):
    """Learned layer weights of BERT-EMD, updated from each step's transport plan and costs.

    Args:
        num_student_layers: M, the number of student transformer layers.
        num_teacher_layers: N, the number of teacher transformer layers.
        normalize: ``"sum"``, ``"softmax"`` or ``"double_softmax"`` (see the module docstring).
        temperature: T_emd, divides w_hat before the (inner) softmax; unused by ``"sum"``.
        eps: floor of every weight after the update (then renormalised to sum 1).

    Buffers (saved in ``state_dict``, so a resumed run continues with the same weights):
        ``student_weight`` [M] and ``teacher_weight`` [N], float64, start uniform (1/M, 1/N).
    """

    student_weight: Tensor
    teacher_weight: Tensor

    def __init__(
        self,
        num_student_layers: int,
        num_teacher_layers: int,
        *,
        normalize: Normalize = "double_softmax",
        temperature: float = 1.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if num_student_layers < 1 or num_teacher_layers < 1:
            raise ValueError(
                f"num_student_layers and num_teacher_layers must be >= 1, got "
                f"{num_student_layers} and {num_teacher_layers}"
            )
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        if not temperature > 0:
            raise ValueError(f"temperature (T_emd) must be > 0, got {temperature}")
        if not 0 < eps < 1.0 / max(num_student_layers, num_teacher_layers):
            raise ValueError(f"eps must be in (0, 1/max(M, N)), got {eps}")
        self.num_student_layers = num_student_layers
        self.num_teacher_layers = num_teacher_layers
        self.normalize = normalize
        self.temperature = float(temperature)
        self.eps = float(eps)
        m, n = num_student_layers, num_teacher_layers
        self.register_buffer("student_weight", torch.full((m,), 1.0 / m, dtype=torch.float64))
        self.register_buffer("teacher_weight", torch.full((n,), 1.0 / n, dtype=torch.float64))

    def extra_repr(self) -> str:
        return (
            f"M={self.num_student_layers}, N={self.num_teacher_layers}, normalize={self.normalize!r}, "
            f"T_emd={self.temperature}, eps={self.eps}"
        )

    def reset(self) -> None:
        """Set both weight vectors back to uniform."""
        with torch.no_grad():
            self.student_weight.fill_(1.0 / self.num_student_layers)
            self.teacher_weight.fill_(1.0 / self.num_teacher_layers)

    @staticmethod
    def contributions(plan: Tensor, cost: Tensor) -> tuple[Tensor, Tensor]:
        """Per-layer transported cost: c^S [M] = sum_j F_ij D_ij, c^T [N] = sum_i F_ij D_ij.

        ``plan`` and ``cost`` are [..., M, N]; leading (per-example) dims are averaged, which is
        the batch-mean contribution used by ``per_sample`` mode. Computed in float64.
        """
        _check_pair(plan, cost)
        return _rule.contributions(plan, cost)

    @torch.no_grad()
    def propose(self, student_contribution: Tensor, teacher_contribution: Tensor) -> tuple[Tensor, Tensor]:
        """The rule up to (not including) the outer step: w_hat, then ``sum``/``softmax(./T_emd)``.

        Args:
            student_contribution: c^S [M] (see :meth:`contributions`), or [F, M]: one row per
                feature (attention, hidden), each proposing from the same current weights.
            teacher_contribution: c^T [N], or [F, N].
        Returns:
            (student [M] or [F, M], teacher [N] or [F, N]) float64 proposals; nothing is stored.
        """
        return _rule.propose(student_contribution, teacher_contribution, self.student_weight, self.teacher_weight,
                             self.normalize, self.temperature)

    @torch.no_grad()
    def finalize(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """Outer step (the second softmax of ``double_softmax``), eps floor, renormalise, store.

        A non-finite proposal (a NaN or Inf cost, e.g. a step that fp16 loss scaling skips)
        leaves both weight vectors unchanged, decided on the device (no host synchronisation).
        """
        return self._store(*_rule.finalize(student, teacher, self.student_weight, self.teacher_weight,
                                           self.normalize, self.eps))

    @torch.no_grad()
    def step(self, plans: Sequence[Tensor], costs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The whole rule for one step of one or more features (attention, hidden) that share
        these weights, in one op: every feature proposes from the current weights, the proposals
        are averaged, then the outer step; stored and returned.

        Args:
            plans: a flow F per feature, [M, N] or [B, M, N] (B problems: their mean contribution),
                all of one shape.
            costs: the costs D solved for, one per plan, same shapes.
        Returns:
            (student_weight [M], teacher_weight [N]), the updated buffers.
        """
        if len(plans) != len(costs) or not plans:
            raise ValueError(f"step needs one cost per plan (at least one), got {len(plans)} plans and "
                             f"{len(costs)} costs")
        for p, c in zip(plans, costs):
            _check_pair(p, c)
            if p.shape != plans[0].shape:
                raise ValueError(f"every feature's plan must have one shape, got {tuple(plans[0].shape)} and "
                                 f"{tuple(p.shape)}")
        plan, cost = (plans[0], costs[0]) if len(plans) == 1 else (torch.stack(list(plans)), torch.stack(list(costs)))
        return self._store(*cost_attention_step(
            plan, cost, self.student_weight, self.teacher_weight, features=len(plans),
            normalize=self.normalize, temperature=self.temperature, eps=self.eps))

    @torch.no_grad()
    def update(self, plan: Tensor, cost: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the full rule to this step's plan and cost, store and return the new weights.

        Args:
            plan: F [M, N] (or [B, M, N]: the batch-mean contribution is used).
            cost: D, same shape as ``plan``.
        Returns:
            (student_weight [M], teacher_weight [N]), the updated buffers.
        """
        return self.step([plan], [cost])

    def _store(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        self.student_weight.copy_(student)
        self.teacher_weight.copy_(teacher)
        return self.student_weight, self.teacher_weight


def _check_pair(plan: Tensor, cost: Tensor) -> None:
    if plan.shape != cost.shape or plan.dim() < 2:
        raise ValueError(
            f"plan and cost must both be [..., M, N] with the same shape, got {tuple(plan.shape)} "
            f"and {tuple(cost.shape)}"
        )
