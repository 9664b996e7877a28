"""Task specifications of multi-task learning, and their YAML configuration files.

A :class:`TaskSpec` says what one task is: its name, type, label count, data files, metric,
optional tap layer (the ``hierarchy`` mechanism), loss weight and optional teacher (multi-task
distillation). :class:`MTLConfig` is a whole run: the shared encoder, the mechanism flags, the
task sampler, the training options, optional distillation options, and the tasks.

Task types:

================  ==============================================  =======================
type              input                                            output / default metric
================  ==============================================  =======================
``single``        one text (``text_column``)                       classes / ``acc``
``pair``          two texts (``text_column``, ``text_pair_column``) classes / ``acc``
``regression``    one or two texts                                 one float / ``pearson``
``tagging``       a list of words (``tokens_column``)               one class per word /
                                                                   ``token_acc``
================  ==============================================  =======================

(``single_sentence``, ``classification``, ``sentence_pair``, ``token_tagging``, ``ner`` ... are
accepted aliases.) Every error names the file and the field, e.g.
``tasks.yaml: tasks[1] ('news').type: unknown task type 'clasification'; expected one of ...``.
"""

from __future__ import annotations

import codecs
import contextvars
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import UsageError

__all__ = [
    "ConfigError",
    "DataFiles",
    "DistillOptions",
    "MTLConfig",
    "MechanismConfig",
    "ModelOptions",
    "SamplerOptions",
    "TaskSpec",
    "TrainingOptions",
    "load_config",
    "load_tasks",
    "normalize_task_type",
]

TASK_TYPES = ("single", "pair", "regression", "tagging")
_TYPE_ALIASES = {
    "single": "single",
    "single_sentence": "single",
    "single-sentence": "single",
    "sentence": "single",
    "classification": "single",
    "sentence_classification": "single",
    "text_classification": "single",
    "pair": "pair",
    "sentence_pair": "pair",
    "sentence-pair": "pair",
    "pair_classification": "pair",
    "sentence_pair_classification": "pair",
    "regression": "regression",
    "tagging": "tagging",
    "token_tagging": "tagging",
    "token-tagging": "tagging",
    "token_classification": "tagging",
    "sequence_labeling": "tagging",
    "ner": "tagging",
    "pos": "tagging",
}
CLASSIFICATION_METRICS = ("acc", "macro_f1", "mcc", "f1", "acc_and_f1")
REGRESSION_METRICS = ("pearson", "spearmanr", "corr")
TAGGING_METRICS = ("token_acc", "token_macro_f1")


# Label of the task being built by TaskSpec.from_dict, so that __post_init__'s errors name it.
_WHERE: contextvars.ContextVar[str | None] = contextvars.ContextVar("_WHERE", default=None)


class ConfigError(UsageError):
    """An invalid task / multi-task configuration; the message names the file and the field (a
    :class:`~bert_emd.errors.UsageError`, so a ``ValueError``: one line from the ``bert-emd``
    command)."""


