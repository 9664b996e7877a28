"""Benchmark of the attention cost matrices from queries and keys (``bert_emd.attention_costs``).

Workload: a TinyBERT-4-like student (M = 4 layers, H = 12 heads, d_S = 26) against a BERT-base
teacher (N = 12 layers, H = 12, d_T = 64), batch B, L in {128, 512}, right padding (random lengths
>= L/2; ``--full-length``: every token real, no padding to skip), the original's configuration
(scores with the -10000 additive mask, attention_floor -100) and post-softmax probs. Passes:
``fwd`` (D [M, N]) and ``fwd+bwd`` (D, then the gradient w.r.t. the student's queries and keys
from a dense G [M, N], as the EMD plan gives; the teacher is frozen).

Providers:
  * ``materialise + layer_costs``: what the loss does today -- every layer's [B, H, L, L] map
    formed as the score hooks form it (``(q k^T) * d**-0.5 + mask``, softmax for probs), then the
    fused ``bert_emd.layer_costs`` (C++ kernel on CPU); the backward through autograd (maps kept);
  * ``attention_costs[cpu]``: chunked PyTorch, query blocks of all layers at a time
    (``bert_emd.ops.attention_costs_cpu.CPU_CHUNK_ELEMENTS``), tiles recomputed in the backward;
  * on CUDA, ``attention_costs[triton]`` (the fused kernels) and the same baseline.
Every provider's D is checked against the baseline's before its timing is reported.

Memory. CPU: every (provider, L, source) runs in a fresh subprocess; the peak is
``getrusage(RUSAGE_SELF).ru_maxrss`` after the measured call minus the resident set size
(``/proc/self/statm``) just before it, with inputs already built and the libraries warmed up on
a tiny problem. It counts everything the process touched (tensors, allocator slack, BLAS
workspace), not just tensors; tracemalloc cannot see PyTorch's C++ allocations. CUDA:
``torch.cuda.max_memory_allocated`` above the allocation before the call. Rows go to
``benchmarks/results/attention_costs.csv`` with machine, versions, commit and date.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, markdown_table, median_time, provenance  # noqa: E402

M_LAYERS, N_LAYERS, HEADS, D_S, D_T = 4, 12, 12, 26, 64
FLOOR = {"scores": -100.0, "probs": None}
BASELINE = "materialise + layer_costs"
ROOT = Path(__file__).resolve().parents[1]


def _inputs(B: int, L: int, device: str, dtype=torch.float32, seed: int = 0, full: bool = False):
    """Student / teacher (q, k) pairs [B, H, L, d] and a right-padded [B, L] attention mask
    (all ones with ``full``)."""
    gen = torch.Generator().manual_seed(seed)

    def side(n, d):
        return [tuple(torch.randn(B, HEADS, L, d, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
                for _ in range(n)]

    S, T = side(M_LAYERS, D_S), side(N_LAYERS, D_T)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=gen)
    if full:
        lengths.fill_(L)
    am = (torch.arange(L)[None, :] < lengths[:, None]).to(device)
    return S, T, am


def _materialise_costs(S, T, am, source):
    """The baseline: maps as the score hooks form them, then the fused layer_costs."""
    from bert_emd.ops.layer_costs import layer_costs

    add = ((1.0 - am.to(torch.float32)) * -10000.0)[:, None, None, :]

    def maps(pairs):
        out = []
        for q, k in pairs:
            s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + add
            out.append(torch.softmax(s, -1) if source == "probs" else s)
        return out

    return layer_costs(maps(S), maps(T), attention_floor=FLOOR[source])


def _provider_fn(provider: str, S, T, am, source, passes: str):
    from bert_emd.ops.attention_costs import attention_costs

    if provider == BASELINE:
        def fwd():
            return _materialise_costs(S, T, am, source)
    else:
        backend = provider.split("[")[1].rstrip("]")

        def fwd():
            return attention_costs(S, T, attention_mask=am, source=source, attention_floor=FLOOR[source],
                                   backend=backend)
    if passes == "fwd":
        def run():
            with torch.no_grad():
                return fwd()
        return run
    leaves = [t for pair in S for t in pair]
    G = torch.rand(M_LAYERS, N_LAYERS, device=am.device)

    def run_bwd():
        D = fwd()
        torch.autograd.grad((D * G).sum(), leaves)
        return D

    return run_bwd


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(provider: str, B: int, L: int, source: str, passes: str, repeats: int, device: str,
            full: bool = False) -> dict:
    """Peak extra memory of one call, then its median time; in the calling process."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    # warm the libraries (BLAS, Triton compile, thread pools) on a tiny problem first
    S, T, am = _inputs(2, 16, device)
    for p in (S, T):
        for pair in p:
            for t in pair:
                t.requires_grad_(passes != "fwd" and p is S)
    _provider_fn(provider, S, T, am, source, passes)()
    S, T, am = _inputs(B, L, device, full=full)
    for q, k in S:
        q.requires_grad_(passes != "fwd")
        k.requires_grad_(passes != "fwd")
    fn = _provider_fn(provider, S, T, am, source, passes)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        D = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_bytes()
        D = fn()
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    D = D.detach().float().cpu()
    # the measured call was the warm-up; --quick: 3 single calls
    t = median_time(fn, repeats=repeats, warmup=0, min_time=0.0 if repeats <= 3 else 0.05, sync=sync)
    return {"time_ms": t * 1e3, "peak_mb": peak / 2**20, "D": D.tolist()}


