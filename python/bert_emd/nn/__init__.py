"""Distillation losses and layer weights (``torch.nn`` modules).

- :class:`EMDLossConfig` -- the loss hyper-parameters (beta, theta, temperatures, gold_weight,
  attention source, terms ...), one frozen object read by every loss and command.
- :class:`CostAttention` -- BERT-EMD's learned student/teacher layer weights (buffers).
- :class:`LayerEMDLoss` -- EMD loss between the layers of one feature type.
- :class:`BertEMDLoss` -- the whole BERT-EMD objective for Hugging Face models.

Modules: :mod:`~bert_emd.nn.emd_terms` (the pieces every loss shares: reading outputs, the
terms, the float64 solve, the layer-weight step), :mod:`~bert_emd.nn.hooks` (query/key hooks of
BERT-family attention), :mod:`~bert_emd.nn.distributed` (``torch.distributed`` helpers).
"""

from __future__ import annotations

from .bert_emd_loss import BertEMDLoss
from .config import EMDLossConfig
from .cost_attention import CostAttention
from .emd_terms import prediction_loss
from .hooks import AttentionScoreCapture
from .layer_emd_loss import LayerEMDLoss, fixed_plan, skip_mapping

__all__ = [
    "AttentionScoreCapture",
    "BertEMDLoss",
    "CostAttention",
    "EMDLossConfig",
    "LayerEMDLoss",
    "fixed_plan",
    "prediction_loss",
    "skip_mapping",
]