def normalize_task_type(value: Any, where: str = "type") -> str:
    """``"sentence_pair"`` -> ``"pair"``, ...; raises :class:`ConfigError` naming ``where``."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: task type must be a string, got {type(value).__name__} {value!r}")
    key = value.strip().lower().replace(" ", "_")
    if key not in _TYPE_ALIASES:
        raise ConfigError(
            f"{where}: unknown task type {value!r}; expected one of {', '.join(TASK_TYPES)} "
            f"(aliases: {', '.join(sorted(k for k in _TYPE_ALIASES if k not in TASK_TYPES))})"
        )
    return _TYPE_ALIASES[key]


# ----------------------------------------------------------------------------- field checks
# One helper per kind of check. Each raises ConfigError("<name>: <what is required>, got <value>");
# ``name`` is "section.field" (or the bare field where _build adds the prefix, as in DataFiles).
# bool is a subclass of int: YAML ``true`` is never accepted as a number.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require_bool(v: Any, name: str) -> bool:
    """``v`` must be YAML ``true`` / ``false`` (not ``"yes"``, not ``0``)."""
    if not isinstance(v, bool):
        raise ConfigError(f"{name}: true or false is required, got {v!r}")
    return v


def _or_null(what: str, optional: bool) -> str:
    return f"{what} (or null)" if optional else what


def _require_int(
    v: Any, name: str, *, lo: int | None = None, hi: int | None = None, optional: bool = False,
    what: str | None = None,
) -> int | None:
    """An integer (not a bool) in ``[lo, hi]`` (either bound optional), or None when ``optional``."""
    if v is None and optional:
        return None
    if _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi):
        return v
    if what is None:
        what = "an integer" + (f" in [{lo}, {hi}]" if lo is not None and hi is not None
                               else f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else "")
    raise ConfigError(f"{name}: {_or_null(what, optional)} is required, got {v!r}")


def _require_number(
    v: Any, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
    hi_open: bool = False, optional: bool = False,
) -> float | None:
    """A number (int or float, not a bool, not NaN) in the range given by ``lo`` / ``hi`` (closed
    unless ``lo_open`` / ``hi_open``), or None when ``optional``. Returns ``v`` unchanged."""
    if v is None and optional:
        return None
    ok = _is_number(v) and not (isinstance(v, float) and math.isnan(v))
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if ok:
        return v
    if lo is not None and hi is not None:
        what = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        what = f"a number {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        what = f"a number {'<' if hi_open else '<='} {hi}"
    else:
        what = "a number"
    raise ConfigError(f"{name}: {_or_null(what, optional)} is required, got {v!r}")


def _require_str(v: Any, name: str, *, optional: bool = False, nonempty: bool = True) -> str | None:
    """A string (a :class:`os.PathLike` is turned into one), non-empty unless ``nonempty`` is
    False, or None when ``optional``. Returns the string."""
    if v is None and optional:
        return None
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str):
        raise ConfigError(f"{name}: {_or_null('a string', optional)} is required, got {type(v).__name__} {v!r}")
    if nonempty and not v.strip():
        raise ConfigError(f"{name}: {_or_null('a non-empty string', optional)} is required, got {v!r}")
    return v


def _require_choice(v: Any, name: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings); the message lists them."""
    if not isinstance(v, str) or v not in choices:
        quoted = [repr(c) for c in choices]
        what = " or ".join(quoted) if len(quoted) <= 2 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise ConfigError(f"{name}: {what} is required, got {v!r}")
    return v


# ----------------------------------------------------------------------------- dataclasses
@dataclass
class DataFiles:
    """Where a task's data lies and how its columns are named.

    Either ``glue`` (a GLUE task name) with ``data_dir`` (the GLUE folder layout, read by
    :func:`bert_emd.distill.data.load_glue`), or ``train`` / ``validation`` / ``test`` files
    (CSV / TSV / JSONL, read by :func:`bert_emd.distill.data.load_table`; tagging tasks: JSONL
    with a word list and a tag list per line). Relative paths are relative to the YAML file.
    """

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    glue: str | None = None
    data_dir: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    label_list: list[str] | None = None
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        # Bare field names: _build (and TaskSpec.validate) prefix them with "tasks[i] ('name').data".
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "label_list" or v is None:
                continue
            setattr(self, f.name, _require_str(v, f.name))
        for name in ("text_column", "label_column", "tokens_column", "tags_column", "encoding"):
            if getattr(self, name) is None:
                raise ConfigError(f"{name}: a string is required, got None")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(
                f"encoding: a known text encoding (e.g. 'utf-8') is required, got {self.encoding!r}"
            ) from None


