"""One multi-task distillation step: the student on every task batch of the step, each task's
teacher, then the multi-task EMD loss (one batched solve for all of them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from .loss import QK, MultiTaskEMDLoss, TaskDistillInput
from .model import MultiTaskModel
from .teachers import TeacherSet

__all__ = ["distillation_step"]


def distillation_step(
    student: MultiTaskModel,
    teachers: TeacherSet,
    loss_fn: MultiTaskEMDLoss,
    batches: Sequence[Mapping[str, Any]],
    *,
    progress: float = 0.0,
    teacher_context: Callable[[], AbstractContextManager[Any]] | None = None,
) -> tuple[Tensor, dict[str, Tensor], list[Any]]:
    """One multi-task distillation step: student and teacher on every task batch, then the loss
    (one batched EMD solve for all of them), then -- with ``hierarchy_mode="emd"`` -- the student's
    layer mixtures set to each task's new EMD student-layer weights.

    With ``attention_source="scores"`` or ``fused_attention`` the loss must be hooked
    (:meth:`MultiTaskEMDLoss.from_models` / :meth:`~MultiTaskEMDLoss.attach`): each batch's
    queries and keys go to the loss and no model is asked for attention maps.

    Args:
        student: the multi-task student.
        teachers: the teachers (run under ``no_grad``).
        loss_fn: the multi-task EMD loss.
        batches: task batches, each a mapping with ``task`` (name or index), ``input_ids``,
            ``attention_mask``, optional ``token_type_ids`` and ``labels``.
        progress: training progress in [0, 1] (teacher annealing).
        teacher_context: a context for the teachers' forwards (the trainer's mixed-precision
            autocast); the loss itself runs outside it, in fp32, as the single-task loss does.
    Returns:
        (loss [], parts, the student's outputs per batch).
    """
    want_att = loss_fn.wants_attention_maps  # only the unfused "probs" term reads maps
    hooked = loss_fn.needs_hooks  # "scores" / fused: queries and keys from the hooks instead
    tasks = [student.task_names[student.task_index(b["task"])] for b in batches]
    feeds = [{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if b.get(k) is not None}
             for b in batches]
    # the student on all task batches in one call: a DDP-wrapped student allows one forward per backward
    outs = list(student([{"task": t, **f} for t, f in zip(tasks, feeds)], output_attentions=want_att))
    s_qk: Sequence[Sequence[QK] | None] = loss_fn.student_queries_keys(len(outs)) if hooked else [None] * len(outs)
    items = []
    for task, f, b, s_out, qk in zip(tasks, feeds, batches, outs, s_qk):
        with torch.no_grad(), (teacher_context() if teacher_context is not None else nullcontext()):
            t_out = teachers(task, f, output_attentions=want_att)
        # read now: the teacher's next call (another task batch) replaces its captures
        t_qk = loss_fn.teacher_queries_keys(task) if hooked else None
        items.append(TaskDistillInput(task, s_out, t_out, b.get("labels"), b.get("attention_mask"), qk, t_qk))
    loss, parts = loss_fn(items, progress=progress)
    if student.mechanisms.hierarchy and student.mechanisms.hierarchy_mode == "emd":
        for name in {i.task for i in items}:
            student.set_emd_layer_weights(name, loss_fn.cost_attention[name].student_weight)
    return loss, parts, outs
