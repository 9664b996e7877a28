"""Local training data for distillation: GLUE task folders and generic CSV / TSV / JSONL files.

Everything is read from local files through the ``datasets`` library; nothing is downloaded.
Every loader returns a :class:`TaskData`, whose splits share one canonical layout:

- ``text`` (str), optionally ``text_pair`` (str), and ``label`` (int class index, or float for
  regression; absent from unlabelled test splits);

which :func:`tokenize` turns into ``input_ids`` / ``attention_mask`` / ``token_type_ids`` /
``labels`` with the teacher's tokenizer.

GLUE folders (the layout of the GLUE download script: ``<data_dir>/train.tsv``, ``dev.tsv``;
MNLI ``dev_matched.tsv`` and ``dev_mismatched.tsv``), read as the original BERT code reads them
(tab-separated, no quoting):

=======  ==================================  ===========================  =======================
task     text (, text pair)                   label column                 labels
=======  ==================================  ===========================  =======================
CoLA     column 4 (no header line)            column 2                     0, 1
SST-2    sentence                             label                        0, 1
MRPC     #1 String, #2 String                 Quality                      0, 1
STS-B    sentence1, sentence2                 score (last column)          float in [0, 5]
QQP      question1, question2                 is_duplicate                 0, 1
MNLI     sentence1, sentence2                 gold_label (last column)     contradiction,
                                                                           entailment, neutral
QNLI     question, sentence                   label                        entailment,
                                                                           not_entailment
RTE      sentence1, sentence2                 label                        entailment,
                                                                           not_entailment
WNLI     sentence1, sentence2                 label                        0, 1
=======  ==================================  ===========================  =======================
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MissingFileError, UsageError

__all__ = [
    "GLUE_TASKS",
    "GlueTask",
    "MissingFileError",
    "TaskData",
    "load_glue",
    "load_table",
    "normalize_task_name",
    "tokenize",
]


@dataclass(frozen=True)
class GlueTask:
    """Column conventions of one GLUE task folder.

    ``text`` / ``text_pair`` / ``label`` are header names, or 0-based column indices for files
    without a header line (CoLA). ``label_list`` is None for regression (STS-B).
    """

    name: str
    text: str | int
    text_pair: str | int | None
    label: str | int
    label_list: tuple[str, ...] | None
    header: bool = True
    dev_files: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)
    # Label column is the last field of each row (MNLI's and STS-B's dev files have extra
    # annotator columns, so the name alone would be ambiguous across files).
    label_last: bool = False

    @property
    def is_regression(self) -> bool:
        return self.label_list is None


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", 3, None, 1, ("0", "1"), header=False),
    "sst-2": GlueTask("sst-2", "sentence", None, "label", ("0", "1")),
    "mrpc": GlueTask("mrpc", "#1 String", "#2 String", "Quality", ("0", "1")),
    "sts-b": GlueTask("sts-b", "sentence1", "sentence2", "score", None, label_last=True),
    "qqp": GlueTask("qqp", "question1", "question2", "is_duplicate", ("0", "1")),
    "mnli": GlueTask(
        "mnli",
        "sentence1",
        "sentence2",
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        dev_files=(("validation", "dev_matched.tsv"), ("validation_mismatched", "dev_mismatched.tsv")),
        label_last=True,
    ),
    "qnli": GlueTask("qnli", "question", "sentence", "label", ("entailment", "not_entailment")),
    "rte": GlueTask("rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "wnli": GlueTask("wnli", "sentence1", "sentence2", "label", ("0", "1")),
}
_ALIASES = {"sst2": "sst-2", "stsb": "sts-b", "sts": "sts-b", "mnli-m": "mnli", "mnli-mm": "mnli"}


def normalize_task_name(task: str) -> str:
    """``"SST-2"``, ``"sst2"`` -> ``"sst-2"``; raises UsageError naming the known tasks."""
    key = task.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise UsageError(f"unknown GLUE task {task!r}; known: {', '.join(sorted(GLUE_TASKS))}")
    return key


@dataclass
class TaskData:
    """Splits of one task in the canonical layout, with what is needed to train and score it.

    Attributes:
        name: GLUE task name (``"sst-2"``, ...) or ``"custom"``.
        splits: ``datasets.DatasetDict`` with ``train`` / ``validation`` / ``test`` (those given)
            and, for MNLI, ``validation_mismatched``; columns ``text``, [``text_pair``], ``label``.
        label_list: class names in index order (label i is ``label_list[i]``), None for regression.
        has_pair: whether a ``text_pair`` column is present.
    """

    name: str
    splits: Any
    label_list: list[str] | None
    has_pair: bool
    files: dict[str, str] = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return self.label_list is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_list is None else len(self.label_list)

    @property
    def metric_task(self) -> str | None:
        """The task name for :func:`bert_emd.distill.metrics.task_metrics` (None if custom)."""
        return self.name if self.name in GLUE_TASKS else None


# ----------------------------------------------------------------------------- helpers
def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        folder = path.parent
        listing = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
        hint = f"; {folder} holds: {', '.join(listing) or '(nothing)'}" if listing is not None else (
            f"; folder {folder} does not exist"
        )
        raise MissingFileError(f"{what}: file {path} not found{hint}")
    return path


def _read_tsv(path: Path) -> list[list[str]]:
    """Rows of a GLUE TSV file as the original BERT code reads them (tabs, no quoting)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [row for row in csv.reader(f, delimiter="\t", quotechar=None) if row]


