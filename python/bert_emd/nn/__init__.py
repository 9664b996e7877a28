"""Distillation losses and layer weights (``torch.nn`` modules).

- :class:`CostAttention` -- BERT-EMD's learned student/teacher layer weights (buffers).
- :class:`LayerEMDLoss` -- EMD loss between the layers of one feature type.
- :class:`BertEMDLoss` -- the whole BERT-EMD objective for Hugging Face models.
"""

from __future__ import annotations

from .bert_emd_loss import BertEMDLoss, prediction_loss
from .cost_attention import CostAttention
from .layer_emd_loss import LayerEMDLoss, fixed_plan, skip_mapping

__all__ = ["BertEMDLoss", "CostAttention", "LayerEMDLoss", "fixed_plan", "prediction_loss", "skip_mapping"]
