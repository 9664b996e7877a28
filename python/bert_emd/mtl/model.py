"""A shared encoder with one head per task, and the five multi-task mechanisms as flags.

Per batch of task t (all examples of a batch belong to one task):

1. the shared encoder runs once (``output_hidden_states=True``): h_0 (embedding output) .. h_M;
2. ``hierarchy``: the task's shared view S_t is h_{tap_layer}, or a mixture sum_k w_tk h_k over
   the M transformer layers (learned softmax weights, or the task's EMD weights); without it,
   S_t = h_M;
3. ``private``: P_t = the task's private encoder over h_0; orthogonality loss
   gamma * ||S^T P||_F^2 with S, P the batch's sentence vectors of S_t and P_t (mean over real
   tokens), centred and row-normalised;
4. ``adversarial``: a discriminator predicts t from pool(S_t) through gradient reversal; its
   cross-entropy, weighted by lambda, joins the loss;
5. ``gate``: S_t <- sigmoid(W_t [S_t; P_t] + b_t) * S_t;
6. features = [S_t; P_t] (or S_t), pooled (CLS or mean) for sentence tasks, per token for
   tagging, into the task's own head (never shared): dense + tanh (optional) and a linear output,
   or, with ``label_embedding``, a projection whose dot products with the task's rows of the
   shared label matrix are the logits.

Loss = loss_weight_t * task loss (cross-entropy; MSE for regression; token cross-entropy with
-100 ignored for tagging) + the auxiliary losses. With every mechanism off this is hard
parameter sharing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MissingFileError, UsageError
from ..model_files import check_model_folder, float32_kwargs
from ..nn.emd_terms import model_sizes
from .config import DataFiles, MechanismConfig, TaskSpec
from .mechanisms import (
    LabelEmbedding,
    LayerMixture,
    PrivateEncoder,
    TaskDiscriminator,
    TaskGate,
    orthogonality_loss,
    pool,
)

__all__ = ["MultiTaskModel", "MultiTaskOutput", "TaskHead", "encoder_sizes"]

CONFIG_NAME = "mtl_config.json"
ENCODER_FOLDER = "encoder"


@dataclass
class MultiTaskOutput:
    """What :meth:`MultiTaskModel.forward` returns for one task's batch.

    Attributes:
        task: the task name.
        logits: [B, C] (classification), [B, 1] (regression) or [B, L, C] (tagging).
        loss: loss_weight * task_loss + aux_loss, or None without labels.
        task_loss: the unweighted task loss [], or None without labels.
        aux_loss: sum of the auxiliary losses [] (0 when no mechanism adds one).
        aux: the weighted auxiliary terms by name (``orthogonality``, ``adversarial``), detached.
        hidden_states: the encoder's M + 1 hidden states [B, L, d] (for distillation).
        attentions: the encoder's M attention maps [B, H, L, L] when requested, else None.
        diagnostics: detached [] values that show what the batch's mechanisms do, never part of
            the loss: ``orthogonality_norm`` (||S^T P||_F of the processed sentence vectors,
            ``private``), ``discriminator_acc`` (share of the batch whose task the discriminator
            names, ``adversarial`` with a weight > 0), ``gate_mean`` (mean gate activation,
            ``gate``).
    """

    task: str
    logits: Tensor
    loss: Tensor | None = None
    task_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    diagnostics: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:  # dict-style access, as Hugging Face outputs
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def encoder_sizes(encoder: nn.Module) -> tuple[int, int]:
    """(M transformer layers, hidden size d) of a :class:`MultiTaskModel`, or from a Hugging Face
    encoder's config."""
    if isinstance(encoder, MultiTaskModel):
        return encoder.num_layers, encoder.hidden_size
    return model_sizes(encoder, "pass num_layers and hidden_size to MultiTaskModel")


