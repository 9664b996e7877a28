"""Host time per call of the ops on tiny inputs (``bert-emd bench overhead``): what a call costs
besides its kernels (argument checks, backend selection, the autograd rule, launches).

Workloads (fp32; tiny, so that the kernels take a few microseconds and the rest is overhead):
  * ``layer_costs``: M = 4 student and N = 12 teacher layers [B=2, L=8, d=16], passed stacked
    ([M, B, L, d] and [N, B, L, d], as the vectorised expression takes them);
  * ``attention_costs``: M = 4 and N = 12 layers' queries and keys [B=2, H=2, L=8, d=8], passed as
    stacked pairs (Q, K) [layers, B, H, L, d], ``source="scores"``, no masks;
  * ``emd``: one 4 x 12 problem, uniform weights (the per-step call of the loss);
  * ``loss``: a whole ``BertEMDLoss`` step, forward and backward, on model outputs of those sizes
    (4 student, 12 teacher layers of hidden states [2, 8, 16], attention maps [2, 2, 8, 8], logits
    [2, 3], labels; the outputs given as dicts, so no model runs): providers ``emd`` (the EMD
    mapping, the cost-attention update), ``skip`` (TinyBERT's fixed mapping, the same terms) and
    ``pred`` (prediction distillation only), eager and, with ``--compile``, compiled (the loss's
    forward in one graph, its backward through AOTAutograd). Only ``fwd+bwd``.
Passes: ``no-grad`` (the forward under ``torch.no_grad``), ``fwd`` (the student requires grad: the
forward that records the graph) and ``fwd+bwd`` (that forward, then ``torch.autograd.grad`` w.r.t.
the student with a dense upstream gradient G [M, N]).

Providers, timed in interleaved rounds (each round times every provider once; the figure is the
median over rounds, so that a load change on a shared machine hits them all alike):
  * ``bert_emd``: the public op (``backend="auto"``);
  * ``vectorised torch``: the plain PyTorch expression of the same result,
    ``((S[:, None] - T[None]) ** 2).mean(...)`` (attention: of the maps Q K^T d**-0.5);
  * ``backend ops alone``: the selected backend's registered forward (and backward) op called
    directly below autograd on lists of layers (for ``layer_costs`` and ``emd`` the C++ kernels:
    the floor no dispatch goes under; for ``attention_costs`` the ``cpu`` backend's PyTorch code);
  * ``emd validate=False``: the call that reads nothing back;
  * with ``--compile``: ``bert_emd`` and ``vectorised torch`` under ``torch.compile`` (the backward
    through AOTAutograd).
Times are the calling thread's CPU time by default (``--timer thread``): the host time of a call,
without the waits for a core on a shared machine; ``--timer wall`` uses ``perf_counter``. Each
provider is checked against the vectorised expression (or the op) before it is timed. Rows go to
``benchmarks/results/overhead.csv`` (machine, versions, commit, date); a markdown table is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bert_emd  # noqa: E402
from _common import append_csv, markdown_table, median_time, provenance  # noqa: E402
from bert_emd import _backends  # noqa: E402

M_LAYERS, N_LAYERS = 4, 12
HIDDEN = (2, 8, 16)  # B, L, d
ATTN = (2, 2, 8, 8)  # B, H, L, d_head


def _layer_inputs(gen: torch.Generator):
    S = torch.randn(M_LAYERS, *HIDDEN, generator=gen)
    T = torch.randn(N_LAYERS, *HIDDEN, generator=gen) * 1.1
    return S, T


def _attention_inputs(gen: torch.Generator):
    def side(n):
        return torch.randn(n, *ATTN, generator=gen), torch.randn(n, *ATTN, generator=gen)

    return side(M_LAYERS), side(N_LAYERS)


def _vec_layers(S: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    return ((S[:, None] - T[None]) ** 2).mean(tuple(range(2, S.dim() + 1)))


def _vec_attention(sqk, tqk) -> torch.Tensor:
    (sq, sk), (tq, tk) = sqk, tqk
    a = sq @ sk.transpose(-1, -2) * sq.shape[-1] ** -0.5
    b = tq @ tk.transpose(-1, -2) * tq.shape[-1] ** -0.5
    return _vec_layers(a, b)


def _kernels(op: str, S, T, G):
    """(forward, forward+backward) of the selected backend's ops, called below autograd."""
    ops = torch.ops.bert_emd
    name = _backends.select(op, "auto", torch.device("cpu"))
    if op == "layer_costs":
        from bert_emd.ops._common import LAYER_COSTS_OPS

        f, b = (getattr(ops, n).default for n in LAYER_COSTS_OPS[name])
        Sl, Tl = list(S.detach().unbind(0)), list(T.unbind(0))

        def fwd():
            with torch._C._AutoDispatchBelowAutograd():
                return f(Sl, Tl, None, False, None)

        def fwd_bwd():
            with torch._C._AutoDispatchBelowAutograd():
                f(Sl, Tl, None, False, None)
                return b(G, Sl, Tl, None, False, None, False)

        return fwd, fwd_bwd
    (sq, sk), (tq, tk) = S, T
    f = getattr(ops, f"attention_costs_fwd_{name}").default
    b = getattr(ops, f"attention_costs_bwd_{name}").default
    args = [list(x.detach().unbind(0)) for x in (sq, sk, tq, tk)]

    def afwd():
        with torch._C._AutoDispatchBelowAutograd():
            return f(*args, None, None, -10000.0, False, False, None)

    def afwd_bwd():
        with torch._C._AutoDispatchBelowAutograd():
            _, lse = f(*args, None, None, -10000.0, False, False, None)
            return b(G, *args, lse, None, None, -10000.0, False, False, None, True, False)

    return afwd, afwd_bwd


