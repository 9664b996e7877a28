"""The whole BERT-EMD objective as a drop-in loss for Hugging Face models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .cost_attention import CostAttention, Normalize
from .layer_emd_loss import LayerEMDLoss, Mapping

__all__ = ["BertEMDLoss", "prediction_loss"]

AttentionSource = Literal["probs", "scores"]
_AUTO = "auto"


def _get(outputs: Any, name: str) -> Any:
    if isinstance(outputs, dict):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _masked_mse(x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    """MSE over all elements, or over real tokens only ([B, L] mask) for [B, L, d] inputs."""
    if mask is None:
        return F.mse_loss(x.float(), y.float())
    m = mask.to(torch.float32)[..., None]
    se = ((x.float() - y.float()) ** 2 * m).sum()
    return se / (m.sum() * x.shape[-1]).clamp_min(1.0)


def prediction_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.8,
    task: Literal["auto", "classification", "regression"] = "auto",
    reduction: Literal["mean", "batchmean"] = "mean",
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Prediction-layer distillation loss of the original (``distillation_loss``).

    Classification: soft = T^2 * soft cross-entropy(softmax(teacher / T), log_softmax(student / T)),
    averaged over batch *and classes* with ``reduction="mean"`` (the original's ``.mean()``) or
    summed over classes and averaged over the batch with ``"batchmean"``; gold = cross-entropy.
    Regression (``task="regression"``, or one output with ``"auto"``): soft = MSE to the teacher's
    output, gold = MSE to the labels. Loss = alpha * soft + (1 - alpha) * gold; without labels,
    the soft term alone.

    Args:
        student_logits: [B, C] (or [B] / [B, 1] for regression).
        teacher_logits: same shape; treated as a constant.
        labels: [B] class indices or regression targets, or None.
        weight: optional [B] 0/1 weights of the rows (classification): the means run over the
            rows of weight 1 only, as if the others were indexed away -- without the host read
            boolean indexing costs on a GPU (tagging: one row per token); 0 if no row counts.
    Returns:
        (loss [], soft [], gold [] or None), fp32.
    """
    s, t = student_logits.float(), teacher_logits.detach().float()
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ")
    regression = task == "regression" or (task == _AUTO and (s.dim() == 1 or s.shape[-1] == 1))
    if regression:
        if weight is not None:
            raise ValueError("prediction_loss: weight is for classification rows")
        soft = F.mse_loss(s.reshape(-1), t.reshape(-1))
        gold = None if labels is None else F.mse_loss(s.reshape(-1), labels.float().reshape(-1))
    elif weight is None:
        ce = -(torch.softmax(t / temperature, -1) * torch.log_softmax(s / temperature, -1))
        ce = ce.mean() if reduction == "mean" else ce.sum(-1).mean()
        soft = ce * temperature**2
        gold = None if labels is None else F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1))
    else:
        C = s.shape[-1]
        w = weight.reshape(-1).to(s.dtype)
        rows = w.sum().clamp_min(1.0)
        ce = -(torch.softmax(t / temperature, -1) * torch.log_softmax(s / temperature, -1)).reshape(-1, C).sum(-1)
        soft = (ce * w).sum() / (rows * (C if reduction == "mean" else 1)) * temperature**2
        if labels is None:
            gold = None
        else:
            target = torch.where(w > 0, labels.reshape(-1), torch.full_like(labels.reshape(-1), -100))
            gold = F.cross_entropy(s.reshape(-1, C), target, ignore_index=-100, reduction="sum") / rows
    loss = soft if gold is None else alpha * soft + (1.0 - alpha) * gold
    return loss, soft, gold


