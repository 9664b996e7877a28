"""Multi-task BERT-EMD distillation: per-task teachers (or one multi-task teacher) into one
student with per-task heads.

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

import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distill.hooks import AttentionScoreCapture, scores_of
from ..nn.bert_emd_loss import _average_grad_over_ranks, prediction_loss
from ..nn.cost_attention import CostAttention
from ..nn.layer_emd_loss import _all_reduce_mean
from ..ops.attention_costs import attention_costs
from ..ops.emd import emd
from ..ops.layer_costs import layer_costs
from .model import MultiTaskModel, encoder_sizes
from .tasks import TaskSpec

__all__ = ["MultiTaskEMDLoss", "TaskDistillInput", "TeacherSet", "distillation_step", "load_teachers"]

FEATURES = ("attention", "hidden")
QK = tuple[Tensor, Tensor]
AttentionSource = Literal["probs", "scores"]
_AUTO = "auto"


def _get(outputs: Any, name: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


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
            :func:`distillation_step` reads them from the hooks of :meth:`MultiTaskEMDLoss.attach`.
    """

    task: str
    student: Any
    teacher: Any
    labels: Tensor | None = None
    attention_mask: Tensor | None = None
    student_qk: Sequence[QK] | None = None
    teacher_qk: Sequence[QK] | None = None


