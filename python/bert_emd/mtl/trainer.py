"""Multi-task training on Hugging Face ``Trainer`` (and multi-task distillation on the project's
``DistillationTrainer``).

What the multi-task trainers change, and nothing else:

- the training data loader: the tasks' tokenised training sets concatenated, batched by
  :class:`~bert_emd.mtl.samplers.MultiTaskBatchSampler` (each batch one task's examples, the
  task chosen by the configured sampler; ``tasks_per_step`` batches per step), padded per task;
- ``compute_loss``: the multi-task model on each task batch of the step (or, distilling, the
  student against each task's teacher with one batched EMD solve per step); the step's loss is
  the mean over its task batches;
- ``evaluate``: every task's validation set, its metrics (``eval_<task>_<metric>``) and the
  macro average of the tasks' headline metrics (``eval_macro_avg``); in distributed runs each rank
  scores a shard of every task's examples and the shards' logits are gathered to every rank;
- logging adds each task's mean training loss since the last log (``loss_<task>``), the
  auxiliary losses (both averaged over the processes, as the Trainer's ``loss``), the mechanisms'
  diagnostics (``diag_<name>_<task>``: ||S^T P||, discriminator accuracy, gate activation; see
  :class:`~bert_emd.mtl.model.MultiTaskOutput`), the layer-mixture weights, and -- distilling --
  each task's EMD layer weights;
- saving writes ``mtl_config.json`` and the encoder's config next to the weights, so that
  :meth:`MultiTaskModel.from_pretrained` loads the folder.

The data (:mod:`~bert_emd.mtl.data`), the evaluation (:mod:`~bert_emd.mtl.evaluation`) and the
distillation step (:mod:`~bert_emd.mtl.step`) live in their own modules; this one holds the
trainers. Everything else (optimiser, schedule, accumulation, checkpoints and resume, bf16, DDP via
accelerate / torchrun) is the Trainer's.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader
from transformers import Trainer

from ..distill.checkpoints import AtomicCheckpoints
from ..distill.trainer import (
    LOSS_STATE_NAME,
    TRANSPORT_NAME,
    DistillationTrainer,
    atomic_save,
    data_parallel_reason,
    mean_over_processes,
    unsynchronised_ranks_reason,
)
from ..errors import UsageError
from . import evaluation
from .data import MultiTaskCollator, TaskDataset
from .loss import MultiTaskEMDLoss
from .model import CONFIG_NAME, ENCODER_FOLDER, MultiTaskModel
from .samplers import MultiTaskBatchSampler, TaskSampler
from .step import distillation_step
from .teachers import TeacherSet

__all__ = ["MultiTaskDistillationTrainer", "MultiTaskTrainer"]

logger = logging.getLogger(__name__)

class _MultiTaskMixin:
    """Data loading, evaluation, logging and saving shared by the two multi-task trainers."""

    loss_is_scaled_for_ga = False

    def _setup_mtl(
        self,
        train_sets: dict[str, Any],
        eval_sets: dict[str, Any] | None,
        sampler: TaskSampler,
        collator: MultiTaskCollator,
        tasks_per_step: int,
    ) -> None:
        self.mtl_train_sets = train_sets
        self.mtl_eval_sets = eval_sets or {}
        self.mtl_sampler = sampler
        self.mtl_collator = collator
        self.tasks_per_step = int(tasks_per_step)
        self._task_loss_sum: dict[str, Tensor] = {}
        self._task_loss_n: dict[str, int] = {}
        self._diag_sum: dict[str, Tensor] = {}
        self._diag_n: dict[str, int] = {}
        self.model_accepts_loss_kwargs = False

    @staticmethod
    def concat(train_sets: dict[str, Any], model: MultiTaskModel) -> ConcatDataset:
        """The tasks' training sets concatenated in the model's task order."""
        missing = [t for t in model.task_names if t not in train_sets]
        if missing:
            raise ValueError(f"no training data for task(s) {missing}")
        return ConcatDataset([TaskDataset(train_sets[t], i) for i, t in enumerate(model.task_names)])

    @staticmethod
    def eval_concat(eval_sets: dict[str, Any] | None, model: MultiTaskModel) -> ConcatDataset | None:
        """The tasks' evaluation sets concatenated (None without any): the Trainer's ``eval_dataset``,
        which it requires for an ``eval_strategy`` other than ``"no"``; :meth:`evaluate` scores the
        sets task by task and never reads it."""
        sets = [TaskDataset(ds, model.task_names.index(t)) for t, ds in (eval_sets or {}).items()]
        return ConcatDataset(sets) if sets else None

    def _trainer_kwargs(self, model: MultiTaskModel, train_sets: dict[str, Any], eval_sets: dict[str, Any] | None,
                        pad_token_id: int, mixture_lr: float | None, label_embedding_lr: float | None,
                        kwargs: dict[str, Any]) -> dict[str, Any]:
        """Keep the per-module learning rates (read by :meth:`create_optimizer`) and return the
        Trainer's keyword arguments with the concatenated data sets and the multi-task collator."""
        self.mixture_lr = mixture_lr
        self.label_embedding_lr = label_embedding_lr
        kwargs = dict(kwargs)
        kwargs.setdefault("eval_dataset", self.eval_concat(eval_sets, model))
        return {**kwargs, "train_dataset": self.concat(train_sets, model),
                "data_collator": MultiTaskCollator(list(model.specs.values()), pad_token_id)}

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimiser, with the layer-mixture parameters (hierarchy) in their own group
        at ``mixture_lr`` (no weight decay) when that is set, and the shared label-embedding matrix
        (label_embedding) in its own group at ``label_embedding_lr`` (weight decay unchanged) when
        that is set: freshly initialised parts that barely move at a fine-tuning rate."""
        fresh = self.optimizer is None  # type: ignore[has-type]
        opt = super().create_optimizer(model)  # type: ignore[misc]
        if not fresh:
            return opt
        plain = self._model()
        groups = []
        lr = getattr(self, "mixture_lr", None)
        if lr is not None:
            mix = [p for m in plain.mixtures.values() for p in m.parameters() if p.requires_grad]
            groups.append((mix, float(lr), 0.0))
        lr = getattr(self, "label_embedding_lr", None)
        if lr is not None and plain.label_embedding is not None:
            emb = [p for p in plain.label_embedding.parameters() if p.requires_grad]
            groups.append((emb, float(lr), self.args.weight_decay))
        for params, group_lr, decay in groups:
            ids = {id(p) for p in params}
            if params:
                for g in opt.param_groups:
                    g["params"] = [p for p in g["params"] if id(p) not in ids]
                opt.add_param_group({"params": params, "lr": group_lr, "weight_decay": decay})
        return opt

    def _model(self) -> MultiTaskModel:
        m = self.accelerator.unwrap_model(self.model)
        assert isinstance(m, MultiTaskModel)
        return m

    def _task_batch_size(self) -> int:
        """Examples in one task batch across all processes: each takes ``per_device_train_batch_size``
        of them, so that N processes with batch b train as one process with batch N * b."""
        return self.args.per_device_train_batch_size * self.args.world_size

    def batch_sampler(self) -> MultiTaskBatchSampler:
        """The training batch sampler (all ranks draw the same task sequence and the same task
        batches, and each takes its ``per_device_train_batch_size`` examples of every task batch)."""
        model = self._model()
        sizes = [len(self.mtl_train_sets[t]) for t in model.task_names]
        args = self.args
        return MultiTaskBatchSampler(
            sizes,
            self.mtl_sampler,
            self._task_batch_size(),
            num_epochs=args.num_train_epochs if args.max_steps <= 0 else max(
                1.0, args.max_steps * args.gradient_accumulation_steps / max(1, self._steps_per_epoch(sizes))
            ),
            tasks_per_step=self.tasks_per_step,
            seed=args.seed,
            num_replicas=args.world_size,
            rank=args.process_index,
        )

    def _steps_per_epoch(self, sizes: list[int]) -> int:
        b = self._task_batch_size()
        return math.ceil(sum(math.ceil(n / b) for n in sizes) / self.tasks_per_step)

    def get_train_dataloader(self) -> DataLoader:
        bs = self.batch_sampler()
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=bs,
            collate_fn=self.mtl_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda",
        )
        prepared = self.accelerator.prepare(loader)
        # our batch sampler is rank-aware (same tasks on every rank): make accelerate's
        # re-sharding wrapper a passthrough, as Trainer does for its rank-aware samplers. Its
        # batch_size goes too (and split_batches, which cuts by it): the wrapper yields only batches
        # of exactly that length, and ours are a rank's share of each of a step's task batches
        wrapper = getattr(prepared, "batch_sampler", None)
        if wrapper is not None and getattr(wrapper, "batch_sampler", None) is bs:
            wrapper.num_processes = 1
            wrapper.process_index = 0
            wrapper.batch_size = None
            wrapper.split_batches = False
            # ... and it passes the epoch on. Resuming mid-epoch, the Trainer wraps the loader's
            # batch sampler (this wrapper) in accelerate's SkipBatchSampler and calls set_epoch on the
            # sampler that that wraps: this wrapper, which has none, so the fresh sampler of the
            # resumed run stayed at epoch 0 and replayed the first epoch's tasks and batches (in
            # distributed runs only: one process has no wrapper, the Trainer reaches our sampler)
            wrapper.set_epoch = bs.set_epoch
        return prepared

    def _progress(self) -> float:
        total = self.state.max_steps or 1
        return min(1.0, self.state.global_step / total)

    def _log_step_tasks(self, batches: list[dict[str, Any]]) -> None:
        """Debug log line: the task batches (task x examples) this process trains on in this step.

        In distributed runs every rank must name the same tasks in the same order (their heads'
        gradients and, distilling, their transport problems are reduced across ranks); enable the
        ``bert_emd.mtl.trainer`` logger at DEBUG to see (and the tests to check) that they do.
        """
        if not logger.isEnabledFor(logging.DEBUG):
            return
        names = self._model().task_names
        desc = ", ".join(f"{names[int(b['task'])]} x {len(b['input_ids'])}" for b in batches)
        logger.debug("rank %d of %d, step %d: %s", self.args.process_index, self.args.world_size,
                     self.state.global_step, desc)

    def _record(self, task: str, value: Tensor) -> None:
        # device tensors summed, read at logging time only (no host synchronisation per step)
        v = value.detach().float()
        prev = self._task_loss_sum.get(task)
        self._task_loss_sum[task] = v.clone() if prev is None else prev + v
        self._task_loss_n[task] = self._task_loss_n.get(task, 0) + 1

    def _record_diagnostics(self, batches: list[dict[str, Any]], outs: list[Any]) -> None:
        """Record each task batch's mechanism diagnostics (``diag_<name>_<task>`` in the logs)."""
        names = self._model().task_names
        for b, out in zip(batches, outs):
            for k, v in (getattr(out, "diagnostics", None) or {}).items():
                key = f"diag_{k}_{names[int(b['task'])]}"
                prev = self._diag_sum.get(key)
                v = v.detach().float()
                self._diag_sum[key] = v.clone() if prev is None else prev + v
                self._diag_n[key] = self._diag_n.get(key, 0) + 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            # every rank reaches the training logs at the same steps and has recorded the same tasks
            # (and terms) as many times: mean_over_processes (a collective) averages them over the
            # ranks; it also copes with a term that some rank lacks
            for t, v in mean_over_processes(self.accelerator, self._task_loss_sum, self._task_loss_n).items():
                logs[f"loss_{t}"] = v
            self._task_loss_sum, self._task_loss_n = {}, {}
            # (a second collective, at the same point on every rank)
            logs.update(mean_over_processes(self.accelerator, self._diag_sum, self._diag_n))
            self._diag_sum, self._diag_n = {}, {}
            self._extra_logs(logs)
        super().log(logs, start_time)  # type: ignore[misc]

    def _extra_logs(self, logs: dict[str, float]) -> None:
        # layer weights need no reduce: the same on every rank (the mixtures are the DDP-synced
        # model's parameters; the EMD weights are updated from the all-reduced transport costs)
        model = self._model()
        for t, w in model.layer_weights().items():
            for i, x in enumerate(w.tolist()):
                logs[f"mix_{t}.{i}"] = x

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Every task's metrics on its evaluation set and their macro average (logged, returned).

        In a distributed run every rank scores its shard of each task's examples and gets every
        rank's logits (:func:`~bert_emd.mtl.evaluation.evaluate_tasks` with ``distributed``): the
        metrics of one process, on every rank, for 1 / world_size of the forwards. Every rank must
        call it (the Trainer does).
        """
        sets = eval_dataset if isinstance(eval_dataset, dict) else self.mtl_eval_sets
        if not sets:
            raise ValueError("no evaluation data: give the tasks validation files")
        # looked up in its module at call time (tests record the calls by replacing it there)
        res = evaluation.evaluate_tasks(self._model(), sets, self.mtl_collator,
                                        batch_size=self.args.per_device_eval_batch_size, device=self.args.device,
                                        distributed=self.args.world_size > 1)
        metrics: dict[str, float] = {}
        for t, scores in res["tasks"].items():
            for k, v in scores.items():
                metrics[f"{metric_key_prefix}_{t}_{k}"] = float(v)
        metrics[f"{metric_key_prefix}_macro_avg"] = res["macro_avg"]
        metrics[f"{metric_key_prefix}_loss"] = float(np.mean([s["loss"] for s in res["tasks"].values()]))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        out = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            model = self._model()
            with open(os.path.join(out, CONFIG_NAME), "w") as f:
                json.dump(model.config_dict(), f, indent=2)
            cfg = getattr(model.encoder, "config", None)
            if cfg is not None and hasattr(cfg, "save_pretrained"):
                cfg.save_pretrained(os.path.join(out, ENCODER_FOLDER))


class MultiTaskTrainer(_MultiTaskMixin, AtomicCheckpoints, Trainer):
    """``transformers.Trainer`` for a :class:`MultiTaskModel` (see the module docstring).

    Args:
        model: the multi-task model.
        args: ``TrainingArguments``; ``per_device_train_batch_size`` is each process's share of a
            task batch (a task batch has ``per_device_train_batch_size * world_size`` examples).
        train_sets: ``{task: tokenised training split}``.
        eval_sets: ``{task: tokenised validation split}`` (for :meth:`evaluate`).
        sampler: the task sampler.
        tasks_per_step: task batches per optimiser step (their losses averaged).
        pad_token_id: padding id of the tokenizer.
        mixture_lr: learning rate of the hierarchy layer mixtures (None: ``args.learning_rate``).
        label_embedding_lr: learning rate of the shared label-embedding matrix (None:
            ``args.learning_rate``).
        **kwargs: everything else ``Trainer`` takes (``processing_class``, callbacks, ...).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        args: Any,
        *,
        train_sets: dict[str, Any],
        eval_sets: dict[str, Any] | None = None,
        sampler: TaskSampler,
        tasks_per_step: int = 1,
        pad_token_id: int = 0,
        mixture_lr: float | None = None,
        label_embedding_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs = self._trainer_kwargs(model, train_sets, eval_sets, pad_token_id, mixture_lr, label_embedding_lr,
                                      kwargs)
        super().__init__(model=model, args=args, **kwargs)
        # (the distillation trainer checks this in DistillationTrainer.__init__)
        for check in (unsynchronised_ranks_reason, data_parallel_reason):
            if (reason := check(self.args)) is not None:
                raise UsageError(reason)
        self._setup_mtl(train_sets, eval_sets, sampler, kwargs["data_collator"], tasks_per_step)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, Any]:
        """Mean over the step's task batches of each batch's loss (weighted task loss + aux)."""
        names = self._model().task_names
        batches = inputs["task_batches"]
        self._log_step_tasks(batches)
        outs = model(batches)  # one forward for all the step's task batches (one per backward under DDP)
        total = None
        for b, out in zip(batches, outs):
            if out.loss is None:
                raise ValueError(f"task {names[int(b['task'])]!r}: a training batch without labels")
            self._record(names[int(b["task"])], out.task_loss)
            for k, v in out.aux.items():
                self._record(k, v)
            total = out.loss if total is None else total + out.loss
        self._record_diagnostics(batches, outs)
        assert total is not None
        loss = total / len(outs)
        return (loss, outs) if return_outputs else loss


