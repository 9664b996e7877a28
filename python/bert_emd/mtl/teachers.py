"""The teachers of multi-task distillation: :class:`TeacherSet` (one teacher per task, or one
multi-task teacher) and :func:`load_teachers` (from local folders)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .config import TaskSpec
from .model import MultiTaskModel, encoder_sizes

__all__ = ["TeacherSet", "load_teachers"]


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
        return encoder_sizes(self.teacher(task))

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
    :class:`~bert_emd.model_files.UntrainedHeadError` naming the folder and the weights,
    unless ``allow_untrained`` (then a warning; the head is drawn from the torch generator, which
    the caller seeds). A multi-task teacher must hold every weight (:meth:`MultiTaskModel.from_pretrained`)."""
    if multitask_teacher is not None:
        return TeacherSet(multitask=MultiTaskModel.from_pretrained(multitask_teacher,
                                                                   attn_implementation=attn_implementation))
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    from ..errors import MissingFileError, UsageError
    from ..model_files import check_model_folder, check_trained_weights, float32_kwargs

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
