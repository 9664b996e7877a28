"""``bert-emd mtl study``: what each run's mechanisms did, and its per-example scores.

- :func:`training_curves` reads the trainer's log history: each task's training loss, the
  diagnostics the multi-task trainer logs at every logging step (``diag_<name>_<task>``: ||S^T P||
  of the private encoder, the task discriminator's accuracy, the mean gate activation; see
  :class:`~bert_emd.mtl.model.MultiTaskOutput`) and the layer-mixture weights (``mix_<task>.<i>``).
- :func:`score_model` scores a saved run on its tasks' dev and test rows, example by example, and
  measures the mechanisms on the dev rows at the end of training (gate activation, discriminator
  accuracy), the learned layer weights and the label-embedding similarities.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DIAGNOSTICS", "balanced_curve", "label_similarity", "score_model", "training_curves"]

# the diagnostics MultiTaskOutput carries and the multi-task trainer logs as diag_<name>_<task>
DIAGNOSTICS = ("discriminator_acc", "orthogonality_norm", "gate_mean")


def training_curves(history: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, dict[str, list]]:
    """Per-task series ``[[step, value], ...]`` from a ``trainer_state.json`` log history.

    Returns:
        ``{"loss": {task: ...}, "discriminator_acc": ..., "orthogonality_norm": ..., "gate_mean": ...,
        "layer_weights": {task: [[step, [w_1 .. w_M]], ...]}}``; series that were never logged are left
        out (a task absent from a logging window has no point there).
    """
    curves: dict[str, dict[str, list]] = {k: {t: [] for t in tasks} for k in ("loss", *DIAGNOSTICS, "layer_weights")}
    for h in history:
        if "loss" not in h or "step" not in h:  # (evaluation and end-of-training entries)
            continue
        step = h["step"]
        for t in tasks:
            if f"loss_{t}" in h:
                curves["loss"][t].append([step, h[f"loss_{t}"]])
            for name in DIAGNOSTICS:
                if f"diag_{name}_{t}" in h:
                    curves[name][t].append([step, h[f"diag_{name}_{t}"]])
            mix = []
            while f"mix_{t}.{len(mix)}" in h:
                mix.append(h[f"mix_{t}.{len(mix)}"])
            if mix:
                curves["layer_weights"][t].append([step, mix])
    return {k: {t: v for t, v in series.items() if v} for k, series in curves.items() if any(series.values())}


def balanced_curve(per_task: dict[str, list]) -> list[list[float]]:
    """The mean over tasks of per-task series at the steps where every task has a point (for the
    discriminator: balanced accuracy, whose chance level is 1 / tasks whatever the sampler)."""
    if not per_task:
        return []
    steps = set.intersection(*({s for s, _ in v} for v in per_task.values()))
    values = [{s: y for s, y in v} for v in per_task.values()]
    return [[s, sum(v[s] for v in values) / len(values)] for s in sorted(steps)]


def label_similarity(model: Any) -> dict[str, Any] | None:
    """Cosine similarities of the shared label-embedding rows (``task:label`` names in row order),
    or None without a label embedding."""
    emb = getattr(model, "label_embedding", None)
    if emb is None:
        return None
    w = emb.embedding.weight.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = []
    for task, (_, count) in emb.offsets.items():
        names = model.specs[task].data.label_list or [str(i) for i in range(count)]
        labels += [f"{task}:{x}" for x in names]
    return {"labels": labels, "matrix": (w @ w.T).tolist()}


def score_model(model_dir: str | Path, splits: dict[str, dict[str, Path]], max_length: int,
                batch_size: int = 64) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Score a saved multi-task model, on the CPU, on each task's rows (CSV: text, label).

    Args:
        model_dir: a folder written by :func:`~bert_emd.mtl.cli_commands.train_from_config`.
        splits: ``{task: {"dev": csv, "test": csv}}`` (``test`` absent: not read).
        max_length: the training truncation length.
    Returns:
        (scores, final): scores ``{task: {"dev_acc", "dev_correct", ("test_acc", "test_correct")}}``
        with ``*_correct`` a string of 0/1, one per row in file order; final ``{"layer_weights":
        {task: [M]}, "gate_dev" / "discriminator_dev_acc": {task: mean over the dev rows},
        "label_similarity"}`` for the mechanisms the model has.
    """
    import torch

    from ..distill.data import load_table, tokenize
    from ..model_files import load_tokenizer
    from .data import MultiTaskCollator, TaskDataset
    from .model import MultiTaskModel

    model = MultiTaskModel.from_pretrained(model_dir).to("cpu").eval()
    tokenizer = load_tokenizer(model_dir)
    collate = MultiTaskCollator(list(model.specs.values()), tokenizer.pad_token_id or 0)
    scores: dict[str, dict[str, Any]] = {}
    dev_diag: dict[str, dict[str, float]] = {}
    for task, files in splits.items():
        spec = model.specs[task]
        tid = model.task_names.index(task)
        scores[task] = {}
        for split, path in files.items():
            ds = tokenize(load_table(test_file=path, label_list=spec.data.label_list), tokenizer,
                          max_length=max_length)["test"]
            rows = TaskDataset(ds, tid)
            correct: list[int] = []
            sums: dict[str, float] = {}
            with torch.inference_mode():
                for start in range(0, len(rows), batch_size):
                    feats = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
                    b = collate(feats)["task_batches"][0]
                    out = model(task, b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
                    correct += (out.logits.argmax(-1) == b["labels"]).int().tolist()
                    for k, v in out.diagnostics.items():  # batch means, weighted by the batch size
                        sums[k] = sums.get(k, 0.0) + float(v) * len(feats)
            scores[task][f"{split}_acc"] = sum(correct) / len(correct)
            scores[task][f"{split}_correct"] = "".join(map(str, correct))
            if split == "dev":
                dev_diag[task] = {k: v / len(rows) for k, v in sums.items()}
    final: dict[str, Any] = {"layer_weights": {t: w.tolist() for t, w in model.layer_weights().items()}}
    # (not ||S^T P||: a sum over the batch's examples, it grows with the batch size, and the scoring
    # batches are not the training batches; its training curve is the diagnostic)
    for name, key in (("gate_mean", "gate_dev"), ("discriminator_acc", "discriminator_dev_acc")):
        per_task = {t: d[name] for t, d in dev_diag.items() if name in d}
        if per_task:
            final[key] = per_task
    sim = label_similarity(model)
    if sim is not None:
        final["label_similarity"] = sim
    return scores, final
