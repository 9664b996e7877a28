"""bert_emd.attention_costs: every backend against the materialise-then-layer_costs reference
(values and gradients of both sides, in float64), masks, floors, odd lengths, different head
sizes, per-sample costs, low precision, the score hooks and Hugging Face eager attention, bounded
memory of the fused paths, validation. Triton runs on CPU tensors under TRITON_INTERPRET=1 (set
by conftest.py) with small shapes; the main comparison forces 16-wide blocks so that several
query and key blocks and a ragged tail are crossed."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it first; kept for a lone run

import bert_emd._ext as _ext  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from bert_emd._backends import BackendError  # noqa: E402
from bert_emd.ops import attention_costs as AC  # noqa: E402
from bert_emd.ops import attention_costs_cpu as ACC  # noqa: E402
from bert_emd.ops._common import Live, live_spans  # noqa: E402
from bert_emd.ops.attention_costs import attention_costs  # noqa: E402
from bert_emd.ops.layer_costs import layer_costs  # noqa: E402
from bert_emd.reference.attention_costs import (  # noqa: E402
    attention_costs_materialized_grad,
    materialize,
)
from bert_emd.reference.layer_costs import layer_costs_loop  # noqa: E402
from helpers import RecordOpArgs  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

BACKENDS = ["cpu", "torch", "triton"]
needs_ext = pytest.mark.skipif(not _ext.has_extension(), reason="bert_emd._C not built (layer_costs cpu kernel)")


def _side(gen, n, B, H, L, d, dtype=torch.float64, grad=True, scale=1.0):
    def one():
        x = torch.randn(B, H, L, d, generator=gen, dtype=torch.float64) * scale
        return x.to(dtype).requires_grad_(grad)

    return [(one(), one()) for _ in range(n)]


def _masks(gen, B, L):
    """An attention mask with right padding (and a hole), and a token mask dropping one more."""
    am = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(max(1, L // 2), L + 1, (1,), generator=gen))
        am[b, n:] = False
    am[-1, 1] = False
    tm = am.clone()
    tm[0, 2] = False
    return am, tm


def _oracle(S, T, source, am, tm, per_sample, floor):
    """Materialise with plain torch ops (autograd through everything), then layer_costs_loop."""
    Sm = [materialize(q, k, source=source, attention_mask=am, dtype=torch.float64) for q, k in S]
    Tm = [materialize(q, k, source=source, attention_mask=am, dtype=torch.float64) for q, k in T]
    return layer_costs_loop(Sm, Tm, tm, per_sample, floor)


def _leaves(S, T):
    return [t for pair in S + T for t in pair]


# (name, source, attention mask, token mask, floor, per_sample, L, d_S, d_T, M, N, teacher grad)
CASES = [
    ("scores_plain", "scores", False, False, None, False, 17, 8, 16, 2, 3, False),
    ("scores_original", "scores", True, False, -100.0, True, 33, 8, 16, 3, 2, True),
    ("scores_token_mask", "scores", True, True, None, False, 21, 16, 8, 2, 2, False),
    ("scores_masked_floor", "scores", True, True, 0.2, True, 19, 8, 8, 1, 3, True),
    ("probs_plain", "probs", False, False, None, True, 17, 8, 16, 2, 3, False),
    ("probs_masks", "probs", True, True, None, False, 21, 16, 8, 3, 2, True),
    ("probs_floor", "probs", True, False, 0.04, True, 19, 8, 16, 2, 2, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients_match_reference(backend, case, rng, monkeypatch):
    if backend == "cpu" and not _ext.has_extension():
        pytest.skip("bert_emd._C not built")
    monkeypatch.setattr(AC, "TRITON_BLOCK", 16)  # Triton: 2-3 query and key blocks, ragged tails
    _, source, use_am, use_tm, floor, per_sample, L, ds, dt, M, N, teacher_grad = case
    B, H = 2, 2
    S, T = _side(rng, M, B, H, L, ds), _side(rng, N, B, H, L, dt, grad=teacher_grad)
    am, tm = _masks(rng, B, L)
    am, tm = (am if use_am else None), (tm if use_tm else None)
    kw = dict(mask=tm, attention_mask=am, source=source, attention_floor=floor, per_sample=per_sample)
    D = attention_costs(S, T, backend=backend, **kw)
    ref = _oracle(S, T, source, am, tm, per_sample, floor)
    assert D.dtype == torch.float64 and D.shape == ((B, M, N) if per_sample else (M, N))
    torch.testing.assert_close(D, ref, rtol=1e-10, atol=1e-12)
    G = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    leaves = _leaves(S, T) if teacher_grad else _leaves(S, [])
    got = torch.autograd.grad((D * G).sum(), leaves)
    want = torch.autograd.grad((ref * G).sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_reference_gradient_is_the_autograd_of_the_materialised_maps(rng):
    B, H, L = 2, 2, 9
    S, T = _side(rng, 2, B, H, L, 4), _side(rng, 3, B, H, L, 8)
    am, tm = _masks(rng, B, L)
    for source, floor in (("scores", -100.0), ("probs", 0.05), ("probs", None)):
        ref = _oracle(S, T, source, am, tm, True, floor)
        G = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
        want = torch.autograd.grad((ref * G).sum(), _leaves(S, T))
        sq, sk = [p[0].detach() for p in S], [p[1].detach() for p in S]
        tq, tk = [p[0].detach() for p in T], [p[1].detach() for p in T]
        dsq, dsk, dtq, dtk = attention_costs_materialized_grad(G, sq, sk, tq, tk, am, tm, -10000.0, source, True,
                                                               floor, True, True)
        got = [g for pair in zip(dsq, dsk) for g in pair] + [g for pair in zip(dtq, dtk) for g in pair]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float32_within_1e5_of_float64(backend, rng):
    if backend == "cpu" and not _ext.has_extension():
        pytest.skip("bert_emd._C not built")
    B, H, L = 2, 2, 25
    S, T = _side(rng, 2, B, H, L, 8, torch.float32), _side(rng, 3, B, H, L, 16, torch.float32)
    am, tm = _masks(rng, B, L)
    for source, floor in (("scores", -100.0), ("probs", None)):
        D = attention_costs(S, T, attention_mask=am, mask=tm, source=source, attention_floor=floor, backend=backend)
        S64 = [(q.double(), k.double()) for q, k in S]
        T64 = [(q.double(), k.double()) for q, k in T]
        ref = _oracle(S64, T64, source, am, tm, False, floor)
        assert D.dtype == torch.float32
        torch.testing.assert_close(D.double(), ref, rtol=1e-5, atol=0)
        g = torch.autograd.grad(D.sum(), _leaves(S, T))
        w = torch.autograd.grad(ref.sum(), _leaves(S64, T64))
        for a, b in zip(g, w):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_low_precision_inputs_accumulate_in_float32(backend, dtype, rng):
    """Scores are formed in float32 from the low-precision Q and K, so the costs match the
    float64 reference of the same (rounded) inputs to float32 accuracy; the gradient's dS is
    rounded to the input dtype before its matmul (Triton, as flash attention), the CPU path
    keeps it in float32."""
    if backend == "cpu" and not _ext.has_extension():
        pytest.skip("bert_emd._C not built")
    B, H, L = 2, 2, 19
    S, T = _side(rng, 2, B, H, L, 16, dtype), _side(rng, 2, B, H, L, 16, dtype)
    am, _ = _masks(rng, B, L)
    D = attention_costs(S, T, attention_mask=am, source="probs", backend=backend)
    assert D.dtype == torch.float32
    S64 = [(q.double(), k.double()) for q, k in S]
    T64 = [(q.double(), k.double()) for q, k in T]
    ref = _oracle(S64, T64, "probs", am, None, False, None)
    torch.testing.assert_close(D.double(), ref, rtol=2e-5, atol=0)
    g = torch.autograd.grad(D.sum(), _leaves(S, T))
    w = torch.autograd.grad(ref.sum(), _leaves(S64, T64))
    for a, b in zip(g, w):
        assert a.dtype == dtype
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < 2e-2, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    if backend == "cpu" and not _ext.has_extension():
        pytest.skip("bert_emd._C not built")
    gen = torch.Generator().manual_seed(7)
    S, T = _side(gen, 1, 1, 2, 5, 3), _side(gen, 2, 1, 2, 5, 2)
    am = torch.tensor([[1, 1, 1, 0, 1]])
    tm = torch.tensor([[1, 0, 1, 1, 1]])
    leaves = _leaves(S, T)

    def fn(*xs, **kw):
        pairs = [(xs[i], xs[i + 1]) for i in range(0, len(xs), 2)]
        return attention_costs(pairs[:1], pairs[1:], backend=backend, **kw)

    cases = [{"source": "probs", "attention_mask": am, "mask": tm, "per_sample": True},
             {"source": "scores", "attention_mask": am, "attention_floor": -100.0}]
    for kw in cases[:1] if backend == "triton" else cases:  # the interpreter: the harder case only
        f = lambda *xs, kw=kw: fn(*xs, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    fwd, bwd = (getattr(torch.ops.bert_emd, n).default for n in AC._OPS[backend])
    gen = torch.Generator().manual_seed(3)
    S, T = _side(gen, 2, 2, 2, 5, 4), _side(gen, 1, 2, 2, 5, 8, grad=False)
    sq, sk = [p[0] for p in S], [p[1] for p in S]
    tq, tk = [p[0] for p in T], [p[1] for p in T]
    am, tm = _masks(gen, 2, 5)
    # the AOT-dispatch check (torch.compile's path) runs the interpreter too often: CPU backends only
    full = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    utils = full[:3] if backend == "triton" else full
    torch.library.opcheck(fwd, (sq, sk, tq, tk, None, None, -10000.0, False, False, None), test_utils=utils)
    torch.library.opcheck(fwd, (sq, sk, tq, tk, am, tm, -10000.0, True, True, 0.01), test_utils=utils)
    d = [x.detach() for x in sq + sk + tq + tk]
    lse = fwd(d[:2], d[2:4], d[4:5], d[5:6], am, tm, -10000.0, True, True, None)[1]
    G = torch.randn(2, 2, 1, dtype=torch.float64, generator=gen)
    only = ("test_schema", "test_faketensor")
    torch.library.opcheck(bwd, (G, d[:2], d[2:4], d[4:5], d[5:6], lse, am, tm, -10000.0, True, True, None, True,
                                True), test_utils=only)
    empty = lse.new_empty((0,))
    torch.library.opcheck(bwd, (G[0], d[:2], d[2:4], d[4:5], d[5:6], empty, None, None, -1e4, False, False, -1.0,
                                True, False), test_utils=only)


@needs_ext
def test_score_hooks_and_eager_attention_are_what_it_reproduces():
    """Drop-in for the loss's attention path: the costs of the score hooks' maps (``scores``)
    and of eager attention's ``output_attentions`` (``probs``), from the hooked Q and K, with
    an SDPA teacher of another hidden size."""
    pytest.importorskip("transformers")
    import helpers
    from bert_emd.nn.hooks import AttentionScoreCapture

    def bert(hidden, layers, attn):
        torch.manual_seed(hidden)
        return helpers.tiny_bert("encoder", attn=attn, vocab=40, hidden=hidden, layers=layers, init=0.2).eval()

    student, teacher, teacher_eager = bert(16, 2, "eager"), bert(32, 3, "sdpa"), bert(32, 3, "eager")
    teacher_eager.load_state_dict(teacher.state_dict())
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 11, dtype=torch.long)
    am[1, 7:] = 0

    def qk(cap):  # what the loss integration hands over: per-layer [B, H, L, d] views
        if hasattr(cap, "queries_keys"):
            return cap.queries_keys()
        out = []
        for (i, q), (_, k) in zip(cap._q, cap._k):
            spec = cap.specs[i]
            b, n = q.shape[:2]
            out.append((q.view(b, n, spec.num_heads, spec.head_size).transpose(1, 2),
                        k.view(b, n, spec.num_heads, spec.head_size).transpose(1, 2)))
        return out

    with AttentionScoreCapture(student) as cs, AttentionScoreCapture(teacher) as ct:
        s_out = student(ids, attention_mask=am, output_attentions=True)
        teacher(ids, attention_mask=am)
        s_qk, t_qk = qk(cs), qk(ct)
        assert not s_qk[0][0].is_contiguous()  # read in place through the head-split view
        want = layer_costs(cs.scores(am), ct.scores(am), attention_floor=-100.0, backend="torch")
        for backend in BACKENDS:
            got = attention_costs(s_qk, t_qk, attention_mask=am, attention_floor=-100.0, backend=backend)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        t_att = teacher_eager(ids, attention_mask=am, output_attentions=True).attentions
        for kw in ({}, {"mask": am, "per_sample": True}):
            want = layer_costs(s_out.attentions, t_att, backend="torch", **kw)
            got = attention_costs(s_qk, t_qk, attention_mask=am, source="probs", backend="cpu", **kw)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_input_forms_and_strides_agree(rng):
    """Pairs of per-head views (non-contiguous), contiguous copies and stacked (Q, K) tensors."""
    B, H, L, M, N = 2, 2, 9, 2, 3

    def views(n, d):  # [B, L, H*d] projections split into heads, as the hooks see them
        return [tuple(torch.randn(B, L, H * d, generator=rng, dtype=torch.float64).view(B, L, H, d).transpose(1, 2)
                      for _ in range(2)) for _ in range(n)]

    S, T = views(M, 4), views(N, 8)
    am, tm = _masks(rng, B, L)
    kw = dict(attention_mask=am, mask=tm, source="probs")
    ref = attention_costs(S, T, backend="torch", **kw)
    stacked_s = (torch.stack([q for q, _ in S]), torch.stack([k for _, k in S]))
    contiguous_t = [(q.contiguous(), k.contiguous()) for q, k in T]
    mixed_t = [contiguous_t[0]] + T[1:]  # layers of one side with different strides
    for backend in BACKENDS:
        for s, t in ((S, T), (stacked_s, contiguous_t), (S, mixed_t)):
            torch.testing.assert_close(attention_costs(s, t, backend=backend, **kw), ref, rtol=1e-12, atol=1e-15)


@needs_ext
@pytest.mark.parametrize("chunk", [1, 200, 1700, 5000, 1 << 22])
def test_cpu_chunking_is_exact(monkeypatch, chunk, rng):
    """Chunks of one query row, several rows, whole heads (2 of 3: a ragged head block), whole
    samples, several samples: same values and gradients as the reference."""
    monkeypatch.setattr(ACC, "CPU_CHUNK_ELEMENTS", chunk)
    B, H, L = 3, 3, 13
    S, T = _side(rng, 2, B, H, L, 4), _side(rng, 2, B, H, L, 8)
    am, tm = _masks(rng, B, L)
    for source, floor, ps in (("scores", -100.0, False), ("probs", None, True)):
        kw = dict(attention_mask=am, mask=tm, source=source, attention_floor=floor, per_sample=ps)
        D = attention_costs(S, T, backend="cpu", **kw)
        ref = attention_costs(S, T, backend="torch", **kw)
        torch.testing.assert_close(D, ref, rtol=1e-11, atol=1e-14)
        got = torch.autograd.grad(D.sum(), _leaves(S, T))
        want = torch.autograd.grad(ref.sum(), _leaves(S, T))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


@needs_ext
@pytest.mark.parametrize("source", ["scores", "probs"])
def test_cpu_key_mask_layouts(source, rng):
    """The cpu backend adds the key mask to a slice of columns when a sample's padded keys are
    contiguous (right or left padding), to the whole row otherwise (holes), and skips samples
    without padding or a zero mask value: every layout gives the reference's values and gradients."""
    B, H, L = 5, 2, 11
    S, T = _side(rng, 2, B, H, L, 4), _side(rng, 3, B, H, L, 8)
    am = torch.ones(B, L, dtype=torch.bool)
    am[0, 7:] = False  # right padding
    am[1, :3] = False  # left padding
    am[2, [1, 4, 9]] = False  # holes
    am[4, 5] = False  # one padded key; sample 3 has none
    for mask_value, floor in ((-10000.0, -100.0 if source == "scores" else None), (0.0, None), (-3.0, None)):
        kw = dict(attention_mask=am, source=source, attention_floor=floor, per_sample=True, mask_value=mask_value)
        D = attention_costs(S, T, backend="cpu", **kw)
        ref = attention_costs(S, T, backend="torch", **kw)
        torch.testing.assert_close(D, ref, rtol=1e-11, atol=1e-14)
        got = torch.autograd.grad(D.sum(), _leaves(S, []))
        want = torch.autograd.grad(ref.sum(), _leaves(S, []))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


