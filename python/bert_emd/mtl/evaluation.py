"""Evaluation of multi-task models: each task's metrics from its logits (:func:`task_scores`) and
the scoring of every task's dataset (:func:`evaluate_tasks`), sharded over the processes of a
distributed run (:func:`eval_shard`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..nn.distributed import distributed_world
from .config import TaskSpec
from .data import MultiTaskCollator, TaskDataset
from .model import MultiTaskModel, task_loss_fn

__all__ = ["eval_shard", "evaluate_tasks", "task_scores"]


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
    x, y = torch.from_numpy(logits), torch.from_numpy(labels)
    return sum(float(task_loss_fn(spec, x[s:s + batch_size], y[s:s + batch_size])) * len(y[s:s + batch_size])
               for s in range(0, len(y), batch_size))
