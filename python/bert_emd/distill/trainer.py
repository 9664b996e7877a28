"""``DistillationTrainer``: BERT-EMD distillation on top of Hugging Face ``Trainer``.

Everything a ``Trainer`` does is kept -- accelerate / torchrun (DDP), bf16, gradient
accumulation, checkpoints and resume, logging, progress bars, evaluation -- and three things are
added:

- a frozen teacher (eval mode, no gradient, never part of ``self.model``, so never saved into a
  student checkpoint) run on every training batch next to the student;
- the student's loss is :class:`bert_emd.nn.BertEMDLoss` (or any loss module with the same call
  signature); its parameters (the projection W) join the optimizer as their own parameter
  groups and are clipped with the student's;
- the loss's state (projection and ``CostAttention`` layer weights) is saved into every
  checkpoint folder (``distill_loss.pt``, written atomically) and restored on resume, so a killed
  run that resumes reaches the weights of an uninterrupted one; the last transport plans and
  costs go to ``transport.json`` beside it;
- every checkpoint folder appears whole or not at all (:class:`AtomicCheckpoints`: staged, then
  renamed into place once every process has written its part), so a run killed while saving
  resumes from the previous complete checkpoint.

At every logging step the loss parts (``loss_attention``, ``loss_hidden``, ``loss_embedding``,
``loss_prediction``, ... averaged over the steps since the last log and over the processes, as
``Trainer``'s own ``loss``) and the current layer weights (``w_student.i``, ``w_teacher.j``;
``w_student_attention.i`` ... when attention and hidden keep separate weights) are added to the
logs and so to ``trainer_state.json``'s ``log_history``, which ``bert-emd plot`` reads.

Evaluation runs the student alone (its own task loss and logits); it never updates the layer
weights.

FSDP is refused with a clear error (:func:`fsdp_unsupported_reason`): the loss's projection joins
the student's optimizer, which accelerate's FSDP2 preparation cannot map to sharded parameters.
Multi-process runs use DDP.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..errors import UsageError
from ..nn.distributed import broadcast_state, distributed_world
from .checkpoints import AtomicCheckpoints

__all__ = [
    "LOSS_STATE_NAME",
    "TRANSPORT_NAME",
    "DistillationTrainer",
    "atomic_save",
    "data_parallel_reason",
    "deepspeed_unsupported_reason",
    "distributed_world",
    "fsdp_unsupported_reason",
    "unsynchronised_ranks_reason",
    "loss_weights",
    "mean_over_processes",
    "transport_state",
]

LOSS_STATE_NAME = "distill_loss.pt"
TRANSPORT_NAME = "transport.json"
logger = logging.getLogger(__name__)


def atomic_save(obj: Any, path: str, *, as_json: bool = False) -> None:
    """Write ``obj`` to ``path`` through a temporary file in the same folder and ``os.replace``,
    so a crash never leaves a half-written file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if as_json:
                f.write(json.dumps(obj, indent=1).encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsdp_unsupported_reason(args: Any = None, *, fsdp_enabled: bool = False) -> str | None:
    """Why this distillation run cannot go on, if FSDP was requested; ``None`` otherwise.

    FSDP counts as requested when ``args.fsdp`` is set (``--fsdp`` / ``--fsdp full_shard`` /
    ``fsdp_config``), when ``accelerate launch --use_fsdp`` (or an accelerate config) set
    ``ACCELERATE_USE_FSDP``, or when the trainer's accelerator runs FSDP (``fsdp_enabled``).

    Why not (accelerate 1.15, torch 2.13): ``DistillationTrainer`` puts the loss's projection W,
    which lives outside the student, into the student's optimizer; accelerate's FSDP2 ``prepare``
    swaps every optimizer parameter for its sharded copy in the model and fails on W ("A parameter
    in the optimizer couldn't be switched to its sharded version"). On CPU accelerate drops the FSDP
    plugin altogether (gloo processes are ``MULTI_CPU``, never ``FSDP``), so a CPU "FSDP" run would
    silently be a DDP run.
    """
    requested = bool(fsdp_enabled) or bool(getattr(args, "fsdp", None)) or _env_flag("ACCELERATE_USE_FSDP")
    if not requested:
        return None
    return (
        "distillation does not support FSDP (requested through --fsdp / fsdp_config, or accelerate launch "
        "--use_fsdp / ACCELERATE_USE_FSDP): the BERT-EMD loss's projection parameters live outside the "
        "student and join its optimizer, which accelerate's FSDP preparation cannot map to sharded "
        "parameters. Use DDP instead: torchrun --nproc_per_node=K -m bert_emd.cli distill ... (or "
        "accelerate launch --multi_gpu ...) without --fsdp / --use_fsdp"
    )


def _env_flag(name: str) -> bool:
    try:
        from accelerate.utils import parse_flag_from_env

        return bool(parse_flag_from_env(name, default=False))
    except ImportError:  # pragma: no cover - accelerate is a Trainer dependency
        return os.environ.get(name, "false").lower() in ("1", "true", "yes", "on")


def deepspeed_unsupported_reason(args: Any = None) -> str | None:
    """Why this distillation run cannot go on, if DeepSpeed was requested (``args.deepspeed``,
    ``--deepspeed ds_config.json``, or ``accelerate launch --use_deepspeed`` / an accelerate config
    setting ``ACCELERATE_USE_DEEPSPEED``); ``None`` otherwise.

    Why not (untested): the DeepSpeed engine owns the student's parameters and optimizer (ZeRO
    partitions both) and replaces the Trainer's gradient clipping, while the loss's projection
    lives outside the student and joins its optimizer; the engine also casts the student to
    bf16/fp16 and runs without autocast. DDP (``torchrun`` / ``accelerate launch --multi_gpu``)
    with ``--bf16`` is the tested path.
    """
    if not (getattr(args, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED")):
        return None
    return (
        "distillation does not support DeepSpeed (requested through --deepspeed, or accelerate launch "
        "--use_deepspeed / ACCELERATE_USE_DEEPSPEED): its engine owns the student's parameters and optimizer, "
        "but the BERT-EMD loss's projection lives outside the student and joins that optimizer. Use DDP "
        "instead: torchrun --nproc_per_node=K -m bert_emd.cli distill ... --bf16 (or accelerate launch --multi_gpu)"
    )


def data_parallel_reason(args: Any) -> str | None:
    """Why this run cannot go on, if one process would drive several GPUs (``nn.DataParallel``: the
    Trainer's choice when a plain ``python`` run sees more than one GPU); ``None`` otherwise.

    Under DataParallel the replicas share the score hooks' capture lists (each replica's pre-hook
    clears the others' captures: wrong or failing attention costs) and the multi-task model's list
    outputs cannot be gathered. One process per GPU (DDP) is the supported and faster layout.
    """
    from transformers.training_args import ParallelMode

    if getattr(args, "parallel_mode", None) != ParallelMode.NOT_DISTRIBUTED:
        return None
    n = getattr(args, "n_gpu", "several")
    return (
        f"one process sees {n} GPUs, so the Trainer would wrap the model in torch.nn.DataParallel, which "
        "bert-emd does not support (the replicas share the attention hooks' captures). Launch one process per "
        f"GPU: torchrun --nproc_per_node={n} -m bert_emd.cli ... (or accelerate launch --multi_gpu), or make one "
        "GPU visible (CUDA_VISIBLE_DEVICES=0)"
    )


def unsynchronised_ranks_reason(args: Any) -> str | None:
    """Why this run cannot go on, if several processes share a ``torch.distributed`` process group
    but the Trainer runs each of them alone; ``None`` otherwise.

    That happens e.g. under ``torchrun`` on CPU without ``--use_cpu True``: transformers only logs a
    warning and every rank trains its own copy of the student into the same output folder, while
    the loss's collectives still mix their layer weights: silently wrong results.
    """
    from transformers.training_args import ParallelMode

    world = distributed_world()
    if world is None:
        return None
    mode = getattr(args, "parallel_mode", None)
    if mode in (ParallelMode.DISTRIBUTED, ParallelMode.SAGEMAKER_DATA_PARALLEL, ParallelMode.TPU):
        return None
    name = getattr(mode, "value", mode)
    return (
        f"{world[1]} processes share a torch.distributed process group, but the Trainer runs each of "
        f"them alone (parallel mode {name!r}): every rank would train its own copy. On CPU pass --use_cpu True "
        "(gloo DDP); with GPUs make one visible to every rank"
    )


def _tolist(t: Tensor | None) -> list | None:
    return None if t is None else t.detach().double().cpu().tolist()


def mean_over_processes(accelerator: Any, sums: dict[str, Tensor], counts: dict[str, int] | int) -> dict[str, float]:
    """Means of logged terms over the steps since the last log and over the processes.

    Args:
        accelerator: the trainer's ``Accelerator`` (one process: no collective at all).
        sums: ``{key: [] tensor}``, this process's sum of the term over its recorded steps (device
            tensors, read here only: nothing synchronises the host per step).
        counts: ``{key: steps recorded}``, or one count for every key (a key that this process
            lacks then counts as 0 in each of those steps).
    Returns:
        ``{key: (sum of the processes' sums) / (sum of their counts)}``. Our trainers record the
        same number of steps per key on every rank (same steps, same tasks), so this is the mean
        over the ranks of each rank's mean, as ``Trainer``'s ``loss`` (``tr_loss`` gathered and
        averaged over the ranks).

    A collective in a distributed run: every process must call it at the same point (training
    logs, which every rank reaches at the same steps).
    """
    keys = list(sums)
    if accelerator.num_processes > 1:
        # Every rank must all-reduce the same keys in the same order: a rank without some key (a
        # custom loss whose parts depend on the batch, ...) would otherwise reduce a tensor of another
        # length (a hang) or add up different terms. So agree first on the union of the ranks' keys
        # (one small object gather per log, never per step), in the same order everywhere (the
        # gathered list is the same on every rank); a key missing on a rank adds 0 there.
        from accelerate.utils import gather_object

        try:
            keys = list(dict.fromkeys(gather_object(keys)))
        except NotImplementedError:  # XLA has no object gather: keys as recorded (same by construction)
            pass
    if not keys:
        return {}
    device = accelerator.device
    zero = torch.zeros((), device=device)
    n = [float(counts if isinstance(counts, int) else counts.get(k, 0)) for k in keys]
    stacked = torch.cat([
        torch.stack([sums[k].detach().float().reshape(()).to(device) if k in sums else zero for k in keys]),
        torch.tensor(n, device=device),
    ])
    total = accelerator.reduce(stacked, reduction="sum").tolist()  # a copy, unchanged in one process
    return {k: s / c for k, s, c in zip(keys, total[: len(keys)], total[len(keys) :]) if c > 0}


def loss_weights(loss: nn.Module) -> dict[str, list[float]]:
    """Current layer weights of a :class:`BertEMDLoss` for logging: ``{"student": [M],
    "teacher": [N]}`` when shared, else per feature (``"student_attention"``, ...); empty for
    fixed mappings."""
    out: dict[str, list[float]] = {}
    if getattr(loss, "mapping", "emd") != "emd":
        return out
    shared = getattr(loss, "layer_weights", None)
    if shared is not None:
        out["student"] = _tolist(shared.student_weight)
        out["teacher"] = _tolist(shared.teacher_weight)
        return out
    for feature in ("attention", "hidden"):
        part = getattr(loss, f"{feature}_loss", None)
        if part is None or part.weights is None or not getattr(loss, f"use_{feature}", True):
            continue
        out[f"student_{feature}"] = _tolist(part.student_weight)
        out[f"teacher_{feature}"] = _tolist(part.teacher_weight)
    return out


def transport_state(loss: nn.Module) -> dict[str, Any]:
    """JSON-able summary of the loss's last step: per feature the plan F [M, N] and cost D
    [M, N] (batch-mean for ``per_sample``), plus the layer weights and the mapping."""
    out: dict[str, Any] = {"mapping": getattr(loss, "mapping", None), "weights": loss_weights(loss)}
    for feature in ("attention", "hidden"):
        part = getattr(loss, f"{feature}_loss", None)
        if part is None or not getattr(loss, f"use_{feature}", True) or part.last_plan is None:
            continue
        plan, cost = part.last_plan, part.last_cost
        if plan.dim() > 2:  # per-sample problems: report the batch mean
            plan, cost = plan.mean(0), cost.mean(0)
        out[feature] = {"plan": _tolist(plan), "cost": _tolist(cost)}
    return out


class DistillationTrainer(AtomicCheckpoints, Trainer):
    """A ``transformers.Trainer`` that trains ``model`` (the student) to imitate ``teacher``.

    Args:
        model: the student, a Hugging Face ``*ForSequenceClassification`` model.
        args: ``TrainingArguments`` (every option works as with ``Trainer``).
        teacher: the fine-tuned teacher (same tokenizer and label set). It is put in eval mode,
            its parameters get ``requires_grad=False``, and it is moved to ``args.device``.
        distill_loss: a :class:`bert_emd.nn.BertEMDLoss` (built with
            ``BertEMDLoss.from_models(student, teacher, ...)`` when it uses attention scores), or
            any module called as ``loss(student_outputs, teacher_outputs, labels=...,
            attention_mask=...) -> (total [], parts {name: []})``.
        **kwargs: everything else ``Trainer`` takes (datasets, collator, ``compute_metrics``,
            ``processing_class``, callbacks, ...). An ``optimizers=(opt, sched)`` pair replaces
            the built-in optimizer: it must then include ``distill_loss.parameters()`` itself.

    Inputs of every batch: ``input_ids``, ``attention_mask`` (and ``token_type_ids``) of the
    teacher's tokenizer, and ``labels`` ([B] int64 classes or float targets).
    """

    # compute_loss returns a per-batch mean: Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args: Any = None, *, teacher: nn.Module,
                 distill_loss: nn.Module, **kwargs: Any) -> None:
        if teacher is None or distill_loss is None:
            raise ValueError("DistillationTrainer needs both teacher= and distill_loss=")
        for check in (fsdp_unsupported_reason, deepspeed_unsupported_reason):
            if (reason := check(args)) is not None:
                raise UsageError(reason)
        self.teacher = teacher
        self.distill_loss = distill_loss
        self._parts_sum: dict[str, Tensor] = {}
        self._parts_steps = 0
        super().__init__(model=model, args=args, **kwargs)
        # an accelerator that runs FSDP although neither args nor the environment asked for it
        if (reason := fsdp_unsupported_reason(fsdp_enabled=getattr(self, "is_fsdp_enabled", False))) is not None:
            raise UsageError(reason)
        for check in (unsynchronised_ranks_reason, data_parallel_reason):
            if (reason := check(self.args)) is not None:
                raise UsageError(reason)
        # transformers 5 sees BERT's forward(**kwargs) as accepting loss kwargs and would count (and,
        # under DDP, all-gather) the labels of every micro-batch for a num_items_in_batch that the
        # distillation loss, a per-batch mean (loss_is_scaled_for_ga = False), never reads
        self.model_accepts_loss_kwargs = False
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.to(self.args.device)
        self.distill_loss.to(self.args.device)
        # Trainer zeroes only the model's gradients (model.zero_grad()): zero the loss's too.
        self.add_callback(_ZeroLossGrads(self.distill_loss))
        # only the unfused "probs" loss reads the models' attention maps (output_attentions, eager
        # attention); "scores" and fused_attention read the hooked queries and keys, so the models
        # keep SDPA / flash attention and no [B, H, L, L] map is returned
        self._wants_attention_maps = bool(
            getattr(distill_loss, "use_attention", False)
            and getattr(distill_loss, "attention_source", "") == "probs"
            and not getattr(distill_loss, "fused_attention", False)
        )
        if self._wants_attention_maps:
            for who, m in (("student", self.model), ("teacher", self.teacher)):
                _ensure_eager(m, who)

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer over the student, plus the loss's parameters (projection W) as two
        more groups (weights with ``args.weight_decay``, biases without)."""
        fresh = self.optimizer is None
        opt = super().create_optimizer(model)
        if fresh:
            loss_params = [(n, p) for n, p in self.distill_loss.named_parameters() if p.requires_grad]
            decay = [p for n, p in loss_params if not n.endswith("bias")]
            no_decay = [p for n, p in loss_params if n.endswith("bias")]
            if decay:
                opt.add_param_group({"params": decay, "weight_decay": self.args.weight_decay})
            if no_decay:
                opt.add_param_group({"params": no_decay, "weight_decay": 0.0})
        return opt

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """Clip the student's and the loss's gradients together (one global norm)."""
        from accelerate.utils import DistributedType

        extra = [p for p in self.distill_loss.parameters() if p.requires_grad]
        plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        if not extra or self.accelerator.distributed_type not in plain:
            return super()._clip_grad_norm(model)  # FSDP / DeepSpeed / XLA clip the model only
        params = [p for p in model.parameters()] + extra
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    # ------------------------------------------------------------------ loss
    def _teacher_autocast(self) -> Any:
        autocast = getattr(self.accelerator, "autocast", None)
        return autocast() if autocast is not None else nullcontext()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """Training: BERT-EMD loss of the student against the teacher on this batch (a mean over
        the batch). Evaluation (``model.training`` False): the student's own task loss."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.get("labels")
        feeds = {k: v for k, v in inputs.items() if k != "labels"}
        want_att = self._wants_attention_maps
        student_out = model(**feeds, output_hidden_states=True, output_attentions=want_att)
        with torch.no_grad(), self._teacher_autocast():
            teacher_out = self.teacher(**feeds, output_hidden_states=True, output_attentions=want_att)
        total, parts = self.distill_loss(
            student_out, teacher_out, labels=labels, attention_mask=inputs.get("attention_mask")
        )
        with torch.no_grad():
            for k, v in parts.items():
                v = v.detach().float()
                self._parts_sum[k] = self._parts_sum[k] + v if k in self._parts_sum else v.clone()
            self._parts_steps += 1
        return (total, student_out) if return_outputs else total

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss parts (mean since the last training log, over the steps and the processes)
        and the layer weights to every training log."""
        # Training logs ("loss" in logs) come at the same steps on every rank, and _parts_steps (the
        # compute_loss calls since the last log) is the same on every rank, so every rank enters or
        # none does (mean_over_processes is a collective). The multi-task trainers never count here.
        if "loss" in logs and self._parts_steps:
            for k, v in mean_over_processes(self.accelerator, self._parts_sum, self._parts_steps).items():
                logs[f"loss_{k}"] = v
            self._parts_sum, self._parts_steps = {}, 0
            # no reduce for the layer weights: they are the same on every rank (broadcast from rank 0
            # at the start, then updated from the all-reduced transport costs)
            for who, values in loss_weights(self.distill_loss).items():
                for i, w in enumerate(values):
                    logs[f"w_{who}.{i}"] = w
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def save_distill_state(self, output_dir: str) -> None:
        """Write ``distill_loss.pt`` (the loss's ``state_dict``: projection and layer weights)
        and ``transport.json`` (last plans, costs, weights) into ``output_dir``, atomically."""
        atomic_save(self.distill_loss.state_dict(), os.path.join(output_dir, LOSS_STATE_NAME))
        atomic_save(transport_state(self.distill_loss), os.path.join(output_dir, TRANSPORT_NAME), as_json=True)

    def load_distill_state(self, checkpoint: str) -> None:
        """Restore the loss's state saved by :meth:`save_distill_state` in ``checkpoint``."""
        path = os.path.join(checkpoint, LOSS_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {LOSS_STATE_NAME}: it is not a checkpoint of a distillation run "
                "(the projection and layer weights could not be restored)"
            )
        # Load onto the CPU: load_state_dict copies into the loss's tensors on whatever device they
        # are. map_location=self.args.device failed on the ranks of a distributed CPU run, whose
        # device is an indexed "cpu:N" that torch.load cannot restore storages to ("don't know how to
        # restore data location ... (tagged with cpu:0)"), so a DDP CPU run could not resume.
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.distill_loss.load_state_dict(state)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's save (the student only: the teacher is not part of ``self.model``), then the
        loss state beside it (on the process that saves)."""
        super().save_model(output_dir, _internal_call)
        out = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            self.save_distill_state(out)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Called on every resume, whatever the backend (DDP, FSDP, DeepSpeed): restore ours too.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_distill_state(checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best and os.path.isfile(os.path.join(best, LOSS_STATE_NAME)):
            self.load_distill_state(best)


class _ZeroLossGrads(TrainerCallback):
    """Zero the loss's gradients (projection W) at the start of training and after every
    optimizer step, as ``Trainer`` does for the model; without it they would accumulate."""

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loss.zero_grad(set_to_none=True)
        broadcast_state(self.loss)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loss.zero_grad(set_to_none=True)


def _ensure_eager(model: nn.Module, who: str) -> None:
    """Post-softmax attention maps need eager attention: switch a model that runs SDPA."""
    inner = getattr(model, "module", model)
    cfg = getattr(inner, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl in (None, "eager"):
        return
    setter = getattr(inner, "set_attn_implementation", None)
    if setter is None:
        raise ValueError(
            f"the {who} runs {impl!r} attention, which returns no attention maps: load it with "
            'attn_implementation="eager" or use BertEMDLoss(attention_source="scores")'
        )
    logger.info("switching the %s from %s to eager attention (attention_source='probs')", who, impl)
    setter("eager")
