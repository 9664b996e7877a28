"""Building blocks of the five multi-task mechanisms (docs/multitask.md describes each).

- :func:`grad_reverse` / :class:`GradientReversal` -- identity forward, gradient times -scale
  backward (adversarial training of the shared features).
- :func:`orthogonality_loss` -- ||S^T P||_F^2 of mean-centred, row-normalised shared and
  private features (shared-private models).
- :class:`LayerMixture` -- a task's softmax mixture over encoder layers (hierarchy).
- :class:`TaskGate` -- a per-task sigmoid gate on the shared features.
- :class:`PrivateEncoder` -- a small per-task Transformer layer over the embedding output.
- :class:`TaskDiscriminator` -- predicts the task from pooled shared features (behind a
  gradient-reversal layer).
- :class:`LabelEmbedding` -- one embedding matrix for every task's labels; logits by dot
  product.
- :func:`pool` -- CLS or masked-mean pooling of token features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "GradientReversal",
    "LabelEmbedding",
    "LayerMixture",
    "PrivateEncoder",
    "TaskDiscriminator",
    "TaskGate",
    "grad_reverse",
    "orthogonality_loss",
    "pool",
]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad.neg() * ctx.scale, None


def grad_reverse(x: Tensor, scale: float = 1.0) -> Tensor:
    """Gradient reversal (Ganin & Lempitsky, 2015): returns ``x`` unchanged; backward multiplies
    the incoming gradient by ``-scale``. x: any shape."""
    if scale < 0:
        raise ValueError(f"grad_reverse: scale must be >= 0, got {scale}")
    return _GradReverse.apply(x, float(scale))


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse` (identity forward, ``-scale * grad`` backward)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        if scale < 0:
            raise ValueError(f"GradientReversal: scale must be >= 0, got {scale}")
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def orthogonality_loss(shared: Tensor, private: Tensor, eps: float = 1e-8) -> Tensor:
    """||S^T P||_F^2 on mean-centred, row-normalised features (Bousmalis et al., 2016; Liu et al.,
    2017), pushing the private features to encode what the shared ones do not.

    Each feature matrix is centred over the batch (column means subtracted), then each row
    (example) is scaled to unit L2 norm (rows that are 0 after centring stay 0).

    Args:
        shared: S [B, d_s] (pooled shared features).
        private: P [B, d_p] (pooled private features of the same examples).
        eps: guards the row norms.
    Returns:
        [] fp32 (fp64 for fp64 inputs), >= 0; 0 iff every column of the processed S is
        orthogonal to every column of the processed P.
    """
    if shared.dim() != 2 or private.dim() != 2 or shared.shape[0] != private.shape[0]:
        raise ValueError(
            f"orthogonality_loss: shared [B, d_s] and private [B, d_p] with the same B are required, got "
            f"{tuple(shared.shape)} and {tuple(private.shape)}"
        )
    dtype = torch.promote_types(shared.dtype, torch.float32)
    s = shared.to(dtype)
    p = private.to(dtype)
    s = s - s.mean(0, keepdim=True)
    p = p - p.mean(0, keepdim=True)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(eps)
    p = p / p.norm(dim=1, keepdim=True).clamp_min(eps)
    return (s.transpose(0, 1) @ p).pow(2).sum()


def pool(x: Tensor, mask: Tensor | None, how: str = "cls") -> Tensor:
    """Sentence vector from token features.

    Args:
        x: [B, L, d].
        mask: [B, L] (1 = real token) or None.
        how: ``"cls"`` (position 0) or ``"mean"`` (mean over real tokens).
    Returns:
        [B, d].
    """
    if how == "cls":
        return x[:, 0]
    if how != "mean":
        raise ValueError(f"pool: how must be 'cls' or 'mean', got {how!r}")
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class LayerMixture(nn.Module):
    """A task's mixture of K encoder layers: sum_k w_k h_k with w = softmax(logits) (``"learned"``)
    or externally set weights (``"emd"``: the task's EMD layer weights of multi-task
    distillation), times a learned scale (ELMo-style). Logits start at 0 (uniform weights).

    Args:
        num_layers: K.
        mode: ``"learned"`` or ``"emd"``.
    """

    weight_buffer: Tensor

    def __init__(self, num_layers: int, mode: str = "learned") -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"LayerMixture: num_layers must be >= 1, got {num_layers}")
        if mode not in ("learned", "emd"):
            raise ValueError(f"LayerMixture: mode must be 'learned' or 'emd', got {mode!r}")
        self.num_layers = num_layers
        self.mode = mode
        self.logits = nn.Parameter(torch.zeros(num_layers)) if mode == "learned" else None
        self.register_buffer("weight_buffer", torch.full((num_layers,), 1.0 / num_layers))
        self.scale = nn.Parameter(torch.ones(()))

    @property
    def weights(self) -> Tensor:
        """[K] mixture weights (sum 1)."""
        if self.logits is not None:
            return torch.softmax(self.logits, 0)
        return self.weight_buffer

    @torch.no_grad()
    def set_weights(self, w: Tensor) -> None:
        """Set the weights of an ``"emd"`` mixture. w: [K], non-negative; normalised here."""
        if self.mode != "emd":
            raise RuntimeError("set_weights is for mode='emd'; a 'learned' mixture trains its logits")
        if w.shape != (self.num_layers,):
            raise ValueError(f"LayerMixture.set_weights: expected [{self.num_layers}] weights, got {tuple(w.shape)}")
        w = w.detach().to(self.weight_buffer)
        self.weight_buffer.copy_(w / w.sum())

    def forward(self, layers: Sequence[Tensor]) -> Tensor:
        """layers: K tensors [B, L, d] -> [B, L, d]."""
        if len(layers) != self.num_layers:
            raise ValueError(f"LayerMixture: expected {self.num_layers} layers, got {len(layers)}")
        w = self.weights.to(layers[0].dtype)
        if self.logits is None:
            w = w.clone()  # set_weights() updates the buffer in place before this step's backward
        out = w[0] * layers[0]
        for k in range(1, self.num_layers):
            out = out + w[k] * layers[k]
        return self.scale.to(out.dtype) * out

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, mode={self.mode!r}"


class TaskGate(nn.Module):
    """g = sigmoid(W c + b), output g * shared, elementwise per token (a task's gate on how much
    shared feature enters its head). The bias starts at ``init_bias`` (gates mostly open).

    Args:
        shared_dim: d (width of the gated shared features).
        context_dim: width of the gate's input c (the shared features, concatenated with the
            private ones when the task has a private encoder).
    """

    def __init__(self, shared_dim: int, context_dim: int, init_bias: float = 1.0) -> None:
        super().__init__()
        self.proj = nn.Linear(context_dim, shared_dim)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.constant_(self.proj.bias, init_bias)
        self.last_mean: Tensor | None = None

    def forward(self, shared: Tensor, context: Tensor) -> Tensor:
        """shared [B, L, d], context [B, L, d_c] -> gated shared [B, L, d]."""
        g = torch.sigmoid(self.proj(context))
        self.last_mean = g.detach().mean()
        return g * shared


class PrivateEncoder(nn.Module):
    """A task's small private encoder: Linear(d_in -> d_p) then one Transformer encoder layer
    (``heads`` heads, FFN 2 d_p) over the encoder's embedding output, padding masked.

    Args:
        input_dim: d_in (the shared encoder's hidden size).
        dim: d_p.
        heads: attention heads (divides ``dim``).
        dropout: dropout inside the layer.
    """

    def __init__(self, input_dim: int, dim: int = 64, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Linear(input_dim, dim)
        self.layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [B, L, d_in], mask [B, L] (1 = real) -> [B, L, d_p]."""
        pad = None if mask is None else mask == 0
        return self.layer(self.inp(x), src_key_padding_mask=pad)


class TaskDiscriminator(nn.Module):
    """Predicts which task a batch came from, from pooled shared features, behind gradient
    reversal: minimising its cross-entropy trains the discriminator and pushes the shared
    encoder towards task-invariant features.

    Args:
        input_dim: d (pooled shared features).
        num_tasks: T.
        hidden: width of the hidden layer.
    """

    def __init__(self, input_dim: int, num_tasks: int, hidden: int = 64) -> None:
        super().__init__()
        self.reverse = GradientReversal(1.0)
        self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_tasks))

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled [B, d] -> task logits [B, T]."""
        return self.net(self.reverse(pooled))


class LabelEmbedding(nn.Module):
    """All tasks' labels in one matrix E [sum_t C_t, d_e]; task t owns rows offset_t .. offset_t + C_t.

    Args:
        label_counts: ``{task: C_t}`` (classification and tagging tasks).
        dim: d_e.
    """

    def __init__(self, label_counts: dict[str, int], dim: int) -> None:
        super().__init__()
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, c in label_counts.items():
            self.offsets[name] = (start, c)
            start += c
        self.embedding = nn.Embedding(max(start, 1), dim)
        # rows of about unit norm: with BERT's 0.02 on both factors of the dot product (label
        # rows and the head's projection) the logits and both gradients start near 0 (a saddle)
        nn.init.normal_(self.embedding.weight, std=dim**-0.5)
        self.dim = dim

    def task_labels(self, task: str) -> Tensor:
        """[C_t, d_e] embeddings of the task's labels."""
        start, c = self.offsets[task]
        return self.embedding.weight[start : start + c]

    def logits(self, task: str, h: Tensor) -> Tensor:
        """h [..., d_e] -> logits [..., C_t] = h E_t^T."""
        return h @ self.task_labels(task).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"tasks={self.offsets}, dim={self.dim}"
