"""Exact EMD: values against POT and scipy's HiGHS LP, feasibility and vertex checks, degenerate
cases, gradients, registration (opcheck, torch.compile), batch shapes, and every bad input."""

from __future__ import annotations

import math
import warnings

import bert_emd
import numpy as np
import pytest
import torch
from bert_emd import EMDStatus, emd
from bert_emd._ext import has_extension

try:  # test extras; the GPU-only tests below need neither
    import ot
    import scipy.optimize as scipy_optimize
except ImportError:  # pragma: no cover
    ot = scipy_optimize = None

needs_pot = pytest.mark.skipif(ot is None, reason="needs POT and scipy (pip install .[test])")

SHAPES = [(1, 1), (1, 7), (7, 1), (4, 12), (6, 12), (12, 12), (24, 48), (64, 64), (100, 37)]
BACKENDS = ["cpu", "torch"] if has_extension() else ["torch"]


def _backend_shapes():
    for backend in BACKENDS:
        for shape in SHAPES:
            # the pure-Python reference is slow by design: keep it to the smaller problems
            if backend == "torch" and shape[0] * shape[1] > 24 * 48:
                continue
            yield backend, shape


def _random_weights(n: int, g: torch.Generator) -> torch.Tensor:
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.05
    return w / w.sum()


