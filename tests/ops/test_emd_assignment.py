"""Square problems with uniform weights (assignment problems) take the assignment solver of the
C++ core: same outputs and guarantees as the general solver, checked against scipy's
``linear_sum_assignment`` and against the general path on the same costs."""

from __future__ import annotations

import bert_emd
import pytest
import torch

scipy_opt = pytest.importorskip("scipy.optimize")


@pytest.mark.parametrize("n", [2, 3, 12, 33, 64])
@pytest.mark.parametrize("ties", [False, True])
def test_square_uniform_matches_scipy_and_the_general_path(n, ties, rng):
    B = 16
    C = torch.rand(B, n, n, generator=rng, dtype=torch.float64)
    if ties:
        C = (C * 3).floor()
    res = bert_emd.emd(C, backend="cpu")
    assert (res.status == 0).all()
    for t in range(B):
        r, c = scipy_opt.linear_sum_assignment(C[t].numpy())
        assert float(res.cost[t]) == pytest.approx(float(C[t].numpy()[r, c].sum()) / n, abs=1e-12)
    # a permutation matrix / n: the marginals hold exactly, a vertex with n non-zeros
    torch.testing.assert_close(res.plan.sum(-1), torch.full((B, n), 1 / n, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(res.plan.sum(-2), torch.full((B, n), 1 / n, dtype=torch.float64), rtol=0, atol=1e-15)
    assert ((res.plan > 0).sum((-2, -1)) == n).all()
    # duals: feasible, tight on the plan, centred as the general path centres them
    slack = C - res.u[..., :, None] - res.v[..., None, :]
    assert slack.min() >= -1e-12
    assert (slack[res.plan > 0].abs() <= 1e-12).all()
    torch.testing.assert_close((res.u / n).sum(-1), (res.v / n).sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.cost, (res.u / n).sum(-1) + (res.v / n).sum(-1), rtol=0, atol=1e-12)
    # the general path (weights one ulp away from uniform) reaches the same value
    a = torch.full((B, n), 1 / n, dtype=torch.float64)
    a[:, 0] = torch.nextafter(a[:, 0], torch.tensor(1.0, dtype=torch.float64))
    a[:, 1] = torch.nextafter(a[:, 1], torch.tensor(0.0, dtype=torch.float64))
    general = bert_emd.emd(C, a, backend="cpu")
    torch.testing.assert_close(res.cost, general.cost, rtol=0, atol=1e-12)


def test_square_uniform_gradients(rng):
    C = torch.rand(4, 6, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    a = torch.full((4, 6), 1 / 6, dtype=torch.float64, requires_grad=True)
    res = bert_emd.emd(C, a, backend="cpu")
    res.cost.sum().backward()
    torch.testing.assert_close(C.grad, res.plan, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, res.u - res.u.mean(-1, keepdim=True), rtol=0, atol=1e-15)
