"""emd(..., method="sinkhorn"): the cpu, triton (interpreter) and torch backends against POT and
each other, degenerate problems, per-problem stopping, gradients, bad input, reg -> 0."""

from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before emd_kernels is imported (conftest does too)

import bert_emd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from bert_emd import _backends, _ext  # noqa: E402
from bert_emd.ops.sinkhorn import _sinkhorn_ops, sinkhorn_dispatch, sinkhorn_op  # noqa: E402
from bert_emd.reference.sinkhorn import sinkhorn_reference  # noqa: E402

ot = pytest.importorskip("ot")
np = pytest.importorskip("numpy")

BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _ext.has_extension(), reason="bert_emd._C not built")),
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            _backends.unavailable_reason("sinkhorn", "triton", "cpu") is not None,
            reason="triton backend needs TRITON_INTERPRET=1 on CPU",
        ),
    ),
]


def solve(backend, cost, a=None, b=None, reg=0.05, max_iter=100_000, tol=1e-12):
    return sinkhorn_op(backend)(cost, a, b, reg, max_iter, tol)


def rand_weights(rng, *shape, zeros=0):
    w = torch.rand(*shape, generator=rng, dtype=torch.float64) + 0.05
    if zeros:
        w[..., :zeros] = 0.0
        w = w[..., torch.randperm(shape[-1], generator=rng)]
    return w / w.sum(-1, keepdim=True)


def pot_sinkhorn(C, a, b, reg):
    """POT's log-domain Sinkhorn at a tight tolerance: (value <P, C>, plan, reg * log_u, reg * log_v)."""
    P, log = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), reg, method="sinkhorn_log",
                         numItermax=200_000, stopThr=1e-14, log=True)
    value = float((P * C.numpy()).sum())  # what ot.sinkhorn2 returns for this plan
    return value, P, reg * log["log_u"], reg * log["log_v"]


def centred(x):
    return x - x.mean(-1, keepdim=True)


