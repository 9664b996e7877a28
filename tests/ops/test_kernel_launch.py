"""How the Triton launchers launch (``emd_kernels._launch`` and the grids): on the inputs' device
whatever device is current, with small host tables uploaded without a host sync, with grids
that keep the large dimension (B*H, B) on axis 0 (CUDA limits axes 1 and 2 to 65535), and
layer_costs refusing sizes whose int32 in-sample indices would wrap.

The CPU tests check the helpers; the ``cuda`` tests (real Triton, skipped without a GPU; the
two-device one without two) check the launches against the CPU results.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

import bert_emd  # noqa: E402

from emd_kernels import _launch  # noqa: E402
from emd_kernels.layer_costs import _check_len  # noqa: E402


def test_on_device_is_a_no_op_off_cuda():
    assert isinstance(_launch.on_device(torch.device("cpu")), contextlib.nullcontext)


def test_upload_to_cpu_copies_values():
    t = torch.tensor([1, 2, 3], dtype=torch.int64)
    up = _launch.upload(t, torch.device("cpu"))
    assert torch.equal(up, t)


def test_launcher_runs_under_the_device_of_its_first_tensor(monkeypatch):
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(_launch, "on_device", Recorder)

    @_launch.launches_on_input_device
    def launcher(xs, flag, *, scale=1.0):
        return xs[0].sum() * scale

    x = torch.ones(3)
    assert float(launcher([x, x], True, scale=2.0)) == 6.0
    assert entered == [x.device]
    with pytest.raises(TypeError, match="no tensor"):
        launcher([], False)


def test_layer_costs_refuses_indices_that_would_wrap():
    _check_len(SimpleNamespace(len=2**31 - 1), 2**31 - 1)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        _check_len(SimpleNamespace(len=2**31), 0)
    # the last program's blocks past the end count too
    with pytest.raises(ValueError, match="2\\*\\*31"):
        _check_len(SimpleNamespace(len=2**31 - 10), 2**31 + 1000)


def _qk(B, H, L, d, layers, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, L, d, generator=g).to(device), torch.randn(B, H, L, d, generator=g).to(device))
            for _ in range(layers)]


@pytest.mark.cuda
def test_inputs_on_another_gpu_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    S, T = _qk(2, 2, 40, 16, 2, "cpu", 0), _qk(2, 2, 40, 32, 3, "cpu", 1)
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, 30:] = 0
    want = bert_emd.attention_costs(S, T, attention_mask=am, source="probs", backend="torch")
    on = lambda pairs: [(q.to(dev), k.to(dev)) for q, k in pairs]  # noqa: E731
    got = bert_emd.attention_costs(on(S), on(T), attention_mask=am.to(dev), source="probs", backend="triton")
    assert got.device == dev
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)
    xs = [torch.randn(4, 3, 50) for _ in range(3)]
    ys = [torch.randn(4, 3, 50) for _ in range(5)]
    want = bert_emd.layer_costs(xs, ys, backend="torch")
    got = bert_emd.layer_costs([x.to(dev) for x in xs], [y.to(dev) for y in ys], backend="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    cost = torch.rand(8, 4, 12, dtype=torch.float64)
    want = bert_emd.emd(cost, method="sinkhorn", backend="cpu")
    got = bert_emd.emd(cost.to(dev), method="sinkhorn", backend="triton")
    torch.testing.assert_close(got.plan.cpu(), want.plan, rtol=1e-6, atol=1e-9)
    assert torch.cuda.current_device() == 0  # the launch guard restored it


@pytest.mark.cuda
def test_grids_beyond_65535_samples():
    # B * H = 65544 attention programs along B*H; 70000 layer_costs samples (per_sample)
    S, T = _qk(5462, 12, 16, 8, 1, "cuda", 2), _qk(5462, 12, 16, 8, 2, "cuda", 3)
    want = bert_emd.attention_costs(S, T, source="probs", per_sample=True, backend="torch")
    got = bert_emd.attention_costs(S, T, source="probs", per_sample=True, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    xs = [torch.randn(70000, 8, device="cuda") for _ in range(2)]
    ys = [torch.randn(70000, 8, device="cuda") for _ in range(3)]
    want = bert_emd.layer_costs(xs, ys, per_sample=True, backend="torch")
    got = bert_emd.layer_costs(xs, ys, per_sample=True, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
