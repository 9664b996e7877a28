"""Time of one distillation step with BertEMDLoss against fixed-mapping and prediction-only losses.

One step = student forward (hidden states; attention scores through the q/k hooks) + teacher
forward (no grad) + loss + student backward, without the optimizer update. Three losses, all in
the same harness (``bert_emd.nn.BertEMDLoss``):

- ``emd``: BERT-EMD (attention scores + hidden + embedding + prediction, EMD layer mapping,
  cost-attention update);
- ``skip``: TinyBERT's fixed skip mapping (same terms, ``mapping="skip"``);
- ``pred``: prediction-layer distillation only.

``--compile [BACKEND]`` adds each loss's step with its forward (both models and the loss)
``torch.compile``d in one graph (``fullgraph=True``; rows ``emd compiled``, ...): with ``aot_eager``
the same kernels, so the difference is the host's dispatch; with ``inductor`` fused kernels too.

Target: the ``emd`` step within 10% of the ``skip`` step. Before timing, the EMD hidden term is
checked against the original's per-pair MSE loop and the plan against its marginals.

Configs: ``tiny`` (2-layer 32-d student, 4-layer 48-d teacher) and ``tinybert`` (4-layer 312-d,
12 heads, FFN 1200 student; BERT-base 12-layer 768-d teacher), random weights.

``--attention-paths``: instead, the same EMD step with its attention term computed two ways
for ``--sources`` (default ``probs,scores``): ``maps`` -- what the loss does without
fused attention (``probs``: both models run eager attention and return every layer's map,
``output_attentions=True``; ``scores``: the q/k hooks' materialised score maps) -- against
``fused`` (``fused_attention=True``: both models keep SDPA, the costs come from the hooked
queries and keys by ``bert_emd.attention_costs``, no map stored). Its gradients are checked equal
before timing. CPU memory: one fresh process per (source, path) measures the peak of its first full step
(VmHWM minus the RSS before, models and inputs built, warmed up on 16 tokens).

Usage: python benchmarks/bench_distill_step.py [--quick] [--device cpu|cuda] [--no-csv]
       python benchmarks/bench_distill_step.py --attention-paths --configs tinybert --batch 1 --seq 512
Rows go to benchmarks/results/distill_step.csv (``--attention-paths``:
distill_step_attention.csv) with machine, versions, commit and date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, markdown_table, provenance  # noqa: E402

CONFIGS = {
    # name: (student layers, d, heads, ffn), (teacher layers, d, heads, ffn)
    "tiny": ((2, 32, 4, 64), (4, 48, 4, 96)),
    "tinybert": ((4, 312, 12, 1200), (12, 768, 12, 3072)),
}
LOSSES = ("emd", "skip", "pred")


def _model(layers: int, d: int, heads: int, ffn: int, seed: int, device: str, attn: str = "sdpa"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=512,
        num_labels=3,
    )
    return BertForSequenceClassification._from_config(cfg, attn_implementation=attn).to(device)


def _loss(kind: str, student, teacher):
    from bert_emd.nn import BertEMDLoss

    if kind == "emd":
        return BertEMDLoss.from_models(student, teacher, attention_source="scores")
    if kind == "skip":
        return BertEMDLoss.from_models(student, teacher, attention_source="scores", mapping="skip")
    return BertEMDLoss.from_models(
        student, teacher, use_attention=False, use_hidden=False, use_embedding=False, use_prediction=True
    )


def _check(student, teacher, batch, device: str) -> None:
    """EMD hidden term = sum(plan * D) with D from the original's per-pair MSE loop; plan feasible."""
    import torch.nn.functional as F
    from bert_emd.nn import BertEMDLoss

    loss_fn = BertEMDLoss.from_models(student, teacher, attention_source="scores").to(device)
    ids, mask, y = batch
    with torch.no_grad():
        so = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        to = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ws = loss_fn.layer_weights.student_weight.clone()
        wt = loss_fn.layer_weights.teacher_weight.clone()
        _, parts = loss_fn(so, to, labels=y, attention_mask=mask)
        hs = [loss_fn.projection(h) for h in so.hidden_states[1:]]
        d = torch.tensor([[float(F.mse_loss(s, t)) for t in to.hidden_states[1:]] for s in hs])
        plan = loss_fn.hidden_loss.last_plan.double().cpu()
    loss_fn.detach_models()
    ref = float((plan * d.double()).sum())
    got = float(parts["hidden"])
    if abs(got - ref) > 1e-4 * max(1.0, abs(ref)):
        raise AssertionError(f"EMD hidden term {got} != sum(plan * per-pair MSE) {ref}")
    if (plan.sum(1) - ws.cpu()).abs().max() > 1e-5 or (plan.sum(0) - wt.cpu()).abs().max() > 1e-5:
        raise AssertionError("EMD plan does not meet the layer-weight marginals")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _compiled_steps(student, teacher, batch, backend: str) -> dict:
    """Per loss, a step whose forward (both models and the loss) is ``torch.compile``d with
    ``fullgraph=True`` on its own copy of the models (hooks stay attached: no recompiles); the
    backward runs AOTAutograd's compiled graph. Each is compiled here, before any timing."""
    import copy

    ids, mask, y = batch
    steps = {}
    for kind in LOSSES:
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        loss_fn = _loss(kind, s, t).to(ids.device)
        need_h = kind != "pred"
        with torch.no_grad():  # transformers installs its output hooks on the first forward
            s(input_ids=ids, attention_mask=mask, output_hidden_states=need_h)
            t(input_ids=ids, attention_mask=mask, output_hidden_states=need_h)

        def forward(s=s, t=t, loss_fn=loss_fn, need_h=need_h):
            so = s(input_ids=ids, attention_mask=mask, output_hidden_states=need_h)
            with torch.no_grad():
                to = t(input_ids=ids, attention_mask=mask, output_hidden_states=need_h)
            return loss_fn(so, to, labels=y, attention_mask=mask)[0]

        fwd = torch.compile(forward, backend=backend, fullgraph=True)

        def step(s=s, fwd=fwd):
            s.zero_grad(set_to_none=True)
            fwd().backward()

        step()  # compile
        steps[kind] = step
    return steps