def _highs_value(C: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    M, N = C.shape
    A_eq = np.zeros((M + N, M * N))
    for i in range(M):
        A_eq[i, i * N:(i + 1) * N] = 1
    for j in range(N):
        A_eq[M + j, j::N] = 1
    res = scipy_optimize.linprog(C.ravel(), A_eq=A_eq, b_eq=np.concatenate([a, b]), bounds=(0, None),
                                 method="highs")
    assert res.status == 0
    return float(res.fun)


def assert_valid_plan(C, a, b, res, *, rtol=1e-9):
    """Feasible, a vertex (at most M+N-1 non-zeros), optimal by a dual certificate."""
    M, N = C.shape[-2:]
    P = res.plan.double()
    mass = float(a.sum())
    assert (P >= 0).all()
    assert torch.allclose(P.sum(-1), a.double().expand_as(P.sum(-1)), atol=1e-9 * mass, rtol=0)
    assert torch.allclose(P.sum(-2), b.double().expand_as(P.sum(-2)), atol=1e-9 * mass, rtol=0)
    nnz = (P > 0).flatten(-2).sum(-1)
    assert int(nnz.max()) <= M + N - 1
    Cd = C.double()
    scale = float(Cd.abs().max()) * mass + 1e-300
    # value is sum(plan * cost)
    assert torch.allclose(res.cost.double(), (P * Cd).sum((-1, -2)), atol=1e-12 * scale, rtol=0)
    # duals: feasible (u_i + v_j <= C_ij) and tight on the support => optimal (strong duality)
    u, v = res.u.double(), res.v.double()
    slack = Cd - u[..., :, None] - v[..., None, :]
    cmax = float(Cd.abs().max()) + 1e-300
    assert float(slack.min()) >= -1e-9 * cmax
    assert float((slack * P).abs().max()) <= 1e-9 * cmax * mass
    dual = (a.double() * u).sum(-1) + (b.double() * v).sum(-1)
    assert torch.allclose(dual, res.cost.double(), atol=rtol * scale, rtol=0)


@needs_pot
@pytest.mark.parametrize("backend,shape", list(_backend_shapes()))
def test_values_against_pot_and_highs(backend, shape, rng):
    M, N = shape
    for weights in ("uniform", "random"):
        C = torch.rand(3, M, N, generator=rng, dtype=torch.float64)
        if weights == "uniform":
            a, b = torch.full((M,), 1.0 / M, dtype=torch.float64), torch.full((N,), 1.0 / N, dtype=torch.float64)
        else:
            a, b = _random_weights(M, rng), _random_weights(N, rng)
        res = emd(C, a, b, backend=backend)
        assert res.status.eq(EMDStatus.OPTIMAL).all()
        for t in range(3):
            ref = ot.emd2(a.numpy(), b.numpy(), C[t].numpy())
            assert res.cost[t].item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
            if M * N <= 24 * 48:
                assert res.cost[t].item() == pytest.approx(_highs_value(C[t].numpy(), a.numpy(), b.numpy()),
                                                           rel=1e-7, abs=1e-9)
            assert_valid_plan(C[t], a, b, type(res)(*(x[t] for x in res)))


def _degenerate_cases(g: torch.Generator):
    yield "uniform 4x12", torch.rand(4, 12, generator=g, dtype=torch.float64), None, None
    yield "all equal", torch.full((6, 12), 0.3, dtype=torch.float64), None, None
    yield "integer ties", torch.randint(0, 3, (12, 12), generator=g).double(), None, None
    yield "integer ties 6x24", torch.randint(0, 2, (6, 24), generator=g).double(), None, None
    eye = 1.0 - torch.eye(12, dtype=torch.float64)
    yield "identity", eye, None, None
    a = torch.tensor([0.5, 0.0, 0.25, 0.25, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.0], dtype=torch.float64)
    yield "zero weights", torch.rand(5, 7, generator=g, dtype=torch.float64), a, b
    yield "tiny", torch.rand(4, 12, generator=g, dtype=torch.float64) * 1e-8, None, None
    yield "huge", torch.rand(4, 12, generator=g, dtype=torch.float64) * 1e8, None, None
    yield "zero cost", torch.zeros(4, 12, dtype=torch.float64), None, None
    yield "1xN", torch.rand(1, 9, generator=g, dtype=torch.float64), None, None
    yield "Nx1", torch.rand(9, 1, generator=g, dtype=torch.float64), None, None
    yield "1x1", torch.rand(1, 1, generator=g, dtype=torch.float64), None, None
    w = torch.tensor([1.0, 1e-12, 1.0], dtype=torch.float64)
    yield "near-zero weight", torch.rand(3, 3, generator=g, dtype=torch.float64), w / w.sum(), None


@needs_pot
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_cases(backend, rng):
    for name, C, a, b in _degenerate_cases(rng):
        M, N = C.shape
        res = emd(C, a, b, backend=backend)
        aa = a if a is not None else torch.full((M,), 1.0 / M, dtype=torch.float64)
        bb = b if b is not None else torch.full((N,), 1.0 / N, dtype=torch.float64)
        assert int(res.status) == EMDStatus.OPTIMAL, name
        ref = ot.emd2(aa.numpy(), bb.numpy(), C.numpy())
        scale = float(C.abs().max()) + 1e-300
        assert abs(res.cost.item() - ref) <= 1e-9 * scale, name
        assert_valid_plan(C, aa, bb, res)
    # the identity cost is solved at zero cost
    assert emd(1.0 - torch.eye(12, dtype=torch.float64), backend=backend).cost.item() == 0.0


@needs_pot
@pytest.mark.skipif(not has_extension(), reason="needs the compiled extension")
def test_cpu_matches_reference_many_degenerate_problems(rng):
    # uniform weights and small integer costs: almost every basis is degenerate
    C = torch.randint(0, 4, (200, 6, 12), generator=rng).double()
    fast = emd(C, backend="cpu")
    ref = emd(C[:20], backend="torch")
    assert fast.status.eq(0).all()
    torch.testing.assert_close(fast.cost[:20], ref.cost, atol=1e-12, rtol=0)
    for t in range(0, 200, 17):
        exp = ot.emd2(np.full(6, 1 / 6), np.full(12, 1 / 12), C[t].numpy())
        assert fast.cost[t].item() == pytest.approx(exp, abs=1e-12)


@needs_pot
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [(), (0,), (3,), (2, 5)])
def test_batch_shapes(backend, batch, rng):
    C = torch.rand(*batch, 4, 6, generator=rng, dtype=torch.float64)
    a = _random_weights(4, rng)
    res = emd(C, a, None, backend=backend)
    assert res.cost.shape == batch
    assert res.plan.shape == (*batch, 4, 6)
    assert res.u.shape == (*batch, 4) and res.v.shape == (*batch, 6)
    assert res.status.shape == batch and res.status.dtype == torch.int32
    flat = C.reshape(-1, 4, 6)
    for t in range(flat.shape[0]):
        exp = ot.emd2(a.numpy(), np.full(6, 1 / 6), flat[t].numpy())
        assert res.cost.reshape(-1)[t].item() == pytest.approx(exp, abs=1e-12)


