"""The hyper-parameters of the BERT-EMD loss, one frozen object for every way of building it.

:class:`EMDLossConfig` is read by :class:`~bert_emd.nn.BertEMDLoss` (single task) and by the
multi-task loss; the command line's loss options and the loss section of a multi-task YAML file
build one. The defaults live here only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["AttentionSource", "EMDLossConfig", "backend_for", "gold_weight_from_alpha"]

AttentionSource = Literal["probs", "scores"]
_AUTO = "auto"
_NORMALIZE = ("sum", "softmax", "double_softmax")
_TERMS = ("use_attention", "use_hidden", "use_embedding", "use_prediction")


@dataclass(frozen=True)
class EMDLossConfig:
    """Hyper-parameters of the BERT-EMD objective

        L = beta * (theta * (L_attn + L_hidden) + L_emb) + L_pred,
        L_pred = (1 - gold_weight) * soft + gold_weight * gold

    (per task, for the multi-task loss). Defaults follow the original code and its per-task
    table, as noted per field (each field's docstring follows it).
    """

    beta: float = 0.001
    """Weight of the layer and embedding terms. Default 0.001, the low end of the original's
    per-task table (0.001-0.005); the original script's argparse default is 0.01 (and the command
    line used it before this object existed: pass ``--beta 0.01`` for those runs). Library,
    command line and YAML share this default."""
    theta: float = 1.0
    """Weight of attention + hidden inside beta (1; the original has no theta)."""
    gold_weight: float = 0.2
    """Share of the gold-label loss in L_pred; the soft (teacher) term gets ``1 - gold_weight``.
    Default 0.2 (the original's alpha 0.8 on the soft term)."""
    T_emd: float = 1.0
    """Temperature of the cost-attention softmax (1; table 1-10)."""
    temperature: float = 1.0
    """T of the prediction loss (1; table 1-7)."""
    normalize: str = "double_softmax"
    """Cost-attention normalisation: ``"sum"``, ``"softmax"``, ``"double_softmax"`` (the paper's
    runs, default)."""
    update_weights: bool = True
    """Apply the cost-attention update of the layer weights every forward."""
    eps: float = 1e-6
    """Floor of the layer weights."""
    attention_source: AttentionSource = "probs"
    """``"probs"`` (post-softmax maps of ``output_attentions``: eager attention; default, needs no
    hooks) or ``"scores"`` (pre-softmax scores from query/key hooks with the additive -10000
    padding mask: the original's choice)."""
    attention_floor: float | None | str = _AUTO
    """Entries <= floor are zeroed before the attention costs; ``"auto"`` (default): -100 for
    scores (the original), None for probs."""
    fused_attention: bool = False
    """Attention costs straight from the hooked queries and keys (``bert_emd.attention_costs``),
    never forming a [B, H, L, L] map; the models may keep SDPA / flash attention. ``"probs"`` are
    then the softmax before attention dropout, and relative position biases (MPNet) are not
    included."""
    use_attention: bool = True
    """Switch the attention term on or off (as the three below; at least one must stay on)."""
    use_hidden: bool = True
    use_embedding: bool = True
    use_prediction: bool = True
    token_mask: bool = False
    """Average hidden and embedding costs over real tokens only (an improvement over the original,
    which averages padding too; off by default for fidelity)."""
    sync_projection_grads: bool = True
    """In distributed runs, average the projections' gradients over the ranks in backward (they
    live outside the student's DDP wrapper)."""
    backend: str | Mapping[str, str] = "auto"
    """Backend of the ops (``"auto"``, ``"cpu"``, ...), or a mapping per op (``{"emd": "cpu"}``;
    ops not named use ``"auto"``)."""

    def __post_init__(self) -> None:
        if self.attention_source not in ("probs", "scores"):
            raise ValueError(f"attention_source must be 'probs' or 'scores', got {self.attention_source!r}")
        if self.normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {self.normalize!r}")
        if not any(getattr(self, t) for t in _TERMS):
            raise ValueError("all loss terms are switched off")
        checks = (("beta", 0.0, False), ("theta", 0.0, False), ("T_emd", 0.0, True), ("temperature", 0.0, True))
        for name, lo, strict in checks:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (
                    strict and v == lo):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {lo:g}, got {v!r}")
            object.__setattr__(self, name, float(v))
        g = self.gold_weight
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 1:
            raise ValueError(f"gold_weight must be in [0, 1], got {g!r}")
        object.__setattr__(self, "gold_weight", float(g))
        floor = self.attention_floor
        if floor is not None and floor != _AUTO and (isinstance(floor, (bool, str)) or not math.isfinite(floor)):
            raise ValueError(f"attention_floor must be a finite number, None or 'auto', got {floor!r}")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_options(cls, config: EMDLossConfig | None = None, *, alpha: float | None = None,
                     **options: Any) -> EMDLossConfig:
        """``config`` (default: the defaults) with ``options`` (field names) replacing its values.

        ``alpha`` is the deprecated name of the soft share of L_pred (``gold_weight = 1 - alpha``,
        with a :class:`DeprecationWarning`). Unknown names are a :class:`TypeError` naming them.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in options if k not in names)
        if unknown:
            raise TypeError(f"unknown loss option(s) {', '.join(unknown)}; "
                            f"EMDLossConfig has {', '.join(sorted(names))}")
        if alpha is not None:
            if "gold_weight" in options:
                raise TypeError("pass gold_weight or the deprecated alpha (= 1 - gold_weight), not both")
            options["gold_weight"] = gold_weight_from_alpha(alpha, stacklevel=4)
        base = cls() if config is None else config
        return dataclasses.replace(base, **options) if options else base

    # ------------------------------------------------------------------ derived values
    @property
    def floor(self) -> float | None:
        """The attention floor in use (``"auto"`` resolved: -100 for scores, None for probs)."""
        if self.attention_floor == _AUTO:
            return -100.0 if self.attention_source == "scores" else None
        return None if self.attention_floor is None else float(self.attention_floor)

    @property
    def needs_hooks(self) -> bool:
        """Whether the attention term reads hooked queries and keys (``"scores"`` or fused)."""
        return self.use_attention and (self.attention_source == "scores" or self.fused_attention)

    @property
    def wants_attention_maps(self) -> bool:
        """Whether the models must return attention maps (``output_attentions``, eager attention):
        only the unfused ``"probs"`` attention term reads them."""
        return self.use_attention and self.attention_source == "probs" and not self.fused_attention

    def backend_for(self, op: str) -> str:
        """The backend of ``op`` (``"emd"``, ``"layer_costs"``, ``"attention_costs"``)."""
        return backend_for(self.backend, op)


def gold_weight_from_alpha(alpha: float, *, stacklevel: int = 3) -> float:
    """``1 - alpha``, the gold share of the deprecated soft share ``alpha``, with a
    :class:`DeprecationWarning` (``stacklevel`` as :func:`warnings.warn`'s, from the caller)."""
    warnings.warn("alpha (the soft share of the prediction loss) is deprecated: pass gold_weight = 1 - alpha "
                  "(the share of the gold-label loss)", DeprecationWarning, stacklevel=stacklevel)
    return 1.0 - float(alpha)


def backend_for(backend: str | Mapping[str, str], op: str) -> str:
    """The backend of ``op`` in a ``backend`` option: the name itself, or the mapping's entry for
    ``op`` (``"auto"`` for ops it does not name)."""
    return backend if isinstance(backend, str) else backend.get(op, _AUTO)