def _providers(op: str, compile_backend: str | None):
    """{provider: callable(S, T) -> D}; S, T as the workload passes them."""
    if op == "layer_costs":
        ours, vec = (lambda S, T: bert_emd.layer_costs(S, T)), _vec_layers
    else:
        ours, vec = (lambda S, T: bert_emd.attention_costs(S, T)), _vec_attention
    out = {"bert_emd": ours, "vectorised torch": vec}
    if compile_backend:
        torch._dynamo.reset()
        out[f"bert_emd compiled ({compile_backend})"] = torch.compile(ours, backend=compile_backend,
                                                                      fullgraph=True)
        out[f"vectorised compiled ({compile_backend})"] = torch.compile(vec, backend=compile_backend,
                                                                        fullgraph=True)
    return out


def _student_grad(S):
    """The student as given with requires_grad (a tensor, or the (Q, K) pair)."""
    if isinstance(S, torch.Tensor):
        return S.detach().requires_grad_()
    return tuple(x.detach().requires_grad_() for x in S)


def _grad_leaves(S):
    return [S] if isinstance(S, torch.Tensor) else list(S)


def _cost_workload(op: str, gen, compile_backend, rounds: int, min_time: float) -> list[tuple]:
    S, T = _layer_inputs(gen) if op == "layer_costs" else _attention_inputs(gen)
    G = torch.rand(M_LAYERS, N_LAYERS, generator=gen)
    Sg = _student_grad(S)
    providers = _providers(op, compile_backend)
    ref = _vec_layers(S, T) if op == "layer_costs" else _vec_attention(S, T)
    ref_g = torch.autograd.grad(providers["vectorised torch"](Sg, T), _grad_leaves(Sg), G)
    fns: dict[tuple[str, str], object] = {}
    for name, fn in providers.items():
        D = fn(Sg, T)  # first call: compiles, and is checked
        grads = torch.autograd.grad(D, _grad_leaves(Sg), G)
        torch.testing.assert_close(D.detach(), ref, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        for g, r in zip(grads, ref_g):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n} grad: {m}")

        def no_grad(fn=fn):
            with torch.no_grad():
                return fn(S, T)

        fns[(name, "no-grad")] = no_grad
        fns[(name, "fwd")] = lambda fn=fn: fn(Sg, T)
        fns[(name, "fwd+bwd")] = lambda fn=fn: torch.autograd.grad(fn(Sg, T), _grad_leaves(Sg), G)
    kf, kfb = _kernels(op, S, T, G)
    fns[("backend ops alone", "no-grad")] = kf
    fns[("backend ops alone", "fwd+bwd")] = kfb
    return _time_rounds(fns, rounds, min_time)