@dataclass
class TaskSpec:
    """One task of a multi-task model.

    Attributes:
        name: unique identifier (letters, digits, ``_``, ``-``); used in metric names.
        type: ``"single"``, ``"pair"``, ``"regression"`` or ``"tagging"`` (aliases accepted).
        num_labels: classes (>= 2), tags (>= 2, tagging) or 1 (regression). May be omitted when
            ``data.label_list`` is given (classification) or for regression.
        data: :class:`DataFiles`.
        metric: the task's headline metric (default: ``acc``; ``pearson`` for regression;
            ``token_acc`` for tagging; the GLUE main metric for a GLUE task).
        tap_layer: layer the task reads with the ``hierarchy`` mechanism (0 = embedding output,
            1..M = transformer layers, negative counts from the top); None = learned mixture.
        loss_weight: multiplies the task's loss (> 0).
        teacher: path of the task's fine-tuned teacher (multi-task distillation), or None.
        max_length: tokenizer truncation length for this task (default: the run's).
    """

    name: str
    type: str
    num_labels: int | None = None
    data: DataFiles = field(default_factory=DataFiles)
    metric: str | None = None
    tap_layer: int | None = None
    loss_weight: float = 1.0
    teacher: str | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_regression(self) -> bool:
        return self.type == "regression"

    @property
    def is_tagging(self) -> bool:
        return self.type == "tagging"

    @property
    def is_pair(self) -> bool:
        return self.type == "pair" or (self.type == "regression" and self.data.text_pair_column is not None)

    def validate(self, where: str | None = None) -> None:
        """Check every field; raise :class:`ConfigError` naming the field (prefixed by ``where``)."""
        w = where or _WHERE.get() or f"task {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{w}.name: a non-empty string is required, got {self.name!r}")
        bad = [c for c in self.name if not (c.isalnum() or c in "_-")]
        if bad:
            raise ConfigError(f"{w}.name: {self.name!r} may hold only letters, digits, '_' and '-'")
        self.type = normalize_task_type(self.type, f"{w}.type")
        if isinstance(self.data, Mapping):
            self.data = _build(DataFiles, self.data, f"{w}.data")
        if not isinstance(self.data, DataFiles):
            raise ConfigError(f"{w}.data: a mapping of data fields is required, got {type(self.data).__name__}")
        labels = self.data.label_list
        if labels is not None:
            if not isinstance(labels, (list, tuple)) or not labels:
                raise ConfigError(f"{w}.data.label_list: a non-empty list is required, got {labels!r}")
            bad = [x for x in labels if x is None or isinstance(x, (bool, list, dict))]
            if bad:  # labels are matched as text: YAML null / true / lists would never match a data file
                raise ConfigError(f"{w}.data.label_list: labels must be strings or numbers, got {bad[0]!r} in "
                                  f"{list(labels)!r}")
            self.data.label_list = [str(x) for x in labels]
            if len(set(self.data.label_list)) != len(self.data.label_list):
                raise ConfigError(f"{w}.data.label_list: duplicate labels in {self.data.label_list}")
        if self.type == "regression":
            if self.num_labels not in (None, 1):
                raise ConfigError(f"{w}.num_labels: a regression task has 1 output, got {self.num_labels!r}")
            if labels is not None:
                raise ConfigError(f"{w}.data.label_list: a regression task has no label list")
            self.num_labels = 1
        else:
            if self.num_labels is None:
                if labels is None:
                    raise ConfigError(
                        f"{w}.num_labels: required for a {self.type} task (or give data.label_list)"
                    )
                self.num_labels = len(labels)
            _require_int(self.num_labels, f"{w}.num_labels", lo=2)
            if labels is not None and len(labels) != self.num_labels:
                raise ConfigError(
                    f"{w}.num_labels: {self.num_labels} does not match data.label_list with "
                    f"{len(labels)} labels {labels}"
                )
        if self.type == "pair" and self.data.glue is None and self.data.text_pair_column is None:
            raise ConfigError(f"{w}.data.text_pair_column: required for a sentence-pair task")
        allowed = (
            REGRESSION_METRICS
            if self.type == "regression"
            else TAGGING_METRICS
            if self.type == "tagging"
            else CLASSIFICATION_METRICS
        )
        if self.metric is None:
            self.metric = _default_metric(self)
        if self.metric not in allowed:
            raise ConfigError(f"{w}.metric: {self.metric!r} is not a {self.type} metric; expected one of {allowed}")
        if self.metric in ("f1", "acc_and_f1") and self.num_labels != 2:
            raise ConfigError(
                f"{w}.metric: {self.metric!r} (F1 of class 1) needs 2 labels, the task has {self.num_labels}"
            )
        _require_int(self.tap_layer, f"{w}.tap_layer", optional=True, what="an integer layer index")
        self.loss_weight = float(_require_number(self.loss_weight, f"{w}.loss_weight", lo=0, lo_open=True))
        _require_int(self.max_length, f"{w}.max_length", lo=2, optional=True)
        self.teacher = _require_str(self.teacher, f"{w}.teacher", optional=True)
        d = self.data
        if d.glue is not None:
            if self.type == "tagging":
                raise ConfigError(f"{w}.data.glue: GLUE has no tagging task")
            if d.data_dir is None:
                raise ConfigError(f"{w}.data.data_dir: required with data.glue ({d.glue!r})")
            if any(x is not None for x in (d.train, d.validation, d.test)):
                raise ConfigError(f"{w}.data: give either glue + data_dir or train/validation/test files, not both")
            from ..distill.data import normalize_task_name

            try:
                d.glue = normalize_task_name(d.glue)
            except ValueError as err:
                raise ConfigError(f"{w}.data.glue: {err}") from None
        elif all(x is None for x in (d.train, d.validation, d.test)):
            raise ConfigError(f"{w}.data: no data: give train/validation/test files or glue + data_dir")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML / JSON serialisable) that :meth:`from_dict` reads back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "task") -> TaskSpec:
        """Build from a mapping; unknown or missing fields raise :class:`ConfigError` naming them."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: a mapping of task fields is required, got {type(d).__name__}")
        name = d.get("name")
        label = f"{where} ({name!r})" if isinstance(name, str) else where
        token = _WHERE.set(label)
        try:
            return _build(cls, d, label)
        finally:
            _WHERE.reset(token)


def _default_metric(spec: TaskSpec) -> str:
    if spec.type == "regression":
        return "pearson"
    if spec.type == "tagging":
        return "token_acc"
    if spec.data.glue is not None:
        from ..distill.metrics import main_metric

        return main_metric(spec.data.glue)
    return "acc"


@dataclass
class MechanismConfig:
    """The five multi-task mechanisms (each off by default: all off = hard parameter sharing).

    Attributes:
        hierarchy: tasks read their ``tap_layer`` or a per-task layer mixture.
        hierarchy_mode: ``"learned"`` (softmax over learned logits, trained by backprop) or
            ``"emd"`` (multi-task distillation only: the task's EMD student-layer weights).
        private: a private encoder per task; its features are concatenated with the shared ones.
        private_dim: width of the private encoder.
        private_heads: attention heads of the private encoder (divides ``private_dim``).
        gamma: weight of the orthogonality loss gamma * ||S^T P||_F^2.
        adversarial: task discriminator on pooled shared features through gradient reversal.
        adversarial_weight: lambda, weight of the discriminator loss.
        gate: per-task sigmoid gate on the shared features.
        label_embedding: all classification/tagging tasks' labels in one embedding matrix;
            logits are dot products (regression tasks keep a linear output).
        label_embedding_dim: width of the label embeddings.
        pooling: ``"cls"`` (first token, BERT's choice) or ``"mean"`` (over real tokens).
        head_hidden: a dense + tanh layer (BERT's pooler shape) before each sentence head.
        dropout: dropout before the heads.
    """

    hierarchy: bool = False
    hierarchy_mode: str = "learned"
    private: bool = False
    private_dim: int = 64
    private_heads: int = 4
    gamma: float = 0.01
    adversarial: bool = False
    adversarial_weight: float = 0.05
    gate: bool = False
    label_embedding: bool = False
    label_embedding_dim: int = 64
    pooling: str = "cls"
    head_hidden: bool = True
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> list[str]:
        """Names of the mechanisms switched on (empty: hard sharing)."""
        return [m for m in MECHANISMS if getattr(self, m)]

    def validate(self, where: str = "mechanisms") -> None:
        for m in MECHANISMS + ("head_hidden",):
            _require_bool(getattr(self, m), f"{where}.{m}")
        _require_choice(self.hierarchy_mode, f"{where}.hierarchy_mode", ("learned", "emd"))
        _require_choice(self.pooling, f"{where}.pooling", ("cls", "mean"))
        for name in ("private_dim", "private_heads", "label_embedding_dim"):
            _require_int(getattr(self, name), f"{where}.{name}", lo=1)
        if self.private_dim % self.private_heads:
            raise ConfigError(
                f"{where}.private_heads: {self.private_heads} does not divide private_dim {self.private_dim}"
            )
        for name in ("gamma", "adversarial_weight"):
            _require_number(getattr(self, name), f"{where}.{name}", lo=0)
        _require_number(self.dropout, f"{where}.dropout", lo=0, hi=1, hi_open=True)

    @classmethod
    def from_value(cls, value: Any, where: str = "mechanisms") -> MechanismConfig:
        """From a list of names (``[hierarchy, gate]``) or a mapping. In a mapping a mechanism is
        ``true``/``false`` or a mapping of its options (``private: {dim: 32, gamma: 0.05}``,
        which switches it on unless it holds ``enabled: false``)."""
        if value is None:
            return cls()
        if isinstance(value, str):
            value = [value]
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            flat: dict[str, Any] = {}
            for i, name in enumerate(value):
                if name not in MECHANISMS:
                    raise ConfigError(f"{where}[{i}]: unknown mechanism {name!r}; expected one of {MECHANISMS}")
                flat[name] = True
            return _build(cls, flat, where)
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}: a list of mechanism names or a mapping is required, got {type(value).__name__}"
            )
        flat = {}
        for key, v in value.items():
            if key in MECHANISMS and isinstance(v, Mapping):
                opts = dict(v)
                flat[key] = opts.pop("enabled", True)
                for opt, ov in opts.items():
                    full = _OPTION_NAMES.get(key, {}).get(opt)
                    if full is None:
                        known = ", ".join(["enabled", *_OPTION_NAMES.get(key, {})])
                        raise ConfigError(f"{where}.{key}.{opt}: unknown option; known: {known}")
                    flat[full] = ov
            elif key in MECHANISMS and v is None:
                flat[key] = True
            else:
                flat[key] = v
        return _build(cls, flat, where)


MECHANISMS = ("hierarchy", "private", "adversarial", "gate", "label_embedding")
_OPTION_NAMES = {
    "hierarchy": {"mode": "hierarchy_mode"},
    "private": {"dim": "private_dim", "heads": "private_heads", "gamma": "gamma"},
    "adversarial": {"weight": "adversarial_weight", "lambda": "adversarial_weight"},
    "gate": {},
    "label_embedding": {"dim": "label_embedding_dim"},
}


@dataclass
class SamplerOptions:
    """Task sampling (see :mod:`bert_emd.mtl.samplers`): ``kind`` is ``proportional``,
    ``uniform``, ``temperature`` (``temperature`` T), ``power`` (``power``, default 0.75) or
    ``epoch_shuffle`` (MT-DNN); ``anneal_to`` anneals the exponent linearly to this value over
    training (e.g. 0.2: from proportional towards uniform)."""

    kind: str = "proportional"
    temperature: float = 2.0
    power: float = 0.75
    anneal_to: float | None = None

    def __post_init__(self) -> None:
        from .samplers import SAMPLERS

        if not isinstance(self.kind, str) or self.kind not in SAMPLERS:
            raise ConfigError(f"sampler.kind: unknown sampler {self.kind!r}; expected one of {', '.join(SAMPLERS)}")
        for name in ("temperature", "power"):
            _require_number(getattr(self, name), f"sampler.{name}", lo=0, lo_open=True)
        if _require_number(self.anneal_to, "sampler.anneal_to", lo=0, optional=True) is not None:
            if self.kind == "epoch_shuffle":
                raise ConfigError("sampler.anneal_to: the epoch_shuffle sampler has no distribution to anneal")


@dataclass
class ModelOptions:
    """The shared encoder: a local Hugging Face folder (any encoder, or a distilled student).

    ``tokenizer``: its folder (default: the encoder's); ``attn_implementation``: passed to
    ``from_pretrained`` (``eager``, ``sdpa``, ``flash_attention_2``, ...: transformers checks the
    name); ``student_layers``: keep only these encoder layers (0-based, distinct), a shallower
    student (null or ``[]``: all layers).
    """

    encoder: str | None = None
    tokenizer: str | None = None
    attn_implementation: str | None = None
    student_layers: list[int] | None = None

    def __post_init__(self) -> None:
        for name in ("encoder", "tokenizer", "attn_implementation"):
            setattr(self, name, _require_str(getattr(self, name), f"model.{name}", optional=True))
        layers = self.student_layers
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in layers):
                raise ConfigError(
                    f"model.student_layers: a list of integers >= 0 (or null) is required, got {layers!r}"
                )
            if len(set(layers)) != len(layers):
                raise ConfigError(f"model.student_layers: distinct layer indices are required, got {list(layers)}")


@dataclass
class TrainingOptions:
    """Trainer options (a subset of ``transformers.TrainingArguments`` with MTL additions).

    ``batch_size`` is the size of one task batch (of each process's share of it: N processes train
    on task batches of N * batch_size examples); ``tasks_per_step`` task batches make a step;
    ``mixture_lr`` is the learning rate of the hierarchy mechanism's layer-mixture logits and
    scale (None: ``lr``; at fine-tuning rates like 5e-5 a softmax over layers barely moves);
    ``limit_train`` / ``limit_eval`` keep the first rows of each task (quick runs).
    """

    output_dir: str = "runs/mtl"
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    seed: int = 42
    max_length: int = 128
    tasks_per_step: int = 1
    logging_steps: int = 50
    eval_strategy: str = "epoch"
    save_strategy: str = "no"
    limit_train: int | None = None
    limit_eval: int | None = None
    use_cpu: bool = False
    mixture_lr: float | None = 1e-2

    def __post_init__(self) -> None:
        self.output_dir = _require_str(self.output_dir, "training.output_dir")
        for name in ("batch_size", "eval_batch_size", "tasks_per_step", "logging_steps", "max_length"):
            _require_int(getattr(self, name), f"training.{name}", lo=1)
        _require_int(self.max_steps, "training.max_steps")
        for name in ("limit_train", "limit_eval"):
            _require_int(getattr(self, name), f"training.{name}", lo=1, optional=True)
        _require_int(self.seed, "training.seed", lo=0, hi=2**32 - 1)  # numpy's seed range
        for name in ("epochs", "lr"):
            _require_number(getattr(self, name), f"training.{name}", lo=0, lo_open=True)
        _require_number(self.mixture_lr, "training.mixture_lr", lo=0, lo_open=True, optional=True)
        _require_number(self.weight_decay, "training.weight_decay", lo=0)
        _require_number(self.warmup_ratio, "training.warmup_ratio", lo=0, hi=1, hi_open=True)
        for name in ("eval_strategy", "save_strategy"):
            _require_choice(getattr(self, name), f"training.{name}", ("no", "epoch", "steps"))
        _require_bool(self.use_cpu, "training.use_cpu")


@dataclass
class DistillOptions:
    """Multi-task EMD distillation (see :class:`bert_emd.mtl.distill.MultiTaskEMDLoss`).

    ``teacher``: one multi-task teacher (a folder saved by ``bert-emd mtl train``); otherwise
    every task names its own ``teacher``. ``gold_weight``: weight of the gold-label loss in the
    prediction term (the soft term gets 1 - gold_weight); ``teacher_annealing`` raises it
    linearly from 0 to 1 over training instead (Clark et al., 2019). ``attention_source``:
    ``"probs"`` (post-softmax maps) or ``"scores"`` (pre-softmax, from query/key hooks);
    ``fused_attention``: attention costs from the hooked queries and keys, no attention maps
    (``bert-emd mtl train --fused-attention`` also switches it on). ``allow_untrained_teacher``: go
    on (with a warning) when a task's teacher checkpoint lacks its task head, which is then random
    (seeded by ``training.seed``); by default such a teacher is refused (``bert-emd mtl train
    --allow-untrained-teacher`` also switches it on).
    """

    enabled: bool = False
    teacher: str | None = None
    beta: float = 0.001
    theta: float = 1.0
    T_emd: float = 1.0
    temperature: float = 1.0
    gold_weight: float = 0.2
    teacher_annealing: bool = False
    normalize: str = "double_softmax"
    use_attention: bool = True
    use_hidden: bool = True
    use_embedding: bool = True
    use_prediction: bool = True
    attention_source: Literal["probs", "scores"] = "probs"
    fused_attention: bool = False
    allow_untrained_teacher: bool = False

    def __post_init__(self) -> None:
        for name in _DISTILL_SWITCHES:
            _require_bool(getattr(self, name), f"distillation.{name}")
        self.teacher = _require_str(self.teacher, "distillation.teacher", optional=True)
        _require_choice(self.normalize, "distillation.normalize", ("sum", "softmax", "double_softmax"))
        _require_choice(self.attention_source, "distillation.attention_source", ("probs", "scores"))
        _require_number(self.gold_weight, "distillation.gold_weight", lo=0, hi=1)
        for name in ("beta", "theta"):
            _require_number(getattr(self, name), f"distillation.{name}", lo=0)
        for name in ("T_emd", "temperature"):  # divisors
            _require_number(getattr(self, name), f"distillation.{name}", lo=0, lo_open=True)
        terms = ("use_attention", "use_hidden", "use_embedding", "use_prediction")
        if self.enabled and not any(getattr(self, t) for t in terms):
            raise ConfigError(f"distillation.{'/'.join(terms)}: all four are false; at least one term must be true")


_DISTILL_SWITCHES = ("enabled", "teacher_annealing", "use_attention", "use_hidden", "use_embedding", "use_prediction",
                     "fused_attention", "allow_untrained_teacher")


@dataclass
class MTLConfig:
    """A whole multi-task run, as read from YAML by :func:`load_config`."""

    tasks: list[TaskSpec]
    model: ModelOptions = field(default_factory=ModelOptions)
    mechanisms: MechanismConfig = field(default_factory=MechanismConfig)
    sampler: SamplerOptions = field(default_factory=SamplerOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    distillation: DistillOptions = field(default_factory=DistillOptions)
    source: str | None = None

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; tasks are {[t.name for t in self.tasks]}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source", None)
        return d


# ----------------------------------------------------------------------------- building
def _build(cls: type, d: Mapping[str, Any], where: str) -> Any:
    """``cls(**d)`` with unknown / missing fields and type errors reported as ConfigError."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: a mapping is required, got {type(d).__name__} {d!r}")
    names = {f.name for f in fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), sorted(names), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown field {', '.join(hints)}; known fields: {', '.join(sorted(names))}")
    from dataclasses import MISSING

    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in d]
    if missing:
        raise ConfigError(f"{where}: missing required field {missing[0]!r}")
    kwargs = dict(d)
    if cls is TaskSpec and "data" in kwargs:
        kwargs["data"] = _build(DataFiles, kwargs["data"] or {}, f"{where}.data")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        msg = str(err)
        if msg.startswith(where):
            raise ConfigError(msg) from None
        sep = "." if msg.split(":")[0] in names else ": "  # "field: ..." -> "where.field: ..."
        raise ConfigError(f"{where}{sep}{msg}") from None
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    return str(p if p.is_absolute() else (base / p))


def config_from_dict(raw: Mapping[str, Any], *, source: str = "<config>", base_dir: Path | None = None) -> MTLConfig:
    """Build an :class:`MTLConfig` from a parsed mapping (the YAML file's content).

    Relative paths (data files, ``data_dir``, teachers, encoder) are resolved against
    ``base_dir`` (the YAML file's folder). Every error is a :class:`ConfigError` starting with
    ``source`` and naming the field.
    """
    base = base_dir or Path.cwd()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'tasks' list, got {type(raw).__name__}")
    known = ("tasks", "model", "mechanisms", "sampler", "training", "distillation")
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r}; known sections: {', '.join(known)}")
    if "tasks" not in raw:
        raise ConfigError(f"{source}: missing 'tasks': a list of task mappings is required")
    tasks_raw = raw["tasks"]
    if not isinstance(tasks_raw, Sequence) or isinstance(tasks_raw, (str, bytes)) or not tasks_raw:
        raise ConfigError(f"{source}: tasks: a non-empty list of task mappings is required, got {tasks_raw!r}")
    try:
        tasks = []
        for i, t in enumerate(tasks_raw):
            where = f"{source}: tasks[{i}]"
            spec = TaskSpec.from_dict(t, where)
            d = spec.data
            d.train, d.validation, d.test = (_resolve(x, base) for x in (d.train, d.validation, d.test))
            d.data_dir = _resolve(d.data_dir, base)
            spec.teacher = _resolve(spec.teacher, base)
            tasks.append(spec)
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{source}: tasks: duplicate task name(s) {dup}; names must be unique")
        model = _wrap(lambda: _build(ModelOptions, _section(raw, "model"), "model"), source)
        model.encoder = _resolve(model.encoder, base)
        model.tokenizer = _resolve(model.tokenizer, base)
        mech = _wrap(lambda: MechanismConfig.from_value(raw.get("mechanisms"), "mechanisms"), source)
        sampler = _wrap(lambda: _build(SamplerOptions, _section(raw, "sampler"), "sampler"), source)
        training = _wrap(lambda: _build(TrainingOptions, _section(raw, "training"), "training"), source)
        training.output_dir = _resolve(training.output_dir, base) or training.output_dir
        dist_raw = raw.get("distillation")
        if dist_raw is None or dist_raw is False:
            distill = DistillOptions()
        else:
            if dist_raw is not True and not isinstance(dist_raw, Mapping):
                raise ConfigError(
                    f"{source}: distillation: a mapping of distillation fields (or true / false) is required, "
                    f"got {type(dist_raw).__name__} {dist_raw!r}"
                )
            dist_raw = {} if dist_raw is True else dict(dist_raw)
            dist_raw.setdefault("enabled", True)
            distill = _wrap(lambda: _build(DistillOptions, dist_raw, "distillation"), source)
            distill.teacher = _resolve(distill.teacher, base)
    except ConfigError:
        raise
    cfg = MTLConfig(tasks, model, mech, sampler, training, distill, source=source)
    _cross_check(cfg, source)
    if not distill.enabled:
        # a `distillation:` section with `enabled: false` is kept (a switch to flip), but say what it drops
        default = DistillOptions()
        ignored = [f.name for f in fields(DistillOptions)
                   if f.name != "enabled" and getattr(distill, f.name) != getattr(default, f.name)]
        if ignored:
            warnings.warn(f"{source}: distillation.enabled is false: ignoring {', '.join(ignored)}", UserWarning,
                          stacklevel=2)
    return cfg


def _section(raw: Mapping[str, Any], name: str) -> Any:
    """A section's mapping; an absent or empty (``model:``) section is ``{}``. Anything else goes to
    _build as is (which names the section if it is not a mapping)."""
    value = raw.get(name)
    return {} if value is None else value


def _wrap(fn: Any, source: str) -> Any:
    try:
        return fn()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _cross_check(cfg: MTLConfig, source: str) -> None:
    m = cfg.mechanisms
    if m.hierarchy_mode == "emd" and m.hierarchy and not cfg.distillation.enabled:
        raise ConfigError(
            f"{source}: mechanisms.hierarchy.mode: 'emd' reads the EMD layer weights of multi-task "
            "distillation; enable the 'distillation' section or use mode 'learned'"
        )
    if m.adversarial and len(cfg.tasks) < 2:
        raise ConfigError(f"{source}: mechanisms.adversarial: the task discriminator needs at least 2 tasks")
    if any(t.tap_layer is not None for t in cfg.tasks) and not m.hierarchy:
        raise ConfigError(
            f"{source}: tasks[{[t.tap_layer is not None for t in cfg.tasks].index(True)}].tap_layer is set but "
            "the 'hierarchy' mechanism is off; add it to mechanisms"
        )
    if cfg.distillation.enabled and cfg.distillation.teacher is None:
        missing = [i for i, t in enumerate(cfg.tasks) if t.teacher is None]
        if missing:
            raise ConfigError(
                f"{source}: tasks[{missing[0]}] ({cfg.tasks[missing[0]].name!r}).teacher: distillation needs a "
                "teacher per task, or one multi-task teacher in distillation.teacher"
            )


def load_config(path: str | os.PathLike) -> MTLConfig:
    """Read a multi-task YAML configuration (see ``examples/mtl_tasks.yaml``).

    Raises:
        MissingFileError: ``path`` does not exist (a ``FileNotFoundError``).
        ConfigError: invalid YAML or an invalid field; the message names the file, the line (YAML
            syntax errors) or the field (``tasks[1] ('news').num_labels: ...``).
    """
    import yaml

    from ..distill.data import MissingFileError

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"multi-task config {p} not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{p}:{where}: invalid YAML: {problem}") from None
    if raw is None:
        raise ConfigError(f"{p}: empty file; a mapping with a 'tasks' list is required")
    if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
        raw = {"tasks": raw}  # a bare list of tasks
    return config_from_dict(raw, source=str(p), base_dir=p.resolve().parent)


def load_tasks(path: str | os.PathLike) -> list[TaskSpec]:
    """Only the task list of a YAML file (a full config, or a bare list of task mappings)."""
    return load_config(path).tasks