class TaskHead(nn.Module):
    """One task's output head (never shared between tasks).

    Sentence tasks: dropout -> [dense d_in -> d_in, tanh, dropout] -> output; tagging: dropout
    -> output per token. Output: Linear(d_in -> C) (1 for regression), or, with a label
    embedding, Linear(d_in -> d_e) whose dot products with the task's label rows are the logits.
    """

    def __init__(self, spec: TaskSpec, input_dim: int, mechanisms: MechanismConfig, use_label_embedding: bool) -> None:
        super().__init__()
        self.task = spec.name
        self.dropout = nn.Dropout(mechanisms.dropout)
        self.dense = (
            nn.Linear(input_dim, input_dim) if mechanisms.head_hidden and not spec.is_tagging else None
        )
        self.use_label_embedding = use_label_embedding
        out_dim = mechanisms.label_embedding_dim if use_label_embedding else int(spec.num_labels or 1)
        self.out = nn.Linear(input_dim, out_dim)
        for lin in (self.dense, self.out):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, label_embedding: LabelEmbedding | None = None) -> Tensor:
        """x [B, d_in] or [B, L, d_in] -> logits [B, C] or [B, L, C]."""
        x = self.dropout(x)
        if self.dense is not None:
            x = self.dropout(torch.tanh(self.dense(x)))
        x = self.out(x)
        if self.use_label_embedding:
            if label_embedding is None:
                raise ValueError(f"task {self.task!r}: its head needs the shared label embedding")
            x = label_embedding.logits(self.task, x)
        return x