def _column(header: list[str] | None, spec: str | int, path: Path, role: str) -> int:
    if isinstance(spec, int):
        return spec
    assert header is not None
    if spec not in header:
        raise UsageError(f"{path}: missing {role} column {spec!r}; header has: {', '.join(header)}")
    return header.index(spec)


def _label_index(value: str, label_list: Sequence[str], path: Path, row: int, column: str) -> int:
    try:
        return list(label_list).index(value)
    except ValueError:
        raise UsageError(
            f"{path}, row {row}: unknown label {value!r} in column {column!r}; "
            f"expected one of {list(label_list)}"
        ) from None


def _glue_split(spec: GlueTask, path: Path, labelled: bool) -> tuple[dict[str, list], int]:
    """Read one GLUE file into canonical columns; returns (columns, rows skipped as malformed)."""
    from datasets import Dataset  # noqa: F401  (fail early with a clear ImportError)

    rows = _read_tsv(path)
    header = None
    if spec.header:
        if not rows:
            raise UsageError(f"{path}: empty file (a header line was expected)")
        header, rows = rows[0], rows[1:]
    if not rows:
        raise UsageError(f"{path}: no data rows")
    i_text = _column(header, spec.text, path, "text")
    i_pair = None if spec.text_pair is None else _column(header, spec.text_pair, path, "text pair")
    i_label = None
    if labelled:
        i_label = -1 if spec.label_last else _column(header, spec.label, path, "label")
        if spec.label_last and header is not None and spec.label not in header:
            # MNLI / STS-B: the last column must be the label column of this task.
            raise UsageError(f"{path}: missing label column {spec.label!r}; header has: {', '.join(header)}")
    need = max(i for i in (i_text, i_pair, i_label if i_label != -1 else 0) if i is not None) + 1
    cols: dict[str, list] = {"text": []}
    if i_pair is not None:
        cols["text_pair"] = []
    if labelled:
        cols["label"] = []
    skipped = 0
    label_name = str(spec.label)
    for n, row in enumerate(rows, start=2 if spec.header else 1):
        if len(row) < need:
            skipped += 1  # QQP's train file has a few broken rows; the original code skips them too
            continue
        cols["text"].append(row[i_text])
        if i_pair is not None:
            cols["text_pair"].append(row[i_pair])
        if labelled:
            value = row[i_label].strip()
            if spec.label_list is None:
                try:
                    cols["label"].append(float(value))
                except ValueError:
                    msg = f"{path}, row {n}: label {value!r} in column {label_name!r} is not a number"
                    raise UsageError(msg) from None
            else:
                cols["label"].append(_label_index(value, spec.label_list, path, n, label_name))
    if skipped == len(rows):
        raise UsageError(
            f"{path}: every row has fewer than {need} tab-separated fields: is this the {spec.name} file?"
        )
    return cols, skipped


def _features(has_pair: bool, regression: bool, label_list: Sequence[str] | None, labelled: bool) -> Any:
    from datasets import ClassLabel, Features, Value

    f: dict[str, Any] = {"text": Value("string")}
    if has_pair:
        f["text_pair"] = Value("string")
    if labelled:
        f["label"] = Value("float32") if regression else ClassLabel(names=list(label_list or []))
    return Features(f)


