"""``bert_emd.emd``: batched balanced optimal transport with envelope gradients.

Registration (once for every backend):
  * ``bert_emd::emd_exact`` -- schema in ``csrc/ops.cpp``, kernels for CPU (``csrc/cpu``) and
    CUDA (``csrc/cuda``);
  * ``bert_emd::emd_exact_torch`` -- the pure-Python reference as a ``torch.library.custom_op``
    with the same signature;
and one autograd rule (the transport rule of ``bert_emd.ops._common``, shared with Sinkhorn)
and one fake kernel (:func:`_fake`) attached to each, so every backend differentiates and traces
identically. The Python paths check their inputs with ``bert_emd.ops._validate``. In eager mode
on plain tensors :func:`emd` calls the kernel directly (``_common.call_below_autograd``) and, for a
gradient, applies the rule itself (``_common.EagerTransport``).

Gradients (envelope theorem: the optimal plan and duals are constants of the backward):
  d value / d cost = plan,   d value / d a = u - mean(u),   d value / d b = v - mean(v).
Centring the duals makes the gradient w.r.t. the weights tangent to the simplex.
"""

from __future__ import annotations

import enum
import warnings
from typing import NamedTuple

import torch

from .. import _backends, _ext
from ..reference.emd import emd_exact_reference
from . import _common
from ._common import EagerTransport, call_below_autograd, eager, transport_grads, transport_setup_context
from ._validate import check_emd_inputs

__all__ = ["EMDResult", "EMDStatus", "emd", "default_max_iter"]


class EMDStatus(enum.IntEnum):
    """Per-problem outcome, as stored in :attr:`EMDResult.status` (int32)."""

    OPTIMAL = 0  #: optimal (exact) / marginals within ``tol`` (sinkhorn)
    #: stopped at ``max_iter``. Exact: the plan is feasible but not proven optimal. Sinkhorn: the
    #: column marginals are still off by more than ``tol`` (the plan is not feasible).
    MAX_ITER = 1
    INVALID = 2  #: invalid input, only reported when ``validate=False`` (outputs are NaN)


class EMDResult(NamedTuple):
    """Result of :func:`emd` for a batch shape ``[...]`` and problems of size ``M x N``.

    Read the objective as :attr:`value`, the preferred name (POT's ``ot.solve`` calls it so; with
    ``method="sinkhorn"`` it is the transport cost without the entropy term, POT's
    ``value_linear``). The field ``cost`` is the same tensor under the name of :func:`emd`'s input
    ``cost``; it stays for compatibility, and the tuple is ``(cost, plan, u, v, status)``.
    """

    cost: torch.Tensor  #: [...] transport cost sum(plan * cost), differentiable; read it as :attr:`value`
    plan: torch.Tensor  #: [..., M, N] transport plan (no gradient)
    u: torch.Tensor  #: [..., M] row duals, centred as POT (no gradient)
    v: torch.Tensor  #: [..., N] column duals (no gradient)
    status: torch.Tensor  #: [...] int32, see :class:`EMDStatus`

    @property
    def value(self) -> torch.Tensor:
        """[...] transport cost sum(plan * cost) of the returned plan, differentiable (the ``cost`` field)."""
        return self.cost


def default_max_iter(M: int, N: int) -> int:
    """Pivot budget of the exact solver when ``max_iter`` is None.

    Perturbation makes the simplex terminate on its own; this bound only guards against
    floating-point pathologies. Typical solves take far fewer pivots (4x12: under 20).
    """
    return 10_000 + 100 * (M + N)


# ----------------------------------------------------------------------------- registration
def _fake(cost, a, b, max_iter, validate):
    return _common.transport_fake(cost)


def _backward(ctx, g_value, *unused):
    return (*transport_grads(ctx, g_value), None, None)  # max_iter, validate: no gradient


