"""Compatibility re-export: the query/key hooks live in :mod:`bert_emd.nn.hooks`."""

from __future__ import annotations

from ..nn.hooks import AttentionScoreCapture, SelfAttentionSpec, additive_mask, find_self_attention, scores_of

__all__ = ["AttentionScoreCapture", "SelfAttentionSpec", "additive_mask", "find_self_attention", "scores_of"]