def load_glue(task: str, data_dir: str | os.PathLike, *, test: bool = False) -> TaskData:
    """Load a GLUE task folder in its standard layout.

    Args:
        task: task name (``cola``, ``sst-2``, ``mrpc``, ``sts-b``, ``qqp``, ``mnli``, ``qnli``,
            ``rte``, ``wnli``; case and ``sst2``-style spellings are accepted).
        data_dir: the folder holding ``train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv``,
            ``dev_mismatched.tsv``).
        test: also read ``test.tsv`` (unlabelled in GLUE; read as text only).
    Returns:
        :class:`TaskData` with splits ``train``, ``validation`` (MNLI: and
        ``validation_mismatched`` when the file exists) and, with ``test``, ``test``.
    Raises:
        MissingFileError: a required file is missing (the message lists the folder).
        UsageError: a missing column, an unknown label, a malformed file.
    """
    from datasets import Dataset, DatasetDict

    name = normalize_task_name(task)
    spec = GLUE_TASKS[name]
    folder = Path(data_dir)
    if not folder.is_dir():
        raise MissingFileError(f"GLUE {name} data_dir {folder} is not a folder")
    wanted: list[tuple[str, str, bool, bool]] = [("train", "train.tsv", True, True)]
    for i, (split, fname) in enumerate(spec.dev_files):
        wanted.append((split, fname, True, i == 0))  # the first dev file is required
    if test:
        wanted.append(("test", "test.tsv", False, True))
    splits, files = {}, {}
    for split, fname, labelled, required in wanted:
        path = folder / fname
        if not path.is_file() and not required:
            continue
        _require_file(path, f"GLUE {name} {split} split")
        if split == "test":
            cols, _ = _glue_test_split(spec, path)
        else:
            cols, _ = _glue_split(spec, path, labelled)
        has_pair = "text_pair" in cols
        feats = _features(has_pair, spec.is_regression, spec.label_list, "label" in cols)
        splits[split] = Dataset.from_dict(cols, features=feats)
        files[split] = str(path)
    label_list = None if spec.label_list is None else list(spec.label_list)
    return TaskData(name, DatasetDict(splits), label_list, spec.text_pair is not None, files)


def _glue_test_split(spec: GlueTask, path: Path) -> tuple[dict[str, list], int]:
    """GLUE test files: a header with ``index`` and the text columns (CoLA: ``sentence``)."""
    rows = _read_tsv(path)
    if not rows:
        raise UsageError(f"{path}: empty file")
    header, rows = rows[0], rows[1:]
    text = "sentence" if spec.name == "cola" else spec.text
    i_text = _column(header, text, path, "text")
    i_pair = None if spec.text_pair is None else _column(header, spec.text_pair, path, "text pair")
    cols: dict[str, list] = {"text": [r[i_text] for r in rows if len(r) > i_text]}
    if i_pair is not None:
        cols["text_pair"] = [r[i_pair] for r in rows if len(r) > max(i_text, i_pair)]
        cols["text"] = [r[i_text] for r in rows if len(r) > max(i_text, i_pair)]
    return cols, 0


# ----------------------------------------------------------------------------- generic files
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "json", ".json": "json"}


