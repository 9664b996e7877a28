"""Glue between Hugging Face models and the distillation losses (hooks, outputs)."""

from __future__ import annotations

from .hooks import AttentionScoreCapture, SelfAttentionSpec, additive_mask, find_self_attention

__all__ = ["AttentionScoreCapture", "SelfAttentionSpec", "additive_mask", "find_self_attention"]