def _emd_workload(gen, compile_backend, rounds: int, min_time: float) -> list[tuple]:
    C = torch.rand(M_LAYERS, N_LAYERS, generator=gen, dtype=torch.float64)
    Cg = C.clone().requires_grad_()
    name = _backends.select("emd", "auto", C.device)
    op = torch.ops.bert_emd.emd_exact.default if name == "cpu" else torch.ops.bert_emd.emd_exact_torch.default
    max_iter = bert_emd.ops.emd.default_max_iter(M_LAYERS, N_LAYERS)
    ref = bert_emd.emd(C)
    for validate in (True, False):  # checked first
        res = bert_emd.emd(Cg, validate=validate)
        torch.testing.assert_close(res.value.detach(), ref.value)
        torch.testing.assert_close(torch.autograd.grad(res.value, Cg)[0], ref.plan)

    def kernel():
        with torch._C._AutoDispatchBelowAutograd():
            return op(C, None, None, max_iter, True)

    def no_grad(validate=True):
        with torch.no_grad():
            return bert_emd.emd(C, validate=validate)

    fns = {
        ("bert_emd", "no-grad"): no_grad,
        ("bert_emd", "fwd+bwd"): lambda: torch.autograd.grad(bert_emd.emd(Cg).value, Cg),
        ("emd validate=False", "no-grad"): lambda: no_grad(False),
        ("emd validate=False", "fwd+bwd"): lambda: torch.autograd.grad(bert_emd.emd(Cg, validate=False).value, Cg),
        ("backend ops alone", "no-grad"): kernel,
    }
    if compile_backend:  # under torch.compile the status is not read (validate reads nothing)
        torch._dynamo.reset()
        value = torch.compile(lambda c: bert_emd.emd(c).value, backend=compile_backend, fullgraph=True)
        torch.testing.assert_close(torch.autograd.grad(value(Cg), Cg)[0], ref.plan)
        name = f"bert_emd compiled ({compile_backend})"
        fns[(name, "no-grad")] = lambda: no_grad_call(value, C)
        fns[(name, "fwd+bwd")] = lambda: torch.autograd.grad(value(Cg), Cg)
    return _time_rounds(fns, rounds, min_time)


def _loss_outputs(gen: torch.Generator, m: int, n: int, grad: bool) -> tuple[dict, dict, torch.Tensor]:
    """Student / teacher outputs as the loss reads them (dicts), and labels [B]."""
    B, L, d = HIDDEN
    H = ATTN[1]

    def side(layers: int, requires_grad: bool) -> dict:
        hs = tuple(torch.randn(B, L, d, generator=gen).requires_grad_(requires_grad) for _ in range(layers + 1))
        att = tuple(torch.softmax(torch.randn(B, H, L, L, generator=gen), -1).requires_grad_(requires_grad)
                    for _ in range(layers))
        return {"hidden_states": hs, "attentions": att,
                "logits": torch.randn(B, 3, generator=gen).requires_grad_(requires_grad)}

    return side(m, grad), side(n, False), torch.randint(0, 3, (B,), generator=gen)


LOSSES = {"emd": {"mapping": "emd"}, "skip": {"mapping": "skip"},
          "pred": {"use_attention": False, "use_hidden": False, "use_embedding": False}}


def loss_step(name: str, gen: torch.Generator):
    """(step, loss_fn, outputs) of the ``loss`` workload for the loss ``name`` (a key of
    :data:`LOSSES`): ``step()`` is one forward and backward (``autograd.grad`` w.r.t. the student's
    outputs and the loss's parameters); ``outputs`` are ``(student, teacher, labels)``. The step
    is checked once: the student's logits, and with ``emd`` / ``skip`` the projection, get a gradient."""
    from bert_emd.nn import BertEMDLoss

    s_out, t_out, labels = _loss_outputs(gen, M_LAYERS, N_LAYERS, True)
    leaves = [t for v in s_out.values() for t in (v if isinstance(v, tuple) else (v,))]
    d = HIDDEN[-1]
    loss_fn = BertEMDLoss(M_LAYERS, N_LAYERS, d, d, attention_source="probs", beta=1.0, **LOSSES[name])
    params = [p for p in loss_fn.parameters() if p.requires_grad]

    def step(fn=None):
        loss = (fn or (lambda s, t, y: loss_fn(s, t, labels=y)[0]))(s_out, t_out, labels)
        return torch.autograd.grad(loss, leaves + params, allow_unused=True)

    grads = step()
    logits = next(i for i, t in enumerate(leaves) if t is s_out["logits"])
    assert grads[logits] is not None, f"{name}: no gradient for the logits"
    if name != "pred":
        assert all(g is not None for g in grads[len(leaves):]), f"{name}: no gradient for the projection"
    return step, loss_fn, (s_out, t_out, labels)


def _loss_workload(gen, compile_backend, rounds: int, min_time: float) -> list[tuple]:
    fns: dict = {}
    for name in LOSSES:
        step, loss_fn, (s_out, t_out, labels) = loss_step(name, gen)
        fns[(name, "fwd+bwd")] = step
        if compile_backend:
            torch._dynamo.reset()
            compiled = torch.compile(lambda s, t, y, fn=loss_fn: fn(s, t, labels=y)[0], backend=compile_backend,
                                     fullgraph=True)
            state = {k: v.clone() for k, v in loss_fn.state_dict().items()}
            ref = loss_fn(s_out, t_out, labels=labels)[0]
            loss_fn.load_state_dict(state)  # each forward updates the layer weights: the same start
            torch.testing.assert_close(compiled(s_out, t_out, labels), ref, rtol=1e-5, atol=1e-6)
            fns[(f"{name} compiled ({compile_backend})", "fwd+bwd")] = lambda step=step, c=compiled: step(c)
    return _time_rounds(fns, rounds, min_time)


