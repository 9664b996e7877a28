"""Statistics and text of ``bert-emd study``: the paired hierarchical bootstrap, the per-row
summaries, the Markdown table and the one-paragraph reading generated from the numbers.

Pure NumPy (no torch, no transformers), so it is cheap to import and to test.

The comparison of two rows A and B of the study (two students trained the same way except for one
choice, e.g. the stage-1 layer mapping) rests on their per-example test correctness: for every
seed s (the same seed in both rows: same random start, same data order) and every test example i,
``a[s, i]`` and ``b[s, i]`` are 1 when the student classified example i correctly. The difference
of accuracies, ``mean(a) - mean(b)``, varies for two reasons: the seeds (another seed gives
another student) and the test examples (another test sample gives other accuracies). The
hierarchical bootstrap resamples both: each replicate draws S seeds with replacement, then N test
examples with replacement, and recomputes the paired difference on that draw. Seeds and examples
are *crossed* (every seed is scored on the same test tweets), so one draw of examples serves all
the seeds of a replicate. The percentile interval of the replicates is the reported 95% interval.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["excludes_zero", "format_acc", "format_diff", "hierarchical_bootstrap", "reading", "row_summary"]


def hierarchical_bootstrap(
    a: Any,
    b: Any,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    chunk: int = 250,
) -> dict[str, float]:
    """Paired difference of accuracies ``mean(a) - mean(b)`` and its bootstrap interval.

    Args:
        a, b: ``[S, N]`` 0/1 (or bool) correctness of two rows: row s of each is the run with
            the s-th common seed, column i the i-th test example (same order in both).
        n_boot: bootstrap replicates.
        level: coverage of the percentile interval.
        seed: seed of NumPy's generator (the same inputs and seed give the same interval).
        chunk: replicates drawn at a time (bounds the memory to about ``S * chunk * N`` floats).
    Returns:
        ``{"diff", "lo", "hi", "seeds", "examples", "n_boot", "level"}``; diff, lo and hi as
        fractions (0.01 = one point of accuracy).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[None], b[None]
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"a and b must be non-empty [seeds, examples] arrays of one shape, got {a.shape} "
                         f"and {b.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = a - b  # [S, N], values in {-1, 0, 1}
    n_seeds, n = d.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    done = 0
    while done < n_boot:
        k = min(chunk, n_boot - done)
        seeds = rng.integers(0, n_seeds, size=(k, n_seeds))  # first the seeds of each replicate ...
        examples = rng.integers(0, n, size=(k, n))  # ... then its test examples (shared by its seeds)
        per_seed = np.take_along_axis(d[:, None, :], examples[None, :, :], axis=2).mean(axis=2)  # [S, k]
        stats[done:done + k] = per_seed[seeds, np.arange(k)[:, None]].mean(axis=1)
        done += k
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "seeds": n_seeds, "examples": n,
            "n_boot": n_boot, "level": level}


def row_summary(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for one value) of a row's accuracies."""
    vals = [float(v) for v in values]
    return {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def format_acc(summary: dict[str, Any]) -> str:
    """``61.2 ± 0.8`` (percent), or ``61.2`` for a single seed."""
    mean = 100 * summary["mean"]
    return f"{mean:.1f}" if summary.get("sd") is None else f"{mean:.1f} ± {100 * summary['sd']:.1f}"


def format_diff(comp: dict[str, Any] | None) -> str:
    """``+1.2 [−0.3, +2.6]`` (points, row minus reference), or an empty cell."""
    if comp is None:
        return ""
    return f"{100 * comp['diff']:+.1f} [{100 * comp['lo']:+.1f}, {100 * comp['hi']:+.1f}]"


def excludes_zero(comp: dict[str, Any]) -> bool:
    return comp["lo"] > 0.0 or comp["hi"] < 0.0


def _points(x: float) -> str:
    return f"{100 * abs(x):.1f} points"


def reading(rows: list[dict[str, Any]], *, reference: str, teacher: dict[str, float] | None = None,
            majority_test: float | None = None, fixed_mappings: Sequence[str] = ("skip", "last", "uniform"),
            budget_words: str = "this budget") -> str:
    """One paragraph that states what the intervals support and nothing more.

    ``rows``: ``{"key", "name", "test": row_summary, "vs_ref": bootstrap dict or None}``, the
    reference row (``key == reference``) among them. Differences are row minus reference."""
    ref = next((r for r in rows if r["key"] == reference), None)
    if ref is None:
        return "The reference row was not run: no paired comparison."
    comps = [r for r in rows if r["key"] != reference and r.get("vs_ref") is not None]
    seeds = max((r["vs_ref"]["seeds"] for r in comps), default=ref["test"]["n"])
    examples = next((r["vs_ref"]["examples"] for r in comps), None)
    out: list[str] = []
    if teacher is not None:
        s = (f"The teacher scores {100 * teacher['test_acc']:.1f}% on the test tweets"
             + (f" (majority class {100 * majority_test:.1f}%)" if majority_test is not None else "")
             + f"; the {ref['name']} student {format_acc(ref['test'])}%.")
        out.append(s)
    better = [r for r in comps if excludes_zero(r["vs_ref"]) and r["vs_ref"]["diff"] < 0]
    worse = [r for r in comps if excludes_zero(r["vs_ref"]) and r["vs_ref"]["diff"] > 0]
    unresolved = [r for r in comps if not excludes_zero(r["vs_ref"])]
    for r in better:
        c = r["vs_ref"]
        out.append(f"{ref['name']} beats {r['name']} by {_points(c['diff'])} "
                   f"(95% interval {_points(-c['hi'])} to {_points(-c['lo'])}).")
    for r in worse:
        c = r["vs_ref"]
        out.append(f"{r['name']} beats {ref['name']} by {_points(c['diff'])} "
                   f"(95% interval {_points(c['lo'])} to {_points(c['hi'])}).")
    if comps and not better and not worse:
        out.append(f"No interval excludes 0: no row separates from {ref['name']} at {budget_words}.")
    elif unresolved:
        names = "; ".join(r["name"] for r in unresolved)  # names may hold commas
        out.append(f"The intervals against {names} include 0: those differences are not resolved at {budget_words}.")
    fixed = [r for r in comps if r["key"] in fixed_mappings]
    if fixed and all(not excludes_zero(r["vs_ref"]) for r in fixed):
        out.append("So the learned many-to-many mapping shows no measurable gain over the fixed mappings here; "
                   "an interval that includes 0 is not evidence that they are equal.")
    elif fixed and all(excludes_zero(r["vs_ref"]) and r["vs_ref"]["diff"] < 0 for r in fixed):
        out.append("The learned mapping beats every fixed mapping at this budget.")
    if seeds == 1:
        out.append("With one seed the intervals cover the sampling of the test tweets only, not the variation "
                   "from seed to seed: read them as a lower bound on the uncertainty.")
    elif examples is not None:
        out.append(f"Intervals: paired hierarchical bootstrap over {seeds} seeds and {examples} test tweets.")
    return " ".join(out)
