"""bert_emd.layer_costs: every backend against the float64 reference (forward, fused backward,
gradcheck, opcheck), masks / floor / strides / dtypes / odd and empty shapes, numerics and
validation. Triton runs on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py): sizes stay
small there (about 1 ms per program instance)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it first; kept for a lone run

import bert_emd._ext as _ext  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from bert_emd._backends import BackendError  # noqa: E402
from bert_emd.ops.layer_costs import _OPS, layer_costs  # noqa: E402
from bert_emd.reference.layer_costs import (  # noqa: E402
    layer_costs_grad,
    layer_costs_loop,
    layer_costs_original,
    layer_costs_vectorized,
)
from helpers import (
    RecordOpArgs,  # noqa: E402
    assert_close,  # noqa: E402
)

BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _ext.has_extension(), reason="bert_emd._C not built")),
    "torch",
    "triton",
]
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]  # big shapes: not through the interpreter


def _layers(gen, k, shape, dtype=torch.float64, scale=1.0):
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype) for _ in range(k)]


def _mask(gen, B, L, p=0.35):
    m = torch.rand(B, L, generator=gen) > p
    m[:, 0] = True  # every sample keeps a real token ([CLS]); empty samples are tested apart
    return m


def _ref(S, T, mask=None, per_sample=False, floor=None):
    return layer_costs_loop([s.double() for s in S], [t.double() for t in T], mask, per_sample, floor)


# Small cases: (name, layer shape, mask kind, floor, non-contiguous student, non-contiguous teacher)
CASES = [
    ("hidden", (3, 7, 5), None, None, False, False),
    ("hidden_mask", (3, 7, 5), "mask", None, False, False),
    ("hidden_mask_int", (2, 9, 3), "int", None, True, False),
    ("attn_mask_floor", (2, 3, 5, 5), "mask", 0.3, False, True),
    ("attn_floor", (2, 2, 6, 6), None, -0.2, True, True),
    ("attn_floor_inplace", (3, 2, 7, 7), None, 0.1, False, False),
    ("tokens_mask", (4, 11), "float", None, False, False),
    ("five_dims", (2, 3, 2, 3, 2), None, None, True, False),
    ("batch1", (1, 5, 3), "mask", None, False, False),
]


def _make_case(gen, shape, mask_kind, nc_s, nc_t, M=3, N=4, dtype=torch.float64):
    def build(k, nc):
        xs = _layers(gen, k, shape, dtype)
        if nc:  # same values, read through transposed strides (last two dims swapped)
            xs = [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in xs]
            assert not xs[0].is_contiguous()
        return xs

    S, T = build(M, nc_s), build(N, nc_t)
    mask = None
    if mask_kind is not None:
        B = shape[0]
        L = shape[2] if len(shape) == 4 else shape[1]
        m = _mask(gen, B, L)
        mask = {"mask": m, "int": m.to(torch.int64), "float": m.to(torch.float32)}[mask_kind]
    return S, T, mask


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_match_reference(backend, case, per_sample):
    _, shape, mask_kind, floor, nc_s, nc_t = case
    gen = torch.Generator().manual_seed(100 + 2 * CASES.index(case) + per_sample)
    S, T, mask = _make_case(gen, shape, mask_kind, nc_s, nc_t)
    S = [s.requires_grad_() for s in S]
    T = [t.requires_grad_() for t in T]
    D = layer_costs(S, T, mask=mask, per_sample=per_sample, attention_floor=floor, backend=backend)
    ref = _ref([s.detach() for s in S], [t.detach() for t in T], mask, per_sample, floor)
    assert D.dtype == torch.float64 and D.shape == ref.shape
    assert_close(D, ref, torch.float64)

    G = torch.randn(D.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(D, S + T, G)
    ref_s, ref_t = layer_costs_grad(G, [s.detach() for s in S], [t.detach() for t in T], mask, per_sample, floor)
    for got, want in zip(grads, ref_s + ref_t):
        assert got.shape == want.shape
        assert_close(got, want, torch.float64, "grad")


def test_reference_grad_is_the_autograd_of_the_loop():
    """The closed-form gradient (what the kernels implement) equals autograd of the definition."""
    gen = torch.Generator().manual_seed(1)
    for shape, floor, per_sample in (((2, 3, 4, 4), 0.1, True), ((3, 5, 4), None, False)):
        S = [x.requires_grad_() for x in _layers(gen, 2, shape)]
        T = [x.requires_grad_() for x in _layers(gen, 3, shape)]
        mask = _mask(gen, shape[0], shape[2] if len(shape) == 4 else shape[1])
        D = layer_costs_loop(S, T, mask, per_sample, floor)
        G = torch.randn(D.shape, generator=gen, dtype=torch.float64)
        want = torch.autograd.grad(D, S + T, G)
        gs, gt = layer_costs_grad(G, [s.detach() for s in S], [t.detach() for t in T], mask, per_sample, floor)
        for a, b in zip(gs + gt, want):
            assert_close(a, b, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    gen = torch.Generator().manual_seed(2)
    shape = (2, 3, 2)
    S = torch.randn((2, *shape), generator=gen, dtype=torch.float64, requires_grad=True)
    T = [torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    for kw in ({}, {"mask": mask, "per_sample": True}, {"attention_floor": -0.5}):
        fn = lambda s, *t, kw=kw: layer_costs(s, list(t), backend=backend, **kw)  # noqa: E731
        # fast mode (one random projection) keeps the interpreter's kernel launches few
        assert torch.autograd.gradcheck(fn, (S, *T), eps=1e-6, atol=1e-8, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    fwd, bwd = (getattr(torch.ops.bert_emd, n).default for n in _OPS[backend])
    gen = torch.Generator().manual_seed(3)
    S = [x.requires_grad_() for x in _layers(gen, 2, (2, 4, 3))]
    T = _layers(gen, 3, (2, 4, 3))
    mask = _mask(gen, 2, 4)
    torch.library.opcheck(fwd, (S, T, None, False, None))
    torch.library.opcheck(fwd, (S, [t.requires_grad_() for t in T], mask, True, -0.1))
    G = torch.randn(2, 2, 3, dtype=torch.float64, generator=gen)
    Sd, Td = [s.detach() for s in S], [t.detach() for t in T]
    torch.library.opcheck(bwd, (G, Sd, Td, mask, True, None, True), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(bwd, (G[0], Sd, Td, None, False, 0.0, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gradient_only_when_required(backend):
    gen = torch.Generator().manual_seed(4)
    S = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)  # stacked [M, B, ...]
    T = _layers(gen, 3, (3, 4, 5))
    D = layer_costs(S, T, backend=backend)

    with RecordOpArgs("layer_costs_bwd") as log:
        (g,) = torch.autograd.grad(D.sum(), S)
    assert len(log.args) == 1 and log.args[0][-1] is False  # need_teacher: one fused call
    ref_s, ref_t = layer_costs_grad(torch.ones(2, 3, dtype=torch.float64), list(S.detach()), T, need_teacher=False)
    assert ref_t == []
    torch.testing.assert_close(g, torch.stack(ref_s))
    T2 = [t.requires_grad_() for t in T]
    with RecordOpArgs("layer_costs_bwd") as log:
        torch.autograd.grad(layer_costs(S, T2, backend=backend).sum(), [S, *T2])
    assert len(log.args) == 1 and log.args[0][-1] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs(backend, dtype):
    """fp32 accumulation: fp32 within 1e-5 of float64; bf16/fp16 at most 2x the error of the
    original loop computed in that dtype; gradients in the input dtype."""
    gen = torch.Generator().manual_seed(5)
    shape = (3, 2, 9, 9)
    mask = _mask(gen, 3, 9)
    S = [x.requires_grad_() for x in _layers(gen, 3, shape, dtype)]
    T = _layers(gen, 4, shape, dtype)
    D = layer_costs(S, T, attention_floor=-1.0, backend=backend)
    assert D.dtype == torch.float32
    ref = _ref(S, T, floor=-1.0).detach()
    err = ((D.double() - ref).abs() / ref).max().item()
    if dtype == torch.float32:
        assert err < 1e-5
    else:
        base = layer_costs_original([s.detach() for s in S], T, attention_floor=-1.0).double()
        base_err = ((base - ref).abs() / ref).max().item()
        assert base_err > 0
        assert err <= 2 * base_err, (err, base_err)
    (g,) = torch.autograd.grad(layer_costs(S, T, mask=mask, backend=backend).sum(), S[0])
    assert g.dtype == dtype
    ref_s, _ = layer_costs_grad(torch.ones(3, 4), [s.detach() for s in S], T, mask)
    assert_close(g.float(), ref_s[0].float(), dtype, "ref64", atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_layers_do_not_cancel(backend):
    """Layers 1e-4 apart on values ~100: direct differences keep 1e-5 relative accuracy where
    the |s|^2 + |t|^2 - 2 s.t formulation loses every digit."""
    gen = torch.Generator().manual_seed(6)
    base = 100 + torch.randn(2, 6, 8, generator=gen, dtype=torch.float64)
    S = [(base + 1e-4 * torch.randn(base.shape, generator=gen, dtype=torch.float64)).float() for _ in range(2)]
    T = [(base + 1e-4 * torch.randn(base.shape, generator=gen, dtype=torch.float64)).float() for _ in range(3)]
    ref = _ref(S, T)
    D = layer_costs(S, T, backend=backend)
    assert ((D.double() - ref).abs() / ref).max().item() < 1e-5
    vec = layer_costs_vectorized(S, T).double()
    assert ((vec - ref).abs() / ref).max().item() > 1e-2  # the cancellation the kernels avoid


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_large_shapes_cross_chunks_and_tiles(backend):
    """Samples longer than the CPU kernel's tile (32768) and chunk (512), fp32 vs float64."""
    gen = torch.Generator().manual_seed(7)
    cases = [
        ((2, 37, 1000), "mask", None),  # masked hidden rows longer than a chunk (in place)
        ((2, 3, 131, 131), "mask", -0.5),  # attention: rows packed across chunks
        ((2, 37, 1000), None, None),  # one flat run
        ((2, 3, 131, 131), None, -0.5),  # in place with the floor in registers, fused backward
    ]
    for shape, mk, floor in cases:
        S, T, mask = _make_case(gen, shape, mk, False, mk is not None, M=5, N=3, dtype=torch.float32)
        for per_sample in (False, True):
            D = layer_costs(S, T, mask=mask, per_sample=per_sample, attention_floor=floor, backend=backend)
            ref = _ref(S, T, mask, per_sample, floor)
            assert ((D.double() - ref).abs() / ref).max().item() < 1e-5
        G = torch.randn(5, 3, generator=gen)
        gs, gt = getattr(torch.ops.bert_emd, _OPS[backend][1])(G, S, T, mask, False, floor, True)
        ref_s, ref_t = layer_costs_grad(G.double(), [s.double() for s in S], [t.double() for t in T], mask,
                                        False, floor)
        for a, b in zip(gs + gt, ref_s + ref_t):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-9)