@needs_ext
@pytest.mark.parametrize("source", ["scores", "probs"])
def test_cpu_skips_keys_and_rows_that_add_nothing(monkeypatch, source, rng):
    """Padded keys beyond reach (below the floor / exp underflowing to 0, proven by a norm bound)
    and rows or keys of weight 0 are never computed by the cpu backend; the costs and gradients
    stay the reference's, and when the bound cannot be proven (huge activations, a mask value
    close to the floor) everything is computed as before."""
    B, H, L = 6, 2, 11
    am = torch.ones(B, L, dtype=torch.bool)
    am[0, 7:] = False  # right padding
    am[1, :3] = False  # left padding
    am[2, [1, 4, 9]] = False  # holes: the live span stays 0:11
    am[4, :] = False  # every key padded
    am[5, 8:] = False
    tm = am.clone()
    tm[5, 0] = False  # a token mask dropping one more row and key
    floor = -100.0 if source == "scores" else None
    computed = []
    real_chunks = ACC._chunks

    def counting(*a, **k):
        for c in real_chunks(*a, **k):
            computed.append((c.b1 - c.b0) * c.entries)
            yield c

    monkeypatch.setattr(ACC, "_chunks", counting)
    monkeypatch.setattr(ACC, "CPU_CHUNK_ELEMENTS", 2000)  # one sample a chunk: its own box
    full = B * H * L * L
    for scale, mask_value, token_mask, skips in ((1.0, -10000.0, None, True), (1.0, -10000.0, tm, True),
                                                 (300.0, -10000.0, None, False), (1.0, -101.0, None, False)):
        S, T = _side(rng, 2, B, H, L, 4, scale=scale), _side(rng, 3, B, H, L, 8)
        if source == "probs" and mask_value == -101.0:
            mask_value = -50.0  # exp(-50) is no underflow: padded keys keep a probability
        kw = dict(attention_mask=am, mask=token_mask, source=source, attention_floor=floor, per_sample=True,
                  mask_value=mask_value)
        boxes = ACC._live_boxes(*(list(x) for x in zip(*S)), *(list(x) for x in zip(*T)), am, token_mask,
                               mask_value, source == "probs", floor, torch.float64)
        if skips:
            cols = {0: (0, 7), 1: (3, 11), 2: (0, 11), 3: (0, 11), 5: (0, 8)}
            cols[4] = (0, 0) if source == "scores" else (0, 11)  # probs of an all-padded row are uniform
            if token_mask is not None:
                cols[4] = (0, 0) if source == "scores" else (0, 11)
                if source == "scores":
                    cols[5] = (1, 8)
            rows = {b: (0, L) for b in range(B)}
            if token_mask is not None:
                rows = {0: (0, 7), 1: (3, 11), 2: (0, 11), 3: (0, 11), 4: (0, 0), 5: (1, 8)}
            assert boxes == [(*rows[b], *cols[b]) for b in range(B)]
        else:
            assert boxes is None
        computed.clear()
        D = attention_costs(S, T, backend="cpu", **kw)
        assert sum(computed) < full if skips else sum(computed) == full
        ref = attention_costs(S, T, backend="torch", **kw)
        torch.testing.assert_close(D, ref, rtol=1e-11, atol=1e-14, equal_nan=True)
        got = torch.autograd.grad(D.nan_to_num().sum(), _leaves(S, T))
        want = torch.autograd.grad(ref.nan_to_num().sum(), _leaves(S, T))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("per_sample", [False, True])
