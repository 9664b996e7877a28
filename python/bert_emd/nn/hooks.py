"""Pre-softmax attention scores of BERT-family models, captured with forward hooks.

BERT-EMD (as TinyBERT) compares *pre-softmax* attention scores, QK^T / sqrt(d_head) plus the
additive padding mask. Hugging Face models return post-softmax maps only, and only with eager
attention (SDPA and flash attention return none). Hooking the query and key projections gives
the scores whatever attention implementation runs, at the price of one batched matmul per layer.

Supported self-attention modules (found by attribute names, so subclasses and checkpoints such
as MiniLM that reuse these architectures work too):

- ``query`` / ``key``: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, ALBERT, MiniLM checkpoints;
- ``q_lin`` / ``k_lin``: DistilBERT;
- ``q`` / ``k``: MPNet (its relative position bias is *not* included in the captured scores).

Cross-attention modules are skipped. The captures are reset at the start of every forward of the
hooked model and appended in call order, so a model that reuses one layer (ALBERT) yields one
entry per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["AttentionScoreCapture", "SelfAttentionSpec", "find_self_attention", "additive_mask", "scores_of"]

# (query attribute, key attribute) of the self-attention modules of the families above.
_QK_NAMES = (("query", "key"), ("q_lin", "k_lin"), ("q", "k"))
_HEAD_ATTRS = ("num_attention_heads", "n_heads", "num_heads")


@dataclass(frozen=True)
class SelfAttentionSpec:
    """One self-attention module: where its projections are and how to split heads."""

    name: str
    module: nn.Module
    query: nn.Linear
    key: nn.Linear
    num_heads: int
    head_size: int


def _spec(name: str, module: nn.Module) -> SelfAttentionSpec | None:
    if "cross" in type(module).__name__.lower() or getattr(module, "is_cross_attention", False):
        return None
    for q_name, k_name in _QK_NAMES:
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear)):
            continue
        ints = (getattr(module, a) for a in _HEAD_ATTRS if isinstance(getattr(module, a, None), int))
        heads = next(ints, None)
        head_size = getattr(module, "attention_head_size", None)
        if heads is None and head_size is None:
            continue
        if head_size is None:
            head_size = q.out_features // heads
        if heads is None:
            heads = q.out_features // head_size
        if heads * head_size != q.out_features or k.out_features != q.out_features:
            raise ValueError(
                f"{name}: cannot split {q_name} ({q.out_features} features) / {k_name} "
                f"({k.out_features}) into {heads} heads of size {head_size}"
            )
        return SelfAttentionSpec(name, module, q, k, int(heads), int(head_size))
    return None


def find_self_attention(model: nn.Module) -> list[SelfAttentionSpec]:
    """The self-attention modules of ``model`` in registration (= layer) order.

    Raises:
        ValueError: no supported self-attention module was found.
    """
    model = getattr(model, "module", model)  # DDP / DataParallel wrapper
    specs = [s for name, mod in model.named_modules() if (s := _spec(name, mod)) is not None]
    if not specs:
        raise ValueError(
            f"no BERT-family self-attention module (attributes {_QK_NAMES}) found in "
            f"{type(model).__name__}; attention_source='scores' supports BERT, RoBERTa, DistilBERT, "
            "ELECTRA, ALBERT and MiniLM-style models; use attention_source='probs' otherwise"
        )
    return specs


def additive_mask(attention_mask: Tensor, mask_value: float = -10000.0) -> Tensor:
    """[B, L] 0/1 (or bool) token mask -> additive key mask [B, 1, 1, L] (0 real, ``mask_value``
    padding), the original BERT/TinyBERT convention."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, L], got shape {tuple(attention_mask.shape)}")
    keep = attention_mask.to(torch.float32)
    return ((1.0 - keep) * mask_value)[:, None, None, :]