@torch.library.custom_op("bert_emd::emd_exact_torch", mutates_args=())
def _emd_exact_torch(
    cost: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, max_iter: int, validate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # the op's checks (shapes, dtypes, devices always; values raise with ``validate``), then the
    # reference, which reports invalid problems as status INVALID when not validating
    check_emd_inputs(cost, a, b, raise_errors=validate)
    return emd_exact_reference(cost, a, b, max_iter, validate)


def _register(opname: str) -> None:
    torch.library.register_fake(opname)(_fake)
    torch.library.register_autograd(opname, _backward, setup_context=transport_setup_context)


_register("bert_emd::emd_exact_torch")
_ext.on_load(lambda: _register("bert_emd::emd_exact"))  # the C++ schema exists once the kernels load


def _exact_op(backend: str):
    op = _EXACT_OPS.get(backend)
    if op is None:  # cpu and cuda: the kernels of one C++ op, which exists once the extension loads
        op = _EXACT_OPS[backend] = torch.ops.bert_emd.emd_exact.default
    return op


_EXACT_OPS = {"torch": torch.ops.bert_emd.emd_exact_torch.default}


# ----------------------------------------------------------------------------- public API
def emd(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    method: str = "exact",
    reg: float = 0.05,
    max_iter: int | None = None,
    tol: float = 1e-9,
    backend: str = "auto",
    validate: bool = True,
) -> EMDResult:
    """Balanced optimal transport, batched over any leading dims.

    Solves ``min_F sum_ij F_ij cost_ij`` s.t. ``F >= 0``, ``F 1 = a``, ``F^T 1 = b``.

    Args:
        cost: [..., M, N] float32 or float64 cost matrices (M, N >= 1; any batch shape, ``(0,)``
            included). Non-contiguous input is read through its strides.
        a: [..., M] non-negative row weights, broadcastable to the batch shape; default uniform
            ``1/M``. Converted to ``cost.dtype``.
        b: [..., N] non-negative column weights; default uniform ``1/N``. ``sum(a)`` and
            ``sum(b)`` must agree to 1e-6 relative (b is rescaled to a's mass).
        method: ``"exact"`` (transportation simplex, float64 inside; the plan is a vertex with
            at most M+N-1 non-zeros) or ``"sinkhorn"`` (entropic, smooth plan).
        reg: entropic regularisation (sinkhorn only), > 0.
        max_iter: pivot budget (exact; default :func:`default_max_iter`) or iteration budget
            (sinkhorn). Reaching it sets ``status == MAX_ITER`` and warns. Square problems with
            uniform weights are assignment problems, which the C++ kernels solve without pivots
            (a shortest-augmenting-path solver): the pivot budget does not apply to them there.
        tol: marginal error at which Sinkhorn stops (per problem).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (reference).
            ``bert-emd info`` lists what runs here and why the others do not.
        validate: check the inputs and raise ``ValueError`` naming the problem (NaN/Inf cost,
            negative or non-finite weights, unequal masses). On CUDA the check costs one
            device-to-host synchronisation; with ``validate=False`` an invalid problem gets
            ``status == INVALID`` and NaN outputs instead, and the exact method on the CUDA
            kernel never synchronises with the host (forward or backward).

    Returns:
        :class:`EMDResult` ``(cost [...], plan [..., M, N], u [..., M], v [..., N], status [...])``
        in ``cost``'s dtype and device; the objective reads best as ``.value`` (the same tensor
        as the ``cost`` field). Only it carries a gradient:
        d/d cost = plan, d/d a = u - mean(u), d/d b = v - mean(v).

    Raises:
        ValueError: invalid shapes, dtypes, devices or values (the message names the argument).
        bert_emd.BackendError: an explicitly requested backend cannot run these inputs.
    """
    if not isinstance(cost, torch.Tensor):
        raise ValueError(f"emd: cost must be a torch.Tensor, got {type(cost).__name__}")
    if a is not None or b is not None:
        _check_weight_devices(cost, a, b)
    if method == "exact":
        shape = cost.shape
        if len(shape) < 2:
            raise ValueError(f"emd: cost must have shape [..., M, N] (at least 2 dims), got shape {list(shape)}")
        if max_iter is None:
            max_iter = 10_000 + 100 * (shape[-2] + shape[-1])  # default_max_iter, inlined: every call's path
        elif max_iter < 0:
            raise ValueError(f"emd: max_iter must be >= 0, got {max_iter}")
        name = _backends.select("emd", backend, cost.device)
        if name != "cpu":
            if name == "cuda" and cost.shape[-2] + cost.shape[-1] > _ext.cuda_max_nodes():
                return _emd_on_cpu(cost, a, b, max_iter, validate,
                                   f"problems of size {cost.shape[-2]}x{cost.shape[-1]} exceed the CUDA kernel's "
                                   f"capacity (M + N <= {_ext.cuda_max_nodes()})")
            if name == "torch" and backend == "auto" and _backends.host_fallback("emd", cost.device.type):
                return _emd_on_cpu(cost, a, b, max_iter, validate,
                                   "bert_emd._C has no CUDA kernels (built without nvcc; rebuild with CUDA for the "
                                   "GPU kernel)")
        op = _EXACT_OPS.get(name) or _exact_op(name)
        args = (cost, a, b, int(max_iter), bool(validate))
        fast = eager(cost)
        if torch.is_grad_enabled() and _any_requires_grad(cost, a, b):
            # eager: the autograd rule around the kernel called directly (the registered
            # autograd kernel is Python, several times the cost of a small solve)
            out = EagerTransport.apply(op, name, *args) if fast else op(*args)
        elif fast:
            # No input needs a gradient: skip the Python autograd kernel (~8 us a call, which
            # matters on the per-step B = 1 path) and go straight to the device kernel.
            out = call_below_autograd(op, name, *args)
        elif torch.compiler.is_compiling():
            out = op(*args)
        else:  # a mode or a tensor subclass: the op as registered, below autograd
            with torch._C._AutoDispatchBelowAutograd():
                out = op(*args)
        status = out[4]
        if validate and not (fast and status.numel() == 1 and not status.item()):  # (one problem, solved: done)
            _check_status(status, cost, a, b, max_iter)
        # eager: tuple.__new__ directly (the NamedTuple's generated __new__ is a Python frame)
        return tuple.__new__(EMDResult, out) if fast else EMDResult(*out)
    if method == "sinkhorn":
        from .sinkhorn import sinkhorn_dispatch

        res = EMDResult(*sinkhorn_dispatch(cost, a, b, reg=reg, max_iter=max_iter, tol=tol, backend=backend))
        if validate:  # sinkhorn_dispatch has warned about stopped problems, with the budget it used
            _check_status(res.status, cost, a, b, None)
        return res
    raise ValueError(f"emd: method must be 'exact' or 'sinkhorn', got {method!r}")



def _emd_on_cpu(cost, a, b, max_iter: int, validate: bool, why: str) -> EMDResult:
    """Problems the device cannot solve (``why``: beyond the CUDA kernel's capacity, or no CUDA
    kernel built): solve on the CPU, return on cost's device (differentiable: the device copies
    are autograd-aware)."""
    warnings.warn(f"emd: {why}; solving them with the CPU kernel", UserWarning, stacklevel=3)
    host = [None if t is None else t.cpu() for t in (cost, a, b)]
    cpu_backend = "cpu" if _ext.has_extension() else "torch"
    res = emd(host[0], host[1], host[2], max_iter=max_iter, validate=validate, backend=cpu_backend)
    return EMDResult(*(t.to(cost.device) for t in res))


def _check_weight_devices(cost: torch.Tensor, a, b) -> None:
    for name, w in (("a", a), ("b", b)):
        # checked here: a tensor on another device would route the whole call to that
        # device's kernel (or the fake kernel for "meta") before any C++ check runs
        if w is not None and (not isinstance(w, torch.Tensor) or w.device != cost.device):
            where = w.device if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"emd: {name} must be a tensor on the same device as cost ({cost.device}), got {where}")