def test_cpu_scores_backward_by_gram_products(monkeypatch, per_sample, rng):
    """The cpu backward of scores uses Gram products of Q and K (no tiles) exactly where f is the
    identity on every live entry (no floor, or scores provably above it) and recomputes the tiles
    elsewhere; forced either way, both sides' gradients are the reference's, with masks, holes,
    an all-padded sample and teacher gradients."""
    B, H, L = 4, 2, 13
    am = torch.ones(B, L, dtype=torch.bool)
    am[0, 9:] = False
    am[1, [2, 6]] = False  # holes: zero rows of K~ inside the box
    am[3, :] = False
    tm = am.clone()
    tm[2, 0] = False
    used = []
    real_side = ACC._bwd_lowrank_side

    def recording(Gn, X, Y, live, samples, dq, dk):
        used.extend(samples)
        return real_side(Gn, X, Y, live, samples, dq, dk)

    monkeypatch.setattr(ACC, "_bwd_lowrank_side", recording)
    monkeypatch.setattr(ACC, "CPU_CHUNK_ELEMENTS", 3000)
    for floor, token_mask, scale, linear in ((None, None, 1.0, True), (-100.0, None, 1.0, True),
                                             (-100.0, tm, 1.0, True), (None, tm, 1.0, True),
                                             (0.2, None, 1.0, False), (-100.0, None, 40.0, False)):
        S, T = _side(rng, 2, B, H, L, 4, scale=scale), _side(rng, 3, B, H, L, 8)
        kw = dict(attention_mask=am, mask=token_mask, source="scores", attention_floor=floor, per_sample=per_sample)
        ref = attention_costs(S, T, backend="torch", **kw)
        G = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
        want = torch.autograd.grad((ref.nan_to_num() * G).sum(), _leaves(S, T))
        for pays in (True, False):
            monkeypatch.setattr(ACC, "_lowrank_pays",  # forced, but never for a box without entries
                                lambda live, b, *a, pays=pays: pays and live.boxes[b][3] > live.boxes[b][2])
            used.clear()
            D = attention_costs(S, T, backend="cpu", **kw)
            got = torch.autograd.grad((D.nan_to_num() * G).sum(), _leaves(S, T))
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
            # both sides (student and teacher) take every sample with live keys when linear and
            # forced; the all-padded sample has none once the floor or the token mask removes them
            with_keys = list(range(B)) if floor is None and token_mask is None else [0, 1, 2]
            assert sorted(used) == (sorted(with_keys * 2) if pays and linear else [])


