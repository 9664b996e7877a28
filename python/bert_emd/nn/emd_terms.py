"""The pieces of the BERT-EMD objective that every loss shares.

:class:`~bert_emd.nn.BertEMDLoss` (one student, one teacher) and the multi-task loss (one
student, a teacher per task, all transport problems of a step in one solve) are both built on
this module:

- reading the models' outputs: :func:`get_output`, :func:`hidden_states`,
  :func:`attention_maps`, the shape checks, and :meth:`EMDTerms.attention_inputs` (maps, or
  hooked queries and keys);
- the terms: :func:`make_projection` / :func:`project` (W, shared by hidden and embedding
  terms), :func:`feature_costs` (``layer_costs`` or, fused, ``attention_costs``),
  :func:`masked_mse` (embedding), :func:`prediction_loss`, and :meth:`EMDTerms.combine`;
- the transport: :func:`solve_plans` (float64, batched) and :func:`update_layer_weights` (the
  cost-attention step, proposals of several features averaged);
- :func:`model_sizes`: layer count and hidden size from a Hugging Face config.

:class:`EMDTerms` is the base module of both losses: it holds the :class:`EMDLossConfig` (and
exposes its fields as read-only attributes) and the query/key hooks.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention_costs import attention_costs
from ..ops.emd import emd
from ..ops.layer_costs import layer_costs
from .config import EMDLossConfig, gold_weight_from_alpha
from .cost_attention import CostAttention
from .distributed import average_grad_over_ranks
from .hooks import AttentionScoreCapture, scores_of

__all__ = [
    "EMDTerms",
    "attention_maps",
    "check_attention_shapes",
    "feature_costs",
    "get_output",
    "hidden_states",
    "make_projection",
    "masked_mse",
    "model_sizes",
    "prediction_loss",
    "project",
    "solve_plans",
    "update_layer_weights",
]

QK = tuple[Tensor, Tensor]
Layers = Tensor | Sequence[Tensor]
_AUTO = "auto"


# ----------------------------------------------------------------------------- reading outputs
def get_output(outputs: Any, name: str) -> Any:
    """``outputs[name]`` of a mapping, else ``outputs.name``; None when absent."""
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def model_sizes(model: nn.Module, hint: str = "pass the layer counts and sizes explicitly") -> tuple[int, int]:
    """(transformer layers, hidden size) from a Hugging Face model's config (DDP unwrapped);
    ``hint`` ends the error of a model without a config."""
    cfg = getattr(getattr(model, "module", model), "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no .config: {hint}")
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None)
    if layers is None or hidden is None:
        raise ValueError(f"cannot read the layer count and hidden size from {type(cfg).__name__}")
    return int(layers), int(hidden)


def hidden_states(outputs: Any, who: str, expected: int, where: str = "") -> Sequence[Tensor]:
    """The ``expected + 1`` hidden states (embeddings + layers) of ``who``'s outputs; ``where``
    prefixes the error (``"task 'x': "``)."""
    hs = get_output(outputs, "hidden_states")
    if hs is None or len(hs) != expected + 1:
        got = "no" if hs is None else len(hs)
        raise ValueError(
            f"{where}the {who} returned {got} hidden states, expected {expected + 1} (embeddings + {expected} "
            "layers; call the model with output_hidden_states=True)"
        )
    return hs


def check_same_tokens(student: Tensor, teacher: Tensor, where: str = "") -> None:
    """The two models' hidden states [B, L, d] must share batch and sequence length."""
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"{where}student hidden states {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in "
            "batch or sequence length: feed both models the same tokenised batch"
        )


def attention_maps(outputs: Any, who: str, expected: int, where: str = "") -> Sequence[Tensor]:
    """The ``expected`` post-softmax attention maps [B, H, L, L] of ``who``'s outputs."""
    att = get_output(outputs, "attentions")
    if att is None or len(att) == 0 or any(a is None for a in att):
        raise ValueError(
            f"{where}the {who} returned no attention maps. Call it with output_attentions=True and load it with "
            'attn_implementation="eager" (SDPA and flash attention return none), or use attention_source="scores" '
            "or fused_attention=True (queries and keys from hooks, any attention implementation), or set "
            "use_attention=False"
        )
    if len(att) != expected:
        raise ValueError(f"{where}the {who} has {len(att)} attention maps, expected {expected} (one per layer)")
    return att