def _run_child(args: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool, device: str, threads: int | None, out_dir: Path | None, batch: int | None = None,
        sources: tuple[str, ...] | None = None, full: bool = False) -> list[dict]:
    """Every (source, L, pass, provider): check D against the baseline, time it, measure its
    peak memory; append the rows to the CSV and print them as a table."""
    B = batch or (1 if quick else 4)
    lengths = (128, 512)
    sources = sources or (("scores",) if quick else ("scores", "probs"))
    passes = ("fwd", "fwd+bwd")
    repeats = 3 if quick else 5
    providers = [BASELINE, "attention_costs[triton]" if device.startswith("cuda") else "attention_costs[cpu]"]
    if threads:
        torch.set_num_threads(threads)  # the children's setting, so that provenance reports it
    prov = provenance(device)
    rows = []
    for source in sources:
        for L in lengths:
            for pss in passes:
                ref = None
                for provider in providers:
                    spec = [provider, str(B), str(L), source, pss, str(repeats), device, str(threads or 0),
                            str(int(full))]
                    res = _run_child(spec) if device == "cpu" else measure(provider, B, L, source, pss, repeats,
                                                                           device, full)
                    D = torch.tensor(res["D"], dtype=torch.float64)
                    if ref is None:
                        ref = D
                    err = ((D - ref).abs().max() / ref.abs().max()).item()
                    if err > 1e-4:
                        raise AssertionError(f"{provider} differs from {BASELINE} by {err:.2e} (L={L}, {source})")
                    qk_mb = 2 * B * HEADS * L * (M_LAYERS * D_S + N_LAYERS * D_T) * 4 / 2**20
                    maps_mb = (M_LAYERS + N_LAYERS) * B * HEADS * L * L * 4 / 2**20
                    row = {**prov, "device": device, "threads": threads or torch.get_num_threads(), "source": source,
                           "B": B, "H": HEADS, "L": L, "padding": "none" if full else "random",
                           "M": M_LAYERS, "N": N_LAYERS, "d_S": D_S, "d_T": D_T,
                           "pass": pss, "provider": provider, "time_ms": round(res["time_ms"], 3),
                           "peak_mb": round(res["peak_mb"], 1), "qk_mb": round(qk_mb, 1),
                           "maps_mb": round(maps_mb, 1), "max_rel_err": f"{err:.1e}"}
                    rows.append(row)
                    print(f"{source:6s} L={L:4d} {pss:8s} {provider:28s} {row['time_ms']:10.1f} ms "
                          f"peak {row['peak_mb']:8.1f} MB  (Q+K {row['qk_mb']} MB, maps {row['maps_mb']} MB)",
                          flush=True)
    path = append_csv("attention_costs", rows, out_dir)
    print(f"\nrows appended to {path}\n")
    print(markdown_table(rows, ["source", "L", "pass", "provider", "time_ms", "peak_mb", "qk_mb", "maps_mb"]))
    return rows


def _child(argv: list[str]) -> int:
    """One measurement in a fresh process (clean peak RSS); prints its result as JSON."""
    provider, B, L, source, pss, repeats, device, threads, full = argv
    if int(threads):
        torch.set_num_threads(int(threads))
    res = measure(provider, int(B), int(L), source, pss, int(repeats), device, bool(int(full)))
    print(json.dumps(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry (``bert-emd bench`` may call it with argv); 0 on success."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B=1, scores only, 3 repeats (< 1 min)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1, as bench_layer_costs; 0 = torch's default)")
    p.add_argument("--out-dir", type=Path, default=None, help="where the CSV goes")
    p.add_argument("--batch", type=int, default=None, help="batch size B (default 4; 1 with --quick)")
    p.add_argument("--full-length", action="store_true",
                   help="every sequence L tokens long (default: random lengths >= L/2, right padded)")
    p.add_argument("--source", choices=("scores", "probs"), action="append", default=None,
                   help="only this source (repeatable; default both, scores with --quick)")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    run(args.quick, args.device, args.threads or None, args.out_dir, args.batch,
        tuple(args.source) if args.source else None, args.full_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