@pytest.mark.skipif(not _ext.has_extension(), reason="bert_emd._C not built")
def test_cpu_result_independent_of_thread_count():
    gen = torch.Generator().manual_seed(8)
    S, T, mask = _make_case(gen, (3, 2, 50, 50), "mask", False, False, M=4, N=6, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer_costs(S, T, mask=mask, attention_floor=0.0, backend="cpu")
        torch.set_num_threads(2)
        two = layer_costs(S, T, mask=mask, attention_floor=0.0, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0/0 in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_degenerate(backend):
    gen = torch.Generator().manual_seed(9)
    S = _layers(gen, 2, (0, 4, 3), torch.float32)
    T = _layers(gen, 3, (0, 4, 3), torch.float32)
    assert layer_costs(S, T, backend=backend).isnan().all()  # mean of nothing, as torch.mean
    assert layer_costs(S, T, per_sample=True, backend=backend).shape == (0, 2, 3)
    # one layer each, batch of one
    s, t = _layers(gen, 1, (1, 5), torch.float64), _layers(gen, 1, (1, 5), torch.float64)
    torch.testing.assert_close(layer_costs(s, t, backend=backend), ((s[0] - t[0]) ** 2).mean().reshape(1, 1))
    # a fully padded sample: its per-sample costs are NaN, its gradient zero, others unaffected
    S = [x.requires_grad_() for x in _layers(gen, 2, (2, 3, 4))]
    T = _layers(gen, 2, (2, 3, 4))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    D = layer_costs(S, T, mask=mask, per_sample=True, backend=backend)
    assert D[1].isnan().all() and not D[0].isnan().any()
    (g,) = torch.autograd.grad(D[0].sum(), S[0])
    assert torch.equal(g[1], torch.zeros_like(g[1])) and torch.equal(g[0, 2], torch.zeros(4, dtype=g.dtype))


def test_triton_multi_tile_paths():
    """Several programs per sample (BLOCK 16, two blocks per forward program, so the last block
    of a program can lie past the end) with odd sizes through every mask / stride path."""
    from emd_kernels.layer_costs import layer_costs_bwd, layer_costs_fwd

    gen = torch.Generator().manual_seed(10)
    for shape, mk, floor, nc_s, nc_t in (
        ((2, 7, 5), "mask", None, False, True),
        ((2, 3, 5, 5), "mask", 0.2, True, False),
        ((3, 11), "int", -0.3, False, False),
        ((2, 3, 7), None, None, True, True),
    ):
        S, T, mask = _make_case(gen, shape, mk, nc_s, nc_t, M=5, N=2, dtype=torch.float32)
        for per_sample in (False, True):
            D = layer_costs_fwd(S, T, mask, per_sample, floor, block=16, iters=2)
            assert_close(D.double(), _ref(S, T, mask, per_sample, floor), torch.float32, "ref64")
            G = torch.randn(D.shape, generator=gen)
            gs, gt = layer_costs_bwd(G, S, T, mask, per_sample, floor, True, block=16)
            ref_s, ref_t = layer_costs_grad(G.double(), [s.double() for s in S], [t.double() for t in T], mask,
                                            per_sample, floor)
            for a, b in zip(gs + gt, ref_s + ref_t):
                assert a.is_contiguous() and a.shape == b.shape
                assert_close(a.double(), b, torch.float32, "ref64")


def test_triton_reads_strided_layers_in_place():
    """A tuple of transposed layers (one stride pattern) is read as is, never copied."""
    from emd_kernels.layer_costs import geometry

    gen = torch.Generator().manual_seed(11)
    S = [x.transpose(-1, -2) for x in _layers(gen, 3, (2, 4, 5, 5))]
    T = list(torch.randn(2, 2, 4, 5, 5, generator=gen).unbind(0))
    mask = _mask(gen, 2, 5)
    for m in (None, mask):
        for per_sample in (False, True):
            g = geometry(S, T, m, per_sample)
            assert all(a is b for a, b in zip(g.student + g.teacher, S + T))
    # different strides within one side: only then are the odd layers made contiguous
    g = geometry([S[0], S[1].contiguous()], T, None, False)
    assert g.student[1] is not S[1] and g.student[0].is_contiguous()


def test_tensor_and_tuple_inputs_agree():
    gen = torch.Generator().manual_seed(12)
    stacked = torch.randn(3, 2, 4, 6, generator=gen)
    T = tuple(_layers(gen, 2, (2, 4, 6), torch.float32))
    for backend in [b for b in ("cpu", "torch") if b != "cpu" or _ext.has_extension()]:
        a = layer_costs(stacked, T, backend=backend)
        b = layer_costs(tuple(stacked.unbind(0)), torch.stack(T), backend=backend)
        torch.testing.assert_close(a, b)


def test_validation_messages():
    gen = torch.Generator().manual_seed(13)
    S = _layers(gen, 2, (2, 4, 3), torch.float32)
    T = _layers(gen, 3, (2, 4, 3), torch.float32)
    bad = [
        (dict(student=[], teacher=T), "student must hold at least one"),
        (dict(student=torch.randn(3), teacher=T), r"student must be a tensor \[num_layers, B, \.\.\.\]"),
        (dict(student=S, teacher=T + [torch.randn(2, 4, 4)]), r"teacher\[3\] must have the shape \[2, 4, 3\]"),
        (dict(student=S, teacher="x"), "teacher must be a tensor"),
        (dict(student=S + [S[0].double()], teacher=T), r"student\[2\] is torch.float64"),
        (dict(student=[s.long() for s in S], teacher=T), r"student\[0\] must be float32, float64, float16"),
        (dict(student=S, teacher=T, mask=torch.ones(2, 5)), r"mask must have shape \[B, L\] = \[2, 4\]"),
        (dict(student=S, teacher=T, mask=torch.ones(2, 4, device="meta")), "mask must be on cpu"),
        (dict(student=[torch.randn(2, 3, 4, 5)], teacher=[torch.randn(2, 3, 4, 5)], mask=torch.ones(2, 4)),
         r"equal query and key lengths"),
        (dict(student=[torch.randn(2, 1, 1, 4, 3)], teacher=[torch.randn(2, 1, 1, 4, 3)], mask=torch.ones(2, 1)),
         "mask needs layers of shape"),
        (dict(student=S, teacher=T, attention_floor=float("nan")), "attention_floor must be a number"),
        (dict(student=S, teacher=T, attention_floor="-100"), "attention_floor must be a float or None"),
        (dict(student=S, teacher=T, per_sample=1), "per_sample must be a bool"),
        (dict(student=S, teacher=[t.to("meta") for t in T]), r"teacher\[0\] must be on cpu"),
        (dict(student=S, teacher=T, backend="gpu"), "backend must be 'auto' or one of"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            layer_costs(**kwargs)


@pytest.mark.skipif(not _ext.has_extension(), reason="bert_emd._C not built")
def test_cpu_op_validates_directly():
    S = [torch.randn(2, 4, 3)]
    with pytest.raises(ValueError, match=r"teacher\[0\] must have the shape \[2, 4, 3\] of student\[0\], got \[2, 4\]"):
        torch.ops.bert_emd.layer_costs_fwd(S, [torch.randn(2, 4)], None, False, None)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, L\] = \[2, 4\], got \[2, 3\]"):
        torch.ops.bert_emd.layer_costs_fwd(S, S, torch.ones(2, 3), False, None)
    with pytest.raises(ValueError, match="teacher must hold at least one layer"):
        torch.ops.bert_emd.layer_costs_fwd(S, [], None, False, None)
    with pytest.raises(ValueError, match=r"grad must have shape \[B, M, N\] = \[2, 1, 1\]"):
        torch.ops.bert_emd.layer_costs_bwd(torch.ones(1, 1), S, S, None, True, None, True)


def test_explicit_backend_that_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="triton"):
        layer_costs([torch.randn(2, 3)], [torch.randn(2, 3)], backend="triton")
