"""No host synchronisation in the ops on CUDA tensors, proven on a CPU-only machine.

Each check runs in a fresh interpreter (this file run as a script), so that an abort inside torch
is a failed test, not a crashed pytest. There, under ``FakeTensorMode``, inputs are fake CUDA
tensors (metadata only, nothing runs), the backend selection answers what a CUDA build answers
(``emd``: the ``cuda`` kernel; ``layer_costs``, ``attention_costs``: ``triton``) so that the path a
GPU takes is the one walked (this machine's ``bert_emd._C`` has no CUDA kernels: ``auto`` would
take the host route), and the registered fake kernels stand in for the kernels. A
``TorchDispatchMode`` records every operation that makes the host wait for the device: a scalar
read (``.item()``, ``.tolist()``, ``bool(t)``: under fake tensors these also raise
``DataDependentOutputException``), an output whose shape depends on the data (``nonzero``,
boolean indexing), a device-to-host copy (``.cpu()``, ``.to("cpu")``) and a blocking
host-to-device copy. A check passes when nothing was recorded.

What is walked, per op: the public call without gradient (argument checks, backend selection,
dispatch, the fake kernel), the registered autograd rule (``setup_context`` and ``backward``, run
with a stand-in ``ctx``: the code autograd runs, the backward op included) and the eager path's
autograd Function (its ``forward`` and ``backward``, same ``ctx``; the backend functions it calls
directly are the registered ops here, whose fake kernels run).

Whole training steps (``loss_step``, ``mtl_step``: tiny BERTs, the student's and the teachers'
forwards, the loss with its layer-weight update, then the backward of every parameter) need a
torch built with CUDA, GPU or not: on a CPU-only build, creating any autograd node over a CUDA
tensor reads the device's CUDA stream and aborts ("PyTorch is not linked with support for cuda
devices"). On a CUDA build without a GPU the graph records, but the autograd engine cannot run it
(its CUDA worker thread asks for a device that does not exist), so :func:`backward_by_hand` walks
the recorded graph itself: every node's backward, in topological order, with the engine's
reduction of broadcast gradients. In CI these run in the CUDA build's environment
(``scripts/cuda_build_check.sh``); ``test_no_sync_on_a_gpu`` runs the real kernels under
``torch.cuda.set_sync_debug_mode("error")`` on a GPU.

``emd(..., validate=True)`` reads the status back (one scalar, the documented opt-in sync);
``validate=False`` reads nothing.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
SYNC_FREE = ["emd", "layer_costs", "attention_costs", "attention_live_spans", "cost_attention"]


def _run(check: str) -> dict:
    # bert_emd as this interpreter imports it (installed, or the checkout's in an editable install)
    out = subprocess.run([sys.executable, str(HERE), check], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, (
        f"check {check!r} exited with {out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    )
    return json.loads(lines[-1])


@pytest.mark.parametrize("check", SYNC_FREE)
def test_no_host_sync(check):
    result = _run(check)
    assert result["calls"] > 0
    assert result["syncs"] == [], f"{check}: host syncs {list(zip(result['syncs'], result['where']))}"


def test_emd_validate_reads_the_status_once():
    """validate=True (the default) reads one scalar back, the documented opt-in sync; the same
    calls with validate=False read nothing (``test_no_host_sync[emd]``)."""
    result = _run("emd_validate")
    assert result["syncs"] == ["read: aten._local_scalar_dense.default"]


def test_the_detector_sees_every_kind_of_host_read():
    """Each recorded kind, from a known offender: a scalar read, bool(), tolist(), a data-dependent
    shape, a device-to-host copy, a blocking host-to-device copy; a non-blocking one passes."""
    result = _run("detector")
    assert result["syncs"] == [
        "read: aten._local_scalar_dense.default",  # item()
        "read: aten._local_scalar_dense.default",  # bool()
        "read: aten._local_scalar_dense.default",  # tolist()
        "data-dependent shape: aten.masked_select.default",
        "device-to-host copy: aten._to_copy.default",
        "blocking host-to-device copy: aten.copy_.default",
    ]


# Whole steps on a CUDA build (GPU or not). The single-task loss in the configurations a training
# run chooses from: attention maps or hooked scores, per-batch or per-sample transport, the fused
# attention-cost op or the maps; the multi-task step with the EMD layer mixtures.
STEPS = ["autograd",
         "loss_step:probs:batch:maps", "loss_step:scores:per_sample:maps",
         "loss_step:scores:batch:fused", "loss_step:probs:per_sample:fused",
         "mtl_step:scores:maps", "mtl_step:probs:fused"]


@pytest.mark.parametrize("check", STEPS)
def test_training_step_without_host_sync(check):
    """Forward and backward of the ops (``autograd``) and of whole loss steps on fake CUDA
    tensors: needs a torch built with CUDA (see the module docstring)."""
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: no CUDA device guard, autograd cannot record over CUDA tensors")
    if check != "autograd":
        pytest.importorskip("transformers")
    result = _run(check)
    assert result["calls"] > 0
    assert result["syncs"] == [], f"{check}: host syncs {list(zip(result['syncs'], result['where']))}"


@pytest.mark.cuda
def test_no_sync_on_a_gpu():
    """The real kernels, forward and backward, under CUDA's sync debug mode (an error on a sync)."""
    import bert_emd

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    S = torch.randn(4, 2, 16, 32, device=dev, generator=gen, requires_grad=True)
    T = torch.randn(12, 2, 16, 32, device=dev, generator=gen)
    mask = torch.ones(2, 16, device=dev)
    mask[1, 10:] = 0
    Q = [torch.randn(n, 2, 2, 16, 8, device=dev, generator=gen) for n in (4, 4, 12, 12)]
    Q[0].requires_grad_()
    C = torch.rand(2, 4, 12, device=dev, generator=gen, dtype=torch.float64, requires_grad=True)
    for _ in range(2):  # the second round after every kernel is compiled and cached
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            D = bert_emd.layer_costs(S, T, mask=mask, per_sample=True)
            A = bert_emd.attention_costs(Q[:2], Q[2:], attention_mask=mask, mask=mask, source="probs")
            res = bert_emd.emd(C, validate=False)
            torch.autograd.grad(D.sum() + A.sum() + res.value.sum(), [S, Q[0], C])
        finally:
            torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------------------------- the checks
