"""Benchmark of the exact batched EMD (``bert-emd bench emd``).

Per-problem solve time for batches of B problems, uniform weights (the BERT-EMD case), against:
  * POT ``ot.emd2`` and ``ot.emd`` called in a Python loop (what a user would write),
  * POT's bare C++ network simplex (``ot.lp.emd_wrap.emd_c``, no Python-side checks),
  * pyemd's C++ backend called as the original BERT-EMD code calls it: ``emd_with_flow`` on the
    zero-padded square (M+N) x (M+N) problem built in numpy from a float64 copy of the costs.
Every provider is first checked against POT on the same problems. Loop-based baselines cost the
same per problem whatever B is, so they are timed on min(B, 64) problems. Every timed call takes
the next problems of a pool of at least 2048 (``POOL``), so that no provider is timed on problems
its branch predictor has just learnt.

Assignment rows (``--assignment``, part of every full run): square problems with uniform weights
(n = 4, 12, 32, 64), which ``bert_emd.emd`` solves with its assignment solver, against the
dedicated assignment solvers a user would pick instead, each called per problem in a loop:
scipy's ``linear_sum_assignment``, ``lap.lapjv`` and ``fastlap.solve_lap_batch`` (batched),
values checked against scipy first.

Writes rows to benchmarks/results/emd.csv, a plot benchmarks/results/emd.png and (full runs)
the table in benchmarks/RESULTS.md between the ``bench_emd`` markers.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bert_emd  # noqa: E402
from _common import append_csv, markdown_table, median_time, provenance, pyplot, save_figure  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
POOL = 2048  # distinct problems per (shape, B) that the timed calls cycle through (at least B)


def _cycle(items: list):
    """A function returning the next item of ``items`` on every call, round and round."""
    it = itertools.cycle(items)
    return lambda: next(it)


def _pot():
    try:
        import ot
        from ot.lp.emd_wrap import emd_c

        return ot, emd_c
    except ImportError:
        return None, None


def _pyemd():
    try:
        from pyemd import emd_with_flow

        return emd_with_flow
    except ImportError:
        return None


def original_pyemd_call(emd_with_flow, trans_matrix: torch.Tensor, M: int, N: int):
    """The original code's solver call: zero-padded square problem, float64 numpy copies."""
    s_w = np.concatenate((np.full(M, 1.0 / M), np.zeros(N)))
    t_w = np.concatenate((np.zeros(M), np.full(N, 1.0 / N)))
    dist = torch.zeros(M + N, M + N, dtype=trans_matrix.dtype)
    dist[:M, M:] = trans_matrix
    dist[M:, :M] = trans_matrix.t()
    d = dist.detach().cpu().numpy().astype("float64")
    value, flow = emd_with_flow(s_w, t_w, d)
    return value, np.array(flow)[:M, M:]


ASSIGNMENT_SIZES = ((4, 4096), (12, 4096), (32, 1024), (64, 256))