def bench_config(name: str, batch: int, seq: int, repeats: int, warmup: int, device: str,
                 compile_backend: str | None = None) -> list[dict]:
    (sl, sd, sh, sf), (tl, td, th, tf) = CONFIGS[name]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (batch, seq), generator=g).to(device)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, seq - seq // 4 :] = 0  # some padding
    mask = mask.to(device)
    y = torch.randint(0, 3, (batch,), generator=g).to(device)

    # One student and one teacher for all losses; each loss hooks them only while it is timed.
    student = _model(sl, sd, sh, sf, 1, device).train()
    teacher = _model(tl, td, th, tf, 2, device).eval()
    losses = {kind: _loss(kind, student, teacher).to(device) for kind in LOSSES}
    for loss_fn in losses.values():
        loss_fn.detach_models()
    _check(student, teacher, (ids, mask, y), device)

    def step(kind: str) -> None:
        student.zero_grad(set_to_none=True)
        need_h = kind != "pred"
        so = student(input_ids=ids, attention_mask=mask, output_hidden_states=need_h)
        with torch.no_grad():
            to = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=need_h)
        total, _ = losses[kind](so, to, labels=y, attention_mask=mask)
        total.backward()

    def timed(kind: str) -> float:
        if kind != "pred":
            losses[kind].attach(student, teacher)
        t0 = time.perf_counter()
        step(kind)
        _sync(device)
        dt = time.perf_counter() - t0
        losses[kind].detach_models()
        return dt

    compiled = _compiled_steps(student, teacher, (ids, mask, y), compile_backend) if compile_backend else {}

    def timed_compiled(kind: str) -> float:
        t0 = time.perf_counter()
        compiled[kind]()
        _sync(device)
        return time.perf_counter() - t0

    names = [*LOSSES, *(f"{k} compiled" for k in compiled)]
    run = {**{k: lambda k=k: timed(k) for k in LOSSES},
           **{f"{k} compiled": lambda k=k: timed_compiled(k) for k in compiled}}
    for kind in names:
        for _ in range(warmup):
            run[kind]()
    # Interleave the losses round by round so that load from other processes hits all alike.
    samples: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(repeats):
        for kind in names:
            samples[kind].append(run[kind]())

    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = []
    for kind in names:
        rows.append(
            {
                "config": name,
                "loss": kind,
                "batch": batch,
                "seq": seq,
                "student": f"{sl}L-{sd}d-{sh}h",
                "teacher": f"{tl}L-{td}d-{th}h",
                "step_ms": med[kind] * 1e3,
                "min_ms": min(samples[kind]) * 1e3,
                "vs_skip": med[kind] / med["skip"],
                "vs_skip_min": min(samples[kind]) / min(samples["skip"]),
                "repeats": repeats,
                "compile": compile_backend if kind.endswith("compiled") else "",
            }
        )
    return rows