@needs_pot
@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_weights_and_float32_and_strides(backend, rng):
    C = torch.rand(3, 12, 4, generator=rng, dtype=torch.float64).transpose(-1, -2)  # non-contiguous
    assert not C.is_contiguous()
    a = torch.stack([_random_weights(4, rng) for _ in range(3)])  # per-problem weights
    b = _random_weights(12, rng)  # shared
    res = emd(C, a, b, backend=backend)
    for t in range(3):
        exp = ot.emd2(a[t].numpy(), b.numpy(), C[t].contiguous().numpy())
        assert res.cost[t].item() == pytest.approx(exp, abs=1e-12)
    res32 = emd(C.float(), a.float(), b.float(), backend=backend)
    assert res32.cost.dtype == torch.float32 and res32.plan.dtype == torch.float32
    torch.testing.assert_close(res32.cost.double(), res.cost, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(backend, rng):
    M, N = 4, 7
    C = torch.rand(2, M, N, generator=rng, dtype=torch.float64, requires_grad=True)
    x = (torch.rand(M, generator=rng, dtype=torch.float64) + 0.2).requires_grad_()
    y = (torch.rand(2, N, generator=rng, dtype=torch.float64) + 0.2).requires_grad_()

    def f(C, x, y):  # weights normalised inside so finite differences stay balanced
        return emd(C, x / x.sum(), y / y.sum(-1, keepdim=True), backend=backend).cost

    assert torch.autograd.gradcheck(f, (C, x, y), eps=1e-7, atol=1e-6)
    # d cost / d C is the plan; d cost / d a is the centred dual (sums to zero)
    a = (x / x.sum()).detach().requires_grad_()
    res = emd(C, a, None, backend=backend)
    gC, ga = torch.autograd.grad(res.cost.sum(), (C, a))
    torch.testing.assert_close(gC, res.plan)
    assert abs(float(ga.sum())) < 1e-12
    exp = (res.u - res.u.mean(-1, keepdim=True)).sum(0)
    torch.testing.assert_close(ga, exp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_duals_give_valid_gradient(backend, rng):
    C = torch.rand(5, 6, generator=rng, dtype=torch.float64)
    a = torch.tensor([0.4, 0.0, 0.3, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    res = emd(C, a, None, backend=backend)
    (ga,) = torch.autograd.grad(res.cost, a)
    assert torch.isfinite(ga).all()
    # moving mass onto a zero-weight row cannot lower the cost faster than its dual says:
    # value(a + h d) >= value(a) + h <grad, d> for a balanced direction d (convexity)
    d = torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    for h in (1e-3, 1e-2):
        moved = emd(C, (a + h * d).detach(), None, backend=backend).cost.item()
        assert moved >= res.cost.item() + h * float(ga @ d) - 1e-12


@pytest.mark.skipif(not has_extension(), reason="needs the compiled extension")
def test_opcheck():
    g = torch.Generator().manual_seed(0)
    C = torch.rand(3, 4, 6, generator=g, dtype=torch.float64)
    a = torch.rand(4, generator=g, dtype=torch.float64)
    a = a / a.sum()
    for args in [
        (C, None, None, 1000, True),
        (C.requires_grad_(), a, None, 1000, True),
        (C.detach().float(), None, a.float()[:4].repeat(2)[:6] / a.float()[:4].repeat(2)[:6].sum(), 1000, True),
    ]:
        torch.library.opcheck(torch.ops.bert_emd.emd_exact.default, args)
    torch.library.opcheck(torch.ops.bert_emd.emd_exact_torch.default, (C.detach()[:1], None, None, 1000, True))


def test_torch_compile(rng):
    C = torch.rand(4, 12, generator=rng, dtype=torch.float64, requires_grad=True)

    def loss(C):
        r = emd(C)
        return r.cost * 2.0

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    out = compiled(C)
    out.backward()
    assert out.item() == pytest.approx(2 * emd(C.detach()).cost.item())
    torch.testing.assert_close(C.grad, 2 * emd(C.detach()).plan)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_iter_is_reported(backend, rng):
    # 10 x 11: a transportation problem (square uniform ones are assignment problems, solved
    # without pivots by the C++ core, so a pivot budget does not apply to them)
    C = torch.rand(3, 10, 11, generator=rng, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        res = emd(C, max_iter=0, backend=backend)
    assert res.status.eq(EMDStatus.MAX_ITER).any()
    # still a feasible plan, never a silent zero plan
    assert torch.allclose(res.plan.sum(-1), torch.full((3, 10), 0.1, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emd(C, backend=backend)


BAD_INPUTS = [
    ("NaN", lambda: (torch.tensor([[0.0, math.nan], [1.0, 0.0]]), None, None), "cost contains NaN or Inf"),
    ("Inf", lambda: (torch.tensor([[0.0, math.inf], [1.0, 0.0]]), None, None), "cost contains NaN or Inf"),
    ("negative a", lambda: (torch.rand(2, 2), torch.tensor([1.5, -0.5]), None), "a must be finite and non-negative"),
    ("NaN b", lambda: (torch.rand(2, 2), None, torch.tensor([math.nan, 1.0])), "b must be finite and non-negative"),
    ("unbalanced", lambda: (torch.rand(2, 3), torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5])),
     r"equal total mass.*sum\(a\)=1 and sum\(b\)=1.5 differ by 0.333"),
    ("zero mass", lambda: (torch.rand(2, 2), torch.zeros(2), torch.zeros(2)), "positive total mass"),
    ("1-d cost", lambda: (torch.rand(5), None, None), r"shape \[\.\.\., M, N\]"),
    ("M = 0", lambda: (torch.rand(0, 3), None, None), "M >= 1 rows and N >= 1 columns"),
    ("N = 0", lambda: (torch.rand(3, 0), None, None), "M >= 1 rows and N >= 1 columns"),
    ("int cost", lambda: (torch.ones(2, 2, dtype=torch.int64), None, None), "float32 or float64"),
    ("int a", lambda: (torch.rand(2, 2), torch.ones(2, dtype=torch.int64), None), "a must be a floating-point"),
    ("a shape", lambda: (torch.rand(2, 3), torch.full((3,), 1 / 3), None), r"a must have shape \[\.\.\., M=2\]"),
    ("b batch", lambda: (torch.rand(4, 2, 3), None, torch.full((3, 3), 1 / 3)), "does not broadcast"),
    ("device", lambda: (torch.rand(2, 2), torch.full((2,), 0.5, device="meta"), None), "same device as cost"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(backend, name, make, match):
    cost, a, b = make()
    with pytest.raises(ValueError, match=match):
        emd(cost, a, b, backend=backend)


def test_bad_input_in_batch_names_element():
    C = torch.rand(4, 2, 2)
    C[2, 0, 1] = math.nan
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="batch element 2"):
            emd(C, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_false_reports_invalid(backend):
    C = torch.rand(3, 2, 2)
    C[1, 0, 0] = math.nan
    res = emd(C, validate=False, backend=backend)
    assert res.status.tolist() == [0, EMDStatus.INVALID, 0]
    assert torch.isnan(res.plan[1]).all() and torch.isfinite(res.plan[0]).all()


def test_reference_and_op_agree_on_invalid_problems():
    # the reference defines a valid problem on its own (bert_emd.reference._problem) and the ops
    # check theirs (bert_emd.ops._validate): both must mark the same problems
    from bert_emd.ops._validate import check_emd_inputs
    from bert_emd.reference._problem import invalid_problems, problem_weights

    C = torch.rand(7, 3, 4, dtype=torch.float64)
    a = torch.full((7, 3), 1 / 3, dtype=torch.float64)
    b = torch.full((7, 4), 1 / 4, dtype=torch.float64)
    C[1, 0, 2] = math.nan
    C[2, 2, 3] = -math.inf
    a[3, 1] = -0.1
    b[4] = 0.0
    a[5] *= 1 + 1e-3  # unbalanced
    b[6, 0] += 1e-8  # within the mass tolerance: valid
    _, _, op = check_emd_inputs(C, a, b, raise_errors=False)
    ref = invalid_problems(C, *problem_weights(C, a, b))
    assert op.tolist() == ref.tolist() == [False, True, True, True, True, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_result_value_is_the_cost_field(backend, rng):
    C = torch.rand(2, 3, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    for method in ("exact", "sinkhorn"):
        res = emd(C, method=method, backend=backend)
        assert res.value is res.cost  # the preferred name, the same tensor
        assert res._fields == ("cost", "plan", "u", "v", "status")  # the tuple is unchanged
        value, plan, *_ = res
        assert value is res.value and plan is res.plan
        (g,) = torch.autograd.grad(res.value.sum(), C)
        torch.testing.assert_close(g, res.plan)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be"):
        emd(torch.rand(2, 2), method="simplex")
    with pytest.raises(ValueError, match="max_iter must be >= 0"):
        emd(torch.rand(2, 2), max_iter=-1)
    with pytest.raises(ValueError, match="backend must be"):
        emd(torch.rand(2, 2), backend="gpu")
    with pytest.raises(bert_emd.BackendError, match="cuda"):
        emd(torch.rand(2, 2), backend="cuda")
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        emd([[0.0, 1.0]])


@pytest.mark.cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    for M, N in [(1, 1), (4, 12), (6, 24), (12, 12), (64, 64)]:
        C = torch.rand(257, M, N, generator=g, dtype=torch.float64)
        C[::3] = torch.randint(0, 3, (C[::3].shape), generator=g).double()  # degenerate ones
        a = _random_weights(M, g)
        cpu = emd(C, a, None, backend="cpu")
        gpu = emd(C.cuda(), a.cuda(), None, backend="cuda")
        assert gpu.status.eq(0).all()
        torch.testing.assert_close(gpu.cost.cpu(), cpu.cost, atol=1e-12, rtol=1e-12)
        gpu32 = emd(C.float().cuda(), a.float().cuda(), None)
        torch.testing.assert_close(gpu32.cost.cpu().double(), cpu.cost, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_bad_input_and_capacity():
    C = torch.rand(2, 2, 2, device="cuda")
    C[1, 0, 0] = math.nan
    with pytest.raises(ValueError, match="batch element 1"):
        emd(C)
    big = torch.rand(200, 100, dtype=torch.float64, device="cuda")  # M + N > 256: CPU fallback
    with pytest.warns(UserWarning, match="capacity"):
        res = emd(big)
    assert res.cost.device.type == "cuda"
    assert res.cost.item() == pytest.approx(emd(big.cpu()).cost.item(), abs=1e-12)


def test_cuda_capacity_fallback_routes_to_cpu(monkeypatch, rng):
    # the routing of problems above the CUDA kernel's capacity, exercised on the CPU by
    # pretending the 'cuda' backend was selected and the capacity is small
    import bert_emd.ops.emd as emd_mod

    monkeypatch.setattr(emd_mod._backends, "select",
                        lambda op, backend, device: "cuda" if backend == "auto" else backend)
    monkeypatch.setattr(emd_mod._ext, "cuda_max_nodes", lambda: 8)
    C = torch.rand(2, 6, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="capacity"):
        res = emd(C)
    monkeypatch.undo()
    exp = emd(C.detach())
    torch.testing.assert_close(res.cost.detach(), exp.cost)
    res.cost.sum().backward()
    torch.testing.assert_close(C.grad, exp.plan)


def test_cuda_tensors_without_cuda_kernels_use_the_cpu_kernel_on_the_host(monkeypatch, rng):
    # A GPU machine whose bert_emd._C was built without nvcc: `auto` would fall to the Python
    # reference (a simplex per problem, a host read per pivot); emd copies the problems to the
    # host for the C++ kernel instead. The decision, on this machine's real build:
    from bert_emd import _backends, _ext

    want = _ext.has_extension() and not _ext.built_with_cuda()
    assert _backends.host_fallback("emd", "cuda") is want
    assert _backends.host_fallback("emd", "cpu") is False
    assert _backends.host_fallback("layer_costs", "cuda") is False  # Triton or the torch ops there
    if not _ext.has_extension():
        pytest.skip("the routing needs the C++ CPU kernel")
    # the routing, exercised on CPU tensors by pretending the device had no kernel (auto resolves
    # to the torch reference, and the host route applies)
    import bert_emd.ops.emd as emd_mod

    select = emd_mod._backends.select
    monkeypatch.setattr(emd_mod._backends, "select",
                        lambda op, backend, device: "torch" if backend == "auto" else select(op, backend, device))
    monkeypatch.setattr(emd_mod._backends, "host_fallback", lambda op, dev: op == "emd")
    C = torch.rand(3, 4, 12, generator=rng, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="no CUDA kernels"):
        res = emd(C)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emd(C.detach(), backend="cpu")  # an explicit backend is taken as asked
    monkeypatch.undo()
    exp = emd(C.detach())
    torch.testing.assert_close(res.plan, exp.plan)
    res.cost.sum().backward()
    torch.testing.assert_close(C.grad, exp.plan)


def test_invalid_status_is_raised_with_the_precise_message():
    # the CUDA kernel reports invalid input as status INVALID; the wrapper re-checks the inputs
    # on that error path to raise the same message the CPU kernel raises
    from bert_emd.ops.emd import _check_status

    C = torch.rand(3, 2, 2)
    C[2, 1, 1] = math.inf
    status = torch.tensor([0, 0, EMDStatus.INVALID], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cost contains NaN or Inf \(batch element 2\)"):
        _check_status(status, C, None, None, "max_iter")