# (run in a subprocess: ``python tests/ops/test_no_host_sync.py <check>``)
CUDA_BUILD_CHOICE = {"emd": "cuda", "layer_costs": "triton", "attention_costs": "triton", "sinkhorn": "triton",
                     "cost_attention": "cuda"}


def _as_on_a_cuda_build() -> None:
    """Backend selection as a CUDA build answers for CUDA tensors (see the module docstring)."""
    from bert_emd import _backends, _ext

    real = _backends.select

    def select(op, backend, device):
        if device.type == "cuda" and backend == "auto":
            return CUDA_BUILD_CHOICE[op]
        return real(op, backend, device)

    _backends.select = select
    _backends.host_fallback = lambda op, device_type: False
    _ext.cuda_max_nodes = lambda: 256


class _HostSyncs:
    """A TorchDispatchMode recording the operations that make the host wait for the device."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        reads = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default}
        shapes = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                  aten.unique_consecutive.default, aten.unique_dim.default, aten.repeat_interleave.Tensor}
        copies = {aten._to_copy.default, aten.copy_.default, aten.to.device, aten.to.dtype_layout}
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                outer.calls += 1
                if func in reads:
                    outer.syncs.append(f"read: {func}")
                elif func in shapes:
                    outer.syncs.append(f"data-dependent shape: {func}")
                elif func in copies:
                    outer._copy(func, args, kwargs)
                if len(outer.syncs) > len(outer.where):
                    outer.where.append(_caller())
                return func(*args, **kwargs)

        self.mode, self.calls, self.syncs, self.where = Mode(), 0, [], []

    def _copy(self, func, args, kwargs) -> None:
        if func == torch.ops.aten.copy_.default:
            dst, src = args[0].device, args[1].device
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        else:
            src = args[0].device
            dst = kwargs.get("device") or (args[1] if len(args) > 1 and isinstance(args[1], torch.device) else src)
            non_blocking = kwargs.get("non_blocking", False)
        dst = torch.device(dst)
        if src.type == "cuda" and dst.type == "cpu":
            self.syncs.append(f"device-to-host copy: {func}")
        elif src.type == "cpu" and dst.type == "cuda" and not non_blocking:
            self.syncs.append(f"blocking host-to-device copy: {func}")

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _caller() -> str:
    """Where a recorded operation came from: the innermost frame in bert_emd, else in transformers."""
    import traceback

    frames = traceback.extract_stack()
    for pkg in ("/bert_emd/", "/transformers/"):
        for f in reversed(frames):
            if pkg in f.filename:
                return f"{f.filename.split(pkg, 1)[1]}:{f.lineno} ({pkg.strip('/')}: {f.line})"
    return "?"


class _Ctx:
    """A stand-in for autograd's ctx: what the rules use of it."""

    def __init__(self, needs_input_grad=()):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