PATHS = ("maps", "fused")


def _attention_setup(name: str, batch: int, seq: int, source: str, path: str, device: str):
    """Student, teacher, loss and inputs of the EMD step whose attention term goes ``path``."""
    from bert_emd.nn import BertEMDLoss

    (sl, sd, sh, sf), (tl, td, th, tf) = CONFIGS[name]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (batch, seq), generator=g).to(device)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, seq - seq // 4 :] = 0  # some padding (none at batch 1)
    mask = mask.to(device)
    y = torch.randint(0, 3, (batch,), generator=g).to(device)
    # eager attention only where the loss reads the models' maps; the weights do not depend on it
    attn = "eager" if (path == "maps" and source == "probs") else "sdpa"
    student = _model(sl, sd, sh, sf, 1, device, attn).train()
    teacher = _model(tl, td, th, tf, 2, device, attn).eval()
    torch.manual_seed(3)  # the loss's projection: equal in both paths
    loss_fn = BertEMDLoss.from_models(student, teacher, attention_source=source,
                                      fused_attention=path == "fused").to(device)
    want_maps = path == "maps" and source == "probs"

    def step(length: int | None = None) -> None:
        """One step; ``length``: on the first ``length`` tokens only (a warm-up that leaves the
        memory of the full step untouched)."""
        i, m = (ids, mask) if length is None else (ids[:, :length], mask[:, :length])
        student.zero_grad(set_to_none=True)
        so = student(input_ids=i, attention_mask=m, output_hidden_states=True, output_attentions=want_maps)
        with torch.no_grad():
            to = teacher(input_ids=i, attention_mask=m, output_hidden_states=True, output_attentions=want_maps)
        total, _ = loss_fn(so, to, labels=y, attention_mask=m)
        total.backward()

    return student, step


def _attention_child(argv: list[str]) -> int:
    """One fresh process: peak memory of one EMD step as JSON: the peak resident set (VmHWM,
    reset just before the step through /proc/self/clear_refs) minus the resident set before it --
    everything the step newly touched: maps, activations, gradients. Warmed up on 16 tokens, so
    that the step's own allocations are not already resident from an earlier full step."""
    import json

    def status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    name, batch, seq, source, path, device, threads = argv
    if int(threads):
        torch.set_num_threads(int(threads))
    _, step = _attention_setup(name, int(batch), int(seq), source, path, device)
    step(16)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    before = status_kb("VmRSS")
    step()
    print(json.dumps({"peak_mb": max(0, status_kb("VmHWM") - before) / 1024}))
    return 0