# ------------------------------------------------------------------------------ against POT
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 12), (6, 5), (1, 7), (9, 1), (16, 24)])
def test_matches_pot_random(backend, shape, rng):
    M, N = shape
    nb = 2 if backend == "triton" else 4
    C = torch.rand(nb, M, N, generator=rng, dtype=torch.float64) * 3
    a, b = rand_weights(rng, nb, M), rand_weights(rng, nb, N)
    reg = 0.6 if backend == "triton" else 0.05  # fewer iterations in the interpreter
    value, plan, u, v, status = solve(backend, C, a, b, reg=reg)
    assert (status == 0).all()
    for k in range(nb):
        ref, P, lu, lv = pot_sinkhorn(C[k], a[k], b[k], reg)
        assert value[k].item() == pytest.approx(ref, rel=1e-6, abs=1e-12)
        np.testing.assert_allclose(plan[k].numpy(), P, atol=1e-9)
        np.testing.assert_allclose(centred(u[k]).numpy(), lu - lu.mean(), atol=1e-7)
        np.testing.assert_allclose(centred(v[k]).numpy(), lv - lv.mean(), atol=1e-7)
    # marginals: rows exact, columns within tol
    torch.testing.assert_close(plan.sum(-1), a, atol=1e-12, rtol=0)
    assert (plan.sum(-2) - b).abs().sum(-1).max() <= 1e-12 * 1.001


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_weights_and_value_is_linear_cost(backend, rng):
    C = torch.rand(3, 4, 12, generator=rng, dtype=torch.float64)
    reg = 0.3 if backend == "triton" else 0.1
    value, plan, u, v, status = solve(backend, C, reg=reg)
    assert (status == 0).all()
    torch.testing.assert_close(value, (plan * C).sum((-2, -1)), rtol=1e-13, atol=0)
    for k in range(2):  # ot.sinkhorn2 itself, once
        ref = ot.sinkhorn2(np.full(4, 0.25), np.full(12, 1 / 12), C[k].numpy(), reg,
                           method="sinkhorn_log", stopThr=1e-14, numItermax=100_000)
        assert value[k].item() == pytest.approx(float(ref), rel=1e-6)
    # the plan has the Gibbs form of the duals
    torch.testing.assert_close(plan, ((u[..., :, None] + v[..., None, :] - C) / reg).exp(), rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------ degenerate
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_costs(backend, rng):
    n = 6
    cases = {
        "all_equal": torch.full((n, n), 0.7, dtype=torch.float64),
        "identity": 1.0 - torch.eye(n, dtype=torch.float64),
        "ties": torch.randint(0, 2, (n, n), generator=rng).double(),
        "zeros": torch.zeros(n, n, dtype=torch.float64),
    }
    C = torch.stack(list(cases.values()))
    reg = 0.25  # random ties at reg 0.1 can take thousands of iterations (slow in the interpreter)
    value, plan, u, v, status = solve(backend, C, reg=reg)
    assert (status == 0).all()
    for k, Ck in enumerate(C):
        ref, *_ = pot_sinkhorn(Ck, torch.full((n,), 1 / n).double(), torch.full((n,), 1 / n).double(), reg)
        assert value[k].item() == pytest.approx(ref, rel=1e-6, abs=1e-13)
    # constant costs: the plan is a b^T straight away
    torch.testing.assert_close(plan[0], torch.full((n, n), 1 / n**2, dtype=torch.float64), rtol=1e-14, atol=0)
    assert value[3].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights(backend, rng):
    M, N = 5, 7
    C = torch.rand(2, M, N, generator=rng, dtype=torch.float64)
    a = rand_weights(rng, 2, M, zeros=2)
    b = rand_weights(rng, 2, N, zeros=3)
    reg = 0.1
    value, plan, u, v, status = solve(backend, C, a, b, reg=reg)
    assert (status == 0).all()
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    for k in range(2):
        ra, cb = a[k] > 0, b[k] > 0
        assert (plan[k][~ra] == 0).all() and (plan[k][:, ~cb] == 0).all()
        sub = C[k][ra][:, cb]
        ref, *_ = pot_sinkhorn(sub, a[k][ra], b[k][cb], reg)
        assert value[k].item() == pytest.approx(ref, rel=1e-6)
        # switched-off lines carry the soft c-transform of the active duals
        exp_u = -reg * torch.logsumexp((v[k][cb][None, :] - C[k][:, cb]) / reg, 1)
        exp_v = -reg * torch.logsumexp((u[k][ra][:, None] - C[k][ra, :]) / reg, 0)
        torch.testing.assert_close(u[k][~ra], exp_u[~ra], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v[k][~cb], exp_v[~cb], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-6, 1e3])