def _any_requires_grad(cost: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return cost.requires_grad or (a is not None and a.requires_grad) or (b is not None and b.requires_grad)


def _check_status(status: torch.Tensor, cost: torch.Tensor, a, b, what: str | int | None) -> None:
    """After a validated solve: raise for invalid problems and warn for problems stopped at the
    iteration budget (``what`` names it, an int being the exact method's pivot budget; None: the
    caller has warned already). The CPU kernel
    raises invalid input itself; the CUDA kernel reports it as status INVALID (it never
    synchronises), and the precise message is then produced here by
    re-checking the inputs on the error path only. One scalar is read back (on CUDA: the one
    synchronisation of a validated call). Under torch.compile the check would be a
    data-dependent branch: there the caller reads ``status`` itself."""
    if torch.compiler.is_compiling():
        return
    n = status.numel()
    if n == 0 or not (status.item() if n == 1 else bool(status.any())):
        return
    if bool((status == EMDStatus.INVALID).any()):
        check_emd_inputs(cost, a, b)  # raises the ValueError naming the argument and element
        # valid inputs, yet a problem failed: Sinkhorn's iterates left float64 (C / reg too large)
        raise FloatingPointError(
            "emd: a problem produced non-finite values (status == INVALID); for Sinkhorn, increase reg "
            "or use method='exact'"
        )
    if what is None:
        return
    if isinstance(what, int):
        what = f"max_iter={what} pivots before optimality"
    stopped = int((status == EMDStatus.MAX_ITER).sum())
    warnings.warn(
        f"emd: {stopped} problem(s) reached {what} (status == MAX_ITER): their plans are feasible "
        "but not proven optimal",
        RuntimeWarning,
        stacklevel=3,
    )
