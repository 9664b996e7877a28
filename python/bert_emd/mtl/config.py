"""The multi-task configuration: task specifications and the options of a run (dataclasses whose
fields are checked on construction; :mod:`~bert_emd.mtl.yaml_config` reads them from YAML).

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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..nn.config import EMDLossConfig
from .checks import (
    ConfigError,
    build_dataclass,
    is_int,
    require_bool,
    require_choice,
    require_int,
    require_number,
    require_str,
)

__all__ = [
    "DataFiles",
    "DistillOptions",
    "MTLConfig",
    "MechanismConfig",
    "ModelOptions",
    "SamplerOptions",
    "TaskSpec",
    "TrainingOptions",
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
            setattr(self, f.name, require_str(v, f.name))
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
            self.data = build_dataclass(DataFiles, self.data, f"{w}.data")
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
            require_int(self.num_labels, f"{w}.num_labels", lo=2)
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
        require_int(self.tap_layer, f"{w}.tap_layer", optional=True, what="an integer layer index")
        self.loss_weight = float(require_number(self.loss_weight, f"{w}.loss_weight", lo=0, lo_open=True))
        require_int(self.max_length, f"{w}.max_length", lo=2, optional=True)
        self.teacher = require_str(self.teacher, f"{w}.teacher", optional=True)
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
            return build_dataclass(cls, d, label, nested={"data": DataFiles})
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
            require_bool(getattr(self, m), f"{where}.{m}")
        require_choice(self.hierarchy_mode, f"{where}.hierarchy_mode", ("learned", "emd"))
        require_choice(self.pooling, f"{where}.pooling", ("cls", "mean"))
        for name in ("private_dim", "private_heads", "label_embedding_dim"):
            require_int(getattr(self, name), f"{where}.{name}", lo=1)
        if self.private_dim % self.private_heads:
            raise ConfigError(
                f"{where}.private_heads: {self.private_heads} does not divide private_dim {self.private_dim}"
            )
        for name in ("gamma", "adversarial_weight"):
            require_number(getattr(self, name), f"{where}.{name}", lo=0)
        require_number(self.dropout, f"{where}.dropout", lo=0, hi=1, hi_open=True)

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
            return build_dataclass(cls, flat, where)
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
        return build_dataclass(cls, flat, where)


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
            require_number(getattr(self, name), f"sampler.{name}", lo=0, lo_open=True)
        if require_number(self.anneal_to, "sampler.anneal_to", lo=0, optional=True) is not None:
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
            setattr(self, name, require_str(getattr(self, name), f"model.{name}", optional=True))
        layers = self.student_layers
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not all(is_int(i) and i >= 0 for i in layers):
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
    ``label_embedding_lr`` is the learning rate of the shared label-embedding matrix (the
    ``label_embedding`` mechanism; None: ``lr``); ``limit_train`` / ``limit_eval`` keep the first
    rows of each task (quick runs).
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
    label_embedding_lr: float | None = None

    def __post_init__(self) -> None:
        self.output_dir = require_str(self.output_dir, "training.output_dir")
        for name in ("batch_size", "eval_batch_size", "tasks_per_step", "logging_steps", "max_length"):
            require_int(getattr(self, name), f"training.{name}", lo=1)
        require_int(self.max_steps, "training.max_steps")
        for name in ("limit_train", "limit_eval"):
            require_int(getattr(self, name), f"training.{name}", lo=1, optional=True)
        require_int(self.seed, "training.seed", lo=0, hi=2**32 - 1)  # numpy's seed range
        for name in ("epochs", "lr"):
            require_number(getattr(self, name), f"training.{name}", lo=0, lo_open=True)
        for name in ("mixture_lr", "label_embedding_lr"):
            require_number(getattr(self, name), f"training.{name}", lo=0, lo_open=True, optional=True)
        require_number(self.weight_decay, "training.weight_decay", lo=0)
        require_number(self.warmup_ratio, "training.warmup_ratio", lo=0, hi=1, hi_open=True)
        for name in ("eval_strategy", "save_strategy"):
            require_choice(getattr(self, name), f"training.{name}", ("no", "epoch", "steps"))
        require_bool(self.use_cpu, "training.use_cpu")


# the fields of bert_emd.nn.EMDLossConfig that the distillation section reads (names, types and
# defaults come from there: _with_loss_fields adds them to DistillOptions)
LOSS_FIELDS = ("beta", "theta", "T_emd", "temperature", "gold_weight", "normalize", "use_attention", "use_hidden",
               "use_embedding", "use_prediction", "attention_source", "fused_attention")
_TERMS = ("use_attention", "use_hidden", "use_embedding", "use_prediction")
_DISTILL_SWITCHES = ("enabled", "teacher_annealing", *_TERMS, "fused_attention", "allow_untrained_teacher")


def _with_loss_fields(cls: type) -> type:
    """Give ``cls`` (before ``@dataclass``) the :data:`LOSS_FIELDS` of :class:`EMDLossConfig`,
    with their types and defaults, after its own fields."""
    loss = {f.name: f for f in fields(EMDLossConfig)}
    cls.__annotations__ = {**cls.__annotations__, **{name: loss[name].type for name in LOSS_FIELDS}}
    for name in LOSS_FIELDS:
        setattr(cls, name, loss[name].default)
    return cls


@dataclass
@_with_loss_fields
class DistillOptions:
    """The ``distillation:`` section: multi-task EMD distillation (see
    :class:`bert_emd.mtl.loss.MultiTaskEMDLoss`).

    ``teacher``: one multi-task teacher (a folder saved by ``bert-emd mtl train``); otherwise
    every task names its own ``teacher``. ``teacher_annealing`` raises the gold share of the
    prediction term linearly from 0 to 1 over training instead of ``gold_weight`` (Clark et al.,
    2019). ``allow_untrained_teacher``: go on (with a warning) when a task's teacher checkpoint
    lacks its task head, which is then random (seeded by ``training.seed``); by default such a
    teacher is refused (``bert-emd mtl train --allow-untrained-teacher`` also switches it on).

    The loss fields are those of :class:`bert_emd.nn.EMDLossConfig` named in :data:`LOSS_FIELDS`,
    with its defaults (``beta``, ``theta``, ``T_emd``, ``temperature``, ``gold_weight``: share of
    the gold-label loss, ``normalize``, ``use_*``, ``attention_source``: ``"probs"`` or
    ``"scores"``, ``fused_attention``: costs from the hooked queries and keys, also switched on by
    ``bert-emd mtl train --fused-attention``); :meth:`loss_config` builds the config.
    """

    enabled: bool = False
    teacher: str | None = None
    teacher_annealing: bool = False
    allow_untrained_teacher: bool = False

    def __post_init__(self) -> None:
        for name in _DISTILL_SWITCHES:
            require_bool(getattr(self, name), f"distillation.{name}")
        self.teacher = require_str(self.teacher, "distillation.teacher", optional=True)
        require_choice(self.normalize, "distillation.normalize", ("sum", "softmax", "double_softmax"))
        require_choice(self.attention_source, "distillation.attention_source", ("probs", "scores"))
        require_number(self.gold_weight, "distillation.gold_weight", lo=0, hi=1)
        for name in ("beta", "theta"):
            require_number(getattr(self, name), f"distillation.{name}", lo=0)
        for name in ("T_emd", "temperature"):  # divisors
            require_number(getattr(self, name), f"distillation.{name}", lo=0, lo_open=True)
        if self.enabled and not any(getattr(self, t) for t in _TERMS):
            raise ConfigError(f"distillation.{'/'.join(_TERMS)}: all four are false; at least one term must be true")

    def loss_config(self, fused_attention: bool | None = None) -> EMDLossConfig:
        """The loss hyper-parameters of this section; ``fused_attention`` (the CLI flag), when
        given, replaces the section's."""
        options = {name: getattr(self, name) for name in LOSS_FIELDS}
        if fused_attention is not None:
            options["fused_attention"] = bool(fused_attention)
        return EMDLossConfig(**options)


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