def check_attention_shapes(student: Sequence[int], teacher: Sequence[int], where: str = "") -> None:
    """Student and teacher attention maps (shapes [B, H, L, L], formed or not) must agree."""
    s, t = tuple(student), tuple(teacher)
    if len(s) != 4 or len(t) != 4:
        raise ValueError(f"{where}attention maps must be [B, H, L, L], got {s} and {t}")
    if s[1] != t[1]:
        raise ValueError(
            f"{where}student attention {s} and teacher attention {t} differ: the student has {s[1]} attention "
            f"heads, the teacher {t[1]}; BERT-EMD compares attention head by head and needs equal head counts "
            "(use_attention=False to skip it)"
        )
    if s != t:
        raise ValueError(
            f"{where}student attention {s} and teacher attention {t} differ in batch or sequence length: feed "
            "both models the same tokenised batch"
        )


# ----------------------------------------------------------------------------- terms
def make_projection(student_hidden_size: int, teacher_hidden_size: int, *, sync_grads: bool = True) -> nn.Linear:
    """W: Linear(d_S -> d_T) with BERT's initialisation (normal 0.02, zero bias; TinyBERT's
    ``fit_dense``); with ``sync_grads`` its gradients are averaged over the ranks in backward
    (:func:`~bert_emd.nn.distributed.average_grad_over_ranks`: W is outside the student's DDP)."""
    lin = nn.Linear(int(student_hidden_size), int(teacher_hidden_size))
    nn.init.normal_(lin.weight, std=0.02)
    nn.init.zeros_(lin.bias)
    if sync_grads:
        for p in lin.parameters():
            p.register_hook(average_grad_over_ranks)
    return lin


def frozen(t: Tensor) -> Tensor:
    """``t`` without a gradient: detached if it has one (a teacher run outside ``no_grad``), else
    ``t`` itself (a teacher's outputs usually have none; a detach is a dispatched op each)."""
    return t.detach() if t.requires_grad else t


def project(projection: nn.Module, h: Tensor) -> Tensor:
    """W h; half-precision states (a bf16 model run without autocast) meet W's float32 first."""
    weight = getattr(projection, "weight", None)
    return projection(h if weight is None else h.to(weight.dtype))


