"""The ops' eager path: what a call costs on the host besides its kernels.

In eager mode on plain tensors the public ops run their backend and their one autograd rule
directly (``bert_emd.ops._common.eager``), not through the registered op's Python dispatcher layers
(the autograd kernel of ``torch.library.register_autograd`` flattens ``Tensor[]`` arguments with
pytree on every call; ``custom_op`` wraps every call). These tests pin that down without timing
anything (``benchmarks/bench_overhead.py`` measures it): the eager path gives exactly the values
and gradients of the registered op; it never enters the dispatcher's Python layers; it is left
for the registered op under ``torch.compile``, a dispatch mode, a function mode, functorch
transforms and tensor subclasses; the profiler still sees the C++ kernels; the small-problem path
of the ``cpu`` attention backend equals its chunked path.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it first; kept for a lone run

import bert_emd  # noqa: E402
import bert_emd._ext as _ext  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from bert_emd.ops import _common  # noqa: E402
from bert_emd.ops import attention_costs_cpu as ACC  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

needs_ext = pytest.mark.skipif(not _ext.has_extension(), reason="bert_emd._C not built")


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _registered(fn):
    """``fn()`` the way the registered op runs: under a (pass-through) dispatch mode, which the
    eager path leaves to it."""
    with _PassThrough():
        return fn()


def _grads(out, leaves, G):
    return torch.autograd.grad(out, leaves, G, allow_unused=True)


def _same(a, b):
    """Exactly equal (the same kernels on the same inputs), None for None."""
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


class _PythonFrames:
    """Records the Python functions entered (file, name) while active."""

    def __enter__(self):
        self.seen = set()

        def prof(frame, event, arg):
            if event == "call":
                self.seen.add((frame.f_code.co_filename, frame.f_code.co_name))

        sys.setprofile(prof)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)

    def files(self, part: str) -> set:
        return {name for f, name in self.seen if part in f.replace(os.sep, "/")}


# ------------------------------------------------------------------------------ layer_costs
@needs_ext
@pytest.mark.parametrize("form", ["stacked", "lists"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_layer_costs_eager_equals_registered(form, backend, rng):
    M, N, B, L = 3, 4, 2, 6
    S = torch.randn(M, B, 2, L, L, generator=rng, dtype=torch.float64)
    T = torch.randn(N, B, 2, L, L, generator=rng, dtype=torch.float64)
    mask = torch.rand(B, L, generator=rng) > 0.3
    mask[:, 0] = True
    for kw, need_t in ((dict(), False), (dict(mask=mask, per_sample=True, attention_floor=-0.5), True)):
        s, t = S.clone().requires_grad_(), T.clone().requires_grad_(need_t)
        if form == "lists":
            s_in, t_in = [x.clone().requires_grad_() for x in S.unbind(0)], list(T.unbind(0))
            if need_t:
                t_in = [x.clone().requires_grad_() for x in t_in]
            leaves = s_in + (t_in if need_t else [])
        else:
            s_in, t_in, leaves = s, t, [s] + ([t] if need_t else [])
        D = bert_emd.layer_costs(s_in, t_in, backend=backend, **kw)
        assert type(D.grad_fn).__name__ == "_EagerBackward"
        G = torch.randn(D.shape, generator=rng, dtype=torch.float64)
        R = _registered(lambda s_in=s_in, t_in=t_in, kw=kw: bert_emd.layer_costs(s_in, t_in, backend=backend, **kw))
        assert type(R.grad_fn).__name__ != "_EagerBackward"
        _same([D], [R])
        _same(_grads(D, leaves, G), _grads(R, leaves, G))
        with torch.no_grad():
            _same([bert_emd.layer_costs(s_in, t_in, backend=backend, **kw)], [R])


@needs_ext
def test_layer_costs_eager_never_enters_the_dispatcher_python_layers(rng):
    S = torch.randn(4, 2, 8, 16, generator=rng, requires_grad=True)
    T = torch.randn(12, 2, 8, 16, generator=rng)
    G = torch.rand(4, 12, generator=rng)
    bert_emd.layer_costs(S, T)  # warm: backend selection memoised
    with _PythonFrames() as frames:
        torch.autograd.grad(bert_emd.layer_costs(S, T), S, G)
        with torch.no_grad():
            bert_emd.layer_costs(S, T)
    assert not frames.files("torch/_library/"), frames.files("torch/_library/")
    assert not frames.files("torch/utils/_pytree.py")
    with _PythonFrames() as frames:  # the registered op, for contrast
        _registered(lambda: torch.autograd.grad(bert_emd.layer_costs(S, T), S, G))
    assert frames.files("torch/_library/autograd.py")


# -------------------------------------------------------------------------- attention_costs
def _qk(rng, n, B, H, L, d, dtype=torch.float64):
    return (torch.randn(n, B, H, L, d, generator=rng, dtype=dtype), torch.randn(n, B, H, L, d, generator=rng,
                                                                              dtype=dtype))


def _masks(rng, B, L):
    am = torch.ones(B, L, dtype=torch.bool)
    am[0, L - 3 :] = False
    tm = am.clone()
    tm[-1, 1] = False
    return am, tm


ATTN_OPTIONS = [
    dict(),
    dict(attention_floor=-100.0, masks=True),
    dict(source="probs", per_sample=True, masks=True),
    dict(source="probs", attention_floor=0.01),
    dict(per_sample=True, attention_floor=-0.3),
]


@needs_ext
@pytest.mark.parametrize("form", ["stacked", "pairs"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_attention_costs_eager_equals_registered(form, backend, rng):
    B, H, L = 2, 2, 7
    (sq, sk), (tq, tk) = _qk(rng, 2, B, H, L, 4), _qk(rng, 3, B, H, L, 6)
    am, tm = _masks(rng, B, L)
    for opts in ATTN_OPTIONS:
        kw = dict(opts)
        if kw.pop("masks", False):
            kw.update(attention_mask=am, mask=tm)
        for need_t in (False, True):
            s = [sq.clone().requires_grad_(), sk.clone().requires_grad_()]
            t = [tq.clone().requires_grad_(need_t), tk.clone().requires_grad_(need_t)]
            if form == "pairs":
                s_in = [(q, k) for q, k in zip(s[0].unbind(0), s[1].unbind(0))]
                t_in = [(q, k) for q, k in zip(t[0].unbind(0), t[1].unbind(0))]
            else:
                s_in, t_in = tuple(s), tuple(t)
            leaves = s + (t if need_t else [])
            D = bert_emd.attention_costs(s_in, t_in, backend=backend, **kw)
            assert type(D.grad_fn).__name__ == "_EagerBackward"
            G = torch.randn(D.shape, generator=rng, dtype=torch.float64)
            R = _registered(lambda s_in=s_in, t_in=t_in, kw=kw: bert_emd.attention_costs(s_in, t_in, backend=backend,
                                                                                         **kw))
            _same([D], [R])
            _same(_grads(D, leaves, G), _grads(R, leaves, G))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_attention_cpu_small_path_equals_chunked(monkeypatch, dtype, rng):
    """The whole-problem path of the cpu backend (small problems) against its chunked path
    (forced by a small chunk budget): values and both sides' gradients, every option."""
    B, H, L = 3, 2, 9
    (sq, sk), (tq, tk) = _qk(rng, 2, B, H, L, 4, dtype), _qk(rng, 3, B, H, L, 8, dtype)
    am, tm = _masks(rng, B, L)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=1e-3)
    for opts in ATTN_OPTIONS:
        kw = dict(opts)
        if kw.pop("masks", False):
            kw.update(attention_mask=am, mask=tm)
        results = []
        for chunk in (ACC.CPU_CHUNK_ELEMENTS, 600):  # small path, then chunks of a few rows
            monkeypatch.setattr(ACC, "CPU_CHUNK_ELEMENTS", chunk)
            leaves = [x.clone().requires_grad_() for x in (sq, sk, tq, tk)]
            D = bert_emd.attention_costs(tuple(leaves[:2]), tuple(leaves[2:]), backend="cpu", **kw)
            G = torch.randn(D.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(D.dtype)
            results.append((D, _grads(D, leaves, G)))
        (D1, g1), (D2, g2) = results
        torch.testing.assert_close(D1, D2, equal_nan=True, **tol)
        for a, b in zip(g1, g2):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b, **tol)
        monkeypatch.undo()


