"""Multi-task BERT-EMD loss: per-task teachers (or one multi-task teacher) into one student with
per-task heads, on the loss core of :mod:`bert_emd.nn.emd_terms`.

Per step, for every task batch k the step carries (task t_k):

- hidden costs D^H_k [M, N_t] = MSE(W_g h^S_i, h^T_j) over the M student and N_t teacher
  transformer layers (W_g: one Linear(d_S -> d_T) per teacher, shared by the tasks of a
  multi-task teacher); attention costs D^A_k [M, N_t] over the attention maps (post-softmax
  ``"probs"`` from ``output_attentions``, or pre-softmax ``"scores"`` from query/key hooks), or,
  with ``fused_attention``, straight from the hooked queries and keys with
  :func:`bert_emd.attention_costs` (no [B, H, L, L] map, both models may keep SDPA attention);
- all these transport problems (2 per task batch, or 1 with one feature off) are solved in
  **one** batched :func:`bert_emd.emd` call: the costs are stacked into [K, M, N_max], teachers
  with fewer layers padded with zero-weight columns (a zero-weight column carries no flow, so
  the padded problem has the same optimum as the unpadded one);
- each task has its own :class:`~bert_emd.nn.CostAttention` (tasks need different teacher
  layers): its student and teacher weights are the marginals of its problems and are updated
  from its plans and costs after the step (attention and hidden proposals averaged, as
  :class:`~bert_emd.nn.BertEMDLoss` with shared weights);
- task loss = loss_weight_t * (beta * (theta * (L_attn + L_hidden) + L_emb) + L_pred) + the
  student's mechanism losses (orthogonality, adversarial), with
  L_pred = (1 - g) * soft + g * gold; g is ``gold_weight``, or rises linearly from 0 to 1 over
  training with ``teacher_annealing`` (Clark et al., 2019, "BAM!");
- the step's loss is the mean of its task losses.

In a distributed run the stacked cost matrices are averaged over ranks before solving, so every
rank keeps identical layer weights; this requires every rank to process the same tasks in the
same order in a step, which :class:`~bert_emd.mtl.samplers.MultiTaskBatchSampler` guarantees
(one task sequence for all ranks, each rank a slice of every task batch). The projections'
gradients are averaged over ranks in backward (the loss is outside the student's DDP wrapper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.config import EMDLossConfig
from ..nn.cost_attention import CostAttention
from ..nn.distributed import all_reduce_mean
from ..nn.emd_terms import (
    EMDTerms,
    feature_costs,
    get_output,
    make_projection,
    masked_mse,
    solve_plans,
)
from .config import TaskSpec
from .model import encoder_sizes

if TYPE_CHECKING:
    from .teachers import TeacherSet

__all__ = ["MultiTaskEMDLoss", "TaskDistillInput"]

QK = tuple[Tensor, Tensor]
TERMS = ("attention", "hidden", "embedding", "prediction")


@dataclass
class TaskDistillInput:
    """One task batch of a distillation step.

    Attributes:
        task: the task name.
        student: the student's outputs (``hidden_states`` M + 1 x [B, L, d_S], ``attentions``
            M x [B, H, L, L] when ``"probs"`` maps are distilled, ``logits``, optional
            ``aux_loss`` []).
        teacher: the teacher's outputs (``hidden_states`` N_t + 1 x [B, L, d_T], ``attentions``,
            ``logits``), computed without gradient.
        labels: gold labels [B] (or [B, L] tags, -100 ignored), or None.
        attention_mask: [B, L] (1 = real token).
        student_qk, teacher_qk: with ``attention_source="scores"`` or ``fused_attention``, the
            per-layer (query, key) pairs [B, H, L, d_head] of this batch (M and N_t of them), as
            :func:`~bert_emd.mtl.step.distillation_step` reads them from the hooks of
            :meth:`MultiTaskEMDLoss.attach`.
    """

    task: str
    student: Any
    teacher: Any
    labels: Tensor | None = None
    attention_mask: Tensor | None = None
    student_qk: Sequence[QK] | None = None
    teacher_qk: Sequence[QK] | None = None


class MultiTaskEMDLoss(EMDTerms):
    """BERT-EMD for several tasks at once (see the module docstring).

    The hyper-parameters are an :class:`~bert_emd.nn.EMDLossConfig` (``config=``, as the YAML
    ``distillation:`` section builds it), or its fields as keyword arguments, which replace those
    of ``config`` when both are given -- the same object and defaults as
    :class:`~bert_emd.nn.BertEMDLoss`. ``gold_weight`` is g, the share of the gold-label loss in
    L_pred (soft term: 1 - g).

    Args:
        tasks: the task specs (type and loss weight are read from them).
        num_student_layers: M.
        student_hidden_size: d_S.
        teacher_layers: ``{task: N_t}``.
        teacher_hidden_sizes: ``{task: d_T}``.
        config: the hyper-parameters (default: ``EMDLossConfig()``).
        teacher_groups: ``{task: key}``; tasks with the same key share one teacher and hence one
            projection W (default: every task its own).
        teacher_annealing: g = training progress (0 -> 1) instead of ``gold_weight``.
        **options: :class:`~bert_emd.nn.EMDLossConfig` fields (``beta``, ``gold_weight``,
            ``attention_source``, ``fused_attention``, ...). ``attention_source="scores"`` and
            ``fused_attention=True`` need the hooks (:meth:`from_models` or :meth:`attach`).
    """

    mapping = "emd"
    _build_hint = ("build the loss with MultiTaskEMDLoss.from_models(tasks, student, teachers, ...) or call "
                   "loss.attach(student, teachers)")

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        num_student_layers: int,
        student_hidden_size: int,
        teacher_layers: Mapping[str, int],
        teacher_hidden_sizes: Mapping[str, int],
        *,
        config: EMDLossConfig | None = None,
        teacher_groups: Mapping[str, str] | None = None,
        teacher_annealing: bool = False,
        **options: Any,
    ) -> None:
        cfg = EMDLossConfig.from_options(config, **options)
        super().__init__(cfg)
        self._teacher_keys: dict[str, str] = {}
        self.teacher_annealing = bool(teacher_annealing)
        self.specs = {t.name: t for t in tasks}
        for name in self.specs:
            if name not in teacher_layers or name not in teacher_hidden_sizes:
                raise ValueError(f"task {name!r}: no teacher layer count / hidden size given")
        self.num_student_layers = int(num_student_layers)
        self.teacher_layers = {k: int(v) for k, v in teacher_layers.items()}
        self.cost_attention = nn.ModuleDict(
            {
                name: CostAttention(self.num_student_layers, self.teacher_layers[name], normalize=cfg.normalize,
                                    temperature=cfg.T_emd, eps=cfg.eps)
                for name in self.specs
            }
        )
        groups = dict(teacher_groups or {name: name for name in self.specs})
        self.groups = {name: str(groups.get(name, name)) for name in self.specs}
        self.projections = nn.ModuleDict()
        for name in self.specs:
            key = self.groups[name]
            d_t = int(teacher_hidden_sizes[name])
            if key in self.projections:
                if self.projections[key].out_features != d_t:
                    raise ValueError(f"tasks of teacher group {key!r} have different teacher hidden sizes")
                continue
            # with sync_projection_grads, averaged over the ranks in backward: the projections live
            # outside the student's DDP wrapper (tests/mtl/test_mtl_ddp.py)
            self.projections[key] = make_projection(student_hidden_size, d_t, sync_grads=cfg.sync_projection_grads)
        self.last: dict[str, dict[str, Tensor]] = {}
        self.emd_calls = 0

    # ------------------------------------------------------------------ construction / hooks
    @classmethod
    def from_models(
        cls, tasks: Sequence[TaskSpec], student: nn.Module, teachers: TeacherSet, **kwargs: Any
    ) -> MultiTaskEMDLoss:
        """Build from the student (a :class:`~bert_emd.mtl.MultiTaskModel`) and the teachers
        (layer counts, hidden sizes and teacher groups read from them) and, with
        ``attention_source="scores"`` or ``fused_attention=True``, attach the query/key hooks to
        both."""
        m, d_s = encoder_sizes(getattr(student, "module", student))
        sizes = {t.name: teachers.sizes(t.name) for t in tasks}
        kwargs.setdefault("teacher_groups", teachers.groups)
        loss = cls(tasks, m, d_s, {t: v[0] for t, v in sizes.items()}, {t: v[1] for t, v in sizes.items()}, **kwargs)
        if loss.needs_hooks:
            loss.attach(student, teachers)
        return loss

    def attach(self, student: nn.Module, teachers: TeacherSet) -> None:
        """Hook the query/key projections of the student and of every teacher
        (``attention_source="scores"`` or ``fused_attention=True``)."""
        self._hook({"student": student, **{f"teacher/{key}": model for key, model in teachers.models.items()}})
        self._teacher_keys = teachers.groups

    def detach_models(self) -> None:
        """Remove the query/key hooks, if any."""
        super().detach_models()
        self._teacher_keys = {}

    def student_queries_keys(self, num_batches: int) -> list[list[QK]]:
        """The hooked student's (query, key) pairs of its last forward, split into the
        ``num_batches`` task batches it ran (in order, one list of M pairs each)."""
        cap = self._captures.get("student")
        if cap is None:
            raise self._hook_error()
        qk = cap.queries_keys()
        if num_batches < 1 or len(qk) % num_batches:
            raise ValueError(f"the student captured {len(qk)} attention calls, not a multiple of {num_batches} "
                             "task batches")
        per = len(qk) // num_batches
        return [qk[i * per:(i + 1) * per] for i in range(num_batches)]

    def teacher_queries_keys(self, task: str) -> list[QK]:
        """The (query, key) pairs of the last forward of ``task``'s hooked teacher."""
        if not self._captures:
            raise self._hook_error()
        cap = self._captures.get(f"teacher/{self._teacher_keys.get(task)}")
        if cap is None:
            raise KeyError(f"task {task!r}: its teacher is not hooked (hooked teachers serve "
                           f"{sorted(self._teacher_keys)}); call loss.attach(student, teachers) again")
        return cap.queries_keys()

    # ------------------------------------------------------------------ helpers
    def task_layer_weights(self) -> dict[str, dict[str, Tensor]]:
        """``{task: {"student": [M], "teacher": [N_t]}}``, the current EMD layer weights.

        (Not called ``layer_weights``: single-task code reads that attribute as one
        :class:`~bert_emd.nn.CostAttention`.)"""
        return {
            name: {"student": ca.student_weight.detach().cpu(), "teacher": ca.teacher_weight.detach().cpu()}
            for name, ca in self.cost_attention.items()
        }

    def gold_share(self, progress: float) -> float:
        """g, the gold-label weight of L_pred at training progress in [0, 1]."""
        if self.teacher_annealing:
            return min(max(float(progress), 0.0), 1.0)
        return self.gold_weight

    # ------------------------------------------------------------------ forward
    def forward(self, items: Sequence[TaskDistillInput], progress: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        """The step's loss over its task batches.

        Args:
            items: one :class:`TaskDistillInput` per task batch of the step.
            progress: training progress in [0, 1] (teacher annealing).
        Returns:
            (loss [] fp32, parts): detached ``attention``, ``hidden``, ``embedding``,
            ``prediction``, ``aux`` (means over the items) and ``<task>/<part>`` per task.
        """
        if not items:
            raise ValueError("MultiTaskEMDLoss: a step needs at least one task batch")
        m = self.num_student_layers
        g = self.gold_share(progress)
        problems: list[tuple[int, str, str, Tensor]] = []  # (item index, task, feature, D [M, N_t])
        per_item: list[dict[str, Tensor]] = []
        for idx, item in enumerate(items):
            if item.task not in self.specs:
                raise KeyError(f"unknown task {item.task!r}; tasks are {list(self.specs)}")
            spec = self.specs[item.task]
            where = f"task {item.task!r}: "
            n = self.teacher_layers[item.task]
            mask = item.attention_mask if self.token_mask else None
            parts: dict[str, Tensor] = {}
            if self.use_hidden or self.use_embedding:
                lin = self.projections[self.groups[item.task]]
                emb_s, layers_s, hs_t = self.hidden_inputs(item.student, item.teacher, m, n, lin, where)
                if layers_s is not None:
                    d = feature_costs(layers_s, hs_t[1:], mask=mask, backend=self._backend)
                    problems.append((idx, item.task, "hidden", d))
                if emb_s is not None:
                    parts["embedding"] = masked_mse(emb_s, hs_t[0], mask)
            if self.use_attention:
                att_s, att_t = self.attention_inputs(
                    item.student, item.teacher, m, n, student_qk=item.student_qk, teacher_qk=item.teacher_qk,
                    attention_mask=item.attention_mask, where=where,
                )
                fused = self.attention_source if self.fused_attention else None
                d = feature_costs(att_s, att_t, fused=fused, mask=mask, attention_mask=item.attention_mask,
                                  attention_floor=self.attention_floor, backend=self._backend)
                problems.append((idx, item.task, "attention", d))
            if self.use_prediction:
                kind = "tagging" if spec.is_tagging else "regression" if spec.is_regression else "classification"
                parts["prediction"], _, _ = self.prediction_term(
                    item.student, item.teacher, item.labels, gold_weight=g, task=kind,
                    attention_mask=item.attention_mask, where=where,
                )
            per_item.append(parts)

        plans = self._solve(problems) if problems else []
        for (idx, _task, feature, d), plan in zip(problems, plans):
            per_item[idx][feature] = (plan.to(d.dtype) * d).sum()

        total = None
        summary: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for item, parts in zip(items, per_item):
            spec = self.specs[item.task]
            zero = next(iter(parts.values())).new_zeros(()) if parts else torch.zeros(())
            att, hid, emb, pred = (parts.get(k, zero).float() for k in TERMS)
            aux = get_output(item.student, "aux_loss")
            aux = zero.float() if aux is None else aux.float()
            task_total = spec.loss_weight * self.combine(att, hid, emb, pred) + aux
            total = task_total if total is None else total + task_total
            for k, v in (("attention", att), ("hidden", hid), ("embedding", emb), ("prediction", pred), ("aux", aux)):
                summary[k] = summary.get(k, 0.0) + v.detach()
                summary[f"{item.task}/{k}"] = summary.get(f"{item.task}/{k}", 0.0) + v.detach()
            summary[f"{item.task}/total"] = summary.get(f"{item.task}/total", 0.0) + task_total.detach()
            counts[item.task] = counts.get(item.task, 0) + 1
        assert total is not None
        k = len(items)
        out = {key: v / (counts[key.split("/")[0]] if "/" in key else k) for key, v in summary.items()}
        out["gold_weight"] = torch.tensor(g)
        if self.update_weights and problems:
            self._update(problems, plans)
        return total / k, out

    def _solve(self, problems: list[tuple[int, str, str, Tensor]]) -> list[Tensor]:
        """Solve every problem of the step in one batched EMD call; plans [M, N_t] each."""
        n_max = max(d.shape[-1] for *_, d in problems)
        costs, a, b = [], [], []
        for _, task, _, d in problems:
            ca = self.cost_attention[task]
            n = d.shape[-1]
            costs.append(F.pad(d.detach().double(), (0, n_max - n)))
            a.append(ca.student_weight.double())
            b.append(F.pad(ca.teacher_weight.double(), (0, n_max - n)))
        # every rank solves the problems of the global batch (same tasks in the same order)
        cost = all_reduce_mean(torch.stack(costs))  # [K, M, N_max]
        plan = solve_plans(cost, torch.stack(a).to(cost.device), torch.stack(b).to(cost.device),
                           backend=self._backend("emd"), match_mass=True)
        self.emd_calls += 1
        plans = []
        self.last = {}
        for k, (_, task, feature, d) in enumerate(problems):
            n = d.shape[-1]
            plans.append(plan[k, :, :n])
            self.last.setdefault(task, {})[f"{feature}_plan"] = plan[k, :, :n].detach()
            self.last[task][f"{feature}_cost"] = cost[k, :, :n].detach()
        return plans

    @torch.no_grad()
    def _update(self, problems: list[tuple[int, str, str, Tensor]], plans: list[Tensor]) -> None:
        """Per task: proposals of all its problems in this step averaged, then the outer step."""
        steps: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        for (_, task, feature, _), plan in zip(problems, plans):
            ps, cs = steps.setdefault(task, ([], []))
            ps.append(plan)
            cs.append(self.last[task][f"{feature}_cost"])
        for task, (ps, cs) in steps.items():
            self.cost_attention[task].step(ps, cs)  # the whole rule in one op