def _file_format(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    return fmt


def _read_generic(path: Path, encoding: str, cache_dir: str | None) -> Any:
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    fmt = _file_format(path)
    kwargs: dict[str, Any] = {"data_files": {"data": str(path)}, "cache_dir": cache_dir}
    if fmt == "csv":
        builder, kwargs["encoding"] = "csv", encoding
    elif fmt == "tsv":
        builder, kwargs["encoding"], kwargs["delimiter"] = "csv", encoding, "\t"
    else:
        builder = "json"
    was = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        return load_dataset(builder, **kwargs)["data"]
    except Exception as err:  # the builders raise many types; name the file
        raise UsageError(f"{path}: cannot read as {fmt.upper()} ({type(err).__name__}: {err})") from err
    finally:
        if was:
            enable_progress_bar()


def _sorted_labels(values: Sequence[Any]) -> list[str]:
    uniq = {str(v) for v in values}
    try:
        return sorted(uniq, key=lambda s: float(s))
    except ValueError:
        return sorted(uniq)


def load_table(
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_list: Sequence[str] | None = None,
    regression: bool = False,
    encoding: str = "utf-8",
    cache_dir: str | None = None,
) -> TaskData:
    """Load generic CSV / TSV / JSONL files (format from the extension) with text, optional
    text-pair, and label columns.

    Classification labels are matched as strings against ``label_list``; without one, the
    sorted distinct labels of the training file (numerically sorted when they are numbers)
    define it, and any other label in a later file is an error. ``test_file`` may lack the
    label column (it is then read as text only).

    Args:
        train_file, validation_file, test_file: paths (at least one).
        text_column, text_pair_column, label_column: column names (JSONL: keys).
        label_list: class names in index order; None to infer them from the training file.
        regression: labels are floats (scored by Pearson / Spearman).
        encoding: text encoding of CSV / TSV files (e.g. ``"latin-1"``).
        cache_dir: where ``datasets`` keeps its Arrow cache (default: its usual cache folder).
    Raises:
        MissingFileError: a file does not exist.
        UsageError: a missing column, an unknown label, an unreadable file.
    """
    from datasets import DatasetDict

    given = {"train": train_file, "validation": validation_file, "test": test_file}
    given = {k: Path(v) for k, v in given.items() if v is not None}
    if not given:
        raise UsageError("load_table needs at least one of train_file, validation_file, test_file")
    raw = {}
    for split, path in given.items():
        _require_file(path, f"{split} file")
        ds = _read_generic(path, encoding, cache_dir)
        needed = [text_column] + ([text_pair_column] if text_pair_column else [])
        if split != "test" or label_column in ds.column_names:
            needed.append(label_column)
        for col in needed:
            if col not in ds.column_names:
                role = "text" if col == text_column else "text pair" if col == text_pair_column else "label"
                raise UsageError(
                    f"{path}: missing {role} column {col!r}; columns are: {', '.join(ds.column_names)}"
                )
        raw[split] = ds
    labels: list[str] | None = None
    if not regression:
        if label_list is not None:
            labels = [str(x) for x in label_list]
        else:
            source = next((raw[k] for k in ("train", "validation", "test") if k in raw), None)
            if source is None or label_column not in source.column_names:
                raise UsageError("cannot infer the label set: no labelled file given; pass label_list (--labels)")
            labels = _sorted_labels(source[label_column])
    splits = {}
    for split, ds in raw.items():
        labelled = label_column in ds.column_names
        splits[split] = _canonical(ds, given[split], text_column, text_pair_column, label_column if labelled else None,
                                   labels, regression)
    return TaskData("custom", DatasetDict(splits), labels, text_pair_column is not None,
                    {k: str(v) for k, v in given.items()})


def _canonical(
    ds: Any,
    path: Path,
    text_column: str,
    text_pair_column: str | None,
    label_column: str | None,
    labels: list[str] | None,
    regression: bool,
) -> Any:
    from datasets import Dataset

    def text(values: list[Any], col: str) -> list[str]:
        out = []
        for i, v in enumerate(values):
            if v is None:
                raise UsageError(f"{path}, row {i + 1}: empty value in column {col!r}")
            out.append(str(v))
        return out

    cols: dict[str, list] = {"text": text(ds[text_column], text_column)}
    if text_pair_column is not None:
        cols["text_pair"] = text(ds[text_pair_column], text_pair_column)
    if label_column is not None:
        values = ds[label_column]
        if regression:
            out = []
            for i, v in enumerate(values):
                try:
                    out.append(float(v))
                except (TypeError, ValueError):
                    msg = f"{path}, row {i + 1}: label {v!r} in column {label_column!r} is not a number"
                    raise UsageError(msg) from None
            cols["label"] = out
        else:
            assert labels is not None
            index = {name: i for i, name in enumerate(labels)}
            out = []
            for i, v in enumerate(values):
                key = _label_key(v)
                if key not in index:
                    raise UsageError(
                        f"{path}, row {i + 1}: unknown label {v!r} in column {label_column!r}; "
                        f"expected one of {labels}"
                    )
                out.append(index[key])
            cols["label"] = out
    feats = _features(text_pair_column is not None, regression, labels, label_column is not None)
    return Dataset.from_dict(cols, features=feats)


def _label_key(v: Any) -> str:
    # 1 and 1.0 (a numeric column read as float) name the same class "1".
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


# ----------------------------------------------------------------------------- tokenisation
def tokenize(
    data: TaskData,
    tokenizer: Any,
    *,
    max_length: int = 128,
    pad_to_max_length: bool = False,
    limit: dict[str, int] | None = None,
) -> Any:
    """Tokenise every split of ``data`` with ``tokenizer`` (the teacher's).

    Args:
        data: the task's splits in the canonical layout.
        tokenizer: a Hugging Face tokenizer.
        max_length: truncate longer inputs (pairs: longest-first).
        pad_to_max_length: pad every example to ``max_length`` here (else pad per batch with
            ``DataCollatorWithPadding``, which is faster).
        limit: optional ``{split: n}``: keep the first n rows of a split (quick runs, tests).
    Returns:
        ``datasets.DatasetDict`` with ``input_ids``, ``attention_mask``, [``token_type_ids``]
        and ``labels`` ([] int64 class index, or float32 for regression) per example.
    """
    from datasets import DatasetDict

    out = {}
    for split, ds in data.splits.items():
        if limit and split in limit and limit[split] is not None:
            ds = ds.select(range(min(len(ds), int(limit[split]))))

        def encode(batch: dict[str, list]) -> dict[str, list]:
            pair = batch.get("text_pair")
            enc = tokenizer(
                batch["text"],
                pair,
                truncation=True,
                max_length=max_length,
                padding="max_length" if pad_to_max_length else False,
            )
            if "label" in batch:
                enc["labels"] = batch["label"]
            return dict(enc)

        out[split] = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {split}")
    return DatasetDict(out)
