"""The data of multi-task learning: each task's splits read (:func:`load_task_data`) and
tokenised (:func:`tokenize_task`), a split as a dataset whose items carry their task
(:class:`TaskDataset`), and the collator that pads each task's examples of a batch
(:class:`MultiTaskCollator`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import MissingFileError, UsageError
from .checks import ConfigError
from .config import TaskSpec

__all__ = ["MultiTaskCollator", "TaskDataset", "load_task_data", "tokenize_task"]


def load_task_data(spec: TaskSpec) -> Any:
    """Read a task's splits with the distillation loaders (``bert_emd.distill.data``), or, for
    tagging, JSONL files with a word list and a tag list per line.

    Returns:
        :class:`bert_emd.distill.data.TaskData` (tagging: with ``tokens`` / ``tags`` columns).
    Raises:
        FileNotFoundError, ValueError: naming the task and the file.
    """
    from ..distill import data as dd

    d = spec.data
    try:
        if spec.is_tagging:
            out = _load_tagging(spec)
        elif d.glue is not None:
            out = dd.load_glue(d.glue, d.data_dir)
        else:
            # the DataFiles fields that name columns, labels and the encoding are load_table's options
            table = {k: getattr(d, k) for k in ("text_column", "text_pair_column", "label_column", "label_list",
                                                "encoding")}
            out = dd.load_table(d.train, d.validation, d.test, regression=spec.is_regression, **table)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"task {spec.name!r}: {err}") from None
    if not spec.is_regression and out.num_labels != spec.num_labels:
        raise ConfigError(
            f"task {spec.name!r}: num_labels is {spec.num_labels} but the data has {out.num_labels} labels "
            f"{out.label_list} (set data.label_list to fix the label set and order)"
        )
    return out


def _load_tagging(spec: TaskSpec) -> Any:
    """JSONL tagging files: ``{"tokens": [...], "tags": [...]}`` per line (column names from the spec)."""
    from datasets import DatasetDict, load_dataset

    from ..distill.data import TaskData

    d = spec.data
    given = {k: v for k, v in (("train", d.train), ("validation", d.validation), ("test", d.test)) if v is not None}
    splits, labels = {}, d.label_list
    for split, path in given.items():
        if not os.path.isfile(path):
            raise MissingFileError(f"{split} file {path} not found")
        if not path.endswith((".jsonl", ".json")):
            raise UsageError(f"{path}: tagging data must be JSONL (one {{tokens, tags}} object per line)")
        ds = load_dataset("json", data_files={"data": path})["data"]
        for col in (d.tokens_column, d.tags_column):
            if col not in ds.column_names and not (split == "test" and col == d.tags_column):
                raise UsageError(f"{path}: missing column {col!r}; columns are {ds.column_names}")
        rows_tok = ds[d.tokens_column]
        rows_tag = ds[d.tags_column] if d.tags_column in ds.column_names else None
        if labels is None and rows_tag is not None:
            labels = sorted({str(t) for row in rows_tag for t in row})
        assert labels is not None or rows_tag is None
        index = {name: i for i, name in enumerate(labels or [])}
        cols: dict[str, list] = {"tokens": [], "tags": []} if rows_tag is not None else {"tokens": []}
        for i, toks in enumerate(rows_tok):
            if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
                raise UsageError(f"{path}, row {i + 1}: {d.tokens_column!r} must be a list of strings")
            cols["tokens"].append(toks)
            if rows_tag is not None:
                tags = rows_tag[i]
                if len(tags) != len(toks):
                    raise UsageError(f"{path}, row {i + 1}: {len(toks)} tokens but {len(tags)} tags")
                try:
                    cols["tags"].append([index[str(t)] for t in tags])
                except KeyError as err:
                    msg = f"{path}, row {i + 1}: unknown tag {err.args[0]!r}; expected one of {labels}"
                    raise UsageError(msg) from None
        from datasets import Dataset

        splits[split] = Dataset.from_dict(cols)
    return TaskData("tagging", DatasetDict(splits), labels, False, given)


def tokenize_task(
    spec: TaskSpec, data: Any, tokenizer: Any, max_length: int, limit: dict[str, int | None] | None = None
) -> Any:
    """Tokenise a task's splits: ``input_ids``, ``attention_mask`` (``token_type_ids``) and
    ``labels`` ([] class / float; tagging: [L] tag of each word's first sub-token, -100 elsewhere)."""
    from datasets import DatasetDict

    from ..distill.data import tokenize

    if not spec.is_tagging:
        return tokenize(data, tokenizer, max_length=max_length, limit=limit)
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"task {spec.name!r}: tagging needs a fast tokenizer (word ids of sub-tokens)")
    out = {}
    for split, ds in data.splits.items():
        if limit and limit.get(split) is not None:
            ds = ds.select(range(min(len(ds), int(limit[split]))))

        def encode(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
            if "tags" in batch:
                labels = []
                for i, tags in enumerate(batch["tags"]):
                    prev, row = None, []
                    for w in enc.word_ids(i):
                        row.append(-100 if w is None or w == prev else int(tags[w]))
                        prev = w
                    labels.append(row)
                enc["labels"] = labels
            return dict(enc)

        out[split] = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {spec.name} {split}")
    return DatasetDict(out)


class TaskDataset(Dataset):
    """A tokenised split of one task; items carry ``task_id``."""

    def __init__(self, data: Any, task_id: int) -> None:
        self.data, self.task_id = data, int(task_id)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.data[int(i)])
        item["task_id"] = self.task_id
        return item


class MultiTaskCollator:
    """Group a list of examples by task (in order of appearance) and pad each group.

    Returns ``{"task_batches": [{"task": int, "input_ids": [B, L], "attention_mask": [B, L],
    ("token_type_ids": [B, L]), ("labels": [B] / [B, L])}, ...]}``.
    """

    def __init__(self, specs: Sequence[TaskSpec], pad_token_id: int = 0) -> None:
        self.specs = list(specs)
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        groups: dict[int, list[dict[str, Any]]] = {}
        for f in features:
            groups.setdefault(int(f["task_id"]), []).append(f)
        return {"task_batches": [self._pad(t, fs) for t, fs in groups.items()]}

    def _pad(self, task: int, feats: list[dict[str, Any]]) -> dict[str, Any]:
        spec = self.specs[task]
        length = max(len(f["input_ids"]) for f in feats)
        out: dict[str, Any] = {"task": task}
        for key, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in feats[0]:
                out[key] = torch.tensor([list(f[key]) + [fill] * (length - len(f[key])) for f in feats])
        if "labels" in feats[0]:
            if spec.is_tagging:
                out["labels"] = torch.tensor([list(f["labels"]) + [-100] * (length - len(f["labels"])) for f in feats])
            elif spec.is_regression:
                out["labels"] = torch.tensor([float(f["labels"]) for f in feats], dtype=torch.float32)
            else:
                out["labels"] = torch.tensor([int(f["labels"]) for f in feats], dtype=torch.long)
        return out
