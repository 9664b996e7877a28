"""Multi-task learning on a shared encoder.

- :mod:`~bert_emd.mtl.config` -- :class:`TaskSpec`, :class:`MTLConfig` and the option
  dataclasses; :mod:`~bert_emd.mtl.checks` -- their field checks (:class:`ConfigError`);
  :mod:`~bert_emd.mtl.yaml_config` -- YAML loading (:func:`load_config`) with errors that name
  the file and the field (:mod:`~bert_emd.mtl.tasks` re-exports all three).
- :mod:`~bert_emd.mtl.mechanisms` -- gradient reversal, orthogonality loss, layer mixture, gate,
  private encoder, task discriminator, label embedding.
- :mod:`~bert_emd.mtl.model` -- :class:`MultiTaskModel`: shared encoder, per-task heads, the five
  mechanisms as flags (all off: hard sharing).
- :mod:`~bert_emd.mtl.samplers` -- proportional, uniform, temperature, power and epoch-shuffle
  task sampling, annealing, and the batch sampler of the trainer.
- :mod:`~bert_emd.mtl.loss` -- :class:`MultiTaskEMDLoss` (per-task layer weights, all tasks'
  transport problems in one batched EMD call) on the loss core of :mod:`bert_emd.nn`;
  :mod:`~bert_emd.mtl.teachers` -- :class:`TeacherSet`, :func:`load_teachers`;
  :mod:`~bert_emd.mtl.step` -- :func:`distillation_step`.
- :mod:`~bert_emd.mtl.data` -- task data, tokenisation, collator; :mod:`~bert_emd.mtl.evaluation`
  -- per-task metrics and (sharded) evaluation.
- :mod:`~bert_emd.mtl.trainer` -- :class:`MultiTaskTrainer` and
  :class:`MultiTaskDistillationTrainer` on ``transformers.Trainer`` (imported lazily, on first
  access to ``bert_emd.mtl.MultiTaskTrainer``: ``import bert_emd.mtl`` does not import
  ``transformers``).
"""

from __future__ import annotations

from typing import Any

from .checks import ConfigError
from .config import (
    DataFiles,
    DistillOptions,
    MechanismConfig,
    MTLConfig,
    SamplerOptions,
    TaskSpec,
    TrainingOptions,
)
from .loss import MultiTaskEMDLoss, TaskDistillInput
from .mechanisms import (
    GradientReversal,
    LabelEmbedding,
    LayerMixture,
    PrivateEncoder,
    TaskDiscriminator,
    TaskGate,
    grad_reverse,
    orthogonality_loss,
    pool,
)
from .model import MultiTaskModel, MultiTaskOutput, TaskHead
from .samplers import (
    SAMPLERS,
    EpochShuffleSampler,
    ExponentSampler,
    MultiTaskBatchSampler,
    TaskSampler,
    make_sampler,
)
from .step import distillation_step
from .teachers import TeacherSet, load_teachers
from .yaml_config import load_config, load_tasks

__all__ = [
    "SAMPLERS",
    "ConfigError",
    "DataFiles",
    "DistillOptions",
    "EpochShuffleSampler",
    "ExponentSampler",
    "GradientReversal",
    "LabelEmbedding",
    "LayerMixture",
    "MTLConfig",
    "MechanismConfig",
    "MultiTaskBatchSampler",
    "MultiTaskDistillationTrainer",
    "MultiTaskEMDLoss",
    "MultiTaskModel",
    "MultiTaskOutput",
    "MultiTaskTrainer",
    "PrivateEncoder",
    "SamplerOptions",
    "TaskDiscriminator",
    "TaskDistillInput",
    "TaskGate",
    "TaskHead",
    "TaskSampler",
    "TaskSpec",
    "TeacherSet",
    "TrainingOptions",
    "distillation_step",
    "grad_reverse",
    "load_config",
    "load_tasks",
    "load_teachers",
    "make_sampler",
    "orthogonality_loss",
    "pool",
]


_LAZY = {"MultiTaskTrainer", "MultiTaskDistillationTrainer"}


def __getattr__(name: str) -> Any:
    # the trainers subclass transformers.Trainer: imported on first use only
    if name in _LAZY:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
