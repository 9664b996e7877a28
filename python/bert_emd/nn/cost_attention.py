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
Everything runs as tensor ops on the weights' device (no ``.item()``, no host round trip).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["CostAttention", "Normalize"]

Normalize = Literal["sum", "softmax", "double_softmax"]
_NORMALIZE = ("sum", "softmax", "double_softmax")


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
    return torch.where(s > 0, w / torch.where(s > 0, s, 1.0), 0.0)


def _floor(w: Tensor, eps: float) -> Tensor:
    w = w.clamp_min(eps)
    return w / w.sum()


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
        if plan.shape != cost.shape or plan.dim() < 2:
            raise ValueError(
                f"plan and cost must both be [..., M, N] with the same shape, got {tuple(plan.shape)} "
                f"and {tuple(cost.shape)}"
            )
        fd = plan.detach().double() * cost.detach().double()
        cs, ct = fd.sum(-1), fd.sum(-2)
        if fd.dim() > 2:
            cs = cs.reshape(-1, cs.shape[-1]).mean(0)
            ct = ct.reshape(-1, ct.shape[-1]).mean(0)
        return cs, ct

    def _inner(self, w_hat: Tensor) -> Tensor:
        if self.normalize == "sum":
            return _sum_normalize(w_hat)
        return torch.softmax(w_hat / self.temperature, dim=-1)

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
        ws = self.student_weight.double()  # (a module .to(dtype) may have cast the buffers)
        wt = self.teacher_weight.double()
        ps = self._inner(_inverse_cost_ratio(student_contribution.to(ws), ws))
        pt = self._inner(_inverse_cost_ratio(teacher_contribution.to(wt), wt))
        return ps, pt

    @torch.no_grad()
    def finalize(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """Outer step (the second softmax of ``double_softmax``), eps floor, renormalise, store.

        A non-finite proposal (a NaN or Inf cost, e.g. a step that fp16 loss scaling skips)
        leaves both weight vectors unchanged, decided on the device (no host synchronisation).
        """
        if self.normalize == "double_softmax":
            student = torch.softmax(student, dim=-1)
            teacher = torch.softmax(teacher, dim=-1)
        student = _floor(student.double(), self.eps)
        teacher = _floor(teacher.double(), self.eps)
        ok = torch.isfinite(student).all() & torch.isfinite(teacher).all()
        self.student_weight.copy_(torch.where(ok, student, self.student_weight))
        self.teacher_weight.copy_(torch.where(ok, teacher, self.teacher_weight))
        return self.student_weight, self.teacher_weight

    @torch.no_grad()
    def update(self, plan: Tensor, cost: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the full rule to this step's plan and cost, store and return the new weights.

        Args:
            plan: F [M, N] (or [B, M, N]: the batch-mean contribution is used).
            cost: D, same shape as ``plan``.
        Returns:
            (student_weight [M], teacher_weight [N]), the updated buffers.
        """
        return self.finalize(*self.propose(*self.contributions(plan, cost)))