def bench_attention_paths(name: str, batch: int, seq: int, sources: list[str], repeats: int, warmup: int,
                          device: str, threads: int) -> list[dict]:
    """The EMD step with attention costs from maps against fused (see the module docstring)."""
    import json
    import subprocess

    rows = []
    for source in sources:
        built = {path: _attention_setup(name, batch, seq, source, path, device) for path in PATHS}
        for path in PATHS:  # first step: gradients must agree before anything is timed (dropout off:
            built[path][0].eval()  # eager and SDPA attention draw their dropout masks differently)
            built[path][1]()
            built[path][0].train()
        grads = {path: [p.grad for p in built[path][0].parameters() if p.grad is not None] for path in PATHS}
        # per parameter, relative to its own scale -- or to 1e-3 of the largest gradient for the
        # ones that are 0 up to rounding (the key biases: softmax ignores a per-row constant)
        scale = max(float(g.abs().max()) for g in grads["maps"])
        worst = max(float((a - b).abs().max() / max(float(b.abs().max()), 1e-3 * scale, 1e-30))
                    for a, b in zip(grads["fused"], grads["maps"]))
        if len(grads["fused"]) != len(grads["maps"]) or not worst < 1e-3:
            raise AssertionError(f"{source}: fused and map-based gradients differ (max relative {worst:.2e})")
        for _ in range(warmup):
            for path in PATHS:
                built[path][1]()
        samples: dict[str, list[float]] = {path: [] for path in PATHS}
        for _ in range(repeats):  # interleaved, so that load from elsewhere hits both alike
            for path in PATHS:
                t0 = time.perf_counter()
                built[path][1]()
                _sync(device)
                samples[path].append(time.perf_counter() - t0)
        del built, grads
        peaks = {}
        for path in PATHS:
            if device == "cpu":
                env = dict(os.environ)
                env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "python"),
                                                     env.get("PYTHONPATH", "")])
                out = subprocess.run([sys.executable, __file__, "--_attention-child", name, str(batch), str(seq),
                                      source, path, device, str(threads)], capture_output=True, text=True,
                                     env=env, check=True)
                peaks[path] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
            else:
                peaks[path] = float("nan")
        med = {k: statistics.median(v) for k, v in samples.items()}
        for path in PATHS:
            rows.append({
                "config": name, "source": source, "path": path, "batch": batch, "seq": seq,
                "step_ms": med[path] * 1e3, "min_ms": min(samples[path]) * 1e3,
                "vs_maps": med[path] / med["maps"], "peak_mb": peaks[path],
                "grad_rel_diff": worst, "repeats": repeats,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_attention-child"]:
        return _attention_child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="small batches and few repeats (< 1 min on CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--configs", default="tiny,tinybert", help="comma-separated subset of tiny,tinybert")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 8, quick 4; tiny: 32)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: 64, quick 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per loss (default 9, quick 5)")
    p.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results")
    p.add_argument("--out-dir", default=None, help="CSV folder (default benchmarks/results)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time each loss's step with its forward torch.compile'd (fullgraph; default "
                        "backend inductor; 'aot_eager' isolates the host-side effect of capture)")
    p.add_argument("--attention-paths", action="store_true",
                   help="time the EMD step with attention costs from maps against fused_attention")
    p.add_argument("--sources", default="probs,scores", help="with --attention-paths: probs, scores or both")
    args = p.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    repeats = args.repeats or (5 if args.quick else 9)
    warmup = 1 if args.quick else 2
    prov = provenance(args.device)
    try:
        import transformers

        prov["transformers"] = transformers.__version__
    except ImportError:
        print("transformers is needed (pip install bert-emd[hf])", file=sys.stderr)
        return 2
    prov["device"] = args.device
    # CPU timings on a shared machine are only as good as its load: record it with the rows.
    prov["load1"] = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "-"

    if args.attention_paths:
        return _main_attention_paths(args, repeats, warmup, prov)
    rows = []
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if name not in CONFIGS:
            print(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
            return 2
        if name == "tiny":
            batch, seq = args.batch or 32, args.seq or 32
            reps = args.repeats or 4 * repeats  # short, noisy steps: more samples
        else:
            batch = args.batch or (4 if args.quick else 8)
            seq = args.seq or (32 if args.quick else 64)
            reps = repeats
        rows += bench_config(name, batch, seq, reps, warmup, args.device, args.compile)

    print(f"# {prov['machine']} | torch {prov['torch']} | transformers {prov['transformers']}", end="")
    print(f" | commit {prov['commit']} | {prov['date']} | load {prov['load1']}")
    print(markdown_table(rows, ["config", "loss", "batch", "seq", "step_ms", "min_ms", "vs_skip", "vs_skip_min"]))
    for name in {r["config"] for r in rows}:
        emd_row = next(r for r in rows if r["config"] == name and r["loss"] == "emd")
        verdict = "meets" if emd_row["vs_skip"] <= 1.10 else "misses"
        print(
            f"{name}: EMD step / skip step = {emd_row['vs_skip']:.3f} median, "
            f"{emd_row['vs_skip_min']:.3f} best-of ({verdict} the 10% target on the median)"
        )
    if not args.no_csv:
        path = append_csv("distill_step", [{**prov, **r} for r in rows], args.out_dir)
        print(f"appended {len(rows)} rows to {path}")
    return 0


def _main_attention_paths(args: argparse.Namespace, repeats: int, warmup: int, prov: dict) -> int:
    sources = [x.strip() for x in args.sources.split(",") if x.strip()]
    if not sources or any(x not in ("probs", "scores") for x in sources):
        print(f"--sources: probs and/or scores, got {args.sources!r}", file=sys.stderr)
        return 2
    rows = []
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if name not in CONFIGS:
            print(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
            return 2
        batch, seq = args.batch or 1, args.seq or 512
        rows += bench_attention_paths(name, batch, seq, sources, args.repeats or repeats, warmup, args.device,
                                      torch.get_num_threads())
    print(f"# {prov['machine']} | torch {prov['torch']} | transformers {prov['transformers']}", end="")
    print(f" | commit {prov['commit']} | {prov['date']} | load {prov['load1']} | threads {torch.get_num_threads()}")
    print(markdown_table(rows, ["config", "source", "path", "batch", "seq", "step_ms", "min_ms", "vs_maps",
                                "peak_mb", "grad_rel_diff"]))
    if not args.no_csv:
        path = append_csv("distill_step_attention", [{**prov, **r} for r in rows], args.out_dir)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