def no_grad_call(fn, *args):
    with torch.no_grad():
        return fn(*args)


TIMER = "thread"  # set by --timer


def _thread_time(fn, *, repeats: int, warmup: int, min_time: float) -> float:
    """``median_time`` on the calling thread's CPU clock: the host time of a call, without the
    time the thread waits for a core on a shared machine."""
    for _ in range(warmup):
        fn()
    t0 = time.thread_time()
    fn()
    inner = max(1, int(min_time / max(time.thread_time() - t0, 1e-6)))
    samples = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(inner):
            fn()
        samples.append((time.thread_time() - t0) / inner)
    return statistics.median(samples)


def _time_rounds(fns: dict, rounds: int, min_time: float) -> list[tuple]:
    """[(provider, pass, median seconds, spread)] over ``rounds`` interleaved rounds."""
    timing = _thread_time if TIMER == "thread" else median_time
    samples: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(timing(fn, repeats=3, warmup=1, min_time=min_time))
    out = []
    for (prov, pas), ts in samples.items():
        med = statistics.median(ts)
        spread = (max(ts) - min(ts)) / med if len(ts) > 1 else 0.0
        out.append((prov, pas, med, spread))
    return out


OPS = ("layer_costs", "attention_costs", "emd", "loss")


def run(quick: bool, threads: int | None, compile_backend: str | None, out_dir: Path | None,
        ops: tuple[str, ...] = OPS) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    rounds, min_time = (3, 0.02) if quick else (7, 0.05)
    prov = provenance("cpu")
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "layer_costs": f"M={M_LAYERS} N={N_LAYERS} [" + ",".join(map(str, HIDDEN)) + "] fp32",
        "attention_costs": f"M={M_LAYERS} N={N_LAYERS} Q,K [" + ",".join(map(str, ATTN)) + "] fp32 scores",
        "emd": f"{M_LAYERS}x{N_LAYERS} fp64, B=1",
        "loss": f"BertEMDLoss M={M_LAYERS} N={N_LAYERS} [" + ",".join(map(str, HIDDEN)) + "] fp32 probs",
    }
    rows: list[dict] = []
    for op in ops:
        if op == "emd":
            timed = _emd_workload(gen, compile_backend, rounds, min_time)
        elif op == "loss":
            timed = _loss_workload(gen, compile_backend, rounds, min_time)
        else:
            timed = _cost_workload(op, gen, compile_backend, rounds, min_time)
        vec = {pas: t for p, pas, t, _ in timed if p == "vectorised torch"}
        for prov_name, pas, t, spread in timed:
            rows.append({
                **prov,
                "benchmark": "overhead",
                "op": op,
                "pass": pas,
                "provider": prov_name,
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "shape": shapes[op],
                "us": t * 1e6,
                "x_vs_vectorised": t / vec[pas] if pas in vec else float("nan"),
                "spread": spread,
                "rounds": rounds,
                "timer": TIMER,
            })
        print(f"{op}: " + ", ".join(f"{p} {pas} {t * 1e6:.1f} us" for p, pas, t, _ in timed), flush=True)
        if op == "loss":  # the targets: emd within 1.5x of skip, at most 1.5 ms above pred
            t = {p: v for p, _, v, _ in timed}
            for suffix in ("", *(f" compiled ({compile_backend})",) * bool(compile_backend)):
                emd, skip, pred = (t[k + suffix] for k in LOSSES)
                print(f"loss{suffix}: emd / skip {emd / skip:.2f}x, emd - pred {(emd - pred) * 1e3:.2f} ms", flush=True)
    path = append_csv("overhead", rows, out_dir)
    print(f"rows appended to {path}")
    print(markdown_table(rows, ["op", "pass", "provider", "threads", "us", "x_vs_vectorised", "spread"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds of shorter samples")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, 0 = torch's default)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time torch.compile'd providers (default backend: inductor)")
    p.add_argument("--out-dir", type=Path, default=None, help="where the CSV goes (default benchmarks/results)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops (default: all)")
    p.add_argument("--timer", choices=["thread", "wall"], default="thread",
                   help="thread: the calling thread's CPU time (default; what a call costs the host, not "
                        "counting waits for a core on a shared machine); wall: perf_counter")
    args = p.parse_args(argv)
    global TIMER
    TIMER = args.timer
    run(args.quick, args.threads or None, args.compile, args.out_dir, tuple(args.ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
