"""Building students (and loading teachers) for distillation.

Three ways to get a student, matching ``bert-emd distill``:

- :func:`load_model` -- a local checkpoint folder (``--student PATH``);
- :func:`student_from_config` -- a fresh, randomly initialised model of the teacher's family
  and vocabulary with chosen layers / hidden size / heads / FFN size (``--student-layers ...``);
- :func:`student_from_teacher_layers` -- a copy of the teacher that keeps only chosen
  transformer layers (``--init-from-teacher-layers 2,5``), as PKD / DistilBERT initialise.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import UsageError
from ..model_files import UntrainedHeadError, check_model_folder, check_trained_weights, float32_kwargs, load_tokenizer

__all__ = [
    "UntrainedHeadError",
    "check_model_folder",
    "check_trained_weights",
    "count_parameters",
    "encoder_layers",
    "float32_kwargs",
    "freeze_word_embeddings",
    "load_model",
    "load_tokenizer",
    "student_from_config",
    "student_from_teacher_layers",
]

_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layers", "num_layers")
logger = logging.getLogger(__name__)
# UntrainedHeadError, check_model_folder, check_trained_weights, float32_kwargs and load_tokenizer
# live in bert_emd.model_files (the multi-task code loads models too); imported here for callers
# of this module


def load_model(
    path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    problem_type: str | None = None,
    attn_implementation: str | None = None,
    label_list: Sequence[str] | None = None,
    role: str = "model",
    predicts: bool = False,
    allow_untrained: bool = False,
    opt_out: str | None = None,
) -> nn.Module:
    """A ``*ForSequenceClassification`` model from a local folder (no hub look-up), in float32
    (see :func:`float32_kwargs`).

    A bare encoder checkpoint (e.g. ``BertModel``) gets a freshly initialised classification head
    with ``num_labels`` outputs; a classifier checkpoint keeps its head (``num_labels`` must then
    agree, else a UsageError). Weights missing from the checkpoint (such a fresh head) are
    reported by :func:`check_trained_weights`: refused when the model ``predicts`` (a teacher, a
    model to score) unless ``allow_untrained``, one info line otherwise.

    Args:
        path: local checkpoint folder (``config.json`` + weights).
        num_labels: outputs of the head (1 for regression); None: the checkpoint's.
        problem_type: ``"regression"`` or ``"single_label_classification"``.
        attn_implementation: e.g. ``"eager"`` (needed for ``output_attentions``).
        label_list: class names, stored in the config as ``id2label``.
        role, predicts, allow_untrained, opt_out: see :func:`check_trained_weights`.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    folder = check_model_folder(path)
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or []))
    kwargs: dict[str, Any] = float32_kwargs()  # float32 whatever the checkpoint's dtype (see there)
    if num_labels is not None:
        if is_classifier and cfg.num_labels != num_labels:
            raise UsageError(
                f"{folder} is a classifier with {cfg.num_labels} labels, but the data has {num_labels}"
            )
        kwargs["num_labels"] = num_labels
    if label_list is not None:
        kwargs["id2label"] = dict(enumerate(label_list))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_list)}
    if problem_type is not None:
        kwargs["problem_type"] = problem_type
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report: check_trained_weights says what matters
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, local_files_only=True, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    check_trained_weights(folder, info.get("missing_keys", ()), role=role, predicts=predicts,
                          allow_untrained=allow_untrained, opt_out=opt_out)
    return model


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layer list of a BERT-family model (``encoder.layer``,
    ``transformer.layer`` of DistilBERT, ...): the first ModuleList with as many entries as
    ``config.num_hidden_layers``."""
    model = getattr(model, "module", model)
    cfg = getattr(model, "config", None)
    n = next((getattr(cfg, a) for a in _LAYER_COUNT_ATTRS if isinstance(getattr(cfg, a, None), int)), None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (n is None or len(mod) == n) and name.endswith("layer"):
            return mod
    raise ValueError(f"cannot find the transformer layer list of {type(model).__name__}")


def _set_layer_count(cfg: Any, n: int) -> None:
    for a in _LAYER_COUNT_ATTRS:
        if isinstance(getattr(cfg, a, None), int):
            setattr(cfg, a, n)


def student_from_teacher_layers(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only the transformer layers ``layers`` (0-based, in order).

    Embeddings, pooler and classification head are copied too, so the student starts as a
    shallower teacher. E.g. ``[2, 5]`` of a 6-layer teacher: student layer 0 <- teacher layer 2,
    student layer 1 <- teacher layer 5 (the 3rd and 6th; TinyBERT's skip targets for M=2, N=6).

    Args:
        teacher: a Hugging Face BERT-family model (not modified).
        layers: distinct indices in ``[0, N)``.
    Returns:
        the student, with ``config.num_hidden_layers == len(layers)``.
    """
    src = encoder_layers(teacher)
    n = len(src)
    layers = [int(i) for i in layers]
    if not layers:
        raise UsageError("init-from-teacher-layers: give at least one teacher layer index")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise UsageError(f"init-from-teacher-layers: indices {bad} outside [0, {n}) (0-based, the teacher has {n})")
    if len(set(layers)) != len(layers):
        raise UsageError(f"init-from-teacher-layers: repeated indices in {layers}")
    student = copy.deepcopy(getattr(teacher, "module", teacher))
    dst = encoder_layers(student)
    kept = [dst[i] for i in layers]
    for new_idx, layer in enumerate(kept):
        for mod in layer.modules():  # HF attention modules carry their layer index (caches)
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_idx
    # Replace in place: the parent keeps its attribute, only the list's content changes.
    while len(dst):
        del dst[len(dst) - 1]
    for layer in kept:
        dst.append(layer)
    _set_layer_count(student.config, len(kept))
    for p in student.parameters():
        p.requires_grad_(True)
    student.train()
    return student


