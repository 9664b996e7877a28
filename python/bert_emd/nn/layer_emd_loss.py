"""EMD loss between the M student layers and the N teacher layers of one feature type."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .config import backend_for
from .cost_attention import CostAttention, Normalize
from .distributed import all_reduce_mean, world_size
from .emd_terms import feature_costs, solve_plans, update_layer_weights

__all__ = ["LayerEMDLoss", "Mapping", "fixed_plan", "skip_mapping"]

Mapping = Literal["emd", "skip", "last", "uniform"]
_MAPPINGS = ("emd", "skip", "last", "uniform")

Layers = Tensor | Sequence[Tensor]


def skip_mapping(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """TinyBERT's skip mapping: student layer i <- teacher layer round((i+1)*N/M) - 1 (0-based).

    For N = k*M this is teacher layer k*(i+1) - 1, i.e. TinyBERT's ``teacher_atts[i*k + k - 1]``
    and ``teacher_reps[(i+1)*k]`` (whose index 0 is the embedding output).
    """
    m, n = num_student_layers, num_teacher_layers
    # Half-up rounding (not Python's banker's rounding) so e.g. M=4, N=6 maps 1.5 -> 2.
    return [min(n - 1, max(0, int((i + 1) * n / m + 0.5) - 1)) for i in range(m)]


def fixed_plan(
    mapping: str, num_student_layers: int, num_teacher_layers: int, *, dtype=torch.float32, device=None
) -> Tensor:
    """The constant "plan" P [M, N] of a fixed mapping; its loss is sum(P * D).

    ``skip``: P[i, skip(i)] = 1 -- TinyBERT's loss, the *sum* of M paired MSEs.
    ``last``: P[M-1, N-1] = 1 -- last student layer to last teacher layer only.
    ``uniform``: P = 1/(M*N) -- every pair, the mean over all M*N costs (the independent coupling
    of uniform layer weights).
    """
    m, n = num_student_layers, num_teacher_layers
    p = torch.zeros(m, n, dtype=dtype, device=device)
    if mapping == "skip":
        p[torch.arange(m), torch.tensor(skip_mapping(m, n))] = 1.0
    elif mapping == "last":
        p[m - 1, n - 1] = 1.0
    elif mapping == "uniform":
        p.fill_(1.0 / (m * n))
    else:
        raise ValueError(f"fixed mapping must be 'skip', 'last' or 'uniform', got {mapping!r}")
    return p


def _pair_cost(s: Tensor, t: Tensor, mask: Tensor | None, per_sample: bool, floor: float | None) -> Tensor:
    """mean (f(s) - f(t))^2 of one layer pair in plain torch, with ``layer_costs``' semantics
    (floor f, token mask, per-sample mean); [] or [B]. Without options it is TinyBERT's MSE."""
    acc = torch.promote_types(s.dtype, torch.float32)  # fp32 accumulation, fp64 stays fp64
    s, t = s.to(acc), t.to(acc)
    if floor is not None:
        s = torch.where(s <= floor, torch.zeros_like(s), s)
        t = torch.where(t <= floor, torch.zeros_like(t), t)
    sq = (s - t) ** 2
    if mask is None:
        return sq.flatten(1).mean(1) if per_sample else sq.mean()
    m = mask.to(sq.dtype)
    if sq.dim() == 4:  # attention [B, H, L, L]: query and key both real
        w = m[:, None, :, None] * m[:, None, None, :]
    elif sq.dim() == 3:  # hidden [B, L, d]
        w = m[:, :, None]
    else:  # [B, L]
        w = m
    w = w.expand_as(sq)
    if per_sample:
        return (sq * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    return (sq * w).sum() / w.sum()


def _count(layers: Layers) -> int:
    return layers.shape[0] if isinstance(layers, Tensor) else len(layers)


class LayerEMDLoss(nn.Module):
    """BERT-EMD loss for one feature type (hidden states or attention maps).

    Per call: layer costs D (``bert_emd.layer_costs``) -> in a distributed run, D averaged over
    ranks so every rank solves the same problem -> exact EMD between the current layer weights
    (``bert_emd.emd``) -> loss = sum(F * D) with the plan F a constant (gradient through D only,
    which is the exact gradient of the EMD value) -> cost-attention update of the weights.

    Args:
        num_student_layers: M.
        num_teacher_layers: N.
        mapping: ``"emd"`` (default) or a fixed mapping ``"skip"`` / ``"last"`` / ``"uniform"``
            (see :func:`fixed_plan`); fixed mappings compute only the costs they use and keep
            no weights.
        normalize, temperature, eps: the cost-attention rule (:class:`CostAttention`).
        per_sample: one transport problem per example (costs [B, M, N], solved in one batched
            call); the loss is their mean, the weights are updated from the batch-mean
            contribution (all-reduced in distributed runs).
        attention_floor: passed to ``layer_costs``: entries <= floor are replaced by 0 in both
            tensors (the original uses -100 on pre-softmax scores). None: off.
        update_weights: apply the cost-attention update in :meth:`forward`.
        cost_attention: use this (shared, externally owned and updated) weight module instead
            of an own one; it is not registered as a submodule here.
        backend: backend of ``layer_costs`` and ``emd`` (``"auto"``, ``"cpu"``, ...), or a dict
            per op, e.g. ``{"layer_costs": "torch"}`` (ops not named use ``"auto"``).
        fused_attention: ``"scores"`` or ``"probs"``: the layers are (query, key) pairs
            [B, H, L, d_head] and the costs come from ``bert_emd.attention_costs`` (the maps of
            that source, never materialised; pass the models' ``attention_mask`` to
            :meth:`transport` / :meth:`forward`). None (default): the layers are the maps.
        mask_value: additive score of padded keys with ``fused_attention`` (the original's -10000).

    Attributes for logging: ``last_cost`` [M, N] (or [B, M, N]), ``last_plan`` (same shape),
    ``student_weight`` [M], ``teacher_weight`` [N].
    """

    def __init__(
        self,
        num_student_layers: int,
        num_teacher_layers: int,
        *,
        mapping: Mapping = "emd",
        normalize: Normalize = "double_softmax",
        temperature: float = 1.0,
        eps: float = 1e-6,
        per_sample: bool = False,
        attention_floor: float | None = None,
        update_weights: bool = True,
        cost_attention: CostAttention | None = None,
        backend: str | dict[str, str] = "auto",
        fused_attention: Literal["scores", "probs"] | None = None,
        mask_value: float = -10000.0,
    ) -> None:
        super().__init__()
        if mapping not in _MAPPINGS:
            raise ValueError(f"mapping must be one of {_MAPPINGS}, got {mapping!r}")
        if fused_attention not in (None, "scores", "probs"):
            raise ValueError(f"fused_attention must be None, 'scores' or 'probs', got {fused_attention!r}")
        self.fused_attention = fused_attention
        self.mask_value = mask_value
        self.num_student_layers = num_student_layers
        self.num_teacher_layers = num_teacher_layers
        self.mapping = mapping
        self.per_sample = per_sample
        self.attention_floor = attention_floor
        self.update_weights = update_weights
        self.backend = backend
        self._external: tuple[CostAttention, ...] = ()
        if cost_attention is not None:
            if (cost_attention.num_student_layers, cost_attention.num_teacher_layers) != (
                num_student_layers,
                num_teacher_layers,
            ):
                raise ValueError(
                    f"cost_attention is for {cost_attention.num_student_layers}x"
                    f"{cost_attention.num_teacher_layers} layers, this loss for "
                    f"{num_student_layers}x{num_teacher_layers}"
                )
            self._external = (cost_attention,)  # a tuple: not registered, the owner saves it
            self.cost_attention: CostAttention | None = None
        elif mapping == "emd":
            self.cost_attention = CostAttention(
                num_student_layers, num_teacher_layers, normalize=normalize, temperature=temperature, eps=eps
            )
        else:
            self.cost_attention = None
        if mapping != "emd":
            m, n = num_student_layers, num_teacher_layers
            self.register_buffer("fixed_plan", fixed_plan(mapping, m, n), persistent=False)
            # Pairs a sparse mapping uses, and their flat index into [M*N] (a buffer: no H2D copy
            # per step once the module is on the device).
            self._rows = list(range(m)) if mapping == "skip" else [m - 1]
            self._cols = skip_mapping(m, n) if mapping == "skip" else [n - 1]
            flat = torch.tensor([i * n + j for i, j in zip(self._rows, self._cols)], dtype=torch.long)
            self.register_buffer("_fixed_index", flat, persistent=False)
        self.last_cost: Tensor | None = None
        self.last_plan: Tensor | None = None

    def _backend(self, op: str) -> str:
        return backend_for(self.backend, op)

    @property
    def weights(self) -> CostAttention | None:
        """The layer-weight module in use (own or shared); None for fixed mappings."""
        return self._external[0] if self._external else self.cost_attention

    @property
    def student_weight(self) -> Tensor | None:
        w = self.weights
        return None if w is None else w.student_weight

    @property
    def teacher_weight(self) -> Tensor | None:
        w = self.weights
        return None if w is None else w.teacher_weight

    def extra_repr(self) -> str:
        return (
            f"M={self.num_student_layers}, N={self.num_teacher_layers}, mapping={self.mapping!r}, "
            f"per_sample={self.per_sample}, attention_floor={self.attention_floor}, "
            f"fused_attention={self.fused_attention!r}"
        )

    def _check(self, student: Layers, teacher: Layers) -> None:
        m, n = _count(student), _count(teacher)
        if (m, n) != (self.num_student_layers, self.num_teacher_layers):
            raise ValueError(
                f"expected {self.num_student_layers} student and {self.num_teacher_layers} teacher "
                f"layers, got {m} and {n}"
            )

    def costs(
        self, student: Layers, teacher: Layers, mask: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Full cost matrix D [M, N] (or [B, M, N] with ``per_sample``), fp32, differentiable."""
        return feature_costs(
            student, teacher, fused=self.fused_attention, mask=mask, attention_mask=attention_mask,
            attention_floor=self.attention_floor, per_sample=self.per_sample, mask_value=self.mask_value,
            backend=self._backend,
        )

    def transport(
        self, student: Layers, teacher: Layers, mask: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, cost D and plan F of this step, without updating the weights.

        Args:
            student: M tensors [B, ...] (a list/tuple, or one tensor [M, B, ...]).
            teacher: N tensors [B, ...] of the same per-layer shape.
            mask: optional token mask [B, L] (1 = real token) passed to ``layer_costs``.
            attention_mask: with ``fused_attention``, the [B, L] mask the models were given.
        Returns:
            (loss [], cost [M, N] or [B, M, N], plan of the same shape). For fixed mappings the
            cost holds only the pairs the mapping uses (0 elsewhere) and the plan is constant.
        """
        self._check(student, teacher)
        if self.mapping == "emd":
            cost = self.costs(student, teacher, mask, attention_mask)
            # Every rank solves the problem of the global batch (average of the local costs);
            # the loss keeps the local cost so DDP's gradient averaging gives the global gradient.
            solve_cost = cost if self.per_sample else all_reduce_mean(cost.detach())
            w = self.weights
            assert w is not None
            plan = solve_plans(solve_cost, w.student_weight, w.teacher_weight, backend=self._backend("emd"))
            plan = plan.to(cost.dtype)
        else:
            cost, plan = self._fixed_costs(student, teacher, mask, attention_mask)
            solve_cost = cost.detach()
        per_problem = (plan * cost).sum((-2, -1))
        loss = per_problem.mean() if per_problem.dim() else per_problem
        # The weight update reads the cost that was solved (rank-averaged), not the local one.
        self.last_cost, self.last_plan = solve_cost.detach(), plan.detach()
        return loss, cost, plan

    def _fixed_costs(
        self, student: Layers, teacher: Layers, mask: Tensor | None, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        m, n = self.num_student_layers, self.num_teacher_layers
        if self.mapping == "uniform":
            cost = self.costs(student, teacher, mask, attention_mask)
        else:
            # Only the M (or 1) mapped pairs, one plain MSE each, as TinyBERT's loop.
            floor, ps = self.attention_floor, self.per_sample
            if self.fused_attention is not None:  # one fused 1 x 1 cost per mapped pair
                vals = [self.costs([student[i]], [teacher[j]], mask, attention_mask)[..., 0, 0]
                        for i, j in zip(self._rows, self._cols)]
            else:
                vals = [_pair_cost(student[i], teacher[j], mask, ps, floor) for i, j in zip(self._rows, self._cols)]
            vals = torch.stack(vals, -1)  # [P] or [B, P]
            idx = self._fixed_index.to(vals.device)
            flat = vals.new_zeros(*vals.shape[:-1], m * n).index_copy(-1, idx, vals)  # [M*N] or [B, M*N]
            cost = flat.unflatten(-1, (m, n))
        return cost, self.fixed_plan.to(device=cost.device, dtype=cost.dtype)

    @torch.no_grad()
    def update(self, plan: Tensor | None = None, cost: Tensor | None = None) -> None:
        """Cost-attention update from ``plan``/``cost`` (default: the last ones); a no-op for fixed
        mappings. In distributed ``per_sample`` runs the contributions are averaged over ranks."""
        w = self.weights
        if w is None:
            return
        plan = self.last_plan if plan is None else plan
        cost = self.last_cost if cost is None else cost
        if plan is None or cost is None:
            raise RuntimeError("update() needs a plan and a cost: call forward/transport first")
        if self.reduces_contributions:
            update_layer_weights(w, [self.contributions(plan, cost)])
        else:  # the whole rule in one op
            w.step([plan], [cost])

    @property
    def reduces_contributions(self) -> bool:
        """The weight update averages the contributions over ranks (distributed ``per_sample``):
        the rule then runs from :meth:`contributions`, not in one op from the plan and cost."""
        return self.per_sample and world_size() > 1

    def contributions(self, plan: Tensor, cost: Tensor) -> tuple[Tensor, Tensor]:
        """c^S [M], c^T [N] for the weight update; identical on every rank."""
        cs, ct = CostAttention.contributions(plan, cost)
        if self.reduces_contributions:
            # Per-example problems differ across ranks: average what the rule consumes instead.
            both = all_reduce_mean(torch.cat([cs, ct]))
            cs, ct = both[: cs.shape[0]], both[cs.shape[0] :]
        return cs, ct

    def forward(
        self, student: Layers, teacher: Layers, mask: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """EMD loss [] of ``student`` (M x [B, ...]) against ``teacher`` (N x [B, ...]); updates
        the layer weights afterwards when ``update_weights`` (and the weights are owned here)."""
        loss, cost, plan = self.transport(student, teacher, mask, attention_mask)
        if self.mapping == "emd" and self.update_weights and not self._external:
            self.update()
        return loss
