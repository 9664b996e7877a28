"""Hugging Face glue of single-task distillation: :class:`DistillationTrainer` (imported lazily,
on first access: it subclasses ``transformers.Trainer``), data, students, metrics and the
``bert-emd`` commands. The query/key hooks it re-exports live in :mod:`bert_emd.nn.hooks`."""

from __future__ import annotations

from typing import Any

from ..nn.hooks import AttentionScoreCapture, SelfAttentionSpec, additive_mask, find_self_attention

__all__ = ["AttentionScoreCapture", "DistillationTrainer", "SelfAttentionSpec", "additive_mask", "find_self_attention"]


def __getattr__(name: str) -> Any:
    # DistillationTrainer subclasses transformers.Trainer: imported on first use only
    if name == "DistillationTrainer":
        from .trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
