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
  auxiliary losses (both averaged over the processes, as the Trainer's ``loss``), and --
  distilling -- each task's EMD layer weights;
- saving writes ``mtl_config.json`` and the encoder's config next to the weights, so that
  :meth:`MultiTaskModel.from_pretrained` loads the folder.

Everything else (optimiser, schedule, accumulation, checkpoints and resume, bf16, DDP via
accelerate / torchrun) is the Trainer's.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from transformers import Trainer

from ..distill.trainer import (
    DistillationTrainer,
    data_parallel_reason,
    distributed_world,
    mean_over_processes,
    unsynchronised_ranks_reason,
)
from ..errors import UsageError
from .loss import MultiTaskEMDLoss
from .model import MultiTaskModel
from .samplers import MultiTaskBatchSampler, TaskSampler
from .step import distillation_step
from .tasks import ConfigError, TaskSpec
from .teachers import TeacherSet

__all__ = [
    "MultiTaskCollator",
    "MultiTaskDistillationTrainer",
    "MultiTaskTrainer",
    "TaskDataset",
    "eval_shard",
    "evaluate_tasks",
    "load_task_data",
    "task_scores",
    "tokenize_task",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data
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
            out = dd.load_table(
                d.train,
                d.validation,
                d.test,
                text_column=d.text_column,
                text_pair_column=d.text_pair_column,
                label_column=d.label_column,
                label_list=d.label_list,
                regression=spec.is_regression,
                encoding=d.encoding,
            )
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

    from ..distill.data import MissingFileError, TaskData

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


# ----------------------------------------------------------------------------- metrics
def task_scores(spec: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics from its logits and gold labels (headline metric first).

    Args:
        logits: [n, C] / [n, 1] (regression) / [n, L, C] (tagging, padded).
        labels: [n] / [n, L] with -100 on positions without a tag.
    """
    from ..distill.metrics import macro_f1, task_metrics

    if spec.is_tagging:
        keep = labels != -100
        preds, gold = logits.argmax(-1)[keep], labels[keep]
        scores = {"token_acc": float((preds == gold).mean()) if gold.size else float("nan"),
                  "token_macro_f1": macro_f1(preds, gold) if gold.size else float("nan")}
    elif spec.is_regression:
        scores = task_metrics(None, logits.reshape(-1), labels.reshape(-1), is_regression=True)
    else:
        scores = task_metrics(spec.data.glue, logits.argmax(-1), labels)
        if spec.metric not in scores:
            from ..distill.metrics import accuracy, binary_f1, matthews

            fn = {"acc": accuracy, "macro_f1": macro_f1, "mcc": matthews, "f1": binary_f1}.get(spec.metric)
            if fn is not None:
                scores[spec.metric] = fn(logits.argmax(-1), labels)
            elif spec.metric == "acc_and_f1":
                scores["acc_and_f1"] = (accuracy(logits.argmax(-1), labels) + binary_f1(logits.argmax(-1), labels)) / 2
    head = spec.metric or next(iter(scores))
    return {head: scores[head], **{k: v for k, v in scores.items() if k != head}}


def eval_shard(n: int, rank: int, world_size: int) -> range:
    """The examples that ``rank`` of ``world_size`` processes scores in a sharded evaluation of
    ``n`` examples: a contiguous block of ``ceil(n / world_size)`` (the last ranks may get fewer,
    or none when ``n < world_size``); the ranks' blocks in rank order are ``range(n)``.

    Returns:
        ``range(min(n, rank * k), min(n, (rank + 1) * k))`` with ``k = ceil(n / world_size)``.
    Raises:
        ValueError: ``n < 0``, ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    if n < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"no shard {rank} of {world_size} for {n} examples")
    k = -(-n // world_size)
    return range(min(n, rank * k), min(n, (rank + 1) * k))


@torch.no_grad()
def evaluate_tasks(
    model: MultiTaskModel,
    datasets: dict[str, Any],
    collator: MultiTaskCollator,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """Score ``model`` on each task's dataset.

    Args:
        model: the multi-task model (the plain model, not a DDP wrapper: sharded, the ranks run
            different numbers of forwards).
        datasets: ``{task: tokenised split}`` (tasks without labels are skipped).
        collator: pads the batches.
        batch_size: examples per forward.
        device: where to run (default: the model's).
        distributed: in a ``torch.distributed`` run of several processes, score only this rank's
            shard of each task's examples (:func:`eval_shard`: a contiguous block of
            ``ceil(n / world_size)``) and gather the shards' logits [n_r, C] / [n_r, L_r, C] and
            labels [n_r] / [n_r, L_r] to every rank (``all_gather_object``, in rank order). A
            collective: every rank must call it, with the same datasets (a rank with an empty shard
            takes part too). Ignored without a process group of more than one process.
    Returns:
        ``{"tasks": {task: {metric: value, ..., "loss": ..., "n": ...}}, "macro_avg": mean of the
        tasks' headline metrics}``; distributed, the same dict on every rank, that of one process
        scoring everything (same example order, tagging logits padded to the longest example; the
        loss of the single process's batches of ``batch_size``, computed from the gathered logits,
        up to float rounding; only the forwards differ).
    """
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    group = distributed_world() if distributed else None
    out: dict[str, Any] = {"tasks": {}}
    # per task: the logits and labels of each batch ([B, C] / [B, L, C], [B] / [B, L] numpy) and the
    # sum over batches of (batch loss x batch size)
    scored: dict[str, tuple[list[np.ndarray], list[np.ndarray], float]] = {}
    for name, ds in datasets.items():
        tid = model.task_names.index(name)
        if len(ds) == 0 or "labels" not in ds.column_names:
            continue
        tds = TaskDataset(ds, tid)
        rows = range(len(tds)) if group is None else eval_shard(len(tds), *group)
        logits_all, labels_all, loss_sum = [], [], 0.0
        for start in range(rows.start, rows.stop, batch_size):
            feats = [tds[i] for i in range(start, min(start + batch_size, rows.stop))]
            b = collator(feats)["task_batches"][0]
            b = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in b.items()}
            res = model(name, **{k: v for k, v in b.items() if k != "task"})
            loss_sum += float(res.task_loss) * len(feats)
            logits_all.append(res.logits.float().cpu().numpy())
            labels_all.append(b["labels"].cpu().numpy())
        scored[name] = (logits_all, labels_all, loss_sum)
    if group is not None:
        import torch.distributed as dist

        # one collective for all tasks; every rank gathers every task (possibly with no batches)
        shards: list[Any] = [None] * group[1]
        dist.all_gather_object(shards, {t: (x, y) for t, (x, y, _) in scored.items()})
        scored = {t: ([x for s in shards for x in s[t][0]], [y for s in shards for y in s[t][1]], 0.0)
                  for t in scored}
    for name, (logits_all, labels_all, loss_sum) in scored.items():
        spec = model.specs[name]
        n = sum(len(y) for y in labels_all)
        if spec.is_tagging:  # pad the token axis to one length
            length = max(x.shape[1] for x in logits_all)
            logits_all = [np.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0))) for x in logits_all]
            labels_all = [np.pad(y, ((0, 0), (0, length - y.shape[1])), constant_values=-100) for y in labels_all]
        logits, labels = np.concatenate(logits_all), np.concatenate(labels_all)
        if group is not None:
            # the loss of one process's batches: a tagging batch's loss is its mean over labelled
            # tokens, which depends on where the batches start (the shards' batches start elsewhere)
            loss_sum = _batched_loss_sum(spec, logits, labels, batch_size)
        scores = task_scores(spec, logits, labels)
        scores["loss"] = loss_sum / n
        scores["n"] = n
        out["tasks"][name] = scores
    heads = [s[model.specs[t].metric] for t, s in out["tasks"].items()]
    out["macro_avg"] = float(np.mean(heads)) if heads else float("nan")
    model.train(was_training)
    return out