def scores_of(
    qk: Sequence[tuple[Tensor, Tensor]], attention_mask: Tensor | None = None, *, mask_value: float = -10000.0
) -> list[Tensor]:
    """Pre-softmax scores, one [B, H, L, L] tensor per (query, key) pair [B, H, L, d_head].

    scores = (x W_q + b_q)(x W_k + b_k)^T / sqrt(d_head) + additive mask, where the mask adds
    ``mask_value`` (the original's -10000) at padded key positions. Differentiable w.r.t. the
    queries and keys.

    Args:
        qk: (query, key) pairs, e.g. :meth:`AttentionScoreCapture.queries_keys`.
        attention_mask: [B, L] 0/1 token mask given to the model, or None (no padding).
        mask_value: additive value at padded keys.
    """
    add = None
    out = []
    for qh, kh in qk:
        b, length, head_size = qh.shape[0], qh.shape[2], qh.shape[3]
        s = torch.matmul(qh, kh.transpose(-1, -2)) * (head_size**-0.5)
        if attention_mask is not None:
            if add is None:
                if attention_mask.shape != (b, length):
                    raise ValueError(
                        f"attention_mask must be [B, L] = [{b}, {length}], got {tuple(attention_mask.shape)}"
                    )
                add = additive_mask(attention_mask, mask_value).to(device=s.device)
            s = s + add.to(s.dtype)
        out.append(s)
    return out


class AttentionScoreCapture:
    """Forward hooks on the query/key projections of every self-attention layer of a model.

    Usage::

        cap = AttentionScoreCapture(model)
        out = model(input_ids, attention_mask=mask)
        scores = cap.scores(mask)        # list of L_layers tensors [B, H, L, L]
        cap.remove()                     # or use it as a context manager

    Args:
        model: a BERT-family model (optionally wrapped by DDP); every supported self-attention
            module inside it is hooked.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = getattr(model, "module", model)
        self.specs = find_self_attention(self.model)
        self._q: list[tuple[int, Tensor]] = []
        self._k: list[tuple[int, Tensor]] = []
        self._handles = [self.model.register_forward_pre_hook(lambda *_: self.clear())]
        for idx, spec in enumerate(self.specs):
            self._handles.append(spec.query.register_forward_hook(self._saver(self._q, idx)))
            self._handles.append(spec.key.register_forward_hook(self._saver(self._k, idx)))

    @staticmethod
    def _saver(store: list[tuple[int, Tensor]], idx: int):
        def hook(_mod: nn.Module, _inp, out: Tensor) -> None:
            store.append((idx, out))

        return hook

    @property
    def num_layers(self) -> int:
        """Number of hooked self-attention modules."""
        return len(self.specs)

    def clear(self) -> None:
        """Drop the captured projections (done automatically at each forward of the model)."""
        self._q.clear()
        self._k.clear()

    def remove(self) -> None:
        """Remove every hook and drop the captures."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> AttentionScoreCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def queries_keys(self) -> list[tuple[Tensor, Tensor]]:
        """Per-head queries and keys of the last forward, one (q, k) pair [B, H, L, d_head] per
        attention call: views of the projection outputs (no copy), the input of
        :func:`bert_emd.attention_costs`, which forms the scores tile by tile and never stores a
        [B, H, L, L] map. Differentiable w.r.t. the model's parameters when the forward was."""
        if not self._q:
            raise RuntimeError("no attention captured: run a forward of the hooked model first")
        if len(self._q) != len(self._k):
            raise RuntimeError(f"captured {len(self._q)} query but {len(self._k)} key projections")
        out = []
        for (qi, q), (ki, k) in zip(self._q, self._k):
            if qi != ki:
                raise RuntimeError(f"query of layer {qi} paired with key of layer {ki}")
            spec = self.specs[qi]
            if q.shape[:-1] != k.shape[:-1]:
                raise ValueError(f"{spec.name}: query {tuple(q.shape)} and key {tuple(k.shape)} differ")
            b, length = q.shape[0], q.shape[1]
            out.append((q.view(b, length, spec.num_heads, spec.head_size).transpose(1, 2),
                        k.view(b, length, spec.num_heads, spec.head_size).transpose(1, 2)))
        return out

    def scores(self, attention_mask: Tensor | None = None, *, mask_value: float = -10000.0) -> list[Tensor]:
        """Pre-softmax scores of the last forward, one [B, H, L, L] tensor per attention call:
        :func:`scores_of` its :meth:`queries_keys`."""
        return scores_of(self.queries_keys(), attention_mask, mask_value=mask_value)
