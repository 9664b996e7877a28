"""``bert_emd::cost_attention_step``: the one-op cost-attention rule against its tensor-op oracle
(``bert_emd.reference.cost_attention``), its edge cases, checks, fake kernel and dispatch."""

from __future__ import annotations

import pytest
import torch
from bert_emd import _backends, _ext
from bert_emd.ops.cost_attention import cost_attention_step
from bert_emd.reference.cost_attention import cost_attention_step_reference

RULES = ("sum", "softmax", "double_softmax")
needs_kernel = pytest.mark.skipif(
    not _ext.has_extension() or _backends.unavailable_reason("cost_attention", "cpu", "cpu") is not None,
    reason="bert_emd._C without the cost_attention_step kernel")


def _problem(F, B, M, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    plan = torch.rand(F * B, M, N, generator=g, dtype=dtype)
    plan = plan / plan.sum((-2, -1), keepdim=True)
    cost = torch.rand(F * B, M, N, generator=g, dtype=dtype)
    ws = torch.softmax(torch.randn(M, generator=g, dtype=torch.float64), 0)
    wt = torch.softmax(torch.randn(N, generator=g, dtype=torch.float64), 0)
    return plan, cost, ws, wt


def _both(plan, cost, ws, wt, F, normalize, temperature=1.0, eps=1e-6):
    got = cost_attention_step(plan, cost, ws, wt, features=F, normalize=normalize, temperature=temperature,
                              eps=eps, backend="cpu")
    want = cost_attention_step_reference(plan, cost, ws, wt, F, normalize, temperature, eps)
    return got, want


@needs_kernel
@pytest.mark.parametrize("normalize", RULES)
@pytest.mark.parametrize("shape", [(1, 1, 4, 12), (2, 1, 5, 13), (2, 3, 4, 6), (1, 8, 6, 12), (3, 2, 1, 7)])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_kernel_equals_reference(normalize, shape, temperature):
    F, B, M, N = shape
    plan, cost, ws, wt = _problem(*shape, seed=hash(shape) % 1000)
    (s, t), (rs, rt) = _both(plan, cost, ws, wt, F, normalize, temperature)
    assert s.dtype == t.dtype == torch.float64 and s.shape == (M,) and t.shape == (N,)
    torch.testing.assert_close(s, rs, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(t, rt, rtol=1e-12, atol=1e-15)
    assert abs(float(s.sum()) - 1) < 1e-12 and abs(float(t.sum()) - 1) < 1e-12


@needs_kernel
def test_mixed_dtypes_and_strides():
    """A float32 flow with a float64 cost, non-contiguous inputs, float32 weights: as the oracle."""
    plan, cost, ws, wt = _problem(2, 1, 4, 6, dtype=torch.float64)
    plan32 = plan.float().transpose(-2, -1).contiguous().transpose(-2, -1)  # non-contiguous
    (s, t), (rs, rt) = _both(plan32, cost, ws.float(), wt.float(), 2, "double_softmax")
    torch.testing.assert_close(s, rs, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(t, rt, rtol=1e-12, atol=1e-15)


@needs_kernel
@pytest.mark.parametrize("normalize", RULES)
@pytest.mark.parametrize("case", ["zero_row", "zero_column", "all_zero", "tiny", "huge", "nan", "inf"])
def test_edge_costs_match_reference(normalize, case):
    """Zero-cost layers (w_hat = 0), all-zero costs (uniform), extreme scales (capped w_hat) and
    non-finite costs (the old weights kept), identical in the kernel and the oracle."""
    plan, cost, ws, wt = _problem(2, 2, 4, 6, dtype=torch.float64)
    if case == "zero_row":
        cost[:, 1] = 0
    elif case == "zero_column":
        cost[..., 2] = 0
    elif case == "all_zero":
        cost.zero_()
    elif case == "tiny":
        cost *= 1e-300
    elif case == "huge":
        cost *= 1e300
    elif case == "nan":
        cost[3, 0, 0] = float("nan")
    else:
        cost[0, 2, 1] = float("inf")
    (s, t), (rs, rt) = _both(plan, cost, ws, wt, 2, normalize, 0.5)
    torch.testing.assert_close(s, rs, rtol=1e-12, atol=1e-15, equal_nan=False)
    torch.testing.assert_close(t, rt, rtol=1e-12, atol=1e-15)
    if case in ("nan", "inf"):
        assert torch.equal(s, ws) and torch.equal(t, wt)  # a non-finite step keeps the weights
    else:
        assert torch.isfinite(s).all() and float(s.min()) >= 1e-6 * 0.999


@needs_kernel
def test_checks_name_the_argument():
    plan, cost, ws, wt = _problem(2, 1, 4, 6)
    with pytest.raises(ValueError, match="same shape"):
        cost_attention_step(plan, cost[..., :5], ws, wt, features=2, backend="cpu")
    with pytest.raises(ValueError, match=r"student_weight must be \[M=4\]"):
        cost_attention_step(plan, cost, ws[:3], wt, features=2, backend="cpu")
    with pytest.raises(ValueError, match="features must be >= 1 and divide"):
        cost_attention_step(plan, cost, ws, wt, features=3, backend="cpu")
    with pytest.raises(ValueError, match="normalize must be one of"):
        cost_attention_step(plan, cost, ws, wt, normalize="max")
    with pytest.raises(ValueError, match="temperature and eps must be > 0"):
        cost_attention_step(plan, cost, ws, wt, features=2, temperature=0.0, backend="cpu")


def test_reference_backend_and_auto():
    """``backend="torch"`` is the oracle itself; ``auto`` picks the kernel where it is built."""
    plan, cost, ws, wt = _problem(1, 1, 3, 5)
    s, t = cost_attention_step(plan, cost, ws, wt, backend="torch")
    rs, rt = cost_attention_step_reference(plan, cost, ws, wt, 1, "double_softmax", 1.0, 1e-6)
    assert torch.equal(s, rs) and torch.equal(t, rt)
    expected = "cpu" if _backends.unavailable_reason("cost_attention", "cpu", "cpu") is None else "torch"
    assert _backends.select("cost_attention", "auto", torch.device("cpu")) == expected


@needs_kernel
def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        plan, cost = torch.empty(4, 5, 7), torch.empty(4, 5, 7)
        s, t = torch.ops.bert_emd.cost_attention_step(plan, cost, torch.empty(5), torch.empty(7, dtype=torch.float64),
                                                      2, 2, 1.0, 1e-6)
        assert s.shape == (5,) and t.shape == (7,) and s.dtype == t.dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.parametrize("normalize", RULES)
def test_cuda_kernel_equals_reference(normalize):
    """The one-thread CUDA kernel: the same core as the CPU kernel, checked on a GPU, without a
    host sync."""
    if _backends.unavailable_reason("cost_attention", "cuda", "cuda") is not None:
        pytest.skip("bert_emd._C without the CUDA cost_attention_step kernel")
    plan, cost, ws, wt = (x.cuda() for x in _problem(2, 3, 5, 13))
    cost_attention_step(plan, cost, ws, wt, features=2, normalize=normalize, backend="cuda")  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        s, t = cost_attention_step(plan, cost, ws, wt, features=2, normalize=normalize, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    rs, rt = cost_attention_step_reference(plan.cpu(), cost.cpu(), ws.cpu(), wt.cpu(), 2, normalize, 1.0, 1e-6)
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(t.cpu(), rt, rtol=1e-12, atol=1e-15)
