"""Shared helpers of the benchmark scripts: provenance, timing, CSV rows, RESULTS.md tables.

Every benchmark checks each provider against the reference before timing it, times the
median of repeats after warm-up, and appends rows to ``benchmarks/results/<name>.csv`` with the
machine, versions, commit and date, so figures from different runs stay comparable.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> str:
    """A short description of where the benchmark ran (CPU model, threads, GPU name)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (host {cpu_name()})"
    return f"{cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def provenance(device: str = "cpu") -> dict[str, str]:
    import importlib.metadata as md

    def ver(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "machine": machine(device),
        "torch": torch.__version__,
        "triton": ver("triton"),
        "pot": ver("pot"),
        "python": platform.python_version(),
    }


def median_time(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2, min_time: float = 0.05,
                sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` in seconds; each sample loops until ``min_time`` has passed."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    # calibrate the inner loop so one sample lasts about min_time
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    one = max(time.perf_counter() - t0, 1e-9)
    inner = max(1, int(min_time / one))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def append_csv(name: str, rows: Iterable[dict[str, object]], out_dir: Path | None = None) -> Path:
    """Append rows (dicts with the same keys) to ``<out_dir>/<name>.csv``, writing a header once."""
    rows = list(rows)
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.csv"
    if not rows:
        return path
    fields = list(rows[0].keys())
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open() as f:
            header = f.readline().strip().split(",")
        if header != fields:  # schema changed: start a new file beside the old one
            path = out_dir / f"{name}-{_dt.date.today().isoformat()}.csv"
            new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def markdown_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` restricted to ``columns``."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a note) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write (120 dpi) and report one benchmark figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
