"""Benchmark of the fused layer cost matrices (``bert-emd bench costs``).

Workloads (fp32, M = 4 student and N = 12 teacher layers, B = 32):
  * ``hidden``: hidden states [B, L=128, d=768] (after the student's projection), no mask;
  * ``attn_L128`` / ``attn_L64``: attention scores [B, H=12, L, L] with the original's
    ``attention_floor=-100`` (padding carries -1e4, as BERT's additive mask gives).
Passes: ``fwd`` (D [M, N]) and ``fwd+bwd`` (D, then the gradient w.r.t. the M student layers
from a dense upstream gradient G [M, N], as the EMD plan gives; the teacher is frozen).

Providers, timed side by side in one run:
  * ``original loop``: the original BERT-EMD code, one ``MSELoss`` call per pair with the
    ``torch.where(x <= -100, 0, x)`` masking redone inside the loop (``fwd+bwd``: autograd);
  * ``vectorised torch``: stack + |s|^2 + |t|^2 - 2 s.t through one matmul (autograd);
  * ``bert_emd[cpu]`` (C++) and, on CUDA, ``bert_emd[triton]``: ``bert_emd.layer_costs``;
  * ``memory floor``: one read of every input, timed as a reduction (``sum``) of each layer;
    for ``fwd+bwd`` the forward floor plus the backward's (one more read of every input and one
    write of the fresh student gradients: ``sum`` of each teacher layer, ``clone`` of each
    student layer).
Each provider is checked against the original loop before it is timed. Rows go to
``benchmarks/results/layer_costs.csv`` (machine, versions, commit, date), a plot next to it.
On CUDA the rows also carry the bytes that must move and the time they take at the measured
device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, markdown_table, median_time, provenance, pyplot, save_figure  # noqa: E402
from bert_emd.ops.layer_costs import layer_costs  # noqa: E402
from bert_emd.reference.layer_costs import layer_costs_original, layer_costs_vectorized  # noqa: E402

M_LAYERS, N_LAYERS = 4, 12


def _workloads(quick: bool) -> list[tuple[str, tuple[int, ...], float | None]]:
    if quick:
        return [("hidden", (8, 64, 256), None), ("attn_L64", (8, 12, 64, 64), -100.0)]
    return [
        ("hidden", (32, 128, 768), None),
        ("attn_L128", (32, 12, 128, 128), -100.0),
        ("attn_L64", (32, 12, 64, 64), -100.0),
    ]


def _inputs(shape, floor, gen, device):
    """M student and N teacher layers; attention scores carry -1e4 on padded keys."""
    def one(scale):
        x = torch.randn(shape, generator=gen) * scale
        if floor is not None:  # padded keys of each sample get BERT's additive -1e4
            B, L = shape[0], shape[-1]
            lengths = torch.randint(L // 2, L + 1, (B,), generator=gen)
            pad = torch.arange(L)[None, :] >= lengths[:, None]
            x = x.masked_fill(pad[:, None, None, :], -1e4)
        return x.to(device)

    S = [one(1.0) for _ in range(M_LAYERS)]
    T = [one(1.1) for _ in range(N_LAYERS)]
    return S, T


def _floor_fwd(S, T):
    for x in S:
        x.sum()
    for x in T:
        x.sum()


def _floor_bwd(S, T):
    for x in T:
        x.sum()
    return [x.clone() for x in S]


def _check(name, D, D_ref, grads=None, grads_ref=None):
    rel = ((D.double() - D_ref.double()).abs() / D_ref.double().abs().clamp_min(1e-30)).max().item()
    tol = 1e-3 if name.startswith("vectorised") else 1e-4  # the matmul form cancels
    assert rel < tol, f"{name}: forward differs from the original loop by {rel:.2e} relative"
    if grads is not None:
        for g, r in zip(grads, grads_ref):
            err = ((g.double() - r.double()).abs().max() / r.double().abs().max()).item()
            assert err < tol, f"{name}: gradient differs from the original loop's by {err:.2e}"


def run(quick: bool, device: str, threads: int | None, out_dir: Path | None) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    repeats = 3 if quick else 7
    min_time = 0.02 if quick else 0.1
    prov = provenance(device)
    gen = torch.Generator().manual_seed(0)
    copy_bw = _copy_bandwidth(dev, sync) if dev.type == "cuda" else None
    backends = ["triton"] if dev.type == "cuda" else ["cpu"]
    rows: list[dict] = []
    for wname, shape, floor in _workloads(quick):
        S, T = _inputs(shape, floor, gen, dev)
        G = torch.rand(M_LAYERS, N_LAYERS, generator=gen).to(dev)
        G /= G.sum()
        numel = S[0].numel()
        elsize = S[0].element_size()
        bytes_fwd = (M_LAYERS + N_LAYERS) * numel * elsize
        bytes_bwd = bytes_fwd + M_LAYERS * numel * elsize  # read all again, write student grads
        Sg = [x.clone().requires_grad_() for x in S]

        providers = {
            "original loop": lambda S_, T_: layer_costs_original(S_, T_, floor),
            "vectorised torch": lambda S_, T_: layer_costs_vectorized(S_, T_, attention_floor=floor),
        }
        for b in backends:
            providers[f"bert_emd[{b}]"] = (
                lambda S_, T_, b=b: layer_costs(S_, T_, attention_floor=floor, backend=b))

        # ---- correctness first, against the original loop (forward and student gradients)
        D_ref = layer_costs_original(Sg, T, floor)
        g_ref = torch.autograd.grad(D_ref, Sg, G)
        del D_ref
        for name, fn in providers.items():
            if name == "original loop":
                continue
            D = fn(Sg, T)
            grads = torch.autograd.grad(D, Sg, G)
            _check(name, D, layer_costs_original(S, T, floor), grads, g_ref)
            del D, grads
        del g_ref

        # ---- timings
        times: dict[tuple[str, str], float] = {}
        for name, fn in providers.items():
            times[(name, "fwd")] = median_time(lambda fn=fn: fn(S, T), repeats=repeats, min_time=min_time,
                                               sync=sync)
            times[(name, "fwd+bwd")] = median_time(
                lambda fn=fn: torch.autograd.grad(fn(Sg, T), Sg, G), repeats=repeats, min_time=min_time, sync=sync)
        times[("memory floor", "fwd")] = median_time(lambda: _floor_fwd(S, T), repeats=repeats,
                                                     min_time=min_time, sync=sync)
        times[("memory floor", "fwd+bwd")] = times[("memory floor", "fwd")] + median_time(
            lambda: _floor_bwd(S, T), repeats=repeats, min_time=min_time, sync=sync)

        for (name, pas), t in times.items():
            nbytes = bytes_fwd if pas == "fwd" else bytes_fwd + bytes_bwd
            row = {
                **prov,
                "benchmark": "layer_costs",
                "workload": wname,
                "pass": pas,
                "provider": name,
                "device": dev.type,
                "threads": torch.get_num_threads(),
                "shape": f"M={M_LAYERS} N={N_LAYERS} [" + ",".join(map(str, shape)) + "] fp32",
                "ms": t * 1e3,
                "GB_per_s": nbytes / t / 1e9,
                "x_vs_loop": times[("original loop", pas)] / t,
                "x_of_floor": t / times[("memory floor", pas)],
                "min_bytes": nbytes,
                "copy_bw_floor_ms": (nbytes / copy_bw * 1e3) if copy_bw else float("nan"),
            }
            rows.append(row)
        print(f"{wname}: " + ", ".join(f"{n} {p} {t * 1e3:.2f} ms" for (n, p), t in times.items()), flush=True)
    path = append_csv("layer_costs", rows, out_dir)
    print(f"rows appended to {path}")
    _plot(rows, path.with_name("layer_costs.png"))
    print(markdown_table(rows, ["workload", "pass", "provider", "threads", "ms", "GB_per_s", "x_vs_loop",
                                "x_of_floor"]))
    return rows


def _copy_bandwidth(dev, sync) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    a = torch.empty(1 << 28, dtype=torch.float32, device=dev)  # 1 GiB
    b = torch.empty_like(a)
    t = median_time(lambda: b.copy_(a), repeats=5, sync=sync)
    return 2 * a.numel() * a.element_size() / t


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.6), squeeze=False)
    width = 0.8 / len(providers)
    for ax, w in zip(axes[0], workloads):
        for k, p in enumerate(providers):
            vals = [next((r["ms"] for r in rows if r["workload"] == w and r["provider"] == p and r["pass"] == pas),
                         0.0) for pas in ("fwd", "fwd+bwd")]
            ax.bar([x + k * width for x in range(2)], vals, width, label=p)
        ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(2)], ["fwd", "fwd+bwd"])
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"layer_costs {w}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(rows[0]["machine"], fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, 3 repeats (< 1 min)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, 0 = torch's default)")
    p.add_argument("--out-dir", type=Path, default=None, help="where the CSV and plot go")
    args = p.parse_args(argv)
    run(args.quick, args.device, args.threads or None, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