class MultiTaskEMDLoss(nn.Module):
    """BERT-EMD for several tasks at once (see the module docstring).

    Args:
        tasks: the task specs (type and loss weight are read from them).
        num_student_layers: M.
        student_hidden_size: d_S.
        teacher_layers: ``{task: N_t}``.
        teacher_hidden_sizes: ``{task: d_T}``.
        teacher_groups: ``{task: key}``; tasks with the same key share one teacher and hence one
            projection W (default: every task its own).
        beta, theta, T_emd, temperature: as :class:`~bert_emd.nn.BertEMDLoss`.
        gold_weight: weight g of the gold-label loss in L_pred (soft term: 1 - g).
        teacher_annealing: g = training progress (0 -> 1) instead of ``gold_weight``.
        normalize: cost-attention normalisation (``"sum"``, ``"softmax"``, ``"double_softmax"``).
        use_attention, use_hidden, use_embedding, use_prediction: switch terms on or off.
        attention_source: ``"probs"`` (the models' post-softmax maps: ``output_attentions`` and
            eager attention) or ``"scores"`` (pre-softmax, from query/key hooks: :meth:`attach`
            or :meth:`from_models`), as :class:`~bert_emd.nn.BertEMDLoss`.
        attention_floor: entries <= floor are zeroed before the attention costs; ``"auto"``:
            -100 for scores (the original), None for probs.
        fused_attention: compute the attention costs from the hooked queries and keys with
            ``bert_emd.attention_costs`` (either source), never materialising a [B, H, L, L] map:
            no ``output_attentions``, and both models may run SDPA / flash attention. Needs the
            hooks (:meth:`from_models` or :meth:`attach`); ``"probs"`` are then the softmax
            before attention dropout, as :class:`~bert_emd.nn.BertEMDLoss`.
        token_mask: average hidden / embedding costs over real tokens only.
        update_weights: apply the cost-attention updates in :meth:`forward`.
        sync_projection_grads: in distributed runs, average the projections' gradients over the
            ranks in backward (as :class:`~bert_emd.nn.BertEMDLoss`: the loss is not part of the
            student's DDP wrapper).
        eps: floor of the layer weights.
        backend: backend of ``layer_costs`` and ``emd`` (a string, or ``{"emd": ..., "layer_costs": ...}``).
    """

    mapping = "emd"

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        num_student_layers: int,
        student_hidden_size: int,
        teacher_layers: Mapping[str, int],
        teacher_hidden_sizes: Mapping[str, int],
        *,
        teacher_groups: Mapping[str, str] | None = None,
        beta: float = 0.001,
        theta: float = 1.0,
        T_emd: float = 1.0,
        temperature: float = 1.0,
        gold_weight: float = 0.2,
        teacher_annealing: bool = False,
        normalize: str = "double_softmax",
        use_attention: bool = True,
        use_hidden: bool = True,
        use_embedding: bool = True,
        use_prediction: bool = True,
        attention_source: AttentionSource = "probs",
        attention_floor: float | None | str = _AUTO,
        fused_attention: bool = False,
        token_mask: bool = False,
        update_weights: bool = True,
        sync_projection_grads: bool = True,
        eps: float = 1e-6,
        backend: str | dict[str, str] = "auto",
    ) -> None:
        super().__init__()
        if attention_source not in ("probs", "scores"):
            raise ValueError(f"attention_source must be 'probs' or 'scores', got {attention_source!r}")
        if not (use_attention or use_hidden or use_embedding or use_prediction):
            raise ValueError("all loss terms are switched off")
        if attention_floor == _AUTO:
            attention_floor = -100.0 if attention_source == "scores" else None
        self.attention_source, self.fused_attention = attention_source, bool(fused_attention)
        self.attention_floor = attention_floor
        self._captures: dict[str, AttentionScoreCapture] = {}
        self._teacher_keys: dict[str, str] = {}
        if not 0 <= gold_weight <= 1:
            raise ValueError(f"gold_weight must be in [0, 1], got {gold_weight}")
        self.specs = {t.name: t for t in tasks}
        for name in self.specs:
            if name not in teacher_layers or name not in teacher_hidden_sizes:
                raise ValueError(f"task {name!r}: no teacher layer count / hidden size given")
        self.num_student_layers = int(num_student_layers)
        self.beta, self.theta, self.temperature = float(beta), float(theta), float(temperature)
        self.gold_weight, self.teacher_annealing = float(gold_weight), bool(teacher_annealing)
        self.use_attention, self.use_hidden = use_attention, use_hidden
        self.use_embedding, self.use_prediction = use_embedding, use_prediction
        self.token_mask, self.update_weights, self.backend = token_mask, update_weights, backend
        self.teacher_layers = {k: int(v) for k, v in teacher_layers.items()}
        self.cost_attention = nn.ModuleDict(
            {
                name: CostAttention(
                    self.num_student_layers, self.teacher_layers[name], normalize=normalize, temperature=T_emd, eps=eps
                )
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
            lin = nn.Linear(int(student_hidden_size), d_t)
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
            if sync_projection_grads:
                # The projections live in the loss, outside the student's DDP wrapper, so DDP never
                # averages their gradients: without this hook each rank stepped W with the gradient of
                # its own share of the batch, the ranks' W drifted apart (and from one process with the
                # whole batch), and with them the costs, plans, layer weights and the student's
                # gradients (tests/test_mtl_ddp.py). No-op in one process.
                for p in lin.parameters():
                    p.register_hook(_average_grad_over_ranks)
            self.projections[key] = lin
        self.last: dict[str, dict[str, Tensor]] = {}
        self.emd_calls = 0

    # ------------------------------------------------------------------ construction / hooks
    @classmethod
    def from_models(
        cls, tasks: Sequence[TaskSpec], student: nn.Module, teachers: TeacherSet, **kwargs: Any
    ) -> MultiTaskEMDLoss:
        """Build from the student (a :class:`MultiTaskModel`) and the teachers (layer counts,
        hidden sizes and teacher groups read from them) and, with ``attention_source="scores"``
        or ``fused_attention=True``, attach the query/key hooks to both."""
        plain = getattr(student, "module", student)
        m, d_s = _sizes(plain)
        sizes = {t.name: teachers.sizes(t.name) for t in tasks}
        kwargs.setdefault("teacher_groups", teachers.groups)
        loss = cls(tasks, m, d_s, {t: v[0] for t, v in sizes.items()}, {t: v[1] for t, v in sizes.items()}, **kwargs)
        if loss.needs_hooks:
            loss.attach(student, teachers)
        return loss

    @property
    def needs_hooks(self) -> bool:
        """Whether the attention term reads hooked queries and keys (``"scores"`` or fused)."""
        return self.use_attention and (self.attention_source == "scores" or self.fused_attention)

    @property
    def wants_attention_maps(self) -> bool:
        """Whether the models must return attention maps (``output_attentions``, eager attention):
        only the unfused ``"probs"`` attention term reads them."""
        return self.use_attention and self.attention_source == "probs" and not self.fused_attention

    def attach(self, student: nn.Module, teachers: TeacherSet) -> None:
        """Hook the query/key projections of the student and of every teacher
        (``attention_source="scores"`` or ``fused_attention=True``)."""
        self.detach_models()
        captures = {"student": AttentionScoreCapture(student)}
        for key, model in teachers.models.items():
            captures[f"teacher/{key}"] = AttentionScoreCapture(model)
        self._captures, self._teacher_keys = captures, teachers.groups

    def detach_models(self) -> None:
        """Remove the query/key hooks, if any."""
        for cap in self._captures.values():
            cap.remove()
        self._captures, self._teacher_keys = {}, {}

    def _hook_error(self) -> RuntimeError:
        what = "fused_attention=True" if self.fused_attention else "attention_source='scores'"
        return RuntimeError(
            f"{what} needs the models hooked: build the loss with MultiTaskEMDLoss.from_models(tasks, student, "
            "teachers, ...) or call loss.attach(student, teachers)"
        )

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
    def _backend(self, op: str) -> str:
        return self.backend if isinstance(self.backend, str) else self.backend.get(op, "auto")

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

    def _hidden(self, outputs: Any, who: str, task: str, expected: int) -> Sequence[Tensor]:
        hs = _get(outputs, "hidden_states")
        if hs is None or len(hs) != expected + 1:
            got = None if hs is None else len(hs)
            raise ValueError(
                f"task {task!r}: the {who} returned {got} hidden states, expected {expected + 1} (embeddings + "
                f"{expected} layers; call it with output_hidden_states=True)"
            )
        return hs

    def _attentions(self, outputs: Any, who: str, task: str, expected: int) -> Sequence[Tensor]:
        att = _get(outputs, "attentions")
        if att is None or len(att) != expected or any(a is None for a in att):
            raise ValueError(
                f"task {task!r}: the {who} returned no (or not {expected}) attention maps: call it with "
                'output_attentions=True and load it with attn_implementation="eager", use '
                "fused_attention=True (queries and keys from hooks, any attention implementation), "
                "or set use_attention=False"
            )
        return att

    def _queries_keys(self, item: TaskDistillInput, who: str, expected: int) -> Sequence[QK]:
        qk = item.student_qk if who == "student" else item.teacher_qk
        if qk is None:
            raise self._hook_error()
        if len(qk) != expected:
            raise ValueError(
                f"task {item.task!r}: the {who} has {len(qk)} attention layers, expected {expected} (one per layer)"
            )
        return qk

    def _attention_costs(self, item: TaskDistillInput, m: int, n: int, mask: Tensor | None) -> Tensor:
        """D^A [M, N_t] of one task batch, from the maps or the hooked queries and keys."""
        if self.needs_hooks:
            qk_s = self._queries_keys(item, "student", m)
            qk_t = [(q.detach(), k.detach()) for q, k in self._queries_keys(item, "teacher", n)]
            if self.fused_attention:
                # the shapes of the maps never formed, [B, H, L, L]: heads and lengths must agree
                (q_s, _), (q_t, _) = qk_s[0], qk_t[0]
                map_s, map_t = (*q_s.shape[:3], q_s.shape[2]), (*q_t.shape[:3], q_t.shape[2])
                if map_s != map_t:
                    self._attention_mismatch(item.task, map_s, map_t)
                return attention_costs(
                    list(qk_s), qk_t, mask=mask, attention_mask=item.attention_mask, source=self.attention_source,
                    attention_floor=self.attention_floor, backend=self._backend("attention_costs"),
                )
            a_s, a_t = scores_of(qk_s, item.attention_mask), scores_of(qk_t, item.attention_mask)
        else:
            a_s = list(self._attentions(item.student, "student", item.task, m))
            a_t = [a.detach() for a in self._attentions(item.teacher, "teacher", item.task, n)]
        if a_s[0].shape != a_t[0].shape:
            self._attention_mismatch(item.task, tuple(a_s[0].shape), tuple(a_t[0].shape))
        return layer_costs(a_s, a_t, mask=mask, attention_floor=self.attention_floor,
                           backend=self._backend("layer_costs"))

    @staticmethod
    def _attention_mismatch(task: str, s: tuple, t: tuple) -> None:
        raise ValueError(
            f"task {task!r}: student attention {s} and teacher attention {t} differ (BERT-EMD compares head by "
            "head: equal head counts needed; set use_attention=False otherwise)"
        )

    def _prediction(self, spec: TaskSpec, item: TaskDistillInput, g: float) -> Tensor:
        s, t = _get(item.student, "logits"), _get(item.teacher, "logits")
        if s is None or t is None:
            raise ValueError(f"task {spec.name!r}: use_prediction needs logits from the student and the teacher")
        if s.shape != t.shape:
            raise ValueError(
                f"task {spec.name!r}: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ "
                "(the teacher must have the task's label set)"
            )
        labels = item.labels
        kind = "regression" if spec.is_regression else "classification"
        if spec.is_tagging:
            return self._tagging_prediction(s, t, labels, item.attention_mask, g)
        loss, _, _ = prediction_loss(s, t, labels, temperature=self.temperature, alpha=1.0 - g, task=kind)
        return loss

    def _tagging_prediction(self, s: Tensor, t: Tensor, labels: Tensor | None, attention_mask: Tensor | None,
                            g: float) -> Tensor:
        """``prediction_loss`` over the tokens that count (labelled ones; without labels, the real
        ones) of logits [B, L, C] and labels [B, L] (-100: none), one row per token, the others
        weighted 0 rather than indexed away (no host read on a GPU); 0 without a token that counts."""
        if labels is not None:
            keep = labels != -100
        elif attention_mask is not None:
            keep = attention_mask.bool()
        else:
            keep = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
        C = s.shape[-1]
        loss, _, _ = prediction_loss(s.reshape(-1, C), t.reshape(-1, C), None if labels is None else labels.reshape(-1),
                                     temperature=self.temperature, alpha=1.0 - g, task="classification",
                                     weight=keep.reshape(-1))
        return loss

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
            n = self.teacher_layers[item.task]
            mask = item.attention_mask if self.token_mask else None
            parts: dict[str, Tensor] = {}
            if self.use_hidden or self.use_embedding:
                hs_s = self._hidden(item.student, "student", item.task, m)
                hs_t = [h.detach() for h in self._hidden(item.teacher, "teacher", item.task, n)]
                if hs_s[0].shape[:-1] != hs_t[0].shape[:-1]:
                    raise ValueError(
                        f"task {item.task!r}: student hidden states {tuple(hs_s[0].shape)} and teacher "
                        f"{tuple(hs_t[0].shape)} differ in batch or sequence length"
                    )
                lin = self.projections[self.groups[item.task]]

                def proj(h: Tensor, lin: nn.Linear = lin) -> Tensor:  # bf16/fp16 states meet fp32 weights
                    return lin(h.to(lin.weight.dtype))

                if self.use_hidden:
                    d = layer_costs(
                        [proj(h) for h in hs_s[1:]], hs_t[1:], mask=mask, backend=self._backend("layer_costs")
                    )
                    problems.append((idx, item.task, "hidden", d))
                if self.use_embedding:
                    e = proj(hs_s[0]).float()
                    if mask is None:
                        parts["embedding"] = F.mse_loss(e, hs_t[0].float())
                    else:
                        w = mask.float()[..., None]
                        se = ((e - hs_t[0].float()) ** 2 * w).sum()
                        parts["embedding"] = se / (w.sum() * e.shape[-1]).clamp_min(1.0)
            if self.use_attention:
                d = self._attention_costs(item, m, n, mask)
                problems.append((idx, item.task, "attention", d))
            if self.use_prediction:
                parts["prediction"] = self._prediction(self.specs[item.task], item, g)
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
            att = parts.get("attention", zero).float()
            hid = parts.get("hidden", zero).float()
            emb = parts.get("embedding", zero).float()
            pred = parts.get("prediction", zero).float()
            aux = _get(item.student, "aux_loss")
            aux = zero.float() if aux is None else aux.float()
            task_total = spec.loss_weight * (self.beta * (self.theta * (att + hid) + emb) + pred) + aux
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
        m = self.num_student_layers
        n_max = max(d.shape[-1] for *_, d in problems)
        costs, a, b = [], [], []
        for _, task, _, d in problems:
            ca = self.cost_attention[task]
            n = d.shape[-1]
            costs.append(F.pad(d.detach().double(), (0, n_max - n)))
            a.append(ca.student_weight.double())
            b.append(F.pad(ca.teacher_weight.double(), (0, n_max - n)))
        cost = torch.stack(costs)  # [K, M, N_max]
        # every rank solves the problems of the global batch (same tasks in the same order)
        cost = _all_reduce_mean(cost)
        a_t = torch.stack(a).to(cost.device)
        b_t = torch.stack(b).to(cost.device)
        # renormalise b to a's mass exactly (the floors keep both at 1 up to rounding)
        b_t = b_t * (a_t.sum(-1, keepdim=True) / b_t.sum(-1, keepdim=True))
        res = emd(cost, a_t, b_t, backend=self._backend("emd"), validate=cost.device.type == "cpu")
        self.emd_calls += 1
        plans = []
        self.last = {}
        for k, (_, task, feature, d) in enumerate(problems):
            n = d.shape[-1]
            plan = res.plan[k, :, :n]
            plans.append(plan)
            self.last.setdefault(task, {})[f"{feature}_plan"] = plan.detach()
            self.last[task][f"{feature}_cost"] = cost[k, :, :n].detach()
        assert cost.shape[1] == m
        return plans

    @torch.no_grad()
    def _update(self, problems: list[tuple[int, str, str, Tensor]], plans: list[Tensor]) -> None:
        """Per task: proposals of all its problems in this step averaged, then the outer step."""
        props: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for (_, task, feature, _), plan in zip(problems, plans):
            ca = self.cost_attention[task]
            cost = self.last[task][f"{feature}_cost"]
            props.setdefault(task, []).append(ca.propose(*CostAttention.contributions(plan, cost)))
        for task, ps in props.items():
            ca = self.cost_attention[task]
            ca.finalize(torch.stack([p[0] for p in ps]).mean(0), torch.stack([p[1] for p in ps]).mean(0))


# ----------------------------------------------------------------------------- teachers
def _sizes(model: nn.Module) -> tuple[int, int]:
    if isinstance(model, MultiTaskModel):
        return model.num_layers, model.hidden_size
    return encoder_sizes(model)


class TeacherSet(nn.Module):
    """The teachers of multi-task distillation: one per task, or one multi-task teacher.

    Args:
        teachers: ``{task: model}``; a model is a Hugging Face ``*ForSequenceClassification`` /
            ``*ForTokenClassification`` model (or anything called as one, returning
            ``hidden_states``, ``attentions`` and ``logits``), or a :class:`MultiTaskModel`
            (called with the task). The same object may serve several tasks.
        multitask: one :class:`MultiTaskModel` teaching every task (instead of ``teachers``).

    Teachers are frozen by the trainer (eval mode, no gradient); they are not part of the
    student, so never saved with it.
    """

    def __init__(
        self, teachers: Mapping[str, nn.Module] | None = None, multitask: MultiTaskModel | None = None
    ) -> None:
        super().__init__()
        if (teachers is None) == (multitask is None):
            raise ValueError("TeacherSet needs either per-task teachers or one multi-task teacher")
        self.models = nn.ModuleDict()
        self.key: dict[str, str] = {}
        if multitask is not None:
            self.models["multitask"] = multitask
            self.key = {name: "multitask" for name in multitask.task_names}
        else:
            assert teachers is not None
            seen: dict[int, str] = {}
            for task, model in teachers.items():
                k = seen.get(id(model))
                if k is None:
                    k = seen[id(model)] = task
                    self.models[k] = model
                self.key[task] = k

    @property
    def groups(self) -> dict[str, str]:
        """``{task: teacher key}`` (tasks of one teacher share a projection)."""
        return dict(self.key)

    def teacher(self, task: str) -> nn.Module:
        if task not in self.key:
            raise KeyError(f"no teacher for task {task!r}; teachers cover {sorted(self.key)}")
        return self.models[self.key[task]]

    def sizes(self, task: str) -> tuple[int, int]:
        """(N_t layers, d_T hidden size) of the task's teacher."""
        return _sizes(self.teacher(task))

    def forward(self, task: str, inputs: Mapping[str, Tensor], output_attentions: bool = False) -> Any:
        """The task's teacher on ``inputs`` (``input_ids``, ``attention_mask``, ``token_type_ids``);
        returns its outputs with ``hidden_states``, ``logits`` (and ``attentions``)."""
        model = self.teacher(task)
        feeds = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids") and
                 v is not None}
        if isinstance(model, MultiTaskModel):
            return model(task, **feeds, output_attentions=output_attentions)
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if output_attentions:
            kwargs["output_attentions"] = True
        return model(**feeds, **kwargs)


def load_teachers(
    tasks: Sequence[TaskSpec],
    *,
    multitask_teacher: str | os.PathLike | None = None,
    attn_implementation: str | None = "eager",
    allow_untrained: bool = False,
) -> TeacherSet:
    """Teachers from local folders: one multi-task teacher (saved by ``bert-emd mtl train``), or
    each task's ``teacher`` (a fine-tuned Hugging Face classifier / token classifier; folders
    shared by several tasks are loaded once).

    A task teacher whose checkpoint lacks weights of the model it is loaded as (its task head: a
    bare encoder checkpoint) would teach with random predictions: it is refused with a
    :class:`~bert_emd.distill.students.UntrainedHeadError` naming the folder and the weights,
    unless ``allow_untrained`` (then a warning; the head is drawn from the torch generator, which
    the caller seeds). A multi-task teacher must hold every weight (:meth:`MultiTaskModel.from_pretrained`)."""
    if multitask_teacher is not None:
        return TeacherSet(multitask=MultiTaskModel.from_pretrained(multitask_teacher,
                                                                   attn_implementation=attn_implementation))
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    from ..distill.data import MissingFileError
    from ..distill.students import check_model_folder, check_trained_weights, float32_kwargs
    from ..errors import UsageError

    loaded: dict[tuple[str, str], nn.Module] = {}
    teachers: dict[str, nn.Module] = {}
    for spec in tasks:
        if spec.teacher is None:
            raise UsageError(f"task {spec.name!r} has no teacher (set tasks[].teacher or distillation.teacher)")
        path = str(spec.teacher)
        if os.path.isfile(os.path.join(path, "mtl_config.json")):
            key = (path, "mtl")
            if key not in loaded:
                loaded[key] = MultiTaskModel.from_pretrained(path, attn_implementation=attn_implementation)
            teachers[spec.name] = loaded[key]
            continue
        cls = AutoModelForTokenClassification if spec.is_tagging else AutoModelForSequenceClassification
        key = (path, cls.__name__)
        if key not in loaded:
            # float32 whatever the checkpoint's dtype (see float32_kwargs): the teachers' hidden
            # states meet the student's in float32 costs, as in single-task distillation
            kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True, **float32_kwargs()}
            if attn_implementation is not None:
                kwargs["attn_implementation"] = attn_implementation
            check_model_folder(path, f"task {spec.name!r}: teacher")
            if allow_untrained and not _has_head(path, cls):
                kwargs["num_labels"] = spec.num_labels  # the random head gets the task's outputs
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # its load report: check_trained_weights says what matters
            try:
                loaded[key], info = cls.from_pretrained(path, **kwargs)
            except OSError as err:
                raise MissingFileError(f"task {spec.name!r}: cannot load the teacher from {path}: {err}") from err
            finally:
                hf_logging.set_verbosity(verbosity)
            check_trained_weights(path, info.get("missing_keys", ()), role=f"teacher of task {spec.name!r}",
                                  predicts=True, allow_untrained=allow_untrained,
                                  opt_out="--allow-untrained-teacher (distillation.allow_untrained_teacher: true)")
        model = loaded[key]
        n_out = getattr(getattr(model, "config", None), "num_labels", None)
        if n_out is not None and n_out != spec.num_labels:
            raise UsageError(
                f"task {spec.name!r}: the teacher at {path} has {n_out} outputs, the task {spec.num_labels} labels"
            )
        teachers[spec.name] = model
    return TeacherSet(teachers)


def _has_head(path: str, cls: type) -> bool:
    """Whether the checkpoint in ``path`` was saved as a model with ``cls``'s kind of head
    (``*ForSequenceClassification`` / ``*ForTokenClassification``, by its config's architectures)."""
    from transformers import AutoConfig

    kind = "ForTokenClassification" if "TokenClassification" in cls.__name__ else "ForSequenceClassification"
    archs = AutoConfig.from_pretrained(path, local_files_only=True).architectures or []
    return any(a.endswith(kind) for a in archs)


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