def test_scale_invariance_tiny_and_huge(backend, scale, rng):
    """value(s C, s reg) = s value(C, reg): magnitudes do not matter, only C / reg."""
    C = torch.rand(2, 4, 6, generator=rng, dtype=torch.float64)
    a, b = rand_weights(rng, 2, 4), rand_weights(rng, 2, 6)
    v1, p1, *_ = solve(backend, C, a, b, reg=0.25)
    v2, p2, _, _, st = solve(backend, C * scale, a, b, reg=0.25 * scale)
    assert (st == 0).all()
    torch.testing.assert_close(v2, v1 * scale, rtol=1e-10, atol=0)
    torch.testing.assert_close(p2, p1, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_reg_large_cost_is_stable(backend, rng):
    """reg = 1e-3 with costs up to 1e3 (C / reg = 1e6): no overflow, a feasible plan."""
    C = torch.rand(2, 4, 12, generator=rng, dtype=torch.float64) * 1e3
    C[0, 0, 0] = 0.0
    value, plan, u, v, status = solve(backend, C, reg=1e-3, max_iter=30, tol=1e-9)
    for t in (value, plan, u, v):
        assert torch.isfinite(t).all()
    assert set(status.tolist()) <= {0, 1}
    torch.testing.assert_close(plan.sum(-1), torch.full((2, 4), 0.25, dtype=torch.float64), atol=1e-10, rtol=0)
    # <P, C> of a plan with exact rows is a convex combination of the costs
    assert ((value >= 0) & (value <= C.amax((-2, -1)))).all()
    torch.testing.assert_close(value, (plan * C).sum((-2, -1)), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ backends agree
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backend_matches_reference_batched_shapes(backend, rng):
    if backend == "cpu" and not _ext.has_extension():
        pytest.skip("bert_emd._C not built")
    if backend == "triton" and _backends.unavailable_reason("sinkhorn", "triton", "cpu"):
        pytest.skip("needs TRITON_INTERPRET=1")
    C = torch.rand(2, 3, 5, 4, generator=rng, dtype=torch.float64)
    a = rand_weights(rng, 5)  # broadcast over the batch
    b = rand_weights(rng, 1, 3, 4)
    ref = sinkhorn_reference(C, a, b, 0.3, 1000, 1e-11)
    out = solve(backend, C, a, b, reg=0.3, max_iter=1000, tol=1e-11)
    for r, o in zip(ref, out):
        assert r.shape == o.shape and r.dtype == o.dtype
    for r, o in zip(ref[:4], out[:4]):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-12)
    assert torch.equal(ref[4], out[4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero_one_and_noncontiguous(backend, rng):
    empty = solve(backend, torch.empty(0, 3, 4, dtype=torch.float64))
    assert [t.shape for t in empty] == [(0,), (0, 3, 4), (0, 3), (0, 4), (0,)]
    base = torch.rand(2, 5, 3, generator=rng, dtype=torch.float64)
    C = base.transpose(-1, -2)  # [2, 3, 5], non-contiguous
    a = rand_weights(rng, 2, 3).t().contiguous().t()  # [2, 3], non-contiguous
    out = solve(backend, C, a, None, reg=0.2)
    ref = solve(backend, C.contiguous(), a.contiguous(), None, reg=0.2)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-14, atol=0)
    one = solve(backend, C[:1], a[:1], None, reg=0.2)
    torch.testing.assert_close(one[0], ref[0][:1], rtol=1e-14, atol=0)
    unbatched = solve(backend, C[0], a[0], None, reg=0.2)
    assert unbatched[0].shape == () and unbatched[1].shape == (3, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_inputs(backend, rng):
    C = torch.rand(2, 4, 6, generator=rng, dtype=torch.float64)
    v64, p64, *_ = solve(backend, C, reg=0.2, tol=1e-10)
    v32, p32, u32, vv32, st = solve(backend, C.float(), reg=0.2, tol=1e-10)
    assert v32.dtype == p32.dtype == u32.dtype == vv32.dtype == torch.float32 and st.dtype == torch.int32
    assert (st == 0).all()  # float64 inside: tight tolerances are reachable from float32 inputs
    torch.testing.assert_close(v32.double(), v64, rtol=1e-6, atol=0)


def test_triton_float32_compute_is_stable(rng):
    if _backends.unavailable_reason("sinkhorn", "triton", "cpu"):
        pytest.skip("needs TRITON_INTERPRET=1")
    from emd_kernels.sinkhorn import sinkhorn_triton

    C = torch.rand(2, 4, 8, generator=rng, dtype=torch.float32)
    v, p, u, vv, st = sinkhorn_triton(C, None, None, 0.1, 200, 1e-5, compute_dtype=torch.float32)
    ref = sinkhorn_reference(C.double(), None, None, 0.1, 200, 1e-5)
    assert (st == 0).all()
    torch.testing.assert_close(v.double(), ref[0], rtol=1e-4, atol=0)
    big = torch.rand(2, 4, 8, generator=rng) * 1e3
    out = sinkhorn_triton(big, None, None, 1e-3, 20, 1e-9, compute_dtype=torch.float32)
    assert all(torch.isfinite(t).all() for t in out[:4])


# ------------------------------------------------------------------------------ stopping
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_problem_stops_on_its_own_error(backend, rng):
    easy = torch.full((4, 6), 0.3, dtype=torch.float64)  # converged before the first update
    hard = torch.rand(4, 6, generator=rng, dtype=torch.float64)
    mid = torch.rand(4, 6, generator=rng, dtype=torch.float64) * 0.2
    C = torch.stack([easy, hard, mid])
    _, _, _, _, st = solve(backend, C, reg=0.01, max_iter=3, tol=1e-12)
    assert st.tolist() == [0, 1, 1]
    # a problem solved inside a batch is solved exactly as alone: it stops on its own error
    batch = solve(backend, C, reg=0.1, tol=1e-10)
    for k in range(3):
        alone = solve(backend, C[k:k + 1], reg=0.1, tol=1e-10)
        for x, y in zip(batch, alone):
            torch.testing.assert_close(x[k:k + 1], y, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_iter_zero_and_tol_zero_terminate(backend, rng):
    C = torch.rand(2, 3, 4, generator=rng, dtype=torch.float64)
    st = solve(backend, C, reg=0.05, max_iter=0)[4]
    assert st.tolist() == [1, 1]
    st = solve(backend, C, reg=0.05, max_iter=50, tol=0.0)[4]  # unreachable tol: max_iter stops it
    assert set(st.tolist()) <= {0, 1}
    one = solve(backend, torch.rand(1, 1, generator=rng, dtype=torch.float64), reg=0.05, max_iter=10, tol=0.0)
    assert one[4].item() == 0 and one[1].item() == 1.0


# ------------------------------------------------------------------------------ reg -> 0
def test_converges_to_exact_as_reg_decreases(rng):
    backend = "cpu" if _ext.has_extension() else "torch"
    M, N = 4, 12
    C = torch.rand(3, M, N, generator=rng, dtype=torch.float64)
    a, b = rand_weights(rng, 3, M), rand_weights(rng, 3, N)
    exact = torch.tensor([ot.emd2(a[k].numpy(), b[k].numpy(), C[k].numpy()) for k in range(3)],
                         dtype=torch.float64)
    regs = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01]
    gaps = []
    for reg in regs:
        value, *_, status = solve(backend, C, a, b, reg=reg, max_iter=200_000, tol=1e-12)
        assert (status == 0).all(), reg
        gap = value - exact
        # 0 <= <P_reg, C> - OT <= reg * log(M N) (entropy bound), up to the marginal tolerance
        assert (gap >= -1e-10).all() and (gap <= reg * math.log(M * N) + 1e-10).all(), (reg, gap)
        gaps.append(gap)
    gaps = torch.stack(gaps)  # [len(regs), 3]
    assert (gaps[1:] <= gaps[:-1] + 1e-10).all(), gaps  # monotone in reg
    assert (gaps[-1] <= 0.02 * exact.abs().clamp_min(1e-3) + 1e-9).all()


# ------------------------------------------------------------------------------ bad input
BAD = [
    ("nan_cost", lambda C, a, b: (C.index_fill(-1, torch.tensor([1]), float("nan")), a, b), "NaN or Inf"),
    ("inf_cost", lambda C, a, b: (C.index_fill(-1, torch.tensor([0]), float("inf")), a, b), "NaN or Inf"),
    ("negative_a", lambda C, a, b: (C, a - a.max(), b), "a must be finite and non-negative"),
    ("nan_b", lambda C, a, b: (C, a, b.index_fill(-1, torch.tensor([2]), float("nan"))), "b must be finite"),
    ("unbalanced", lambda C, a, b: (C, a * 1.01, b), "equal total mass"),
    ("zero_mass", lambda C, a, b: (C, a * 0, b * 0), "positive total mass"),
    ("empty_rows", lambda C, a, b: (C[:, :0], None, None), "M >= 1"),
    ("int_cost", lambda C, a, b: ((C * 10).long(), None, None), "float32 or float64"),
    ("one_dim_cost", lambda C, a, b: (C[0, 0], None, None), "at least 2 dims"),
    ("a_wrong_len", lambda C, a, b: (C, a[:, :2], b), "a must have shape"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_value_error(backend, case, rng):
    _, make, msg = case
    C = torch.rand(2, 3, 4, generator=rng, dtype=torch.float64)
    args = make(C, rand_weights(rng, 2, 3), rand_weights(rng, 2, 4))
    with pytest.raises(ValueError, match=msg):
        solve(backend, *args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw, msg",
    [({"reg": 0.0}, "reg must be"), ({"reg": -1.0}, "reg must be"), ({"reg": float("nan")}, "reg must be"),
     ({"reg": float("inf")}, "reg must be"), ({"max_iter": -1}, "max_iter"), ({"tol": -1e-3}, "tol must be")],
)
def test_bad_scalars_raise_value_error(backend, kw, msg, rng):
    C = torch.rand(2, 3, 4, generator=rng, dtype=torch.float64)
    with pytest.raises(ValueError, match=msg):
        solve(backend, C, **kw)
    with pytest.raises(ValueError, match=msg):
        sinkhorn_dispatch(C, backend=backend, **{"reg": 0.05, "max_iter": 10, "tol": 1e-9, **kw})


def test_mismatched_devices_raise_value_error(rng):
    # (a meta tensor would route the op itself to its fake kernel, so the check is up front)
    C = torch.rand(2, 3, 4, generator=rng, dtype=torch.float64)
    with pytest.raises(ValueError, match="same device"):
        sinkhorn_dispatch(C, rand_weights(rng, 2, 3).to("meta"))
    with pytest.raises(ValueError, match="same device"):
        sinkhorn_dispatch(C, None, rand_weights(rng, 2, 4).to("meta"))


def test_triton_rejects_large_problems():
    if _backends.unavailable_reason("sinkhorn", "triton", "cpu"):
        pytest.skip("needs TRITON_INTERPRET=1")
    C = torch.rand(2, 65, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="up to 64"):
        solve("triton", C)
    with pytest.raises(bert_emd.BackendError, match="at most 64"):
        sinkhorn_dispatch(C, backend="triton")


# ------------------------------------------------------------------------------ emd() + autograd
@pytest.mark.parametrize("backend", BACKENDS)
def test_emd_sinkhorn_gradients_match_pot_envelope(backend, rng):
    M, N, reg = 4, 6, 0.1
    C = torch.rand(M, N, generator=rng, dtype=torch.float64)
    a, b = rand_weights(rng, M), rand_weights(rng, N)
    Cg, ag, bg = (t.clone().requires_grad_() for t in (C, a, b))
    res = bert_emd.emd(Cg, ag, bg, method="sinkhorn", reg=reg, tol=1e-13, max_iter=100_000, backend=backend)
    assert res.status.item() == 0
    res.cost.backward()
    torch.testing.assert_close(Cg.grad, res.plan, rtol=0, atol=0)
    torch.testing.assert_close(ag.grad, centred(res.u), rtol=0, atol=0)
    Cp, ap, bp = (t.clone().requires_grad_() for t in (C, a, b))
    pot = ot.solve(Cp, ap, bp, reg=reg, grad="envelope", max_iter=100_000, tol=1e-14)
    pot.value.backward()
    assert res.cost.item() == pytest.approx(pot.value_linear.item(), rel=1e-9)
    torch.testing.assert_close(Cg.grad, Cp.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ag.grad, ap.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(bg.grad, bp.grad, rtol=0, atol=1e-9)


def test_emd_sinkhorn_batched_grad_and_max_iter_warning(rng):
    C = torch.rand(2, 3, 4, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 3, generator=rng, dtype=torch.float64)
    res = bert_emd.emd(C, method="sinkhorn", reg=0.1)
    assert res.cost.shape == (2, 3) and res.plan.shape == (2, 3, 4, 5)
    (res.cost * w).sum().backward()
    torch.testing.assert_close(C.grad, w[..., None, None] * res.plan, rtol=1e-15, atol=0)
    with pytest.warns(RuntimeWarning, match="max_iter=2"):
        res = bert_emd.emd(C.detach(), method="sinkhorn", reg=0.01, max_iter=2)
    assert (res.status == 1).all()


def test_emd_sinkhorn_stopped_warns_once_with_the_budget_used(rng):
    """A Sinkhorn solve stopped at its budget warns once, with the iteration count actually used
    (also when max_iter is left at its default), and never calls the plan feasible."""
    from bert_emd.ops.sinkhorn import DEFAULT_MAX_ITER

    C = torch.rand(3, 4, 5, generator=rng, dtype=torch.float64) * 50
    for max_iter, shown in ((3, "max_iter=3"), (None, f"max_iter={DEFAULT_MAX_ITER}")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = bert_emd.emd(C, method="sinkhorn", reg=1e-3, max_iter=max_iter, tol=0.0)
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1, msgs
        assert shown in msgs[0] and "None" not in msgs[0] and "feasible" not in msgs[0]
        assert (res.status == bert_emd.EMDStatus.MAX_ITER).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, rng):
    name = {"cpu": "sinkhorn", "torch": "sinkhorn_torch", "triton": "sinkhorn_triton"}[backend]
    assert f"bert_emd::{name}" in _sinkhorn_ops()
    op = getattr(torch.ops.bert_emd, name).default
    C = torch.rand(2, 3, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    a = rand_weights(rng, 2, 3).requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if backend != "triton":  # torch.compile over the interpreter is not supported
        tests += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, (C, a, None, 0.2, 500, 1e-9), test_utils=tests)


# ------------------------------------------------------------------------------ Triton compile
COMPILE_SCRIPT = r"""
import json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from emd_kernels import sinkhorn as K

fn = K._sinkhorn_kernel
out = []
for cc, bm, bn, comp, dt in [(80, 4, 16, tl.float64, "fp32"), (90, 64, 64, tl.float64, "fp64"),
                             (90, 16, 16, tl.float32, "fp32")]:
    const = {"HAS_A": True, "HAS_B": cc == 90, "BLOCK_M": bm, "BLOCK_N": bn, "COMPUTE": comp}
    sig = {}
    for n in fn.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n == "ST":
            sig[n] = "*i32"
        elif n == "PARAMS":
            sig[n] = "*fp64"
        elif n in ("C", "A", "Bw", "P", "U", "V", "VAL"):
            sig[n] = "*" + dt
        elif n.startswith("s_"):
            sig[n] = "i64"
        else:
            sig[n] = "i32"
    k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": K.launch_config(bm, bn)["num_warps"]})
    out.append({"cc": cc, "ptx_target": f".target sm_{cc}" in k.asm["ptx"], "cubin": len(k.asm["cubin"]),
                "shared": k.metadata.shared})
print(json.dumps(out))
"""


def test_triton_kernel_compiles_for_sm80_and_sm90():
    """PTX and cubin for Ampere and Hopper without a GPU (subprocess: no interpreter there)."""
    from _triton_compile import run_compile_script

    pytest.importorskip("triton")
    res = run_compile_script(COMPILE_SCRIPT, timeout=300)
    assert [r["cc"] for r in res] == [80, 90, 90]
    assert all(r["ptx_target"] and r["cubin"] > 0 for r in res)
    assert all(r["shared"] <= (163 if r["cc"] == 80 else 227) * 1024 for r in res), res  # fits a block