def _average_grad_over_ranks(grad: Tensor) -> Tensor:
    """Backward hook: the projection lives outside the student's DDP wrapper, so average its
    gradient over ranks here (idempotent if the user wraps the loss in DDP as well)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return grad
    grad = grad.clone()
    dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    return grad / dist.get_world_size()


def _config_sizes(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(getattr(model, "module", model), "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no .config: pass the layer counts and sizes explicitly")
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None)
    if layers is None or hidden is None:
        raise ValueError(f"cannot read the layer count and hidden size from {type(cfg).__name__}")
    return int(layers), int(hidden)


class BertEMDLoss(nn.Module):
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
    - L_pred = alpha * T^2 * softCE(teacher / T, student / T) + (1 - alpha) * CE(labels)
      (MSE for regression), see :func:`prediction_loss`.
    - Layer weights: :class:`~bert_emd.nn.CostAttention`, updated after every forward (no
      gradient); shared by attention and hidden by default (the two updates are averaged, as the
      original with ``--seperate False``), separate with ``share_weights=False``.

    Defaults follow the original code (``emd_task_distill.py``) and its per-task table:
    beta 0.001 (table 0.001-0.005; the script's argparse default is 0.01), theta 1 (the original
    has no theta), T_emd 1 (table 1-10), T 1 (table 1-7; learning rates 2e-5 to 5e-5),
    alpha 0.8, ``normalize="double_softmax"`` (the paper's runs), shared layer weights,
    ``pred_reduction="mean"``, no token mask. One default departs: ``attention_source="probs"``
    (no hooks needed; requires eager attention); ``"scores"`` is the original's choice.

    Args:
        num_student_layers: M (transformer layers of the student).
        num_teacher_layers: N.
        student_hidden_size: d_S.
        teacher_hidden_size: d_T.
        beta, theta: weights of the intermediate losses (formula above).
        T_emd: temperature of the cost-attention softmax.
        temperature: T of the prediction loss.
        alpha: share of the soft (teacher) term in L_pred; 1 - alpha goes to the gold labels.
        normalize: cost-attention normalisation (``"sum"``, ``"softmax"``, ``"double_softmax"``).
        share_weights: one pair of layer weights for attention and hidden (default), else two.
        update_weights: apply the cost-attention update every forward.
        mapping: ``"emd"`` or a fixed mapping (``"skip"``, ``"last"``, ``"uniform"``) for
            comparison at equal cost.
        attention_source: ``"probs"`` or ``"scores"`` (needs :meth:`attach` or :meth:`from_models`).
        attention_floor: entries <= floor are zeroed before the attention costs; ``"auto"``:
            -100 for scores (the original), None for probs.
        use_attention, use_hidden, use_embedding, use_prediction: switch the terms on or off.
        per_sample: one transport problem per example (see :class:`LayerEMDLoss`).
        token_mask: average hidden and embedding costs over real tokens only (an improvement
            over the original, which averages padding too; off by default for fidelity).
        pred_reduction: ``"mean"`` (original: over batch and classes) or ``"batchmean"``.
        task: ``"auto"`` (regression when the logits have one column), ``"classification"`` or
            ``"regression"``.
        projection: learn W (default); False uses the identity (requires d_S == d_T).
        sync_projection_grads: in distributed runs, average W's gradient over ranks in backward
            (W is not inside the student's DDP wrapper); turn off if you synchronise it yourself.
        eps: floor of the layer weights.
        backend: backend of ``layer_costs`` and ``emd``, or a dict per op (``{"emd": "cpu"}``).
        fused_attention: compute the attention costs from the hooked queries and keys with
            ``bert_emd.attention_costs`` (either source), never materialising a [B, H, L, L] map:
            memory independent of L^2, and both models may run SDPA / flash attention (no
            ``output_attentions``). Needs the hooks (:meth:`from_models` or :meth:`attach`).
            ``"probs"`` are then the softmax before attention dropout, and relative position
            biases (MPNet) are not included.

    The projection W is a parameter of this module: give ``loss.parameters()`` to the optimizer
    together with the student's. The layer weights are buffers: they are in ``state_dict``.
    """

    def __init__(
        self,
        num_student_layers: int,
        num_teacher_layers: int,
        student_hidden_size: int,
        teacher_hidden_size: int,
        *,
        beta: float = 0.001,
        theta: float = 1.0,
        T_emd: float = 1.0,
        temperature: float = 1.0,
        alpha: float = 0.8,
        normalize: Normalize = "double_softmax",
        share_weights: bool = True,
        update_weights: bool = True,
        mapping: Mapping = "emd",
        attention_source: AttentionSource = "probs",
        attention_floor: float | None | str = _AUTO,
        use_attention: bool = True,
        use_hidden: bool = True,
        use_embedding: bool = True,
        use_prediction: bool = True,
        per_sample: bool = False,
        token_mask: bool = False,
        pred_reduction: Literal["mean", "batchmean"] = "mean",
        task: Literal["auto", "classification", "regression"] = "auto",
        projection: bool = True,
        sync_projection_grads: bool = True,
        eps: float = 1e-6,
        backend: str | dict[str, str] = "auto",
        fused_attention: bool = False,
    ) -> None:
        super().__init__()
        if attention_source not in ("probs", "scores"):
            raise ValueError(f"attention_source must be 'probs' or 'scores', got {attention_source!r}")
        if not (use_attention or use_hidden or use_embedding or use_prediction):
            raise ValueError("all loss terms are switched off")
        if not projection and student_hidden_size != teacher_hidden_size:
            raise ValueError(
                f"projection=False needs equal hidden sizes, got student {student_hidden_size} "
                f"and teacher {teacher_hidden_size}"
            )
        if attention_floor == _AUTO:
            attention_floor = -100.0 if attention_source == "scores" else None
        self.num_student_layers, self.num_teacher_layers = num_student_layers, num_teacher_layers
        self.beta, self.theta, self.temperature, self.alpha = beta, theta, temperature, alpha
        self.attention_source = attention_source
        self.fused_attention = fused_attention
        self.use_attention, self.use_hidden = use_attention, use_hidden
        self.use_embedding, self.use_prediction = use_embedding, use_prediction
        self.token_mask = token_mask
        self.pred_reduction, self.task = pred_reduction, task
        self.mapping = mapping
        self.share_weights = share_weights and mapping == "emd"
        self.update_weights = update_weights

        if projection:
            self.projection: nn.Module = nn.Linear(student_hidden_size, teacher_hidden_size)
            # BERT's initialisation (normal 0.02, zero bias), as TinyBERT's fit_dense.
            nn.init.normal_(self.projection.weight, std=0.02)
            nn.init.zeros_(self.projection.bias)
            if sync_projection_grads:
                for p in self.projection.parameters():
                    p.register_hook(_average_grad_over_ranks)
        else:
            self.projection = nn.Identity()

        m, n = num_student_layers, num_teacher_layers
        shared = None
        if self.share_weights:
            shared = CostAttention(m, n, normalize=normalize, temperature=T_emd, eps=eps)
        self.layer_weights: CostAttention | None = shared
        common = dict(
            mapping=mapping,
            normalize=normalize,
            temperature=T_emd,
            eps=eps,
            per_sample=per_sample,
            update_weights=update_weights,
            cost_attention=shared,
            backend=backend,
        )
        self.attention_loss = LayerEMDLoss(
            m, n, attention_floor=attention_floor, fused_attention=attention_source if fused_attention else None,
            **common,
        )
        self.hidden_loss = LayerEMDLoss(m, n, **common)
        self._captures: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction / hooks
    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, **kwargs: Any) -> BertEMDLoss:
        """Build from two Hugging Face models (layer counts and hidden sizes from their configs)
        and, with ``attention_source="scores"``, attach the score hooks to both."""
        m, d_s = _config_sizes(student)
        n, d_t = _config_sizes(teacher)
        loss = cls(m, n, d_s, d_t, **kwargs)
        if (loss.attention_source == "scores" or loss.fused_attention) and loss.use_attention:
            loss.attach(student, teacher)
        return loss

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        """Hook the query/key projections of both models (``attention_source="scores"`` or
        ``fused_attention=True``)."""
        from ..distill.hooks import AttentionScoreCapture

        self.detach_models()
        self._captures = {
            "student": AttentionScoreCapture(student),
            "teacher": AttentionScoreCapture(teacher),
        }

    def detach_models(self) -> None:
        """Remove the score hooks, if any."""
        for cap in self._captures.values():
            cap.remove()
        self._captures = {}

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
            f"beta={self.beta}, theta={self.theta}, T={self.temperature}, alpha={self.alpha}, "
            f"attention_source={self.attention_source!r}, fused_attention={self.fused_attention}, "
            f"share_weights={self.share_weights}"
        )

    # ------------------------------------------------------------------ features
    def _hidden(self, outputs: Any, who: str, expected: int) -> Sequence[Tensor]:
        hs = _get(outputs, "hidden_states")
        if hs is None:
            raise ValueError(f"{who} outputs have no hidden_states: call the model with output_hidden_states=True")
        if len(hs) != expected + 1:
            raise ValueError(
                f"{who} returned {len(hs)} hidden states, expected {expected + 1} (embeddings + {expected} layers)"
            )
        return hs

    def _queries_keys(self, who: str, expected: int) -> list[tuple[Tensor, Tensor]]:
        cap = self._captures.get(who)
        if cap is None:
            raise RuntimeError(
                "fused_attention=True needs the models hooked: build the loss with "
                "BertEMDLoss.from_models(student, teacher, ...) or call loss.attach(student, teacher)"
            )
        qk = cap.queries_keys()
        if len(qk) != expected:
            raise ValueError(f"{who} has {len(qk)} attention layers, expected {expected} (one per layer)")
        return qk

    def _attentions(self, outputs: Any, who: str, expected: int, mask: Tensor | None) -> Sequence[Tensor]:
        if self.attention_source == "scores":
            cap = self._captures.get(who)
            if cap is None:
                raise RuntimeError(
                    "attention_source='scores' needs the models hooked: build the loss with "
                    "BertEMDLoss.from_models(student, teacher, ...) or call loss.attach(student, teacher)"
                )
            att = cap.scores(mask)
        else:
            att = _get(outputs, "attentions")
            if att is None or len(att) == 0 or any(a is None for a in att):
                raise ValueError(
                    f"{who} outputs have no attention maps. Call the model with output_attentions=True "
                    'and load it with attn_implementation="eager" (SDPA and flash attention return '
                    'none), or use BertEMDLoss(attention_source="scores"), which hooks the query/key '
                    "projections and works with any attention implementation."
                )
        if len(att) != expected:
            raise ValueError(f"{who} has {len(att)} attention maps, expected {expected} (one per layer)")
        return att

    @staticmethod
    def _check_attention(s: Sequence[Tensor], t: Sequence[Tensor]) -> None:
        a, b = s[0], t[0]
        if a.dim() != 4 or b.dim() != 4:
            raise ValueError(f"attention maps must be [B, H, L, L], got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.shape[1] != b.shape[1]:
            raise ValueError(
                f"student has {a.shape[1]} attention heads, teacher {b.shape[1]}: BERT-EMD compares "
                "attention head by head and needs equal head counts (use_attention=False to skip it)"
            )
        if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
            raise ValueError(
                f"student attention {tuple(a.shape)} and teacher attention {tuple(b.shape)} differ in batch "
                "or sequence length: feed both models the same tokenised batch"
            )

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
        zero = None
        total_layers = []
        need_hidden = self.use_hidden or self.use_embedding
        if need_hidden:
            hs_s = self._hidden(student_outputs, "student", m)
            hs_t = self._hidden(teacher_outputs, "teacher", n)
            if hs_s[0].shape[:-1] != hs_t[0].shape[:-1]:
                raise ValueError(
                    f"student hidden states {tuple(hs_s[0].shape)} and teacher {tuple(hs_t[0].shape)} differ "
                    "in batch or sequence length: feed both models the same tokenised batch"
                )
            # half-precision hidden states (a bf16 model run without autocast) meet the fp32 projection
            proj_s = [self.projection(h.to(self.projection.weight.dtype)) for h in hs_s]
            hs_t = [h.detach() for h in hs_t]
            zero = proj_s[0].new_zeros((), dtype=torch.float32)
        att_term = hid_term = emb_term = None
        if self.use_attention:
            if self.fused_attention:  # (q, k) pairs; attention_costs checks heads and lengths
                att_s = self._queries_keys("student", m)
                att_t = [(q.detach(), k.detach()) for q, k in self._queries_keys("teacher", n)]
                att_term, _, _ = self.attention_loss.transport(att_s, att_t, mask, attention_mask)
            else:
                att_s = self._attentions(student_outputs, "student", m, attention_mask)
                att_t = [a.detach() for a in self._attentions(teacher_outputs, "teacher", n, attention_mask)]
                self._check_attention(att_s, att_t)
                att_term, _, _ = self.attention_loss.transport(att_s, att_t, mask)
            total_layers.append(self.attention_loss)
            zero = att_term.new_zeros(()) if zero is None else zero
        if self.use_hidden:
            hid_term, _, _ = self.hidden_loss.transport(proj_s[1:], hs_t[1:], mask)
            total_layers.append(self.hidden_loss)
        if self.use_embedding:
            emb_term = _masked_mse(proj_s[0], hs_t[0], mask)
        pred_term = None
        if self.use_prediction:
            s_logits, t_logits = _get(student_outputs, "logits"), _get(teacher_outputs, "logits")
            if s_logits is None or t_logits is None:
                raise ValueError(
                    "use_prediction=True needs logits in both outputs (a *ForSequenceClassification model)"
                )
            pred_term, soft, gold = prediction_loss(
                s_logits,
                t_logits,
                labels,
                temperature=self.temperature,
                alpha=self.alpha,
                task=self.task,
                reduction=self.pred_reduction,
            )
            parts["prediction_soft"] = soft.detach()
            if gold is not None:
                parts["prediction_gold"] = gold.detach()
            zero = pred_term.new_zeros(()) if zero is None else zero

        assert zero is not None
        att_term = zero if att_term is None else att_term.float()
        hid_term = zero if hid_term is None else hid_term.float()
        emb_term = zero if emb_term is None else emb_term.float()
        pred = zero if pred_term is None else pred_term
        total = self.beta * (self.theta * (att_term + hid_term) + emb_term) + pred
        parts.update(
            attention=att_term.detach(),
            hidden=hid_term.detach(),
            embedding=emb_term.detach(),
            prediction=pred.detach(),
        )
        if self.update_weights and self.mapping == "emd" and total_layers:
            self._update(total_layers)
        return total, parts

    @torch.no_grad()
    def _update(self, layers: list[LayerEMDLoss]) -> None:
        if not self.share_weights:
            for layer in layers:
                layer.update()
            return
        # Shared pair: both features propose from the same current weights, the proposals are
        # averaged, then the outer step (second softmax of double_softmax) and the eps floor.
        w = self.layer_weights
        assert w is not None
        props = [w.propose(*layer.contributions(layer.last_plan, layer.last_cost)) for layer in layers]
        ps = torch.stack([p[0] for p in props]).mean(0)
        pt = torch.stack([p[1] for p in props]).mean(0)
        w.finalize(ps, pt)