def _batched_loss_sum(spec: TaskSpec, logits: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    """Sum over the batches of ``batch_size`` consecutive examples of (the batch's task loss x its
    size), from logits [n, C] / [n, 1] / [n, L, C] and labels [n] / [n, L] (-100: no tag)."""
    from .model import task_loss_fn

    x, y = torch.from_numpy(logits), torch.from_numpy(labels)
    return sum(float(task_loss_fn(spec, x[s:s + batch_size], y[s:s + batch_size])) * len(y[s:s + batch_size])
               for s in range(0, len(y), batch_size))


# ----------------------------------------------------------------------------- trainers
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

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimiser, with the layer-mixture parameters (hierarchy) in their own group
        at ``mixture_lr`` (no weight decay) when that is set."""
        fresh = self.optimizer is None  # type: ignore[has-type]
        opt = super().create_optimizer(model)  # type: ignore[misc]
        lr = getattr(self, "mixture_lr", None)
        if fresh and lr is not None:
            mix = [p for m in self._model().mixtures.values() for p in m.parameters() if p.requires_grad]
            ids = {id(p) for p in mix}
            if mix:
                for g in opt.param_groups:
                    g["params"] = [p for p in g["params"] if id(p) not in ids]
                opt.add_param_group({"params": mix, "lr": float(lr), "weight_decay": 0.0})
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            # every rank reaches the training logs at the same steps and has recorded the same tasks
            # (and terms) as many times: mean_over_processes (a collective) averages them over the
            # ranks; it also copes with a term that some rank lacks
            for t, v in mean_over_processes(self.accelerator, self._task_loss_sum, self._task_loss_n).items():
                logs[f"loss_{t}"] = v
            self._task_loss_sum, self._task_loss_n = {}, {}
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
        rank's logits (:func:`evaluate_tasks` with ``distributed``): the metrics of one process, on
        every rank, for 1 / world_size of the forwards. Every rank must call it (the Trainer does).
        """
        sets = eval_dataset if isinstance(eval_dataset, dict) else self.mtl_eval_sets
        if not sets:
            raise ValueError("no evaluation data: give the tasks validation files")
        res = evaluate_tasks(self._model(), sets, self.mtl_collator, batch_size=self.args.per_device_eval_batch_size,
                             device=self.args.device, distributed=self.args.world_size > 1)
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
            from .model import CONFIG_NAME, ENCODER_FOLDER

            with open(os.path.join(out, CONFIG_NAME), "w") as f:
                json.dump(model.config_dict(), f, indent=2)
            cfg = getattr(model.encoder, "config", None)
            if cfg is not None and hasattr(cfg, "save_pretrained"):
                cfg.save_pretrained(os.path.join(out, ENCODER_FOLDER))


class MultiTaskTrainer(_MultiTaskMixin, Trainer):
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
        **kwargs: Any,
    ) -> None:
        self.mixture_lr = mixture_lr
        collator = MultiTaskCollator(list(model.specs.values()), pad_token_id)
        kwargs.setdefault("eval_dataset", self.eval_concat(eval_sets, model))
        super().__init__(model=model, args=args, train_dataset=self.concat(train_sets, model),
                         data_collator=collator, **kwargs)
        # (the distillation trainer checks this in DistillationTrainer.__init__)
        for check in (unsynchronised_ranks_reason, data_parallel_reason):
            if (reason := check(self.args)) is not None:
                raise UsageError(reason)
        self._setup_mtl(train_sets, eval_sets, sampler, collator, tasks_per_step)

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
        **kwargs: Any,
    ) -> None:
        self.mixture_lr = mixture_lr
        collator = MultiTaskCollator(list(model.specs.values()), pad_token_id)
        kwargs.setdefault("eval_dataset", self.eval_concat(eval_sets, model))
        super().__init__(model=model, args=args, teacher=teachers, distill_loss=distill_loss,
                         train_dataset=self.concat(train_sets, model), data_collator=collator, **kwargs)
        self._setup_mtl(train_sets, eval_sets, sampler, collator, tasks_per_step)

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
        return (loss, outs) if return_outputs else loss

    def _extra_logs(self, logs: dict[str, float]) -> None:
        super()._extra_logs(logs)
        assert isinstance(self.distill_loss, MultiTaskEMDLoss)
        for t, w in self.distill_loss.task_layer_weights().items():
            for who in ("student", "teacher"):
                for i, x in enumerate(w[who].tolist()):
                    logs[f"w_{t}_{who}.{i}"] = x

    def save_distill_state(self, output_dir: str) -> None:
        from ..distill.trainer import LOSS_STATE_NAME, TRANSPORT_NAME, atomic_save

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