def _record(fn) -> dict:
    """Run ``fn`` under a fake-tensor mode and the recorder; a DataDependentOutputException
    (a host read the fake tensors cannot answer) is reported as the read it is."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    rec = _HostSyncs()
    with FakeTensorMode(), rec:
        try:
            fn()
        except DataDependentOutputException:
            if not rec.syncs:
                rec.syncs.append("read: DataDependentOutputException")
    return {"calls": rec.calls, "syncs": rec.syncs, "where": rec.where}


def _check_emd(validate: bool) -> dict:
    import bert_emd
    from bert_emd.ops import _common
    from bert_emd.ops import emd as E

    def run():
        dev = torch.device("cuda")
        C = torch.rand(3, 4, 12, dtype=torch.float64, device=dev)
        a = torch.full((4,), 0.25, dtype=torch.float64, device=dev)
        b = torch.full((3, 12), 1 / 12, dtype=torch.float64, device=dev)
        for args in ((C,), (C, a, b), (C.select(0, 0),)):
            bert_emd.emd(*args, validate=validate)
        if validate:
            return
        # the registered rule and the eager path's Function (stand-in ctx), backward included
        op = torch.ops.bert_emd.emd_exact.default
        inputs = (C, a, b, 1000, False)
        for flags in ((True, False, False), (True, True, True)):
            ctx = _Ctx(flags + (False, False))
            out = op(*inputs)
            _common.transport_setup_context(ctx, inputs, out)
            E._backward(ctx, torch.ones(3, dtype=torch.float64, device=dev))
            ctx = _Ctx((False, False) + flags + (False, False))
            out = _common.EagerTransport.forward(ctx, op, "registered", *inputs)
            _common.EagerTransport.backward(ctx, torch.ones(3, dtype=torch.float64, device=dev))

    return _record(run)


def _check_layer_costs() -> dict:
    import bert_emd
    from bert_emd.ops import layer_costs as LC

    fwd, bwd = (getattr(torch.ops.bert_emd, n).default for n in LC._OPS["triton"])
    LC._DIRECT["triton"] = (fwd, bwd)  # the eager Function's direct calls: the registered ops here

    def run():
        dev = torch.device("cuda")
        M, N, B, L, d = 4, 12, 2, 8, 16
        S, T = torch.randn(M, B, L, d, device=dev), torch.randn(N, B, L, d, device=dev)
        mask = torch.ones(B, L, device=dev)
        maps = torch.randn(M, B, 2, L, L, device=dev), torch.randn(N, B, 2, L, L, device=dev)
        for s, t, kw in ((S, T, {}), (list(S.unbind(0)), tuple(T.unbind(0)), dict(mask=mask, per_sample=True)),
                         (*maps, dict(mask=mask, attention_floor=-100.0))):
            bert_emd.layer_costs(s, t, **kw)
        for per_sample, need_t in ((False, False), (True, True)):
            G = torch.ones((B, M, N) if per_sample else (M, N), device=dev)
            Sl, Tl = list(S.unbind(0)), list(T.unbind(0))
            ctx = _Ctx(([True] * M, [need_t] * N, False, False, False))
            out = fwd(Sl, Tl, mask, per_sample, None)
            LC._setup_context(ctx, (Sl, Tl, mask, per_sample, None), out, bwd=LC._OPS["triton"][1])
            LC._backward(ctx, G)
            ctx = _Ctx((False,) * 6 + (True, need_t))
            LC._Eager.forward(ctx, "triton", 1, (True, True), mask, per_sample, None, S, T)
            LC._Eager.backward(ctx, G)

    return _record(run)


def _attention_inputs(dev):
    M, N, B, H, L = 4, 12, 2, 2, 8
    sq, sk = torch.randn(M, B, H, L, 8, device=dev), torch.randn(M, B, H, L, 8, device=dev)
    tq, tk = torch.randn(N, B, H, L, 16, device=dev), torch.randn(N, B, H, L, 16, device=dev)
    am = torch.ones(B, L, device=dev)
    return (sq, sk), (tq, tk), am


def _check_attention_costs() -> dict:
    import bert_emd
    from bert_emd.ops import attention_costs as AC

    fwd, bwd = (getattr(torch.ops.bert_emd, n).default for n in AC._OPS["triton"])
    AC._IMPLS["triton"] = (fwd, bwd)  # the eager Function's direct calls: the registered ops here

    def run():
        dev = torch.device("cuda")
        (sq, sk), (tq, tk), am = _attention_inputs(dev)
        pairs = list(zip(sq.unbind(0), sk.unbind(0)))
        for s, kw in (((sq, sk), {}), (pairs, dict(attention_mask=am, mask=am, source="probs", per_sample=True)),
                      ((sq, sk), dict(attention_mask=am, attention_floor=-100.0))):
            bert_emd.attention_costs(s, (tq, tk), **kw)
        M, N = sq.shape[0], tq.shape[0]
        lists = [list(x.unbind(0)) for x in (sq, sk, tq, tk)]
        for probs, per_sample, need_t in ((False, False, False), (True, True, True)):
            G = torch.ones((2, M, N) if per_sample else (M, N), device=dev)
            options = (am, am, -10000.0, probs, per_sample, None)
            ctx = _Ctx(([True] * M, [True] * M, [need_t] * N, [need_t] * N) + (False,) * 6)
            out = fwd(*lists, *options)
            AC._setup_context(ctx, (*lists, *options), out, bwd=AC._OPS["triton"][1])
            AC._backward(ctx, G, None)
            how = ("triton", (1, 1, 1, 1), (True,) * 4, *options[2:])
            ctx = _Ctx((False,) * 3 + (True, True, need_t, need_t))
            AC._Eager.forward(ctx, how, am, am, sq, sk, tq, tk)
            AC._Eager.backward(ctx, G)

    return _record(run)


def _check_live_spans() -> dict:
    """The host-side preparation of the Triton attention kernels (which keys and rows can be
    skipped), computed on the device: pure PyTorch, checked directly."""
    from bert_emd.ops._common import live_spans

    def run():
        (sq, sk), (tq, tk), am = _attention_inputs(torch.device("cuda"))
        lists = [list(x.unbind(0)) for x in (sq, sk, tq, tk)]
        for probs, floor in ((False, -100.0), (True, None)):
            live_spans(*lists, am, am, -10000.0, probs, floor)

    return _record(run)


def _check_detector() -> dict:
    def run():
        from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

        x = torch.rand(4, device="cuda")
        for read in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x.narrow(0, 0, 1).tolist(),
                     lambda: torch.masked_select(x, x > 0.5)):
            try:
                read()
            except (DataDependentOutputException, DynamicOutputShapeException):
                pass
        x.cpu()
        h = torch.rand(4)  # (torch.ops: Tensor.to / copy_ set a device guard a CPU-only torch lacks)
        torch.ops.aten.copy_.default(torch.empty(4, device="cuda"), h)
        torch.ops.aten.copy_.default(torch.empty(4, device="cuda"), h, True)

    return _record(run)


def backward_by_hand(root: torch.Tensor) -> None:
    """``root.backward()`` without the autograd engine (which cannot start on a CUDA build with no
    GPU): each node of the recorded graph, in topological order, gets the sum of the gradients its
    consumers sent, runs its backward and passes the results on, each reduced to the shape and
    dtype its next node recorded for it (the engine's handling of broadcast inputs); leaves
    accumulate into ``.grad``. Hooks on tensors are not run (the steps checked here register none)."""
    order, seen, stack = [], set(), [(root.grad_fn, False)]
    while stack:  # iterative depth-first post-order
        node, done = stack.pop()
        if done:
            order.append(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
    pending: dict = {root.grad_fn: [torch.ones_like(root)]}
    for node in reversed(order):
        grads = pending.pop(node, None)
        if grads is None:
            continue
        if type(node).__name__ == "AccumulateGrad":
            leaf = node.variable
            leaf.grad = grads[0] if leaf.grad is None else leaf.grad + grads[0]
            continue
        if any(g is None for g in grads):  # outputs no consumer used: the engine passes zeros (undefined)
            grads = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
                     for g, m in zip(grads, node._input_metadata)]
        outs = node(*grads) if callable(node) else node.apply(*grads)  # C++ node, or a Python Function's
        outs = outs if isinstance(outs, tuple) else (outs,)
        for (nxt, nr), g in zip(node.next_functions, outs):
            if nxt is None or g is None:
                continue
            meta = nxt._input_metadata[nr]
            if tuple(g.shape) != tuple(meta.shape):
                g = g.sum_to_size(meta.shape)
            if g.dtype != meta.dtype:
                g = g.to(meta.dtype)
            slot = pending.setdefault(nxt, [None] * len(nxt._input_metadata))
            slot[nr] = g if slot[nr] is None else slot[nr] + g


def _check_autograd() -> dict:
    """Forward and backward of the three ops through autograd's recorded graph (a CUDA build only)."""
    import bert_emd

    def run():
        dev = torch.device("cuda")
        S = torch.randn(4, 2, 8, 16, device=dev, requires_grad=True)
        T = torch.randn(12, 2, 8, 16, device=dev)
        (sq, sk), (tq, tk), am = _attention_inputs(dev)
        sq.requires_grad_()
        C = torch.rand(2, 4, 12, dtype=torch.float64, device=dev, requires_grad=True)
        D = bert_emd.layer_costs(S, T, mask=am, per_sample=True)
        A = bert_emd.attention_costs((sq, sk), (tq, tk), attention_mask=am, source="probs")
        res = bert_emd.emd(C, validate=False)
        backward_by_hand(D.sum() + A.sum() + res.value.sum())
        assert S.grad is not None and sq.grad is not None and C.grad is not None

    return _record(run)


def _record_step(build, step, steps: int = 2) -> dict:
    """``build()`` (models, loss, batches: on fake CUDA tensors, not recorded) then ``steps``
    recorded calls of ``step(built)`` -- the second reads the layer weights the first one wrote."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    rec = _HostSyncs()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with torch.device("cuda"):  # the models' parameters; the step runs without a default device
            built = build()
        with rec:
            try:
                for _ in range(steps):
                    step(built)
            except DataDependentOutputException as e:
                rec.syncs.append(f"read: DataDependentOutputException ({e})")
    return {"calls": rec.calls, "syncs": rec.syncs, "where": rec.where}


VOCAB, B, L = 40, 3, 9


def _batch(n_labels: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)  # CPU generator: the values are made on the host, then faked
    ids = torch.randint(3, VOCAB, (B, L), generator=g).cuda()
    am = torch.ones(B, L, dtype=torch.long).cuda()
    return {"input_ids": ids, "attention_mask": am, "labels": torch.arange(B).remainder(n_labels).cuda()}


def _check_loss_step(source: str, sample: str, attention: str) -> dict:
    """A BertEMDLoss training step: student and teacher forwards, the loss (EMD mapping, its
    layer-weight update), the backward to every student and loss parameter."""
    import helpers
    from bert_emd.nn import BertEMDLoss

    fused = attention == "fused"
    maps = source == "probs" and not fused

    def build():
        student = helpers.tiny_bert(vocab=VOCAB, hidden=16, layers=2, labels=3, init=0.2)
        teacher = helpers.tiny_bert(vocab=VOCAB, hidden=32, layers=4, labels=3, init=0.2).eval()
        loss_fn = BertEMDLoss.from_models(student, teacher, attention_source=source, beta=1.0,
                                          per_sample=sample == "per_sample", fused_attention=fused)
        return student, teacher, loss_fn, _batch(3, 0)

    def step(built):
        student, teacher, loss_fn, b = built
        s_out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                        output_attentions=maps)
        with torch.no_grad():
            t_out = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                            output_attentions=maps)
        loss, _ = loss_fn(s_out, t_out, labels=b["labels"], attention_mask=b["attention_mask"])
        backward_by_hand(loss)
        assert loss_fn.projection.weight.grad is not None
        assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None

    return _record_step(build, step)


def _check_mtl_step(source: str, attention: str) -> dict:
    """A multi-task distillation step: the student on both task batches, each task's teacher, the
    multi-task EMD loss (one batched solve, per-task layer weights, the EMD layer mixtures)."""
    import helpers
    from bert_emd.mtl import MechanismConfig, MultiTaskEMDLoss, MultiTaskModel, TaskSpec, TeacherSet, distillation_step

    def build():
        ts = [TaskSpec(f"t{i}", "single", n, data={"train": "x.csv"}) for i, n in enumerate((2, 3))]
        encoder = helpers.tiny_bert("encoder-no-pool", vocab=VOCAB, hidden=32, layers=2)
        student = MultiTaskModel(encoder, ts, MechanismConfig(hierarchy=True, hierarchy_mode="emd", dropout=0.0))
        teachers = TeacherSet({"t0": helpers.tiny_bert(vocab=VOCAB, hidden=32, layers=3, labels=2).eval(),
                               "t1": helpers.tiny_bert(vocab=VOCAB, hidden=32, layers=4, labels=3).eval()})
        loss_fn = MultiTaskEMDLoss.from_models(ts, student, teachers, attention_source=source,
                                               fused_attention=attention == "fused", beta=1.0)
        batches = [{"task": "t0", **_batch(2, 0)}, {"task": "t1", **_batch(3, 1)}]
        return student, teachers, loss_fn, batches

    def step(built):
        student, teachers, loss_fn, batches = built
        loss, _, _ = distillation_step(student, teachers, loss_fn, batches)
        backward_by_hand(loss)
        assert student.encoder.encoder.layer[0].attention.self.query.weight.grad is not None

    return _record_step(build, step)


def _check_cost_attention() -> dict:
    """The layer-weight rule: the one-op kernel (its fake kernel here) and the tensor-op reference
    (``backend="torch"``), for one feature, two stacked features and per-example plans. (Storing
    the weights, ``CostAttention.step``, is walked by the whole-step checks: a CPU-only torch's
    ``Tensor.copy_`` binding cannot take fake CUDA tensors.)"""
    from bert_emd.ops.cost_attention import cost_attention_step

    def run():
        dev = torch.device("cuda")
        M, N, B = 4, 12, 3
        ws = torch.full((M,), 1 / M, dtype=torch.float64, device=dev)
        wt = torch.full((N,), 1 / N, dtype=torch.float64, device=dev)
        for backend in ("auto", "torch"):
            for normalize in ("sum", "double_softmax"):
                for features, shape in ((1, (M, N)), (2, (2, M, N)), (1, (B, M, N)), (2, (2 * B, M, N))):
                    plan, cost = torch.rand(shape, device=dev), torch.rand(shape, device=dev)
                    cost_attention_step(plan, cost, ws, wt, features=features, normalize=normalize,
                                        backend=backend)

    return _record(run)


CHECKS = {
    "emd": lambda: _check_emd(False),
    "emd_validate": lambda: _check_emd(True),
    "layer_costs": _check_layer_costs,
    "attention_costs": _check_attention_costs,
    "attention_live_spans": _check_live_spans,
    "cost_attention": _check_cost_attention,
    "detector": _check_detector,
    "autograd": _check_autograd,
}


def _check_step(name: str) -> dict:
    """``loss_step:SOURCE:SAMPLE:ATTENTION`` or ``mtl_step:SOURCE:ATTENTION`` (see STEPS)."""
    kind, *options = name.split(":")
    return (_check_loss_step if kind == "loss_step" else _check_mtl_step)(*options)


CHECKS.update({name: functools.partial(_check_step, name) for name in STEPS[1:]})


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))  # tests/: helpers
    _as_on_a_cuda_build()
    print(json.dumps(CHECKS[sys.argv[1]]()))