def test_gram_backward_pays_for_long_rows():
    """The Gram-product backward is chosen by multiply-adds: TinyBERT-4 against BERT-base at
    L = 512 (about half the recompute's), not at L = 128; a sample without live rows never."""
    def live(r, w):
        return Live(torch.ones(1, 512, dtype=torch.bool), torch.ones(1, 512, dtype=torch.bool), [(0, r, 0, w)])

    assert ACC._lowrank_pays(live(512, 512), 0, 4, 12, 26, 64)
    assert ACC._lowrank_pays(live(512, 512), 0, 12, 4, 64, 26)  # the teacher's side
    assert not ACC._lowrank_pays(live(128, 128), 0, 4, 12, 26, 64)
    assert not ACC._lowrank_pays(live(0, 0), 0, 4, 12, 26, 64)


@pytest.mark.slow  # large interpreted launches
def test_triton_kernels_sweep_only_the_live_box(rng):
    """The Triton kernels get each sample's live box from the op (here right padding: keys 0:20
    of sample 0, all 40 of sample 1) and sweep nothing outside it: a box cut shorter changes that
    sample's costs and leaves the gradients of the cut keys exactly 0, the computed box changes
    nothing."""
    from emd_kernels.attention_costs import attention_costs_bwd, attention_costs_fwd

    B, H, L = 2, 2, 40
    S, T = _side(rng, 2, B, H, L, 8, grad=False), _side(rng, 2, B, H, L, 16, grad=False)
    sq, sk = [q for q, _ in S], [k for _, k in S]
    tq, tk = [q for q, _ in T], [k for _, k in T]
    am = torch.ones(B, L, dtype=torch.bool)
    am[0, 20:] = False
    for source, floor in (("scores", -100.0), ("probs", None)):
        probs = source == "probs"
        box = live_spans(sq, sk, tq, tk, am, None, -10000.0, probs, floor)
        assert box.tolist() == [[0, L, 0, 20], [0, L, 0, L]]
        args = (sq, sk, tq, tk, am, None, -10000.0, probs, True, floor)
        full, lse = attention_costs_fwd(*args, block=16)
        got, _ = attention_costs_fwd(*args, block=16, box=box)
        torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-15)
        cut = box.clone()
        cut[1, 3] = 10
        short, _ = attention_costs_fwd(*args, block=16, box=cut)
        torch.testing.assert_close(short[0], full[0], rtol=1e-12, atol=1e-15)
        assert (short[1] - full[1]).abs().max() > 1e-3
        G = torch.randn(B, 2, 2, generator=rng, dtype=torch.float64)
        dsq, dsk, _, _ = attention_costs_bwd(G, sq, sk, tq, tk, lse, am, None, -10000.0, probs, True, floor,
                                             True, False, block=16, box=cut)
        for dk in dsk:
            assert dk[1, :, 10:].abs().max() == 0 and dk[1, :, :10].abs().max() > 0


