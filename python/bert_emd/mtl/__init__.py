"""Multi-task learning on a shared encoder (DESIGN.md section 3).

- :mod:`~bert_emd.mtl.tasks` -- :class:`TaskSpec`, :class:`MTLConfig`, YAML loading
  (:func:`load_config`) with errors that name the file and the field.
- :mod:`~bert_emd.mtl.mechanisms` -- gradient reversal, orthogonality loss, layer mixture, gate,
  private encoder, task discriminator, label embedding.
- :mod:`~bert_emd.mtl.model` -- :class:`MultiTaskModel`: shared encoder, per-task heads, the five
  mechanisms as flags (all off: hard sharing).
- :mod:`~bert_emd.mtl.samplers` -- proportional, uniform, temperature, power and epoch-shuffle
  task sampling, annealing, and the batch sampler of the trainer.
- :mod:`~bert_emd.mtl.distill` -- :class:`MultiTaskEMDLoss` (per-task layer weights, all tasks'
  transport problems in one batched EMD call) and :class:`TeacherSet`.
- :mod:`~bert_emd.mtl.trainer` -- :class:`MultiTaskTrainer` on ``transformers.Trainer``
  (imported lazily: it needs ``transformers``).
"""

from __future__ import annotations

from .distill import MultiTaskEMDLoss, TaskDistillInput, TeacherSet, distillation_step, load_teachers
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
