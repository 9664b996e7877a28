"""CostAttention: the three weight rules, the eps floor, state_dict, long-run stability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _original_bert_emd import OriginalBertEMD, softmax
from bert_emd import emd
from bert_emd.nn import CostAttention

RULES = ("sum", "softmax", "double_softmax")


def original_update(plan, cost, ws, wt, normalize, t_emd, eps=1e-6):
    """One separate-mode update of the original (transcription), on the padded problem, then
    the eps floor (the one documented departure: softmax of a large w_hat underflows to ~0)."""
    m, n = plan.shape
    o = OriginalBertEMD(m, n, T_emd=t_emd, normalize=normalize, seperate=True)
    o.att_student_weight, o.att_teacher_weight = ws.copy(), wt.copy()
    big_f = np.zeros((m + n, m + n))
    big_f[:m, m:] = plan
    big_d = torch.zeros(m + n, m + n, dtype=torch.float64)
    big_d[:m, m:] = torch.as_tensor(cost)
    big_d[m:, :m] = torch.as_tensor(cost).T
    o.get_new_layer_weight(big_f, big_d, m, n, T=t_emd)
    s, t = o.att_student_weight, o.att_teacher_weight
    if normalize == "double_softmax":
        s, t = softmax(s), softmax(t)
    s, t = np.maximum(s, eps), np.maximum(t, eps)
    return s / s.sum(), t / t.sum()


def test_starts_uniform_and_is_saved():
    ca = CostAttention(4, 12)
    torch.testing.assert_close(ca.student_weight, torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(ca.teacher_weight, torch.full((12,), 1 / 12, dtype=torch.float64))
    assert set(ca.state_dict()) == {"student_weight", "teacher_weight"}
    cost = torch.rand(4, 12)
    ca.update(emd(cost, ca.student_weight.float(), ca.teacher_weight.float()).plan, cost)
    fresh = CostAttention(4, 12)
    fresh.load_state_dict(ca.state_dict())
    assert torch.equal(fresh.student_weight, ca.student_weight)
    ca.reset()
    assert torch.equal(ca.student_weight, torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("normalize", RULES)
@pytest.mark.parametrize("t_emd", [1.0, 5.0])
def test_rules_equal_original(normalize, t_emd):
    rng = np.random.default_rng(0)
    ca = CostAttention(3, 5, normalize=normalize, temperature=t_emd)
    ws, wt = ca.student_weight.numpy().copy(), ca.teacher_weight.numpy().copy()
    for _ in range(5):
        cost = torch.as_tensor(rng.random((3, 5)))
        plan = emd(cost, ca.student_weight, ca.teacher_weight).plan
        ref_s, ref_t = original_update(plan.numpy(), cost.numpy(), ws, wt, normalize, t_emd)
        s, t = ca.update(plan, cost)
        torch.testing.assert_close(s, torch.as_tensor(ref_s), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(t, torch.as_tensor(ref_t), atol=1e-12, rtol=1e-12)
        ws, wt = ref_s, ref_t
    assert not np.allclose(ws, 1 / 3)


def test_low_cost_layer_gains_weight():
    ca = CostAttention(2, 2, normalize="sum")
    cost = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    # optimal plan: the anti-diagonal; row 0 carries cost 1, row 1 cost 2; column 1 carries 1
    s, t = ca.update(emd(cost).plan, cost)
    torch.testing.assert_close(s, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(t, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))


def test_batched_plan_uses_batch_mean_contribution():
    cost = torch.rand(6, 3, 4, dtype=torch.float64)
    plan = emd(cost).plan
    a, b = CostAttention(3, 4, normalize="softmax"), CostAttention(3, 4, normalize="softmax")
    a.update(plan, cost)
    cs, ct = CostAttention.contributions(plan, cost)
    torch.testing.assert_close(cs, (plan * cost).sum(-1).mean(0))
    b.finalize(*b.propose(cs, ct))
    # (the one-op rule sums in its own order: equal to rounding)
    torch.testing.assert_close(a.student_weight, b.student_weight, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(a.teacher_weight, b.teacher_weight, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("normalize", RULES)
def test_zero_cost_layers_never_nan(normalize):
    """10,000 updates with zero-cost rows/columns (and all-zero, tiny and huge costs)."""
    g = torch.Generator().manual_seed(0)
    m, n = 4, 6
    ca = CostAttention(m, n, normalize=normalize, temperature=0.5)
    for step in range(10_000):
        kind = step % 5
        cost = torch.rand(m, n, generator=g, dtype=torch.float64)
        if kind == 0:
            cost[step % m] = 0.0
        elif kind == 1:
            cost[:, step % n] = 0.0
        elif kind == 2:
            cost.zero_()
        elif kind == 3:
            cost = cost * (1e-30 if step % 2 else 1e30)
        # A feasible plan for the current weights (the rule needs no optimality).
        plan = ca.student_weight[:, None] * ca.teacher_weight[None, :]
        s, t = ca.update(plan, cost)
        for w in (s, t):
            assert torch.isfinite(w).all(), step
            assert (w >= ca.eps * 0.999).all(), step
            assert abs(float(w.sum()) - 1.0) < 1e-12, step
    # and the exact solver accepts whatever weights the rule produced
    cost = torch.rand(m, n, generator=g, dtype=torch.float64)
    res = emd(cost, ca.student_weight, ca.teacher_weight)
    assert torch.isfinite(res.cost)


def test_sum_rule_zero_cost_layer_is_floored_not_nan():
    # Row 0 costs nothing: the original leaves w_hat = 0 and its next r = 0/0 is NaN.
    ca = CostAttention(2, 3, normalize="sum", eps=1e-6)
    cost = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    for _ in range(3):
        s, _ = ca.update(emd(cost, ca.student_weight, ca.teacher_weight).plan, cost)
        assert torch.isfinite(s).all() and float(s.min()) >= 1e-6 * 0.999


@pytest.mark.parametrize("normalize", RULES)
def test_non_finite_cost_keeps_previous_weights(normalize):
    ca = CostAttention(2, 3, normalize=normalize)
    cost = torch.rand(2, 3, dtype=torch.float64)
    s0, t0 = (w.clone() for w in ca.update(emd(cost).plan, cost))
    bad = cost.clone()
    bad[0, 1] = float("nan")
    s, t = ca.update(emd(cost, ca.student_weight, ca.teacher_weight).plan, bad)
    assert torch.equal(s, s0) and torch.equal(t, t0)


def test_validation():
    with pytest.raises(ValueError, match="normalize"):
        CostAttention(2, 3, normalize="max")
    with pytest.raises(ValueError, match="temperature"):
        CostAttention(2, 3, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        CostAttention(2, 3).update(torch.rand(2, 3), torch.rand(3, 2))
    with pytest.raises(ValueError, match="one cost per plan"):
        CostAttention(2, 3).step([torch.rand(2, 3)], [])
    with pytest.raises(ValueError, match="one shape"):
        CostAttention(2, 3).step([torch.rand(2, 3), torch.rand(4, 2, 3)], [torch.rand(2, 3), torch.rand(4, 2, 3)])


@pytest.mark.parametrize("normalize", RULES)
def test_step_of_two_features_is_the_shared_rule(normalize):
    """step() (one op) equals the rule written out: both features propose from the same weights,
    the proposals are averaged, then the outer step (the shared-weights update)."""
    g = torch.Generator().manual_seed(3)
    plans = [torch.rand(4, 12, generator=g) for _ in range(2)]
    costs = [torch.rand(4, 12, generator=g) for _ in range(2)]
    a, b = CostAttention(4, 12, normalize=normalize), CostAttention(4, 12, normalize=normalize)
    for _ in range(3):
        a.step(plans, costs)
        cs = [CostAttention.contributions(p, c) for p, c in zip(plans, costs)]
        ps, pt = b.propose(torch.stack([c[0] for c in cs]), torch.stack([c[1] for c in cs]))
        b.finalize(ps.mean(0), pt.mean(0))
        torch.testing.assert_close(a.student_weight, b.student_weight, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(a.teacher_weight, b.teacher_weight, rtol=1e-12, atol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_cuda_update_without_host_sync():
    ca = CostAttention(4, 12).cuda()
    cost = torch.rand(4, 12, device="cuda")
    plan = torch.rand(4, 12, device="cuda")
    ca.update(plan, cost)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        ca.update(plan, cost)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ca.student_weight.is_cuda