@needs_ext
def test_attention_costs_eager_never_enters_the_dispatcher_python_layers(rng):
    S, T = _qk(rng, 4, 2, 2, 8, 8, torch.float32), _qk(rng, 12, 2, 2, 8, 8, torch.float32)
    S = tuple(x.requires_grad_() for x in S)
    G = torch.rand(4, 12, generator=rng)
    bert_emd.attention_costs(S, T)
    with _PythonFrames() as frames:
        torch.autograd.grad(bert_emd.attention_costs(S, T), S, G)
    assert not frames.files("torch/_library/"), frames.files("torch/_library/")
    assert not frames.files("torch/utils/_pytree.py")


# ------------------------------------------------------------------------------------- emd
@needs_ext
@pytest.mark.parametrize("weights", [False, True])
def test_emd_eager_equals_registered(weights, rng):
    C = torch.rand(5, 4, 12, generator=rng, dtype=torch.float64, requires_grad=True)
    a = torch.rand(4, generator=rng, dtype=torch.float64).requires_grad_() if weights else None
    b = (torch.rand(5, 12, generator=rng, dtype=torch.float64) + 0.1) if weights else None
    if weights:
        b = (b / b.sum(-1, keepdim=True) * a.detach().sum()).requires_grad_()
    leaves = [C] + ([a, b] if weights else [])
    res = bert_emd.emd(C, a, b)
    assert type(res.value.grad_fn).__name__ == "EagerTransportBackward"
    ref = _registered(lambda: bert_emd.emd(C, a, b))
    _same(res, ref)
    G = torch.rand(5, generator=rng, dtype=torch.float64)
    _same(_grads(res.value, leaves, G), _grads(ref.value, leaves, G))
    with torch.no_grad():
        _same(bert_emd.emd(C, a, b, validate=False), ref)