def run_assignment(quick: bool, device: str, repeats: int, prov: dict, g: torch.Generator) -> list[dict]:
    """Square, uniform-weight problems: bert_emd.emd against scipy / lap / fastlap per problem."""
    from scipy.optimize import linear_sum_assignment

    try:
        import lap
    except ImportError:
        lap = None
    try:
        import fastlap
    except ImportError:
        fastlap = None
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    rows = []
    for n, B in ASSIGNMENT_SIZES[1:3] if quick else ASSIGNMENT_SIZES:
        nb = -(-POOL // B)
        pool = torch.rand(nb * B, n, n, generator=g, dtype=torch.float64)
        batches = [pool[k * B : (k + 1) * B].to(dev) for k in range(nb)]
        arrays = [np.ascontiguousarray(b.cpu().numpy()) for b in batches]
        res = bert_emd.emd(batches[0])
        for t in range(min(B, 32)):  # values first: the optimal assignment's cost / n
            r, c = linear_sum_assignment(arrays[0][t])
            ref = arrays[0][t][r, c].sum() / n
            assert abs(float(res.cost[t]) - ref) < 1e-9, f"bert_emd disagrees with scipy on {n}x{n}"
        nxt, nxt_np = _cycle(batches), _cycle(arrays)
        timings = {f"bert_emd[{dev.type}]": median_time(lambda: bert_emd.emd(nxt()), repeats=repeats, sync=sync)}
        timings["scipy linear_sum_assignment loop"] = median_time(
            lambda: [linear_sum_assignment(c) for c in nxt_np()], repeats=repeats)
        if lap is not None:
            timings["lap.lapjv loop"] = median_time(lambda: [lap.lapjv(c) for c in nxt_np()], repeats=repeats)
        if fastlap is not None and hasattr(fastlap, "solve_lap_batch"):
            timings["fastlap.solve_lap_batch"] = median_time(lambda: fastlap.solve_lap_batch(nxt_np()),
                                                             repeats=repeats)
        fastest = min(t for k, t in timings.items() if not k.startswith("bert_emd"))
        for name, t in timings.items():
            rows.append({**prov, "benchmark": "assignment", "provider": name, "threads": torch.get_num_threads(),
                         "shape": f"{n}x{n}", "B": B, "us_per_problem": t / B * 1e6,
                         "speedup_vs_ot.emd2": float("nan"), "speedup_vs_POT_C++": float("nan"),
                         "speedup_vs_fastest_lap": fastest / t})
        print(f"assignment {n}x{n} B={B}: " + ", ".join(f"{k} {v / B * 1e6:.2f} us" for k, v in timings.items()),
              flush=True)
    return rows


def run(quick: bool, device: str, threads: int | None, update_results: bool, out_dir: Path | None,
        assignment: bool = True) -> list[dict]:
    ot, emd_c = _pot()
    emd_with_flow = _pyemd()
    if threads:
        torch.set_num_threads(threads)
    shapes = [(4, 12), (12, 12)] if quick else [(4, 12), (6, 12), (12, 12), (64, 64)]
    batches = [1, 4096] if quick else [1, 64, 4096]
    repeats = 3 if quick else 7
    prov = provenance(device)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for M, N in shapes:
        a_np, b_np = np.full(M, 1.0 / M), np.full(N, 1.0 / N)
        for B in batches:
            # Every timed call gets problems it has not just solved: a pool of at least POOL problems,
            # cycled through, because a provider timed on the same few problems again and again has
            # its branches learnt by the branch predictor (4x12 at B = 64: 0.9 us per problem on
            # repeated problems, 1.3 us on fresh ones; see RESULTS.md).
            nb = -(-POOL // B)
            pool = torch.rand(nb * B, M, N, generator=g, dtype=torch.float64)
            C = pool[:B]
            Cd = C.to(dev)
            nloop = min(B, 64)
            next_batch = _cycle([pool[k * B : (k + 1) * B].to(dev) for k in range(nb)])
            windows = [[np.ascontiguousarray(pool[t].numpy()) for t in range(k, k + nloop)]
                       for k in range(0, pool.shape[0] - nloop + 1, nloop)]
            next_window = _cycle(windows)
            # ---- correctness first: every provider against POT on the same problems
            res = bert_emd.emd(Cd)
            check = min(B, 16)
            if ot is not None:
                ref = np.array([ot.emd2(a_np, b_np, C[t].numpy()) for t in range(check)])
                err = float(np.abs(res.cost[:check].cpu().numpy() - ref).max())
                assert err < 1e-9, f"bert_emd disagrees with POT on {M}x{N}: {err}"
            if dev.type != "cpu":  # the device kernel against the CPU kernel on the same problems
                cpu = bert_emd.emd(C[:check])
                err = float((res.cost[:check].cpu() - cpu.cost).abs().max())
                assert err < 1e-9, f"bert_emd[{dev.type}] disagrees with bert_emd[cpu] on {M}x{N}: {err}"
            if emd_with_flow is not None:
                v, _ = original_pyemd_call(emd_with_flow, C[0], M, N)
                assert abs(v - float(res.cost[0])) < 1e-9, "pyemd (padded) disagrees with bert_emd"
            if B == 1 and M * N <= 144:
                r = bert_emd.emd(C, backend="torch")
                assert abs(float(r.cost[0]) - float(res.cost[0])) < 1e-9
            # ---- timings (seconds per problem)
            timings: dict[str, float] = {}
            timings[f"bert_emd[{dev.type}]"] = median_time(lambda: bert_emd.emd(next_batch()), repeats=repeats,
                                                           sync=sync) / B
            if ot is not None:
                timings["ot.emd2 loop"] = median_time(
                    lambda: [ot.emd2(a_np, b_np, c) for c in next_window()], repeats=repeats) / nloop
                timings["ot.emd loop"] = median_time(
                    lambda: [ot.emd(a_np, b_np, c) for c in next_window()], repeats=repeats) / nloop
                timings["POT C++ emd_c"] = median_time(
                    lambda: [emd_c(a_np, b_np, c, 100000, 1) for c in next_window()], repeats=repeats) / nloop
            if emd_with_flow is not None:
                timings["pyemd (original call)"] = median_time(
                    lambda: [original_pyemd_call(emd_with_flow, torch.from_numpy(c), M, N) for c in next_window()],
                    repeats=repeats) / nloop
            base = timings.get("ot.emd2 loop")
            bare = timings.get("POT C++ emd_c")
            for name, t in timings.items():
                rows.append({
                    **prov,
                    "benchmark": "emd_exact",
                    "provider": name,
                    "threads": torch.get_num_threads(),
                    "shape": f"{M}x{N}",
                    "B": B,
                    "us_per_problem": t * 1e6,
                    "speedup_vs_ot.emd2": (base / t) if base else float("nan"),
                    "speedup_vs_POT_C++": (bare / t) if bare else float("nan"),
                })
            print(f"{M}x{N} B={B}: " + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in timings.items()),
                  flush=True)
    # one call with B=1 from Python (the per-step overhead a training loop pays)
    C1 = torch.rand(4, 12, generator=g, dtype=torch.float64).to(dev)
    t = median_time(lambda: bert_emd.emd(C1), repeats=repeats, sync=sync)
    rows.append({**prov, "benchmark": "emd_exact_call", "provider": f"bert_emd[{dev.type}] one call",
                 "threads": torch.get_num_threads(), "shape": "4x12", "B": 1, "us_per_problem": t * 1e6,
                 "speedup_vs_ot.emd2": float("nan"), "speedup_vs_POT_C++": float("nan")})
    print(f"one 4x12 call from Python: {t * 1e6:.2f} us")
    for r in rows:
        r["speedup_vs_fastest_lap"] = float("nan")
    if assignment:
        rows += run_assignment(quick, device, repeats, prov, g)
    path = append_csv("emd", rows, out_dir)
    print(f"rows appended to {path}")
    _plot(rows, path.with_suffix(".png"))
    table = markdown_table(
        [r for r in rows if r["benchmark"] != "assignment"],
        ["shape", "B", "provider", "threads", "us_per_problem", "speedup_vs_ot.emd2", "speedup_vs_POT_C++"])
    assignment_rows = [r for r in rows if r["benchmark"] == "assignment"]
    if assignment_rows:
        table += "\n\nSquare problems with uniform weights (assignment problems):\n\n" + markdown_table(
            assignment_rows, ["shape", "B", "provider", "threads", "us_per_problem", "speedup_vs_fastest_lap"])
    print(table)
    if update_results:
        _update_results_md(table, rows[0])
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    shapes = sorted({r["shape"] for r in rows if r["benchmark"] == "emd_exact"},
                    key=lambda s: int(s.split("x")[0]) * int(s.split("x")[1]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = [r for r in rows if r["shape"] == shape and r["benchmark"] == "emd_exact"]
        for prov in sorted({r["provider"] for r in sel}):
            pts = sorted((r["B"], r["us_per_problem"]) for r in sel if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"exact EMD {shape}")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("us per problem")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def _update_results_md(table: str, prov: dict) -> None:
    start, end = "<!-- bench_emd:start -->", "<!-- bench_emd:end -->"
    block = (f"{start}\nMachine: {prov['machine']}; torch {prov['torch']}, POT {prov['pot']}; commit "
             f"{prov['commit']}; {prov['date']}.\n\n{table}\n{end}")
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## Exact EMD (`bert-emd bench emd`)\n\n{block}\n"
    RESULTS_MD.write_text(text)
    print(f"table written to {RESULTS_MD}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes, B in {1, 4096}, 3 repeats (< 1 min)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, 0 = all)")
    p.add_argument("--update-results", action=argparse.BooleanOptionalAction, default=None,
                   help="write the table into benchmarks/RESULTS.md (default: on for full runs)")
    p.add_argument("--out-dir", type=Path, default=None, help="where the CSV and plot go")
    p.add_argument("--assignment", action=argparse.BooleanOptionalAction, default=True,
                   help="also time square uniform problems against scipy, lap and fastlap (default on)")
    args = p.parse_args(argv)
    update = (not args.quick) if args.update_results is None else args.update_results
    run(args.quick, args.device, args.threads or None, update, args.out_dir, args.assignment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