class MultiTaskDistillationTrainer(_MultiTaskMixin, DistillationTrainer):
    """Multi-task BERT-EMD distillation on ``DistillationTrainer``: the student is a
    :class:`MultiTaskModel`, the teacher a :class:`TeacherSet`, the loss a
    :class:`MultiTaskEMDLoss` (whose projections and per-task layer weights join the optimiser
    and the checkpoints, as in single-task distillation).

    Args: as :class:`MultiTaskTrainer`, plus ``teachers`` and ``distill_loss``.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        args: Any,
        *,
        teachers: TeacherSet,
        distill_loss: MultiTaskEMDLoss,
        train_sets: dict[str, Any],
        eval_sets: dict[str, Any] | None = None,
        sampler: TaskSampler,
        tasks_per_step: int = 1,
        pad_token_id: int = 0,
        mixture_lr: float | None = None,
        label_embedding_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs = self._trainer_kwargs(model, train_sets, eval_sets, pad_token_id, mixture_lr, label_embedding_lr,
                                      kwargs)
        super().__init__(model=model, args=args, teacher=teachers, distill_loss=distill_loss, **kwargs)
        self._setup_mtl(train_sets, eval_sets, sampler, kwargs["data_collator"], tasks_per_step)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, Any]:
        """The step's multi-task distillation loss (one batched EMD solve for all its tasks)."""
        student = self._model()
        batches = inputs["task_batches"]
        self._log_step_tasks(batches)
        assert isinstance(self.distill_loss, MultiTaskEMDLoss) and isinstance(self.teacher, TeacherSet)
        # mixed precision: the student's forward is autocast by its accelerate wrapper, the teachers'
        # here; the loss (projections, costs, EMD) stays in fp32, as in single-task distillation
        loss, parts, outs = distillation_step(student if model is student else _Wrapped(model, student),
                                              self.teacher, self.distill_loss, batches, progress=self._progress(),
                                              teacher_context=self._teacher_autocast)
        for k, v in parts.items():
            if "/" in k and k.endswith("/total"):
                self._record(k.split("/")[0], v)
            elif "/" not in k:
                self._record(f"distill_{k}", v)
        self._record_diagnostics(batches, outs)
        return (loss, outs) if return_outputs else loss

    def _extra_logs(self, logs: dict[str, float]) -> None:
        super()._extra_logs(logs)
        assert isinstance(self.distill_loss, MultiTaskEMDLoss)
        for t, w in self.distill_loss.task_layer_weights().items():
            for who in ("student", "teacher"):
                for i, x in enumerate(w[who].tolist()):
                    logs[f"w_{t}_{who}.{i}"] = x

    def save_distill_state(self, output_dir: str) -> None:
        assert isinstance(self.distill_loss, MultiTaskEMDLoss)
        atomic_save(self.distill_loss.state_dict(), os.path.join(output_dir, LOSS_STATE_NAME))
        summary = {t: {k: v.tolist() for k, v in w.items()} for t, w in self.distill_loss.task_layer_weights().items()}
        atomic_save({"weights": summary}, os.path.join(output_dir, TRANSPORT_NAME), as_json=True)


class _Wrapped(nn.Module):
    """Calls a wrapped (DDP) student but exposes the plain model's attributes to distillation_step."""

    def __init__(self, wrapped: nn.Module, plain: MultiTaskModel) -> None:
        super().__init__()
        object.__setattr__(self, "_w", wrapped)
        object.__setattr__(self, "_p", plain)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_p"), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return object.__getattribute__(self, "_w")(*args, **kwargs)