@needs_ext
def test_emd_kernel_call_is_seen_by_the_profiler():
    """The eager call reaches the C++ kernel by a redispatch, except while the profiler records
    (a redispatch is not recorded as an op)."""
    C = torch.rand(4, 12, dtype=torch.float64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        bert_emd.emd(C)
    assert any(e.key == "bert_emd::emd_exact" for e in prof.key_averages())


# ------------------------------------------------------------------------- when not eager
def test_eager_only_on_plain_tensors_outside_modes_and_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.rand(3)
    assert _common.eager(x) and _common.eager(torch.nn.Parameter(x))
    with _PassThrough():
        assert not _common.eager(x)

    class FunctionMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with FunctionMode():
        assert not _common.eager(x)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not _common.eager(fake)
    assert not _common.eager(fake)  # a fake tensor, the mode left
    assert not torch.func.vmap(lambda t: torch.tensor(_common.eager(t)))(torch.rand(2, 3)).any()


@needs_ext
def test_compiled_calls_trace_the_registered_ops(rng):
    """Under torch.compile the ops are the registered ones (fullgraph: no graph break from the
    eager path), forward and backward as eager."""
    S = torch.randn(3, 2, 5, 4, generator=rng, requires_grad=True)
    T = torch.randn(4, 2, 5, 4, generator=rng)
    Q = tuple(x.requires_grad_() for x in _qk(rng, 2, 2, 2, 5, 4, torch.float32))
    K = _qk(rng, 3, 2, 2, 5, 4, torch.float32)

    def loss(S, T, Q, K):
        D = bert_emd.layer_costs(S, T)
        A = bert_emd.attention_costs(Q, K, source="probs")
        return bert_emd.emd(D.double(), validate=False).value + bert_emd.emd(A.double(), validate=False).value

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    want = loss(S, T, Q, K)
    got = compiled(S, T, Q, K)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, [S, *Q]), torch.autograd.grad(want, [S, *Q])):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------ backend memo
def test_auto_selection_is_memoised_without_reading_the_environment(monkeypatch):
    """``auto`` never depends on TRITON_INTERPRET, so its memo key leaves it out; an explicit
    ``triton`` depends on it on CPU tensors."""
    from bert_emd import _backends

    cpu = torch.device("cpu")
    first = _backends.select("layer_costs", "auto", cpu)
    monkeypatch.setattr(_backends, "triton_interpret", lambda: pytest.fail("read the environment"))
    assert _backends.select("layer_costs", "auto", cpu) == first
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(_backends.BackendError, match="TRITON_INTERPRET"):
        _backends.select("layer_costs", "triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _backends._triton_reason("cpu") is None:
        assert _backends.select("layer_costs", "triton", cpu) == "triton"
