"""The whole BERT-EMD objective as a drop-in loss for Hugging Face models."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from .config import EMDLossConfig
from .cost_attention import CostAttention
from .emd_terms import EMDTerms, make_projection, masked_mse, model_sizes, prediction_loss, update_layer_weights
from .layer_emd_loss import LayerEMDLoss, Mapping

__all__ = ["BertEMDLoss", "prediction_loss"]


class BertEMDLoss(EMDTerms):
    """BERT-EMD distillation objective for Hugging Face (BERT-family) student/teacher models.

        L = beta * (theta * (L_attn + L_hidden) + L_emb) + L_pred

    - L_hidden: EMD between the M student and N teacher transformer-layer outputs (embedding
      output excluded), cost D_ij = MSE(W h^S_i, h^T_j), W = ``projection`` (Linear d_S -> d_T,
      with bias, shared with L_emb).
    - L_attn: EMD between attention maps, D_ij = MSE(A^S_i, A^T_j) over B, H, L, L, heads
      compared one by one. ``attention_source="scores"``: pre-softmax scores with the additive
      -10000 padding mask, entries <= -100 set to 0 (``attention_floor``), as the original;
      ``"probs"``: the post-softmax maps of ``output_attentions``.
    - L_emb = MSE(W e^S, e^T) of the embedding outputs.
    - L_pred = (1 - gold_weight) * T^2 * softCE(teacher / T, student / T) + gold_weight * CE(labels)
      (MSE for regression), see :func:`prediction_loss`.
    - Layer weights: :class:`~bert_emd.nn.CostAttention`, updated after every forward (no
      gradient); shared by attention and hidden by default (the two updates are averaged, as the
      original with ``--seperate False``), separate with ``share_weights=False``.

    The hyper-parameters are an :class:`~bert_emd.nn.EMDLossConfig` (``config=``), or its fields
    as keyword arguments (``beta=0.01``), which replace those of ``config`` when both are given.
    Its defaults follow the original code and its per-task table: beta 0.001 (table 0.001-0.005;
    the script's argparse default is 0.01), theta 1, T_emd 1, T 1, gold_weight 0.2 (the original's
    alpha 0.8 on the soft term), ``normalize="double_softmax"``; one departs:
    ``attention_source="probs"`` (no hooks needed; requires eager attention), where ``"scores"``
    is the original's choice. The options below are this loss's own (single-task) structure.

    Args:
        num_student_layers: M (transformer layers of the student).
        num_teacher_layers: N.
        student_hidden_size: d_S.
        teacher_hidden_size: d_T.
        config: the hyper-parameters (default: ``EMDLossConfig()``).
        share_weights: one pair of layer weights for attention and hidden (default), else two.
        mapping: ``"emd"`` or a fixed mapping (``"skip"``, ``"last"``, ``"uniform"``) for
            comparison at equal cost.
        per_sample: one transport problem per example (see :class:`LayerEMDLoss`).
        pred_reduction: ``"mean"`` (original: over batch and classes) or ``"batchmean"``.
        task: ``"auto"`` (regression when the logits have one column), ``"classification"`` or
            ``"regression"``.
        projection: learn W (default); False uses the identity (requires d_S == d_T).
        alpha: deprecated: the soft share of L_pred, ``1 - gold_weight`` (a DeprecationWarning).
        **options: :class:`~bert_emd.nn.EMDLossConfig` fields (``beta``, ``theta``, ``T_emd``,
            ``temperature``, ``gold_weight``, ``normalize``, ``attention_source``,
            ``attention_floor``, ``fused_attention``, ``use_attention`` / ``use_hidden`` /
            ``use_embedding`` / ``use_prediction``, ``token_mask``, ``update_weights``,
            ``sync_projection_grads``, ``eps``, ``backend``). ``attention_source="scores"`` and
            ``fused_attention=True`` need the hooks (:meth:`from_models` or :meth:`attach`).

    The projection W is a parameter of this module: give ``loss.parameters()`` to the optimizer
    together with the student's. The layer weights are buffers: they are in ``state_dict``.
    """

    _build_hint = ("build the loss with BertEMDLoss.from_models(student, teacher, ...) or call "
                   "loss.attach(student, teacher)")

    def __init__(
        self,
        num_student_layers: int,
        num_teacher_layers: int,
        student_hidden_size: int,
        teacher_hidden_size: int,
        *,
        config: EMDLossConfig | None = None,
        share_weights: bool = True,
        mapping: Mapping = "emd",
        per_sample: bool = False,
        pred_reduction: Literal["mean", "batchmean"] = "mean",
        task: Literal["auto", "classification", "regression"] = "auto",
        projection: bool = True,
        alpha: float | None = None,
        **options: Any,
    ) -> None:
        cfg = EMDLossConfig.from_options(config, alpha=alpha, **options)
        super().__init__(cfg)
        if not projection and student_hidden_size != teacher_hidden_size:
            raise ValueError(
                f"projection=False needs equal hidden sizes, got student {student_hidden_size} "
                f"and teacher {teacher_hidden_size}"
            )
        self.num_student_layers, self.num_teacher_layers = num_student_layers, num_teacher_layers
        self.pred_reduction, self.task = pred_reduction, task
        self.mapping = mapping
        self.share_weights = share_weights and mapping == "emd"

        self.projection: nn.Module = (
            make_projection(student_hidden_size, teacher_hidden_size, sync_grads=cfg.sync_projection_grads)
            if projection else nn.Identity()
        )
        m, n = num_student_layers, num_teacher_layers
        shared = None
        if self.share_weights:
            shared = CostAttention(m, n, normalize=cfg.normalize, temperature=cfg.T_emd, eps=cfg.eps)
        self.layer_weights: CostAttention | None = shared
        common = dict(
            mapping=mapping,
            normalize=cfg.normalize,
            temperature=cfg.T_emd,
            eps=cfg.eps,
            per_sample=per_sample,
            update_weights=cfg.update_weights,
            cost_attention=shared,
            backend=cfg.backend,
        )
        self.attention_loss = LayerEMDLoss(
            m, n, attention_floor=cfg.floor, fused_attention=cfg.attention_source if cfg.fused_attention else None,
            **common,
        )
        self.hidden_loss = LayerEMDLoss(m, n, **common)

    @property
    def alpha(self) -> float:
        """Deprecated name: the soft share of L_pred, ``1 - gold_weight``."""
        return 1.0 - self.gold_weight

    # ------------------------------------------------------------------ construction / hooks
    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, **kwargs: Any) -> BertEMDLoss:
        """Build from two Hugging Face models (layer counts and hidden sizes from their configs)
        and, with ``attention_source="scores"`` or ``fused_attention=True``, attach the query/key
        hooks to both."""
        m, d_s = model_sizes(student)
        n, d_t = model_sizes(teacher)
        loss = cls(m, n, d_s, d_t, **kwargs)
        if loss.needs_hooks:
            loss.attach(student, teacher)
        return loss

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Hook the query/key projections of both models (``attention_source="scores"`` or
        ``fused_attention=True``)."""
        self._hook({"student": student, "teacher": teacher})

    # ------------------------------------------------------------------ logging helpers
    @property
    def student_weight(self) -> dict[str, Tensor | None]:
        """Current student layer weights per feature type ([M] each)."""
        return {"attention": self.attention_loss.student_weight, "hidden": self.hidden_loss.student_weight}

    @property
    def teacher_weight(self) -> dict[str, Tensor | None]:
        """Current teacher layer weights per feature type ([N] each)."""
        return {"attention": self.attention_loss.teacher_weight, "hidden": self.hidden_loss.teacher_weight}

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, theta={self.theta}, T={self.temperature}, gold_weight={self.gold_weight}, "
            f"attention_source={self.attention_source!r}, fused_attention={self.fused_attention}, "
            f"share_weights={self.share_weights}"
        )

    def _queries_keys(self, who: str) -> list | None:
        cap = self._captures.get(who)
        return None if cap is None else cap.queries_keys()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        student_outputs: Any,
        teacher_outputs: Any,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its parts from the two models' outputs.

        Args:
            student_outputs: the student's Hugging Face output (``hidden_states`` needed for
                hidden/embedding terms: ``output_hidden_states=True``; ``attentions`` for
                ``attention_source="probs"``: ``output_attentions=True`` and eager attention;
                ``logits`` for the prediction term). A dict with these keys works too.
            teacher_outputs: the teacher's output, same requirements (run it under no_grad).
            labels: [B] gold labels (class indices or regression targets), or None.
            attention_mask: [B, L] token mask the models were given: the additive mask of
                ``"scores"``, and the token mask of ``token_mask=True``.
        Returns:
            (loss [] fp32, parts): parts holds detached ``attention``, ``hidden``, ``embedding``,
            ``prediction``, ``prediction_soft`` and, with labels, ``prediction_gold``.
        """
        m, n = self.num_student_layers, self.num_teacher_layers
        mask = attention_mask if self.token_mask else None
        parts: dict[str, Tensor] = {}
        terms: dict[str, Tensor] = {}
        solved: list[LayerEMDLoss] = []  # attention first, then hidden
        if self.use_hidden or self.use_embedding:
            emb_s, layers_s, hs_t = self.hidden_inputs(student_outputs, teacher_outputs, m, n, self.projection)
        if self.use_attention:
            att_s, att_t = self.attention_inputs(
                student_outputs, teacher_outputs, m, n, student_qk=self._queries_keys("student"),
                teacher_qk=self._queries_keys("teacher"), attention_mask=attention_mask,
            )
            # the fused costs read the models' attention mask (the additive mask of the scores)
            extra = (attention_mask,) if self.fused_attention else ()
            terms["attention"], _, _ = self.attention_loss.transport(att_s, att_t, mask, *extra)
            solved.append(self.attention_loss)
        if self.use_hidden:
            terms["hidden"], _, _ = self.hidden_loss.transport(layers_s, hs_t[1:], mask)
            solved.append(self.hidden_loss)
        if self.use_embedding:
            terms["embedding"] = masked_mse(emb_s, hs_t[0], mask)
        if self.use_prediction:
            terms["prediction"], soft, gold = self.prediction_term(
                student_outputs, teacher_outputs, labels, gold_weight=self.gold_weight, task=self.task,
                reduction=self.pred_reduction,
            )
            parts["prediction_soft"] = soft.detach()
            if gold is not None:
                parts["prediction_gold"] = gold.detach()

        zero = next(iter(terms.values())).new_zeros((), dtype=torch.float32)
        att, hid, emb, pred = (terms.get(k, zero).float() for k in ("attention", "hidden", "embedding", "prediction"))
        total = self.combine(att, hid, emb, pred)
        parts.update(attention=att.detach(), hidden=hid.detach(), embedding=emb.detach(), prediction=pred.detach())
        if self.update_weights and self.mapping == "emd" and solved:
            self._update(solved)
        return total, parts

    @torch.no_grad()
    def _update(self, layers: list[LayerEMDLoss]) -> None:
        if not self.share_weights:
            for layer in layers:
                layer.update()
            return
        # Shared pair: both features propose from the same current weights, the proposals are
        # averaged, then the outer step (second softmax of double_softmax) and the eps floor.
        assert self.layer_weights is not None
        if any(layer.reduces_contributions for layer in layers):
            update_layer_weights(self.layer_weights,
                                 [layer.contributions(layer.last_plan, layer.last_cost) for layer in layers])
        else:  # the whole rule in one op
            self.layer_weights.step([layer.last_plan for layer in layers], [layer.last_cost for layer in layers])
