"""Multi-task learning on a shared encoder (DESIGN.md section 3).

- :mod:`~bert_emd.mtl.tasks` -- :class:`TaskSpec`, :class:`MTLConfig`, YAML loading
  (:func:`load_config`) with errors that name the file and the field.
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
- :mod:`~bert_emd.mtl.trainer` -- :class:`MultiTaskTrainer` on ``transformers.Trainer``
  (imported lazily: it needs ``transformers``).
"""

from __future__ import annotations

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
from .tasks import (
    ConfigError,
    DataFiles,
    DistillOptions,
    MechanismConfig,
    MTLConfig,
    SamplerOptions,
    TaskSpec,
    TrainingOptions,
    load_config,
    load_tasks,
)
from .teachers import TeacherSet, load_teachers

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
    "MultiTaskEMDLoss",
    "MultiTaskModel",
    "MultiTaskOutput",
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
