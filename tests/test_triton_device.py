"""The three Triton ops on the device against the pure-PyTorch references, in one compact module.

``scripts/gpu_check.sh`` runs it on a lent GPU (``TRITON_INTERPRET=0``, ``pytest -m cuda``): the
``cuda`` param is the only check of ``attention_costs``, ``layer_costs`` and
``emd(method="sinkhorn")`` with ``backend="triton"`` on CUDA tensors with real Triton (the other
Triton tests run the interpreter on CPU tensors, with forced small blocks). The ``cpu`` param runs
the same tests through the interpreter (``TRITON_INTERPRET=1``, as tests/conftest.py sets), so
that the test logic itself is exercised in CI; sizes are small for it (the whole ``cpu`` part runs
in about 40 s on two cores).

Every test builds its inputs on the CPU from a fixed seed, moves them to the device, runs the op
with ``backend="triton"`` and compares the values and the gradients (``torch.autograd.grad``)
with the reference (``backend="torch"`` for the costs, the cpu backend for Sinkhorn) computed on
the CPU in float64 from the same (rounded) inputs. Launch sizes are the launchers' defaults for
the device (on a GPU: 16/32-wide attention blocks, so L = 37 and 64 cross several query and key
blocks with a ragged tail; several layer_costs programs per sample), except where noted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it first; kept for a lone run

import bert_emd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from bert_emd import _ext  # noqa: E402

pytest.importorskip("triton")

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

DEVICES = [
    # the interpreter's run of the GPU tests checks the tests themselves (the ops' interpreter paths
    # are tested in tests/ops): slow
    pytest.param("cpu", marks=[pytest.mark.skipif(not _INTERPRET, reason="the cpu param needs TRITON_INTERPRET=1"),
                               pytest.mark.slow]),
    pytest.param("cuda", marks=pytest.mark.cuda),  # skipped by conftest.py without a GPU
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    # Checked when a test runs, never at import (no CUDA query then): the cuda param is meant
    # for real Triton; under the interpreter it would run CUDA tensors through numpy (slowly, and
    # bf16 dots are only widened for CPU tensors there).
    if request.param == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("real Triton only: run with TRITON_INTERPRET=0 (scripts/gpu_check.sh)")
    return torch.device(request.param)


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest deviation relative to the largest reference magnitude (float64, on the CPU)."""
    got = got.detach().cpu().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def _masks(B: int, L: int, kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(attention_mask, token mask) [B, L] bool on the CPU: "none"; "right" (right padding,
    lengths L - 5 and L // 2 + 1, the rest full); "holes" (right padding + padded keys inside the
    sequence, a token mask dropping one more real token); "empty" (right padding and a last sample
    without a real token, in both masks)."""
    if kind == "none":
        return None, None
    am = torch.ones(B, L, dtype=torch.bool)
    am[0, L - 5:] = False
    am[1, L // 2 + 1:] = False
    tm = None
    if kind == "holes":
        am[0, [3, 10]] = False
        am[-1, 1] = False
        tm = am.clone()
        tm[-1, 0] = False
    elif kind == "empty":
        am[-1] = False
        tm = am.clone()
    return am, tm


# ---------------------------------------------------------------------------- attention_costs
# Tolerances of the fused attention costs against the float64 reference of the same inputs
# (scores are formed in float32 from Q and K of any dtype, the scale applied after the dot):
#   float32: values 1e-4 relative per entry (GPU exp/log are approximate, the sums run in another
#            order), gradients 1e-4 of the largest reference entry.
#   bfloat16: the reference sees the same rounded inputs and the products of the tensor-core dot
#            are exact, so the values stay near float32 accuracy (2e-4: room for the MMA's
#            accumulation); the gradient's dS is rounded to bf16 before its dot (as flash
#            attention) and the gradients are stored in bf16: 2e-2 of the largest entry.
# A case can be ill-conditioned in the input dtype itself: scores of padded keys without a floor
# are x - 10000, rounded to float32 (ulp 1e-3), and their gradient sum_j G_ij (f(S_i) - f(T_j))
# cancels the -10000s: every backend in float32 (the torch reference too) is 1-3e-4 off float64
# there. The gradient bound is therefore the larger of the dtype's and 2x the error of the torch
# reference run on the CPU in the input dtype (its own error shows the case's conditioning).
ATT_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-4, 2e-2)}

# (name, source, floor, masks, per_sample, L, M, N, dtype, per-head views, teacher grad)
# d_head: student 26 (TinyBERT-4), teacher 64 (BERT-base); H = 2, B = 3.
ATT_CASES = [
    ("scores_original", "scores", -100.0, "right", True, 37, 4, 6, torch.float32, True, False),
    ("scores_holes_tokmask", "scores", -100.0, "holes", False, 64, 2, 3, torch.float32, False, True),
    ("scores_plain_bf16", "scores", None, "none", True, 64, 3, 4, torch.bfloat16, True, False),
    ("scores_empty_sample", "scores", -100.0, "empty", True, 37, 2, 3, torch.float32, True, False),
    # no floor: padded keys stay live, their scores x - 10000 carry float32 rounding (4e-6 relative
    # on the costs, 1-3e-4 on the gradients here, alike in every backend: see above)
    ("scores_right_nofloor", "scores", None, "right", False, 64, 2, 3, torch.float32, False, False),
    ("probs_plain", "probs", None, "none", False, 37, 4, 6, torch.float32, False, False),
    ("probs_right", "probs", None, "right", True, 64, 3, 4, torch.float32, True, True),
    ("probs_holes_bf16", "probs", None, "holes", False, 37, 2, 3, torch.bfloat16, True, False),
    ("probs_empty_sample", "probs", None, "empty", True, 64, 2, 3, torch.float32, False, False),
]


def _qk_side(gen, n, B, H, L, d, dtype, device, views):
    """n (query, key) pairs [B, H, L, d] on ``device``: per-head views [B, L, H, d] -> [B, H, L, d]
    of [B, L, H*d] projection outputs (non-contiguous, read in place), or contiguous tensors."""
    def one():
        if views:
            x = torch.randn(B, L, H * d, generator=gen, dtype=torch.float64).to(dtype).to(device)
            t = x.view(B, L, H, d).transpose(1, 2)
            assert not t.is_contiguous()
            return t
        return torch.randn(B, H, L, d, generator=gen, dtype=torch.float64).to(dtype).to(device)

    return [(one(), one()) for _ in range(n)]


@pytest.mark.parametrize("case", ATT_CASES, ids=[c[0] for c in ATT_CASES])
def test_attention_costs(device, case):
    name, source, floor, masks, per_sample, L, M, N, dtype, views, teacher_grad = case
    gen = torch.Generator().manual_seed(1000 + ATT_CASES.index(case))
    B, H = 3, 2
    S = _qk_side(gen, M, B, H, L, 26, dtype, device, views)
    T = _qk_side(gen, N, B, H, L, 64, dtype, device, views)
    am, tm = _masks(B, L, masks)
    kw = dict(source=source, attention_floor=floor, per_sample=per_sample, mask_value=-10000.0)
    leaves = [x.requires_grad_() for pair in S + (T if teacher_grad else []) for x in pair]
    D = bert_emd.attention_costs(S, T, attention_mask=None if am is None else am.to(device),
                                 mask=None if tm is None else tm.to(device), backend="triton", **kw)
    assert D.device.type == device.type and D.dtype == torch.float32
    assert D.shape == ((B, M, N) if per_sample else (M, N))

    def cpu64(pairs, grad):
        return [tuple(x.detach().cpu().double().requires_grad_(grad) for x in pair) for pair in pairs]

    S64, T64 = cpu64(S, True), cpu64(T, teacher_grad)
    ref = bert_emd.attention_costs(S64, T64, attention_mask=am, mask=tm, backend="torch", **kw)
    if masks == "empty":  # a sample without real tokens: NaN per sample (documented), the rest finite
        assert ref[-1].isnan().all() and D[-1].isnan().all()
        assert not ref[:-1].isnan().any() and not D[:-1].isnan().any()
    else:
        assert not ref.isnan().any()
    vtol, gtol = ATT_TOL[dtype]
    torch.testing.assert_close(D.cpu().double(), ref, rtol=vtol, atol=0, equal_nan=True)

    G = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    # nan_to_num: the NaN sample gets no gradient (its G is dropped), as in training code
    got = torch.autograd.grad((D.nan_to_num() * G.float().to(device)).sum(), leaves)
    ref_leaves = [x for pair in S64 + (T64 if teacher_grad else []) for x in pair]
    want = torch.autograd.grad((ref.nan_to_num() * G).sum(), ref_leaves)
    Sb, Tb = [[tuple(x.detach().cpu().requires_grad_() for x in p) for p in side] for side in (S, T)]
    Db = bert_emd.attention_costs(Sb, Tb, attention_mask=am, mask=tm, backend="torch", **kw)
    base = torch.autograd.grad((Db.nan_to_num() * G.to(Db.dtype)).sum(),
                               [x for pair in Sb + (Tb if teacher_grad else []) for x in pair])
    for k, (g, w, b, x) in enumerate(zip(got, want, base, leaves)):
        assert g.dtype == dtype and g.device == x.device and g.shape == x.shape
        err, base_err = _max_rel(g, w), _max_rel(b, w)
        assert err <= max(gtol, 2 * base_err), (
            f"gradient {k} ({name}): max error {err:.2e} of the largest entry > {gtol:g} and > 2x the "
            f"{dtype} torch reference's {base_err:.2e}")
        if masks == "empty":  # no gradient reaches the sample without real tokens
            assert g[-1].abs().max() == 0


# -------------------------------------------------------------------------------- layer_costs
# Tolerances of layer_costs against the float64 reference of the same (rounded) inputs: every
# dtype is widened to float32 before differencing, so the values of all dtypes stay within float32
# accuracy of the sums (1e-5 relative per entry). The gradients are stored in the input dtype:
# float32 1e-5, float16 2e-3 (2**-11 rounding), bfloat16 1e-2 (2**-8 rounding) of the largest entry.
LC_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-5, 1e-2)}

# (name, kind, shape, mask, floor, per_sample, dtype, non-contiguous student, teacher)
LC_CASES = [
    ("hidden_mask", "hidden", (3, 37, 52), True, None, True, torch.float32, True, False),
    ("hidden_bf16", "hidden", (3, 37, 52), False, None, False, torch.bfloat16, False, True),
    ("scores_original", "scores", (3, 2, 37, 37), True, -100.0, True, torch.float32, False, True),
    ("attn_floor_fp16", "attn", (2, 3, 29, 29), False, 0.1, False, torch.float16, True, True),
    ("attn_mask_bf16", "attn", (2, 2, 64, 64), True, -0.2, False, torch.bfloat16, True, False),
]


def _lc_layers(gen, k, kind, shape, mask, dtype, device, strided):
    """k layers on ``device``: hidden states [B, L, D], attention maps [B, H, L, L] ("attn"), or
    pre-softmax scores carrying the -10000 additive padding mask ("scores"); ``strided``: read
    through transposed strides (last two dims swapped in memory)."""
    out = []
    for _ in range(k):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if kind == "scores":
            x = 3 * x + torch.where(mask[:, None, None, :], 0.0, -10000.0)
        x = x.to(dtype)
        x = x.transpose(-1, -2).contiguous().to(device).transpose(-1, -2) if strided else x.to(device)
        assert x.is_contiguous() != strided
        out.append(x)
    return out


def _layer_costs_check(device, S, T, mask, per_sample, floor, dtype, gen, **launch):
    """layer_costs with backend="triton" (or, with ``launch`` knobs, the launchers directly) against
    the float64 reference: values and both sides' gradients."""
    S = [s.requires_grad_() for s in S]
    T = [t.requires_grad_() for t in T]
    m = None if mask is None else mask.to(device)
    if launch:
        from emd_kernels.layer_costs import layer_costs_bwd, layer_costs_fwd

        D = layer_costs_fwd(S, T, m, per_sample, floor, **launch)
    else:
        D = bert_emd.layer_costs(S, T, mask=m, per_sample=per_sample, attention_floor=floor, backend="triton")
    assert D.device.type == device.type and D.dtype == torch.float32
    S64 = [s.detach().cpu().double().requires_grad_() for s in S]
    T64 = [t.detach().cpu().double().requires_grad_() for t in T]
    ref = bert_emd.layer_costs(S64, T64, mask=mask, per_sample=per_sample, attention_floor=floor, backend="torch")
    vtol, gtol = LC_TOL[dtype]
    torch.testing.assert_close(D.cpu().double(), ref, rtol=vtol, atol=0)
    G = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    if launch:
        gs, gt = layer_costs_bwd(G.float().to(device), S, T, m, per_sample, floor, True, block=launch.get("block"))
        got = gs + gt
    else:
        got = torch.autograd.grad((D * G.float().to(device)).sum(), S + T)
    want = torch.autograd.grad((ref * G).sum(), S64 + T64)
    for k, (g, w, x) in enumerate(zip(got, want, S + T)):
        assert g.dtype == dtype and g.device == x.device and g.shape == x.shape
        err = _max_rel(g, w)
        assert err <= gtol, f"gradient {k}: max error {err:.2e} of the largest entry > {gtol:g}"


@pytest.mark.parametrize("case", LC_CASES, ids=[c[0] for c in LC_CASES])
def test_layer_costs(device, case):
    _, kind, shape, use_mask, floor, per_sample, dtype, nc_s, nc_t = case
    gen = torch.Generator().manual_seed(2000 + LC_CASES.index(case))
    B, L = shape[0], shape[-2]
    mask = None
    if use_mask:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[0, L - 7:] = False
        mask[1, [2, 5]] = False  # holes
        mask[-1, L // 2:] = False
    S = _lc_layers(gen, 4, kind, shape, mask, dtype, device, nc_s)
    T = _lc_layers(gen, 6, kind, shape, mask, dtype, device, nc_t)
    _layer_costs_check(device, S, T, mask, per_sample, floor, dtype, gen)


@pytest.mark.parametrize("launch", ["default", "block32_iters3"])
def test_layer_costs_several_programs_per_sample(device, launch):
    """Many elements per sample. "default": the public op at its launch sizes; on a 132-SM GPU
    (H100 / H200) 256-element blocks, 290 programs per sample of 2 blocks each (the last one's
    second block lies past the end); under the interpreter 8192-element blocks, 19 programs per
    sample. "block32_iters3": the launchers with forced 32-element blocks, 3 per forward program,
    on a ragged size (the knobs of the interpreter tests), on the device's real Triton."""
    gen = torch.Generator().manual_seed(3000)
    B, L, D = (4, 148, 1000) if launch == "default" else (2, 37, 13)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, L - 9:] = False
    S = _lc_layers(gen, 4, "hidden", (B, L, D), mask, torch.float32, device, False)
    T = _lc_layers(gen, 6, "hidden", (B, L, D), mask, torch.float32, device, False)
    knobs = {} if launch == "default" else {"block": 32, "iters": 3}
    _layer_costs_check(device, S, T, mask, False, None, torch.float32, gen, **knobs)
    if launch != "default":
        _layer_costs_check(device, S, T, mask, True, 0.3, torch.float32, gen, **knobs)


# ----------------------------------------------------------------------------------- sinkhorn
# (batch shape, M, N): batched problems with uneven weights a and b (b rescaled to a's mass).
SK_CASES = [((6,), 4, 12), ((2, 3), 6, 24)]


def _weights(gen, *shape):
    w = torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.05
    return w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", SK_CASES, ids=[f"{c[1]}x{c[2]}" for c in SK_CASES])
def test_sinkhorn(device, case, dtype):
    """emd(method="sinkhorn", backend="triton") against the cpu backend (the torch one without
    the extension). Both iterate in float64 whatever the input dtype and stop each problem on its
    own marginal error, so they agree to the tolerance reached (float32 outputs: to float32
    rounding); the gradients are the envelope ones (plan, centred duals)."""
    batch, M, N = case
    gen = torch.Generator().manual_seed(4000 + 10 * SK_CASES.index(case) + (dtype == torch.float32))
    C = (torch.rand(*batch, M, N, generator=gen, dtype=torch.float64) * 2).to(dtype)
    a, b = _weights(gen, *batch, M).to(dtype), _weights(gen, *batch, N).to(dtype)
    kw = dict(method="sinkhorn", reg=0.1, max_iter=5000, tol=1e-11)
    ref_backend = "cpu" if _ext.has_extension() else "torch"
    Cr, ar, br = (x.clone().requires_grad_() for x in (C, a, b))
    ref = bert_emd.emd(Cr, ar, br, backend=ref_backend, **kw)
    Cd, ad, bd = (x.to(device).requires_grad_() for x in (C, a, b))
    res = bert_emd.emd(Cd, ad, bd, backend="triton", **kw)
    assert (ref.status == 0).all() and torch.equal(res.status.cpu(), ref.status), (res.status, ref.status)
    rtol, atol = (1e-8, 1e-11) if dtype == torch.float64 else (2e-6, 1e-9)
    for what in ("cost", "plan", "u", "v"):
        got, want = getattr(res, what), getattr(ref, what)
        assert got.dtype == dtype and got.device.type == device.type and got.shape == want.shape, what
        torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol, msg=lambda m, w=what: f"{w}: {m}")
    w = torch.rand(batch, generator=gen, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad((res.cost * w.to(device)).sum(), (Cd, ad, bd))
    want = torch.autograd.grad((ref.cost * w).sum(), (Cr, ar, br))
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu(), r, rtol=rtol, atol=atol)
