"""Benchmark of batched entropic transport, ``emd(..., method="sinkhorn")`` (``bert-emd bench sinkhorn``).

Per-problem time for batches of B problems (random costs in [0, 1), uniform weights, the same
reg and tol for every provider) of our backends (the PyTorch reference at B = 1 only), against:
  * POT ``ot.sinkhorn`` called in a Python loop, with ``method="sinkhorn"`` (POT's default,
    not log-domain) and ``method="sinkhorn_log"`` (the same iteration as ours),
  * POT's batch solver ``ot.batch.solve_batch(..., method="log_sinkhorn")`` where installed.
Equal accuracy: every provider gets the same tol, and each row reports the gap of its value to
the exact EMD value (``ot.emd2``) and its column-marginal error, so the times compare work at the
accuracy actually reached. (POT tests an L2 marginal error every 10 iterations, and its batch
solver stops when the worst problem of the batch has converged; ours tests the L1 error of each
problem every iteration.) Every provider is first checked against the PyTorch reference on the
same problems. Loop baselines cost the same per problem whatever B is, so they are timed on
min(B, 8) problems; anything slower than half a second (POT's batch solver at B = 4096
takes minutes) is timed once.

Appends rows to benchmarks/results/sinkhorn.csv (machine, versions, commit, date in each row).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bert_emd  # noqa: E402,F401  (loads the ops)
from _common import append_csv, markdown_table, median_time, provenance  # noqa: E402
from bert_emd import _backends  # noqa: E402
from bert_emd.ops.sinkhorn import sinkhorn_op  # noqa: E402
from bert_emd.reference.sinkhorn import sinkhorn_reference  # noqa: E402


def _pot():
    try:
        import ot
    except ImportError:
        return None, None
    try:
        from ot.batch import solve_batch
    except ImportError:
        solve_batch = None
    return ot, solve_batch


def _accuracy(values: np.ndarray, plans: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """(mean relative gap to the exact value, max L1 marginal error over rows and columns)."""
    gap = float(np.mean(np.abs(values - exact) / np.maximum(np.abs(exact), 1e-12)))
    M, N = plans.shape[-2:]
    rows = np.abs(plans.sum(-1) - 1.0 / M).sum(-1)
    cols = np.abs(plans.sum(-2) - 1.0 / N).sum(-1)
    return gap, float(np.maximum(rows, cols).max())


def _time(fn, repeats: int, sync=None) -> tuple[float, str]:
    """Median of repeats, or a single run for anything slower than half a second."""
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    one = time.perf_counter() - t0
    if one > 0.5:
        return one, "one run"
    return median_time(fn, repeats=repeats, warmup=0, min_time=0.02, sync=sync), ""


def run(quick: bool, device: str, threads: int | None, reg: float, tol: float, out_dir: Path | None) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    shapes = [(4, 12), (12, 12)] if quick else [(4, 12), (12, 12), (64, 64)]
    batches = [1, 256] if quick else [1, 4096]
    repeats = 3 if quick else 5
    n_loop_max = 2 if quick else 8
    max_iter = 100_000
    ot, solve_batch = _pot()
    prov = provenance(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    ours = [b for b in ("cpu", "triton", "torch") if _backends.unavailable_reason("sinkhorn", b, dev.type) is None]
    if dev.type == "cpu":
        ours = [b for b in ours if b != "triton"]  # the interpreter is a test tool, not a contender
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []

    for M, N in shapes:
        for B in batches:
            C = torch.rand(B, M, N, generator=g, dtype=torch.float64)
            Cd = C.to(dev)
            exact = (np.array([ot.emd2(np.full(M, 1 / M), np.full(N, 1 / N), c) for c in C[:256].numpy()])
                     if ot is not None else None)
            nb_exact = 0 if exact is None else len(exact)
            check = sinkhorn_reference(C[:8], None, None, reg, max_iter, 1e-12)[0]

            def row(provider: str, t: float, nprob: int, values, plans, converged: float, note: str = ""):
                k = min(nprob, nb_exact)
                gap, marg = (_accuracy(np.asarray(values)[:k], np.asarray(plans)[:k], exact[:k])
                             if k else (float("nan"), float("nan")))
                r = {**prov, "op": "sinkhorn", "provider": provider, "M": M, "N": N, "B": B, "reg": reg,
                     "tol": tol, "us_per_problem": t * 1e6 / nprob, "gap_to_exact": gap, "marginal_err": marg,
                     "converged": converged, "note": note}
                rows.append(r)
                print(f"  {M}x{N} B={B:<5} {provider:<22} {r['us_per_problem']:>12.2f} us/problem   "
                      f"gap {gap:.2e}  marg {marg:.1e}  conv {converged:.2f} {note}", flush=True)

            for backend in ours:
                if backend == "torch" and B > 1:
                    continue  # the reference runs every problem until the slowest converges: minutes
                op = sinkhorn_op(backend)
                tight = op(Cd[:8], None, None, reg, max_iter, 1e-12)[0].cpu()
                if not torch.allclose(tight, check, rtol=1e-9, atol=0):
                    raise RuntimeError(f"{backend} disagrees with the reference on {M}x{N}")
                fn = lambda op=op: op(Cd, None, None, reg, max_iter, tol)  # noqa: E731
                t, how = _time(fn, repeats, sync)
                value, plan, _, _, status = fn()
                conv = float((status == 0).float().mean())
                note = f"{torch.get_num_threads()} threads" if backend == "cpu" else ""
                row(backend, t, B, value.cpu().numpy(), plan.cpu().numpy(), conv, " ".join(filter(None, [note, how])))
                if backend == "cpu" and B > 1 and torch.get_num_threads() > 1:
                    nt = torch.get_num_threads()
                    torch.set_num_threads(1)
                    t1, how = _time(fn, repeats)
                    torch.set_num_threads(nt)
                    row("cpu", t1, B, value.numpy(), plan.numpy(), conv, " ".join(filter(None, ["1 thread", how])))

            if ot is None:
                continue
            a, b = np.full(M, 1 / M), np.full(N, 1 / N)
            n_loop = min(B, n_loop_max)
            for method in ("sinkhorn", "sinkhorn_log"):
                Cn = C[:n_loop].numpy()
                ref = np.array([np.sum(ot.sinkhorn(a, b, c, reg, method=method, stopThr=1e-12,
                                                   numItermax=max_iter) * c) for c in Cn[:2]])
                if not np.allclose(ref, check[:2].numpy(), rtol=1e-6):
                    raise RuntimeError(f"POT {method} disagrees with the reference on {M}x{N}")
                plans = []

                def loop(method=method, Cn=Cn, plans=plans):
                    plans.clear()
                    for c in Cn:
                        plans.append(ot.sinkhorn(a, b, c, reg, method=method, stopThr=tol, numItermax=max_iter))

                t, _ = _time(loop, repeats)
                P = np.stack(plans)
                row(f"pot.sinkhorn[{method}]", t, n_loop, (P * Cn).sum((-2, -1)), P, float("nan"),
                    f"loop over {n_loop}")

            if solve_batch is not None:
                Cn = C.numpy()
                t0 = time.perf_counter()
                res = solve_batch(Cn, reg, method="log_sinkhorn", max_iter=max_iter, tol=tol)
                t = time.perf_counter() - t0
                P = np.asarray(res.plan)
                n_it = res.log.get("n_iter", "?") if isinstance(res.log, dict) else "?"
                row("pot.batch.solve_batch", t, B, np.asarray(res.value_linear), P, float("nan"),
                    f"one run, {n_it} iterations (worst of batch)")
    # per-problem speed-up over POT's batch solver at the same shape and B
    for r in rows:
        base = [x for x in rows if x["provider"] == "pot.batch.solve_batch" and (x["M"], x["N"], x["B"]) ==
                (r["M"], r["N"], r["B"])]
        r["speedup_vs_pot_batch"] = base[0]["us_per_problem"] / r["us_per_problem"] if base else float("nan")
    path = append_csv("sinkhorn", rows, out_dir)
    print(f"\nrows appended to {path}\n")
    print(markdown_table(rows, ["M", "N", "B", "provider", "note", "us_per_problem", "gap_to_exact",
                                "marginal_err", "speedup_vs_pot_batch"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="4x12 and 12x12, B in {1, 256}, 3 repeats (< 1 min)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0 = all)")
    p.add_argument("--reg", type=float, default=0.05, help="entropic regularisation (default 0.05)")
    p.add_argument("--tol", type=float, default=1e-9, help="marginal tolerance for every provider (default 1e-9)")
    p.add_argument("--out-dir", type=Path, default=None, help="where the CSV goes (default benchmarks/results)")
    args = p.parse_args(argv)
    run(args.quick, args.device, args.threads or None, args.reg, args.tol, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
