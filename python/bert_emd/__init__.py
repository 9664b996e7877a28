"""bert-emd: layer-to-layer knowledge distillation with Earth Mover's Distance.

Public ops (any device, autograd, torch.compile):
  - :func:`emd` -- batched exact (or entropic) optimal transport with envelope gradients.
  - :func:`layer_costs` -- fused teacher-student layer cost matrices.
  - :func:`attention_costs` -- attention cost matrices from queries and keys, never storing a map.

The distillation loss lives in :mod:`bert_emd.nn` (``BertEMDLoss``, ``LayerEMDLoss``,
``CostAttention``); Hugging Face glue in :mod:`bert_emd.distill`.
"""

from __future__ import annotations

from ._backends import BackendError
from .ops.attention_costs import attention_costs
from .ops.emd import EMDResult, EMDStatus, emd
from .ops.layer_costs import layer_costs

__version__ = "0.1.0"

__all__ = ["BackendError", "EMDResult", "EMDStatus", "attention_costs", "emd", "layer_costs", "__version__"]