def student_from_config(
    teacher_config: Any,
    *,
    num_layers: int,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    num_labels: int | None = None,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """A randomly initialised ``*ForSequenceClassification`` student of the teacher's family, in
    float32 (a bfloat16 teacher's config would otherwise build a bfloat16 student: see
    :func:`float32_kwargs`).

    The teacher's config is copied (vocabulary, position and type embeddings, labels, problem
    type) and the sizes replaced; anything not given keeps the teacher's value.

    Args:
        teacher_config: the teacher's ``PretrainedConfig``.
        num_layers: M.
        hidden_size, num_heads, intermediate_size: d_S, heads (must divide d_S; BERT-EMD's
            attention loss needs the teacher's head count), FFN size.
        num_labels: outputs of the head (default: the teacher's).
        attn_implementation: e.g. ``"eager"``.
        overrides: other config fields (e.g. ``hidden_dropout_prob=0.0``).
    """
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(teacher_config)
    if num_layers < 1:
        raise UsageError(f"student layers must be >= 1, got {num_layers}")
    _set_layer_count(cfg, num_layers)
    if hidden_size is not None:
        cfg.hidden_size = hidden_size
    if num_heads is not None:
        cfg.num_attention_heads = num_heads
    if intermediate_size is not None:
        cfg.intermediate_size = intermediate_size
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UsageError(
            f"student hidden size {cfg.hidden_size} is not a multiple of its head count {cfg.num_attention_heads}"
        )
    if num_labels is not None:
        cfg.num_labels = num_labels
    for k, v in overrides.items():
        setattr(cfg, k, v)
    kwargs = float32_kwargs()  # not the teacher config's dtype (see there)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForSequenceClassification.from_config(cfg, **kwargs)
    model.train()
    return model


def freeze_word_embeddings(model: nn.Module) -> int:
    """Stop training the word-embedding matrix (the largest tensor of a small student, and the
    costliest optimizer update on a CPU); returns the number of frozen parameters."""
    model = getattr(model, "module", model)
    emb = model.get_input_embeddings()
    for p in emb.parameters():
        p.requires_grad_(False)
    return sum(p.numel() for p in emb.parameters())


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for p in getattr(model, "module", model).parameters():
        if not trainable_only or p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())