def masked_mse(x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    """MSE over all elements, or over real tokens only ([B, L] mask) for [B, L, d] inputs."""
    if mask is None:
        return F.mse_loss(x.float(), y.float())
    m = mask.to(torch.float32)[..., None]
    se = ((x.float() - y.float()) ** 2 * m).sum()
    return se / (m.sum() * x.shape[-1]).clamp_min(1.0)


def feature_costs(
    student: Layers,
    teacher: Layers,
    *,
    fused: Literal["scores", "probs"] | None = None,
    mask: Tensor | None = None,
    attention_mask: Tensor | None = None,
    attention_floor: float | None = None,
    per_sample: bool = False,
    mask_value: float = -10000.0,
    backend: Callable[[str], str] | str = _AUTO,
) -> Tensor:
    """Cost matrix D [M, N] (or [B, M, N]) between the student's and the teacher's layers, fp32,
    differentiable: ``layer_costs`` of the tensors, or, with ``fused`` (a source), the
    ``attention_costs`` of (query, key) pairs. ``backend``: a name, or ``op -> name``."""
    pick = backend if callable(backend) else (lambda _op: backend)
    if fused is not None:
        return attention_costs(
            student, teacher, mask=mask, attention_mask=attention_mask, source=fused, attention_floor=attention_floor,
            per_sample=per_sample, mask_value=mask_value, backend=pick("attention_costs"),
        )
    return layer_costs(student, teacher, mask=mask, per_sample=per_sample, attention_floor=attention_floor,
                       backend=pick("layer_costs"))


def prediction_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    gold_weight: float | None = None,
    task: Literal["auto", "classification", "regression"] = "auto",
    reduction: Literal["mean", "batchmean"] = "mean",
    weight: Tensor | None = None,
    alpha: float | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Prediction-layer distillation loss of the original (``distillation_loss``).

    Classification: soft = T^2 * soft cross-entropy(softmax(teacher / T), log_softmax(student / T)),
    averaged over batch *and classes* with ``reduction="mean"`` (the original's ``.mean()``) or
    summed over classes and averaged over the batch with ``"batchmean"``; gold = cross-entropy.
    Regression (``task="regression"``, or one output with ``"auto"``): soft = MSE to the teacher's
    output, gold = MSE to the labels. Loss = (1 - gold_weight) * soft + gold_weight * gold; without
    labels, the soft term alone.

    Args:
        student_logits: [B, C] (or [B] / [B, 1] for regression).
        teacher_logits: same shape; treated as a constant.
        labels: [B] class indices or regression targets, or None.
        gold_weight: share of the gold term (default :class:`EMDLossConfig`'s, 0.2).
        weight: optional [B] 0/1 weights of the rows (classification): the means run over the
            rows of weight 1 only, as if the others were indexed away -- without the host read
            boolean indexing costs on a GPU (tagging: one row per token); 0 if no row counts.
        alpha: deprecated: the soft share, ``1 - gold_weight`` (a :class:`DeprecationWarning`).
    Returns:
        (loss [], soft [], gold [] or None), fp32.
    """
    if alpha is not None:
        if gold_weight is not None:
            raise TypeError("pass gold_weight or the deprecated alpha (= 1 - gold_weight), not both")
        gold_weight = gold_weight_from_alpha(alpha)
    elif gold_weight is None:
        gold_weight = EMDLossConfig.gold_weight
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
    loss = soft if gold is None else (1.0 - gold_weight) * soft + gold_weight * gold
    return loss, soft, gold


# ----------------------------------------------------------------------------- transport
def solve_plans(cost: Tensor, a: Tensor, b: Tensor, *, backend: str = _AUTO, match_mass: bool = False) -> Tensor:
    """Exact transport plans of costs [..., M, N] between marginals a [..., M] and b [..., N]
    (broadcast over the batch), solved in float64 in one batched :func:`bert_emd.emd` call; no
    gradient. ``match_mass`` rescales b to a's mass exactly (floored weights keep both at 1 only up
    to rounding). Inputs are validated on CPU only (a host read; on an accelerator an invalid
    problem, e.g. a NaN cost, yields a NaN plan instead of an error)."""
    # float64: the problems are tiny, and the marginals must sum to 1 to solver tolerance
    c = cost.detach().double()
    batch = c.shape[:-2]
    a = a.to(c).expand(*batch, a.shape[-1])
    b = b.to(c).expand(*batch, b.shape[-1])
    if match_mass:
        b = b * (a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True))
    return emd(c, a, b, backend=backend, validate=c.device.type == "cpu").plan


@torch.no_grad()
def update_layer_weights(weights: CostAttention, contributions: Sequence[tuple[Tensor, Tensor]]) -> None:
    """One cost-attention step of ``weights`` from the contributions (c^S [M], c^T [N]) of one or
    more features (attention, hidden): every feature proposes from the same current weights, the
    proposals are averaged, then the outer step (second softmax of double_softmax) and the floor
    (the original with ``--seperate False``)."""
    if len(contributions) == 1:
        weights.finalize(*weights.propose(*contributions[0]))
        return
    # every feature's proposal in one pass: [F, M] and [F, N] (a step's host time is its op count)
    ps, pt = weights.propose(torch.stack([c[0] for c in contributions]), torch.stack([c[1] for c in contributions]))
    weights.finalize(ps.mean(0), pt.mean(0))


# ----------------------------------------------------------------------------- the base module
class _ClassSignature:
    """``inspect.signature`` of a loss class (``help()``, IDEs): its constructor's parameters,
    ``**options`` replaced by the :class:`EMDLossConfig` fields as keyword-only parameters with
    their defaults. Instances get None, so their signature stays that of their call."""

    def __get__(self, obj: Any, owner: type) -> inspect.Signature | None:
        if obj is not None:
            return None
        sig = inspect.signature(owner.__init__)
        params = [p for p in list(sig.parameters.values())[1:] if p.kind is not p.VAR_KEYWORD]
        names = {p.name for p in params}
        options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                   for f in dataclasses.fields(EMDLossConfig) if f.name not in names]
        return sig.replace(parameters=[*params, *options])


class EMDTerms(nn.Module):
    """Base of the BERT-EMD losses: the :class:`EMDLossConfig` (its fields read as attributes:
    ``loss.beta``, ``loss.gold_weight``, ...), the query/key hooks, and the terms one batch of one
    task contributes.

    Subclasses name themselves in the hook errors through ``_build_hint``.
    """

    _build_hint = "build the loss with from_models(...) or call loss.attach(...)"
    __signature__ = _ClassSignature()

    def __init__(self, config: EMDLossConfig) -> None:
        super().__init__()
        if not isinstance(config, EMDLossConfig):
            raise TypeError(f"config must be an EMDLossConfig, got {type(config).__name__}")
        self.config = config
        self.attention_floor = config.floor
        self._captures: dict[str, AttentionScoreCapture] = {}

    # fields of the config, read-only
    beta = property(lambda self: self.config.beta)
    theta = property(lambda self: self.config.theta)
    T_emd = property(lambda self: self.config.T_emd)
    temperature = property(lambda self: self.config.temperature)
    gold_weight = property(lambda self: self.config.gold_weight)
    attention_source = property(lambda self: self.config.attention_source)
    fused_attention = property(lambda self: self.config.fused_attention)
    use_attention = property(lambda self: self.config.use_attention)
    use_hidden = property(lambda self: self.config.use_hidden)
    use_embedding = property(lambda self: self.config.use_embedding)
    use_prediction = property(lambda self: self.config.use_prediction)
    token_mask = property(lambda self: self.config.token_mask)
    update_weights = property(lambda self: self.config.update_weights)
    backend = property(lambda self: self.config.backend)

    @property
    def needs_hooks(self) -> bool:
        """Whether the attention term reads hooked queries and keys (``"scores"`` or fused)."""
        return self.config.needs_hooks

    @property
    def wants_attention_maps(self) -> bool:
        """Whether the models must return attention maps (``output_attentions``, eager attention):
        only the unfused ``"probs"`` attention term reads them."""
        return self.config.wants_attention_maps

    def _backend(self, op: str) -> str:
        return self.config.backend_for(op)

    # ------------------------------------------------------------------ hooks
    def _hook(self, models: Mapping[str, nn.Module]) -> None:
        """Replace the hooks by query/key hooks on ``models`` (``{name: model}``)."""
        self.detach_models()
        self._captures = {name: AttentionScoreCapture(model) for name, model in models.items()}

    def detach_models(self) -> None:
        """Remove the query/key hooks, if any."""
        for cap in self._captures.values():
            cap.remove()
        self._captures = {}

    def _hook_error(self) -> RuntimeError:
        what = "fused_attention=True" if self.fused_attention else "attention_source='scores'"
        return RuntimeError(f"{what} needs the models hooked: {self._build_hint}")

    def _checked_qk(self, qk: Sequence[QK] | None, who: str, expected: int, where: str) -> Sequence[QK]:
        if qk is None:
            raise self._hook_error()
        if len(qk) != expected:
            raise ValueError(f"{where}the {who} has {len(qk)} attention layers, expected {expected} (one per layer)")
        return qk

    # ------------------------------------------------------------------ inputs of the terms
    def attention_inputs(
        self,
        student: Any,
        teacher: Any,
        m: int,
        n: int,
        *,
        student_qk: Sequence[QK] | None = None,
        teacher_qk: Sequence[QK] | None = None,
        attention_mask: Tensor | None = None,
        where: str = "",
    ) -> tuple[list, list]:
        """What the attention costs compare for one batch, the teacher's detached: with
        ``fused_attention`` the (query, key) pairs [B, H, L, d_head]; else the maps [B, H, L, L]
        (pre-softmax scores of the pairs with the additive padding mask, or the outputs'
        post-softmax ``attentions``). Layer counts and the maps' shapes are checked."""
        if self.needs_hooks:
            qk_s = list(self._checked_qk(student_qk, "student", m, where))
            qk_t = [(frozen(q), frozen(k)) for q, k in self._checked_qk(teacher_qk, "teacher", n, where)]
            if self.fused_attention:  # the shapes of the maps never formed, [B, H, L, L]
                (q_s, _), (q_t, _) = qk_s[0], qk_t[0]
                check_attention_shapes((*q_s.shape[:3], q_s.shape[2]), (*q_t.shape[:3], q_t.shape[2]), where)
                return qk_s, qk_t
            a_s, a_t = scores_of(qk_s, attention_mask), scores_of(qk_t, attention_mask)
        else:
            a_s = list(attention_maps(student, "student", m, where))
            a_t = [frozen(a) for a in attention_maps(teacher, "teacher", n, where)]
        check_attention_shapes(a_s[0].shape, a_t[0].shape, where)
        return a_s, a_t

    def hidden_inputs(
        self, student: Any, teacher: Any, m: int, n: int, projection: nn.Module, where: str = ""
    ) -> tuple[Tensor | None, Tensor | None, list[Tensor]]:
        """(W e^S [B, L, d_T], W h^S_1..M stacked [M, B, L, d_T], [e^T, h^T_1 .. h^T_N] detached):
        the student's embedding output projected when ``use_embedding`` (else None), its layer
        outputs projected when ``use_hidden`` (else None), and the teacher's hidden states,
        embeddings first."""
        hs_s = hidden_states(student, "student", m, where)
        hs_t = [frozen(h) for h in hidden_states(teacher, "teacher", n, where)]
        check_same_tokens(hs_s[0], hs_t[0], where)
        if not self.use_hidden:
            return (project(projection, hs_s[0]) if self.use_embedding else None), None, hs_t
        # one projection of the stacked states, not one per layer: a step's host time is its
        # number of small ops (each Linear is a matmul and a bias forward, three ops backward)
        if self.use_embedding:
            out = project(projection, torch.stack(hs_s))
            return out[0], out[1:], hs_t
        return None, project(projection, torch.stack(hs_s[1:])), hs_t

    def prediction_term(
        self,
        student: Any,
        teacher: Any,
        labels: Tensor | None,
        *,
        gold_weight: float,
        task: Literal["auto", "classification", "regression", "tagging"] = "auto",
        reduction: Literal["mean", "batchmean"] = "mean",
        attention_mask: Tensor | None = None,
        where: str = "",
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:func:`prediction_loss` of the two models' ``logits``. ``task="tagging"``: logits
        [B, L, C] and labels [B, L] (-100: none), one row per token, the rows that count (labelled
        tokens; without labels, the real ones) weighted 1, the others 0 (no host read on a GPU)."""
        s, t = get_output(student, "logits"), get_output(teacher, "logits")
        if s is None or t is None:
            raise ValueError(f"{where}use_prediction=True needs logits from the student and the teacher "
                             "(a *ForSequenceClassification model)")
        if s.shape != t.shape:
            raise ValueError(f"{where}student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ "
                             "(the teacher must have the task's label set)")
        kw: dict[str, Any] = dict(temperature=self.temperature, gold_weight=gold_weight, reduction=reduction)
        if task != "tagging":
            return prediction_loss(s, t, labels, task=task, **kw)
        if labels is not None:
            keep = labels != -100
        elif attention_mask is not None:
            keep = attention_mask.bool()
        else:
            keep = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
        C = s.shape[-1]
        flat = None if labels is None else labels.reshape(-1)
        return prediction_loss(s.reshape(-1, C), t.reshape(-1, C), flat, task="classification",
                               weight=keep.reshape(-1), **kw)

    def combine(self, attention: Tensor, hidden: Tensor, embedding: Tensor, prediction: Tensor) -> Tensor:
        """beta * (theta * (L_attn + L_hidden) + L_emb) + L_pred."""
        return self.beta * (self.theta * (attention + hidden) + embedding) + prediction
