"""Entropic transport (``emd(..., method="sinkhorn")``): op registration and dispatch.

Interface used by :mod:`bert_emd.ops.emd`:
  * :func:`sinkhorn_dispatch` ``(cost, a, b, *, reg, max_iter, tol, backend) -> (value, plan,
    u, v, status)`` -- picks the backend, runs its op, warns when problems hit ``max_iter``;
    ``value`` carries the gradient.
  * :func:`sinkhorn_op` ``(backend) -> op`` -- the op of one backend.
  * :func:`_sinkhorn_ops` ``() -> [qualified op names]`` -- every registered Sinkhorn op.

Ops, one schema (``csrc/ops.cpp``): ``(Tensor cost [..., M, N], Tensor? a [..., M],
Tensor? b [..., N], float reg, int max_iter, float tol) -> (value [...], plan [..., M, N],
u [..., M], v [..., N], status [...] int32)``; a, b broadcast to the batch shape, None = uniform.
  * ``bert_emd::sinkhorn``         C++ CPU kernel (``csrc/cpu/sinkhorn_cpu.cpp``)
  * ``bert_emd::sinkhorn_torch``   the PyTorch reference, any device
  * ``bert_emd::sinkhorn_triton``  Triton (``emd_kernels/sinkhorn.py``), M, N <= 64; CUDA
    tensors, or CPU tensors under ``TRITON_INTERPRET=1``
Each gets one fake kernel (:func:`_fake`) and the autograd rule of the exact method (the
transport rule of ``bert_emd.ops._common``), so every backend differentiates and traces
identically; the Python ops check their inputs with ``bert_emd.ops._validate``. Algorithm and
conventions: ``bert_emd.reference.sinkhorn``.

Convention (as POT's ``ot.solve(M, a, b, reg=reg, grad="envelope")``, with its value_linear):
  value = <P, C>, the transport cost of the entropic plan P (no entropy term);
  d value / d C = P;  d value / d a = u - mean(u);  d value / d b = v - mean(v),
where u = reg * log_u, v = reg * log_v are the dual potentials, P = exp((u_i + v_j - C_ij)/reg).
These are the envelope gradients of the regularised objective <P, C> + reg * <P, log P - 1>
at the computed plan; they tend to the exact-EMD gradients as reg -> 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .. import _backends, _ext
from ..reference.sinkhorn import sinkhorn_reference
from . import _common
from ._common import EagerTransport, call_below_autograd, eager, transport_grads, transport_setup_context
from ._validate import check_emd_inputs, check_sinkhorn_args

__all__ = ["DEFAULT_MAX_ITER", "sinkhorn_dispatch", "sinkhorn_op"]

#: iteration budget when ``max_iter`` is None (column+row update pairs)
DEFAULT_MAX_ITER = 10_000

_Out = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _fake(cost, a, b, reg, max_iter, tol):
    return _common.transport_fake(cost)


def _backward(ctx, g_value, *unused):
    return (*transport_grads(ctx, g_value), None, None, None)  # reg, max_iter, tol: no gradient


@torch.library.custom_op("bert_emd::sinkhorn_torch", mutates_args=())
def _sinkhorn_torch(
    cost: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, reg: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_sinkhorn_args(reg, max_iter, tol)
    check_emd_inputs(cost, a, b)
    return sinkhorn_reference(cost, a, b, reg, max_iter, tol)


@torch.library.custom_op("bert_emd::sinkhorn_triton", mutates_args=())
def _sinkhorn_triton(
    cost: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, reg: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from emd_kernels.sinkhorn import MAX_SIZE, sinkhorn_triton

    check_sinkhorn_args(reg, max_iter, tol)
    a_full, b_full, _ = check_emd_inputs(cost, a, b)
    batch, (M, N) = cost.shape[:-2], cost.shape[-2:]
    if M > MAX_SIZE or N > MAX_SIZE:
        raise ValueError(
            f"emd (triton backend): method='sinkhorn' holds problems up to {MAX_SIZE} x {MAX_SIZE} on chip, "
            f"got {M} x {N}; use backend='torch' (or 'auto')"
        )
    outs = sinkhorn_triton(
        cost.detach().reshape(-1, M, N),
        None if a is None else a_full.detach().reshape(-1, M),
        None if b is None else b_full.detach().reshape(-1, N),
        float(reg), int(max_iter), float(tol),
    )
    shapes = (batch, (*batch, M, N), (*batch, M), (*batch, N), batch)
    return tuple(t.reshape(s) for t, s in zip(outs, shapes))


def _register(opname: str) -> None:
    torch.library.register_fake(opname)(_fake)
    torch.library.register_autograd(opname, _backward, setup_context=transport_setup_context)


_OPS = ["bert_emd::sinkhorn_torch", "bert_emd::sinkhorn_triton"]
for _name in _OPS:
    _register(_name)


def _register_cpp() -> None:  # the C++ schema exists once the kernels load
    _OPS.insert(0, "bert_emd::sinkhorn")
    _register("bert_emd::sinkhorn")


_ext.on_load(_register_cpp)


def _sinkhorn_ops() -> list[str]:
    """Qualified names of the registered Sinkhorn ops (C++ first when the extension is built)."""
    return list(_OPS)


def sinkhorn_op(backend: str) -> Callable[..., _Out]:
    """The op of ``backend`` ("cpu", "triton" or "torch"), called with the schema above."""
    if backend == "cpu":
        return torch.ops.bert_emd.sinkhorn.default
    if backend == "triton":
        return torch.ops.bert_emd.sinkhorn_triton.default
    if backend == "torch":
        return torch.ops.bert_emd.sinkhorn_torch.default
    raise ValueError(f"method='sinkhorn' has no {backend!r} backend (it has: cpu, triton, torch)")


def sinkhorn_dispatch(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    reg: float = 0.05,
    max_iter: int | None = None,
    tol: float = 1e-9,
    backend: str = "auto",
) -> _Out:
    """Run ``emd(..., method="sinkhorn")``: validate the scalars, pick a backend, solve.

    Args:
        cost: [..., M, N] float32/float64. a: [..., M] / b: [..., N] weights or None (uniform).
        reg: entropic regularisation > 0, in cost units (P = exp((u + v - C) / reg)).
        max_iter: column+row update pairs per problem (default :data:`DEFAULT_MAX_ITER`).
        tol: stop when sum_j |P^T 1 - b|_j <= tol * sum(a) (rows are exact), per problem.
        backend: "auto" (cpu on CPU; triton on CUDA when M, N <= 64, else torch), "cpu",
            "triton" or "torch".

    Returns:
        (value [...], plan [..., M, N], u [..., M], v [..., N], status [...] int32); only
        value carries a gradient (module docstring).
    """
    if not isinstance(cost, torch.Tensor):
        raise ValueError(f"emd: cost must be a torch.Tensor, got {type(cost).__name__}")
    for name, w in (("a", a), ("b", b)):
        if isinstance(w, torch.Tensor) and w.device != cost.device:
            raise ValueError(f"emd: {name} must be on the same device as cost ({cost.device}), got {w.device}")
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER
    check_sinkhorn_args(reg, max_iter, tol)
    name = _backends.select("sinkhorn", backend, cost.device)
    if name == "triton" and cost.dim() >= 2:
        from emd_kernels.sinkhorn import MAX_SIZE

        if max(cost.shape[-2:]) > MAX_SIZE:
            if backend == "triton":
                raise _backends.BackendError(
                    f"backend 'triton' cannot run sinkhorn on {cost.shape[-2]} x {cost.shape[-1]} problems: "
                    f"its kernel holds at most {MAX_SIZE} x {MAX_SIZE} on chip. Use backend='torch' or 'auto'."
                )
            name = "torch"
    op = sinkhorn_op(name)
    args = (cost, a, b, float(reg), int(max_iter), float(tol))
    if not eager(cost):  # compiling, a mode or a tensor subclass: the op as registered
        out = op(*args)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (cost, a, b)):
        out = EagerTransport.apply(op, name, *args)  # the rule around the kernel called directly
    else:
        out = call_below_autograd(op, name, *args)
    counts = torch.stack([(out[4] == 1).sum(), (out[4] == 2).sum()]).tolist()  # one sync
    if counts[0]:
        warnings.warn(
            f"emd(method='sinkhorn'): {counts[0]} problem(s) reached max_iter={max_iter} before the marginal "
            f"error fell below tol={tol:g} (status == 1); raise max_iter or reg, or loosen tol",
            RuntimeWarning,
            stacklevel=3,
        )
    if counts[1]:
        warnings.warn(
            f"emd(method='sinkhorn'): {counts[1]} problem(s) produced NaN (status == 2): cost / reg "
            f"overflows float64; scale the costs or raise reg",
            RuntimeWarning,
            stacklevel=3,
        )
    return out