@pytest.mark.slow  # large interpreted launches
def test_triton_splits_student_layers_the_gpu_cannot_hold(monkeypatch, rng):
    """A launch the GPU lacks the resources for (OutOfResources: shared memory at 8+ fp64 layers or
    head size 128 on an A100) is retried with the X layers in halves, down to one layer, with the
    same costs and gradients of both sides; ``MAX_X_LAYERS`` caps the groups from the start; a
    single layer that does not fit gives a clear error."""
    from triton.runtime.errors import OutOfResources

    import emd_kernels.attention_costs as KA

    monkeypatch.setattr(AC, "TRITON_BLOCK", 16)
    B, H, L = 2, 2, 19
    S, T = _side(rng, 3, B, H, L, 8), _side(rng, 2, B, H, L, 16)
    am, tm = _masks(rng, B, L)
    kw = dict(attention_mask=am, mask=tm, source="probs", per_sample=True)
    ref = attention_costs(S, T, backend="torch", **kw)
    G = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    want = torch.autograd.grad((ref * G).sum(), _leaves(S, T))
    real = {"_fwd_launch": KA._fwd_launch, "_bwd_launch": KA._bwd_launch}
    ran, refused = [], []

    def limited(name, most):
        def launch(*a, **k):
            layers = len(a[2] if name == "_bwd_launch" else a[0])
            if layers > most:
                refused.append(layers)
                raise OutOfResources(300000, 166912, "shared memory")
            ran.append(layers)
            return real[name](*a, **k)
        return launch

    for most, cap in ((1, None), (2, None), (3, 1), (3, 2)):
        monkeypatch.setattr(KA, "MAX_X_LAYERS", cap)
        for name in real:
            monkeypatch.setattr(KA, name, limited(name, most))
        ran.clear()
        refused.clear()
        D = attention_costs(S, T, backend="triton", **kw)
        got = torch.autograd.grad((D * G).sum(), _leaves(S, T))
        torch.testing.assert_close(D, ref, rtol=1e-10, atol=1e-12)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
        assert max(ran) <= min(most, cap or 3) and (bool(refused) == (cap is None))
    monkeypatch.setattr(KA, "MAX_X_LAYERS", None)
    monkeypatch.setattr(KA, "_fwd_launch", limited("_fwd_launch", 0))
    with pytest.raises(RuntimeError, match="does not fit this GPU even for one layer"):
        attention_costs(S, T, backend="triton", **kw)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) any out-of-place op returns while active (in-place
    ops such as the interpreter's copies of kernel arguments allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name.endswith("_"):
            return out
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_attention_map_is_allocated(monkeypatch, backend, rng):
    """Forward and backward of the fused paths never allocate a tensor of one layer's map size
    B H L^2 (the chunked path holds at most its chunk budget), while the reference does."""
    monkeypatch.setattr(ACC, "CPU_CHUNK_ELEMENTS", 2048)
    B, H, L, d = 2, 2, 48, 8
    S, T = _side(rng, 2, B, H, L, d, torch.float32, grad=False), _side(rng, 2, B, H, L, d, torch.float32, grad=False)
    sq, sk = [p[0] for p in S], [p[1] for p in S]
    tq, tk = [p[0] for p in T], [p[1] for p in T]
    am, tm = _masks(rng, B, L)
    fwd, bwd = AC._IMPLS[backend]
    G = torch.ones(B, 2, 2)
    with _LargestTensor() as mode:
        _, lse = fwd(sq, sk, tq, tk, am, tm, -10000.0, True, True, None)
        bwd(G, sq, sk, tq, tk, lse, am, tm, -10000.0, True, True, None, True, True)
    map_size = B * H * L * L
    assert mode.largest < map_size // 2, (mode.largest, map_size)
    assert mode.largest <= max(B * H * L * d, 2048)  # Q/K-sized outputs, or the chunk budget
    with _LargestTensor() as mode:
        AC._fwd_torch(sq, sk, tq, tk, am, tm, -10000.0, True, True, None)
    assert mode.largest >= map_size  # the reference materialises (the test can tell)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gradient_only_when_required(backend, rng):
    if backend == "cpu" and not _ext.has_extension():
        pytest.skip("bert_emd._C not built")
    S, T = _side(rng, 2, 1, 2, 7, 4), _side(rng, 2, 1, 2, 7, 8, grad=False)

    D = attention_costs(S, T, source="probs", backend=backend)
    with RecordOpArgs("attention_costs_bwd") as log:
        grads = torch.autograd.grad(D.sum(), _leaves(S, []))
    assert len(log.args) == 1 and log.args[0][-2:] == (True, False)  # need_student, not teacher
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # only a key of the student needs grad: one call still, its query gradient is dropped
    q = S[0][0].detach()
    D = attention_costs([(q, S[0][1])], T, backend=backend)
    (gk,) = torch.autograd.grad(D.sum(), [S[0][1]])
    assert gk.shape == S[0][1].shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_degenerate(backend, rng):
    if backend == "cpu" and not _ext.has_extension():
        pytest.skip("bert_emd._C not built")
    empty = _side(rng, 2, 0, 2, 5, 4, grad=False)
    D = attention_costs(empty, _side(rng, 1, 0, 2, 5, 4, grad=False), backend=backend)
    assert D.shape == (2, 1) and torch.isnan(D).all()  # the mean of nothing, as layer_costs
    S, T = _side(rng, 1, 2, 1, 1, 1), _side(rng, 1, 2, 1, 1, 3)  # L = 1, d = 1, one head, M = N = 1
    for source in ("scores", "probs"):
        torch.testing.assert_close(attention_costs(S, T, source=source, backend=backend),
                                   _oracle(S, T, source, None, None, False, None))
    S, T = _side(rng, 2, 2, 2, 6, 4), _side(rng, 2, 2, 2, 6, 4)
    tm = torch.ones(2, 6, dtype=torch.bool)
    tm[1] = False  # a sample without real tokens: NaN in per-sample mode, ignored otherwise
    D = attention_costs(S, T, mask=tm, per_sample=True, backend=backend)
    assert torch.isnan(D[1]).all() and torch.isfinite(D[0]).all()
    torch.testing.assert_close(D[0], _oracle(S, T, "scores", None, tm, True, None)[0])
    torch.testing.assert_close(attention_costs(S, T, mask=tm, backend=backend),
                               _oracle(S, T, "scores", None, tm, False, None))


def test_identical_layers_cost_zero_and_differences_are_direct(rng):
    """Teacher equal to the student: exactly 0 (differences formed directly, no expansion)."""
    S = _side(rng, 2, 2, 2, 17, 8, torch.float32, grad=False, scale=30.0)
    for backend in BACKENDS:
        if backend == "cpu" and not _ext.has_extension():
            continue
        for source in ("scores", "probs"):
            D = attention_costs(S, S, source=source, backend=backend)
            assert D[0, 0] == 0 and D[1, 1] == 0 and D[0, 1] > 0


def test_backend_selection(monkeypatch, rng):
    S = _side(rng, 1, 1, 1, 3, 2, grad=False)
    assert AC._select("auto", torch.device("cpu")) == ("cpu", "torch")[0]
    with pytest.raises(BackendError, match="no 'cuda' implementation"):
        attention_costs(S, S, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        attention_costs(S, S, backend="gpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="Triton kernels need CUDA tensors"):
        attention_costs(S, S, backend="triton")


def test_validation_messages(rng):
    S = _side(rng, 2, 2, 2, 5, 4, grad=False)
    with pytest.raises(ValueError, match="student has 2 attention heads, teacher 3"):
        attention_costs(S, _side(rng, 1, 2, 3, 5, 4, grad=False))
    with pytest.raises(ValueError, match="sequence length 5 differs from the teacher's 6"):
        attention_costs(S, _side(rng, 1, 2, 2, 6, 4, grad=False))
    with pytest.raises(ValueError, match="batch size 2 differs"):
        attention_costs(S, _side(rng, 1, 3, 2, 5, 4, grad=False))
    with pytest.raises(ValueError, match="source must be 'scores' or 'probs'"):
        attention_costs(S, S, source="logits")
    with pytest.raises(ValueError, match=r"mask must have shape \[B, L\] = \[2, 5\]"):
        attention_costs(S, S, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, L\]"):
        attention_costs(S, S, attention_mask=torch.ones(5))
    with pytest.raises(ValueError, match=r"teacher_qk\[0\] key must have the shape"):
        attention_costs(S, [(S[0][0], S[0][1][..., :3])])
    with pytest.raises(ValueError, match=r"student_qk\[1\] query must have shape \[B, H, L, d_head\]"):
        attention_costs([S[0], (S[1][0][0], S[1][1][0])], S)
    with pytest.raises(ValueError, match="must be float32, float64, float16 or bfloat16"):
        attention_costs([(torch.ones(2, 2, 5, 4, dtype=torch.int64),) * 2], S)
    with pytest.raises(ValueError, match="one dtype"):
        attention_costs([(S[0][0], S[0][1].float())], S)
    with pytest.raises(ValueError, match=r"student_qk\[0\] must be a \(query, key\) pair"):
        attention_costs([S[0][0]], S)
    with pytest.raises(ValueError, match="sequence of \\(query, key\\) pairs"):
        attention_costs(S[0][0], S)
    with pytest.raises(ValueError, match="at least one"):
        attention_costs([], S)
    with pytest.raises(ValueError, match="attention_floor must be finite"):
        attention_costs(S, S, attention_floor=float("nan"))
    with pytest.raises(ValueError, match="per_sample must be a bool"):
        attention_costs(S, S, per_sample=1)
    with pytest.raises(ValueError, match="mask_value must be a float"):
        attention_costs(S, S, mask_value=None)


@needs_ext
@pytest.mark.parametrize("source", ["scores", "probs"])
def test_bert_emd_loss_fused_attention_matches_materialised(source):
    """With ``BertEMDLoss(fused_attention=True)`` the loss and
    the student's gradients equal the materialising path, with the teacher on SDPA."""

    pytest.importorskip("transformers")
    import helpers
    from bert_emd.nn.bert_emd_loss import BertEMDLoss

    def bert(hidden, layers, attn, seed):
        torch.manual_seed(seed)
        return helpers.tiny_bert(attn=attn, vocab=40, hidden=hidden, layers=layers, labels=3)

    ids = torch.randint(0, 40, (3, 13), generator=torch.Generator().manual_seed(0))
    am = torch.ones(3, 13, dtype=torch.long)
    am[1, 9:] = 0
    labels = torch.tensor([0, 2, 1])
    results = []
    for fused in (False, True):
        student, teacher = bert(16, 2, "eager", 1), bert(32, 4, "sdpa" if fused else "eager", 2).eval()
        loss = BertEMDLoss.from_models(student, teacher, attention_source=source, fused_attention=fused,
                                       per_sample=True, token_mask=True)
        with torch.no_grad():
            t_out = teacher(ids, attention_mask=am, output_hidden_states=True, output_attentions=not fused)
        s_out = student(ids, attention_mask=am, output_hidden_states=True, output_attentions=not fused)
        total, parts = loss(s_out, t_out, labels, attention_mask=am)
        grads = torch.autograd.grad(total, list(student.parameters()), allow_unused=True)
        results.append((total.detach(), parts["attention"], grads))
    (t0, a0, g0), (t1, a1, g1) = results
    assert a0 > 0
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=0)
    torch.testing.assert_close(t1, t0, rtol=1e-6, atol=0)
    scale = max(g.abs().max() for g in g0 if g is not None)
    for x, y in zip(g1, g0):
        if y is not None:
            assert (x - y).abs().max() <= 1e-5 * scale