class MultiTaskModel(nn.Module):
    """A shared encoder (any Hugging Face encoder, or a distilled student) with per-task heads
    and the mechanisms of :class:`~bert_emd.mtl.config.MechanismConfig`.

    Args:
        encoder: a model returning ``hidden_states`` (M + 1 tensors [B, L, d]) when called with
            ``output_hidden_states=True`` (e.g. ``BertModel``). A ``*For...`` model is accepted
            and its ``base_model`` used.
        tasks: the task specs (names unique).
        mechanisms: which mechanisms are on (default: none, hard sharing).
        num_layers, hidden_size: M and d when the encoder has no Hugging Face config.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: Sequence[TaskSpec],
        mechanisms: MechanismConfig | None = None,
        *,
        num_layers: int | None = None,
        hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskModel needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        base = getattr(encoder, "base_model", None)
        if isinstance(base, nn.Module) and base is not encoder:
            encoder = base
        self.encoder = encoder
        if num_layers is None or hidden_size is None:
            m, d = encoder_sizes(encoder)
            num_layers, hidden_size = num_layers or m, hidden_size or d
        self.num_layers, self.hidden_size = int(num_layers), int(hidden_size)
        mech = mechanisms or MechanismConfig()
        self.mechanisms = mech
        self.specs: dict[str, TaskSpec] = {t.name: t for t in tasks}
        self.task_names: list[str] = names
        m, d = self.num_layers, self.hidden_size

        # hierarchy: tap index into hidden_states (0..M), or a mixture over layers 1..M
        self.tap: dict[str, int | None] = {}
        self.mixtures = nn.ModuleDict()
        for t in tasks:
            tap = None
            if mech.hierarchy and t.tap_layer is not None:
                tap = t.tap_layer if t.tap_layer >= 0 else m + 1 + t.tap_layer
                if not 0 <= tap <= m:
                    raise UsageError(
                        f"task {t.name!r}: tap_layer {t.tap_layer} is outside the encoder's layers "
                        f"(0 = embeddings .. {m}, or -1 .. -{m + 1})"
                    )
            elif mech.hierarchy:
                self.mixtures[t.name] = LayerMixture(m, mech.hierarchy_mode)
            self.tap[t.name] = tap

        self.private = nn.ModuleDict()
        d_p = mech.private_dim if mech.private else 0
        if mech.private:
            for t in tasks:
                self.private[t.name] = PrivateEncoder(d, mech.private_dim, mech.private_heads, mech.dropout)
        self.gates = nn.ModuleDict()
        if mech.gate:
            for t in tasks:
                self.gates[t.name] = TaskGate(d, d + d_p)
        self.discriminator: TaskDiscriminator | None = None
        if mech.adversarial:
            if len(tasks) < 2:
                raise ValueError("the adversarial mechanism needs at least 2 tasks (it predicts the task)")
            self.discriminator = TaskDiscriminator(d, len(tasks))
        self.label_embedding: LabelEmbedding | None = None
        if mech.label_embedding:
            counts = {t.name: int(t.num_labels or 1) for t in tasks if not t.is_regression}
            if counts:
                self.label_embedding = LabelEmbedding(counts, mech.label_embedding_dim)
        self.heads = nn.ModuleDict(
            {
                t.name: TaskHead(t, d + d_p, mech, self.label_embedding is not None and not t.is_regression)
                for t in tasks
            }
        )

    # ------------------------------------------------------------------ helpers
    def task_index(self, task: str | int | Tensor) -> int:
        """Index of ``task`` (a name, an index, or a tensor of one index repeated)."""
        if isinstance(task, Tensor):
            flat = task.reshape(-1)
            if flat.numel() == 0:
                raise ValueError("task tensor is empty")
            task = int(flat[0])
        if isinstance(task, str):
            if task not in self.specs:
                raise KeyError(f"unknown task {task!r}; tasks are {self.task_names}")
            return self.task_names.index(task)
        if not 0 <= int(task) < len(self.task_names):
            raise KeyError(f"task index {task} out of range for {len(self.task_names)} tasks")
        return int(task)

    def layer_weights(self) -> dict[str, Tensor]:
        """Each task's current layer-mixture weights [M] (hierarchy with a mixture), detached."""
        return {name: mix.weights.detach().cpu() for name, mix in self.mixtures.items()}

    def set_emd_layer_weights(self, task: str, weights: Tensor) -> None:
        """Set task's mixture weights [M] (``hierarchy_mode="emd"``); a no-op for tasks with a tap."""
        if task in self.mixtures:
            self.mixtures[task].set_weights(weights)

    def encode(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        output_attentions: bool = False,
        inputs_embeds: Tensor | None = None,
    ) -> Any:
        """Run the shared encoder; returns its output with ``hidden_states`` (and ``attentions``)."""
        kwargs: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if output_attentions:
            kwargs["output_attentions"] = True
        out = self.encoder(**kwargs)
        hs = out["hidden_states"] if isinstance(out, Mapping) else getattr(out, "hidden_states", None)
        if hs is None or len(hs) != self.num_layers + 1:
            got = None if hs is None else len(hs)
            raise ValueError(
                f"the encoder returned {got} hidden states, expected {self.num_layers + 1} (embeddings + M layers)"
            )
        return out

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        task: str | int | Tensor | Sequence[Mapping[str, Any]],
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        output_attentions: bool = False,
        inputs_embeds: Tensor | None = None,
    ) -> MultiTaskOutput | list[MultiTaskOutput]:
        """One task's batch through the shared encoder and the task's private parts and head.

        Args:
            task: the batch's task (name, index, or a [B] / [] tensor of its index); or a list of
                task batches, mappings with ``task`` and this method's tensor arguments (then the
                other arguments but ``output_attentions`` are not given).
            input_ids: [B, L] token ids; attention_mask: [B, L] 1 = real; token_type_ids: [B, L].
            labels: [B] class indices, [B] floats (regression) or [B, L] tag ids with -100 on
                positions that carry no label (tagging); None for inference.
            output_attentions: also return the encoder's attention maps (eager attention).
        Returns:
            :class:`MultiTaskOutput`; for a list of task batches, the list of their outputs.
        """
        if isinstance(task, (list, tuple)):
            # all of a step's task batches in one call: DDP allows one forward of the wrapped
            # model per backward, and a step (tasks_per_step > 1) holds several task batches.
            # The class's forward, not self.forward: with mixed precision accelerate replaces the
            # instance's forward by one wrapped in a torch.autocast *instance*, which is not
            # re-entrant (it keeps the state to restore on itself): calling it again from inside
            # left CPU/GPU autocast switched on after the outer call returned, for the rest of the
            # process (the loss, backward, evaluation and any later run: --bf16 leaked).
            forward = type(self).forward
            return [forward(self, b["task"], **{k: v for k, v in b.items() if k != "task"},
                            output_attentions=output_attentions) for b in task]
        ti = self.task_index(task)
        name = self.task_names[ti]
        spec = self.specs[name]
        mech = self.mechanisms
        out = self.encode(
            input_ids, attention_mask, token_type_ids, output_attentions=output_attentions, inputs_embeds=inputs_embeds
        )
        hs = tuple(out["hidden_states"] if isinstance(out, Mapping) else out.hidden_states)
        atts = out.get("attentions") if isinstance(out, Mapping) else getattr(out, "attentions", None)
        mask = attention_mask
        if self.tap[name] is not None:
            shared = hs[self.tap[name]]
        elif name in self.mixtures:
            shared = self.mixtures[name](hs[1:])
        else:
            shared = hs[-1]
        aux: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {}
        private = self.private[name](hs[0], mask) if name in self.private else None
        pooled_shared = pool(shared, mask, mech.pooling)
        if private is not None:
            # Sentence vectors by the mean over real tokens, whatever the head pools: CLS vectors of
            # a fresh encoder are nearly equal across a batch, and row normalisation after centring
            # divides by that tiny spread (gradients ~ 1 / spread).
            # (gamma 0: no loss term, but the diagnostic still shows what the features do without it)
            with nullcontext() if mech.gamma > 0 else torch.no_grad():
                ortho = orthogonality_loss(pool(shared, mask, "mean"), pool(private, mask, "mean"))
            if mech.gamma > 0:
                aux["orthogonality"] = mech.gamma * ortho
            diagnostics["orthogonality_norm"] = ortho.detach().sqrt()
        if self.discriminator is not None and mech.adversarial_weight > 0:
            d_logits = self.discriminator(pooled_shared)
            target = torch.full((d_logits.shape[0],), ti, dtype=torch.long, device=d_logits.device)
            aux["adversarial"] = mech.adversarial_weight * F.cross_entropy(d_logits.float(), target)
            diagnostics["discriminator_acc"] = (d_logits.detach().argmax(-1) == target).float().mean()
        if name in self.gates:
            context = shared if private is None else torch.cat([shared, private], -1)
            shared = self.gates[name](shared, context)
            last = self.gates[name].last_mean
            if last is not None:
                diagnostics["gate_mean"] = last
        feats = shared if private is None else torch.cat([shared, private], -1)
        if not spec.is_tagging:
            feats = pool(feats, mask, mech.pooling)
        logits = self.heads[name](feats, self.label_embedding)
        aux_loss = sum(aux.values()) if aux else logits.new_zeros((), dtype=torch.float32)
        assert isinstance(aux_loss, Tensor)
        task_loss = loss = None
        if labels is not None:
            task_loss = task_loss_fn(spec, logits, labels)
            loss = spec.loss_weight * task_loss + aux_loss
        return MultiTaskOutput(
            task=name,
            logits=logits,
            loss=loss,
            task_loss=task_loss,
            aux_loss=aux_loss,
            aux={k: v.detach() for k, v in aux.items()},
            hidden_states=hs,
            attentions=tuple(atts) if atts is not None and len(atts) else None,
            diagnostics=diagnostics,
        )

    # ------------------------------------------------------------------ saving / loading
    def config_dict(self) -> dict[str, Any]:
        """What :meth:`save_pretrained` writes to ``mtl_config.json``."""
        return {
            "tasks": [t.to_dict() for t in self.specs.values()],
            "mechanisms": asdict(self.mechanisms),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
        }

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write ``mtl_config.json``, the encoder's Hugging Face config (``encoder/``) and all
        weights (``model.safetensors``) to ``path``."""
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        (p / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        cfg = getattr(self.encoder, "config", None)
        if cfg is not None and hasattr(cfg, "save_pretrained"):
            cfg.save_pretrained(str(p / ENCODER_FOLDER))
        sd = self.state_dict() if state_dict is None else state_dict
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(p / "model.safetensors"),
                  metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, attn_implementation: str | None = None) -> MultiTaskModel:
        """Load a model saved by :meth:`save_pretrained` (or a ``bert-emd mtl train`` output folder,
        whose weights may carry a ``student.`` prefix from multi-task distillation)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel


        p = Path(path)
        cfg_file = p / CONFIG_NAME
        if not cfg_file.is_file():
            raise MissingFileError(f"{p} holds no {CONFIG_NAME}: not a multi-task model folder")
        raw = json.loads(cfg_file.read_text())
        tasks = []
        for t in raw["tasks"]:
            t = dict(t)
            t["data"] = DataFiles(**t.get("data", {}))
            tasks.append(TaskSpec(**t))
        mech = MechanismConfig(**raw["mechanisms"])
        kwargs: dict[str, Any] = {}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        enc_cfg = AutoConfig.from_pretrained(str(p / ENCODER_FOLDER), local_files_only=True, **kwargs)
        # float32 whatever dtype the saved encoder config names (see float32_kwargs)
        encoder = AutoModel.from_config(enc_cfg, **kwargs, **float32_kwargs())
        model = cls(encoder, tasks, mech, num_layers=raw.get("num_layers"), hidden_size=raw.get("hidden_size"))
        weights = p / "model.safetensors"
        if not weights.is_file():
            raise MissingFileError(f"{p} holds no model.safetensors")
        sd = load_file(str(weights))
        if any(k.startswith("student.") for k in sd):
            sd = {k[len("student.") :]: v for k, v in sd.items() if k.startswith("student.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # Encoders may register non-persistent / tied buffers (position ids) that are not saved.
        # The encoder's pooler is never used (heads pool themselves); a checkpoint of an encoder
        # built without one (add_pooling_layer=False) has no pooler weights.
        missing = [k for k in missing if not k.endswith("position_ids") and not k.startswith("encoder.pooler.")]
        if missing or unexpected:
            raise ValueError(f"{weights}: state does not match the model: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")
        return model

    @classmethod
    def from_encoder(
        cls,
        encoder_path: str | os.PathLike,
        tasks: Sequence[TaskSpec],
        mechanisms: MechanismConfig | None = None,
        *,
        attn_implementation: str | None = None,
    ) -> MultiTaskModel:
        """A new multi-task model on a pretrained encoder from a local folder (no hub look-up)."""
        from transformers import AutoModel


        check_model_folder(encoder_path)
        # float32 whatever the checkpoint's dtype: a bfloat16 encoder would train its weights in
        # bfloat16 under --bf16 and feed bfloat16 states to the float32 heads without it
        kwargs: dict[str, Any] = {"local_files_only": True, **float32_kwargs()}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            encoder = AutoModel.from_pretrained(str(encoder_path), **kwargs)
        except OSError as err:
            raise MissingFileError(f"cannot load an encoder from {encoder_path}: {err}") from err
        return cls(encoder, tasks, mechanisms)


def task_loss_fn(spec: TaskSpec, logits: Tensor, labels: Tensor) -> Tensor:
    """The task's supervised loss [] (fp32).

    Args:
        spec: the task.
        logits: [B, C], [B, 1] (regression) or [B, L, C] (tagging).
        labels: [B] class ids / [B] floats / [B, L] tag ids (-100 = ignored).
    """
    x = logits.float()
    if spec.is_regression:
        return F.mse_loss(x.reshape(-1), labels.float().reshape(-1))
    if spec.is_tagging:
        y = labels.long().reshape(-1)
        total = F.cross_entropy(x.reshape(-1, x.shape[-1]), y, ignore_index=-100, reduction="sum")
        return total / (y != -100).sum().clamp_min(1)  # 0, not NaN, for a batch without tags
    return F.cross_entropy(x, labels.long().reshape(-1))
