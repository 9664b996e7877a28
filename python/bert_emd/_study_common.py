"""What the two offline studies (``bert-emd study``, ``bert-emd mtl study``) share: their common
command-line checks, run-folder rules, time and percentage formats, and the provenance a report
records (commit, machine, the command that reproduces it). Standard library only."""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["add_common_args", "check_output_dir", "command_line", "fmt_time", "git_commit", "machine", "pct",
           "rows_in", "seed_and_row_changes", "write_report"]


def add_common_args(p: argparse.ArgumentParser, budgets: Sequence[str], default_dir: str) -> None:
    """The options every study takes: ``--quick``, ``--output-dir``, ``--resume``, ``--seeds``,
    ``--dev-only``, ``--keep-models``, ``--progress`` and the hidden ``--budget`` of the tests
    (a study adds ``--rows`` and its own options)."""
    p.add_argument("--quick", action="store_true", help="the short budget: every row, one seed (<= 15 min on 2 cores)")
    p.add_argument("--output-dir", "--output_dir", default=default_dir,
                   help=f"where data, runs, results and plots go (default: {default_dir})")
    p.add_argument("--resume", action="store_true",
                   help="continue a study in a non-empty --output-dir: finished runs are kept")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds per row, 0..N-1 (default: budget's)")
    p.add_argument("--dev-only", action="store_true",
                   help="a pilot for choosing hyperparameters: score the dev split only; the test split is never "
                        "read (no intervals)")
    p.add_argument("--keep-models", action="store_true",
                   help="keep each run's weights (default: removed once the run is scored; logs and trainer "
                        "states stay)")
    p.add_argument("--progress", action="store_true", help="show the Trainer's progress bars and logs")
    p.add_argument("--budget", choices=sorted(budgets), default=None, help=argparse.SUPPRESS)  # tests


def check_output_dir(out: Path, resume: bool) -> None:
    """A study writes into a new or empty folder, or continues one with ``resume``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise UsageError(f"--output-dir {out} exists and is not empty: pass --resume to continue the study there "
                         "(finished runs are kept), or name a new folder")


def seed_and_row_changes(args: argparse.Namespace, all_rows: Sequence[str]) -> dict[str, Any]:
    """The budget fields that ``--seeds N`` (seeds 0..N-1) and ``--rows a,b`` (in the study's order)
    replace; one-line errors for a bad count or an unknown row."""
    changes: dict[str, Any] = {}
    if args.seeds is not None:
        if args.seeds < 1:
            raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
        changes["seeds"] = tuple(range(args.seeds))
    if args.rows is not None:
        rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
        unknown = [r for r in rows if r not in all_rows]
        if unknown or not rows:
            raise UsageError(f"--rows: unknown row(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(all_rows)}")
        changes["rows"] = tuple(r for r in all_rows if r in rows)
    return changes


def rows_in(path: Path) -> int:
    """Data rows of a CSV file with a header."""
    with open(path, encoding="utf-8", newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def pct(x: float | None) -> str:
    """A share as a percentage with one decimal, ``-`` for none."""
    return "-" if x is None else f"{100 * x:.1f}"


def fmt_time(s: float) -> str:
    """Seconds as ``1h05m`` or ``4m07s``."""
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def git_commit() -> str:
    """The checkout's short commit (marked when it has uncommitted changes to tracked files)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{sha} (with uncommitted changes)" if dirty else sha


def machine(threads: int) -> str:
    """CPU model, core count, torch threads and Python version, for a report's header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {threads} threads, Python {platform.python_version()}"


def command_line(prog: Sequence[str], args: argparse.Namespace, options: Sequence[str],
                 flags: Sequence[str]) -> str:
    """The command that repeats this run: ``prog``, ``--quick`` / ``--budget``, ``--output-dir``,
    then each of ``options`` that was given a value and each of ``flags`` that is set."""
    words = list(prog)
    if args.quick:
        words.append("--quick")
    if args.budget:
        words += ["--budget", args.budget]
    words += ["--output-dir", args.output_dir]
    for opt in options:
        v = getattr(args, opt)
        if v is not None:
            words += [f"--{opt.replace('_', '-')}", str(v)]
    for flag in flags:
        if getattr(args, flag):
            words.append(f"--{flag.replace('_', '-')}")
    return shlex.join(words)


def write_report(out: Path, result: dict[str, Any], format_report: Any, write_plots: Any) -> None:
    """Print the study's report and write ``results.md``, ``results.json`` and the plots into ``out``."""
    import json

    report = format_report(result)
    print()
    print(report)
    (out / "results.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plots = write_plots(result, out)
    print(f"\nresults: {out / 'results.md'}; plots: {', '.join(str(p.relative_to(out)) for p in plots)}")
