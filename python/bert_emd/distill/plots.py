"""PNG plots of a training run (``bert-emd plot RUN_DIR``; also written at the end of a run).

- ``layer_weights.png``: the learned student and teacher layer weights over training steps
  (from the ``w_student.i`` / ``w_teacher.j`` entries of ``log_history``);
- ``transport.png``: the last transport plans F (and costs D) of attention and hidden states as
  heatmaps, student layers as rows, teacher layers as columns (from ``transport.json``);
- ``loss.png``: the training loss and its parts (attention, hidden, embedding, prediction),
  and the evaluation loss and metrics, over steps.

A run folder is the ``--output-dir`` of ``bert-emd distill`` / ``finetune`` (read:
``trainer_state.json`` and ``transport.json``, else those of its latest ``checkpoint-*``), or a
checkpoint folder itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .data import MissingFileError

__all__ = [
    "find_run_files",
    "plot_comparison",
    "plot_curves",
    "plot_intervals",
    "plot_layer_weights",
    "plot_losses",
    "plot_run",
    "plot_transport",
]

_WEIGHT_KEY = re.compile(r"^w_(student|teacher)(?:_(attention|hidden))?\.(\d+)$")
_PARTS = ("attention", "hidden", "embedding", "prediction")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, title: str = "") -> Path:
    """Title (if any), lay out, write ``path`` and free the figure."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return Path(path)


def _checkpoints(run: Path) -> list[Path]:
    found = [p for p in run.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def find_run_files(run_dir: str | Path) -> tuple[Path | None, Path | None]:
    """(``trainer_state.json``, ``transport.json``) of a run folder, falling back to its latest
    checkpoint for each; None where absent."""
    run = Path(run_dir)
    if not run.is_dir():
        raise MissingFileError(f"run folder {run} does not exist")
    places = [run, *reversed(_checkpoints(run))]
    state = next((p / "trainer_state.json" for p in places if (p / "trainer_state.json").is_file()), None)
    transport = next((p / "transport.json" for p in places if (p / "transport.json").is_file()), None)
    return state, transport


def _weight_series(history: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, list[tuple[int, float]]]]:
    """{(who, feature): {layer: [(step, weight)]}}, feature "" when shared."""
    out: dict[tuple[str, str], dict[int, list[tuple[int, float]]]] = {}
    for entry in history:
        step = entry.get("step")
        for key, value in entry.items():
            m = _WEIGHT_KEY.match(key)
            if m is None or step is None:
                continue
            who, feature, layer = m.group(1), m.group(2) or "", int(m.group(3))
            out.setdefault((who, feature), {}).setdefault(layer, []).append((int(step), float(value)))
    return out


def plot_layer_weights(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Student and teacher layer weights over steps; None if the history holds none (fixed
    mappings, prediction-only runs)."""
    series = _weight_series(history)
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, who in zip(axes[0], ("student", "teacher")):
        for (w, feature), layers in sorted(series.items()):
            if w != who:
                continue
            style = "--" if feature == "hidden" else "-"
            cmap = plt.get_cmap("viridis", max(2, len(layers)))
            for layer, pts in sorted(layers.items()):
                steps, values = zip(*pts)
                label = f"layer {layer + 1}" + (f" ({feature})" if feature else "")
                ax.plot(steps, values, style, color=cmap(layer), label=label)
        ax.set_title(f"{who} layer weights")
        ax.set_xlabel("step")
        ax.set_ylabel("weight")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    return _save(fig, path, title)


def plot_transport(transport: dict[str, Any], path: str | Path, title: str = "") -> Path | None:
    """Heatmaps of the last plan F (top) and cost D (bottom) per feature; None if no plan."""
    features = [f for f in ("attention", "hidden") if isinstance(transport.get(f), dict)]
    if not features:
        return None
    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(2, len(features), figsize=(5.5 * len(features), 6.5), squeeze=False)
    for col, feature in enumerate(features):
        for row, (key, cmap) in enumerate((("plan", "Blues"), ("cost", "Oranges"))):
            ax = axes[row][col]
            mat = np.asarray(transport[feature][key], dtype=float)
            im = ax.imshow(mat, cmap=cmap, aspect="auto")
            m, n = mat.shape
            ax.set_xticks(range(n), [str(j + 1) for j in range(n)])
            ax.set_yticks(range(m), [str(i + 1) for i in range(m)])
            ax.set_xlabel("teacher layer")
            ax.set_ylabel("student layer")
            name = "transport plan F" if key == "plan" else "cost D"
            ax.set_title(f"{feature}: {name}")
            if m * n <= 144:
                top = np.nanmax(mat) if mat.size else 0.0
                for i in range(m):
                    for j in range(n):
                        v = mat[i, j]
                        ax.text(j, i, f"{v:.2f}" if key == "plan" else f"{v:.2g}", ha="center", va="center",
                                fontsize=7, color="white" if top and v > 0.6 * top else "black")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    mapping = transport.get("mapping")
    return _save(fig, path, title or f"last transport plans (mapping: {mapping})")


def plot_losses(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Training loss and its parts (log scale), and evaluation loss / metrics, over steps."""
    train = [e for e in history if "loss" in e and "step" in e]
    evals = [e for e in history if any(k.startswith("eval_") for k in e) and "step" in e]
    if not train and not evals:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        steps = [e["step"] for e in train]
        ax.plot(steps, [e["loss"] for e in train], "k-", lw=2, label="total")
        for part in _PARTS:
            key = f"loss_{part}"
            pts = [(e["step"], e[key]) for e in train if key in e and e[key] > 0]
            if pts:
                s, v = zip(*pts)
                ax.plot(s, v, label=part)
        ax.set_yscale("log")
    ax.set_title("training loss and parts (unweighted)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax = axes[0][1]
    skip = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_epoch")
    keys = sorted({k for e in evals for k in e if k.startswith("eval_") and k not in skip})
    for key in keys:
        pts = [(e["step"], e[key]) for e in evals if key in e]
        s, v = zip(*pts)
        ax.plot(s, v, "o-", label=key[len("eval_"):])
    ax.set_title("evaluation")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8)
    return _save(fig, path, title)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``layer_weights.png``, ``transport.png`` and ``loss.png`` of a run (those its files
    allow) to ``out_dir`` (default ``RUN_DIR/plots``); returns the paths written.

    Raises:
        MissingFileError: the folder holds neither a ``trainer_state.json`` nor a
            ``transport.json`` (itself or in a ``checkpoint-*`` folder).
    """
    state_file, transport_file = find_run_files(run_dir)
    if state_file is None and transport_file is None:
        raise MissingFileError(
            f"{run_dir}: no trainer_state.json or transport.json (in it or in a checkpoint-* folder): "
            "not the output folder of a bert-emd finetune/distill run"
        )
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    name = Path(run_dir).resolve().name
    if state_file is not None:
        history = json.loads(state_file.read_text()).get("log_history", [])
        for fn, fname in ((plot_layer_weights, "layer_weights.png"), (plot_losses, "loss.png")):
            p = fn(history, out / fname, title=name)
            if p is not None:
                written.append(p)
    if transport_file is not None:
        p = plot_transport(json.loads(transport_file.read_text()), out / "transport.png")
        if p is not None:
            written.append(p)
    return written


def plot_comparison(rows: list[dict[str, Any]], path: str | Path, *, metric: str = "test_acc",
                    reference: float | None = None, baseline: float | None = None, title: str = "") -> Path:
    """Bar chart of one metric per method (mean with min-max whiskers over seeds), as the demo
    reports it. ``rows``: ``{"name": str, "values": [float, ...]}``; ``reference`` (teacher) and
    ``baseline`` (majority class) are drawn as horizontal lines."""
    plt = _plt()
    import numpy as np

    names = [r["name"] for r in rows]
    means = np.array([np.mean(r["values"]) for r in rows]) * 100
    lo = means - np.array([np.min(r["values"]) for r in rows]) * 100
    hi = np.array([np.max(r["values"]) for r in rows]) * 100 - means
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.2))
    ax.bar(range(len(rows)), means, yerr=[lo, hi], capsize=4, color="tab:blue", alpha=0.8)
    for i, r in enumerate(rows):
        ax.plot([i] * len(r["values"]), np.array(r["values"]) * 100, "k.", ms=5)
    if reference is not None:
        ax.axhline(reference * 100, color="tab:green", ls="--", label=f"teacher {reference * 100:.1f}")
    if baseline is not None:
        ax.axhline(baseline * 100, color="gray", ls=":", label=f"majority class {baseline * 100:.1f}")
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    floor = min([*(means - lo), *([baseline * 100] if baseline is not None else [])])
    ax.set_ylim(max(0.0, floor - 5), 100 if reference is None else min(100.0, max(reference * 100, *means + hi) + 4))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    return _save(fig, path)


def plot_curves(panels: dict[str, dict[str, list[tuple[float, float]]]], path: str | Path, *, title: str = "",
                xlabel: str = "step", log: bool = True) -> Path | None:
    """Line plots side by side: ``{panel title: {label: [(x, y), ...]}}`` (e.g. the stage-1
    training loss and its parts per layer mapping). None if every series is empty."""
    panels = {t: {k: v for k, v in series.items() if v} for t, series in panels.items()}
    panels = {t: series for t, series in panels.items() if series}
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for label, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label)
        if log and all(y > 0 for pts in series.values() for _, y in pts):
            ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, title)


def plot_intervals(rows: list[dict[str, Any]], path: str | Path, *, reference_name: str = "",
                   metric: str = "test accuracy", teacher: float | None = None, baseline: float | None = None,
                   title: str = "") -> Path:
    """Two panels per row: test accuracy (mean, +-1 sd bar, one dot per seed; teacher and
    majority class as lines) and the paired difference to the reference row with its interval
    (a dot at 0 for the reference itself). ``rows``: ``{"name", "values": [acc, ...],
    "diff": float | None, "lo": float | None, "hi": float | None}``, fractions."""
    plt = _plt()
    import numpy as np

    n = len(rows)
    ys = np.arange(n)[::-1]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 0.45 * n + 1.8), sharey=True)
    for y, r in zip(ys, rows):
        vals = np.asarray(r["values"], dtype=float) * 100
        sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
        ax.errorbar(vals.mean(), y, xerr=sd, fmt="o", color="tab:blue", capsize=3)
        ax.plot(vals, [y] * len(vals), "k.", ms=4)
        if r.get("diff") is not None:
            d, lo, hi = 100 * r["diff"], 100 * r["lo"], 100 * r["hi"]
            color = "tab:red" if lo > 0 or hi < 0 else "tab:gray"
            bx.errorbar(d, y, xerr=[[d - lo], [hi - d]], fmt="o", color=color, capsize=3)
        else:
            bx.plot(0, y, "o", color="tab:blue")
    if teacher is not None:
        ax.axvline(teacher * 100, color="tab:green", ls="--", label=f"teacher {teacher * 100:.1f}")
    if baseline is not None:
        ax.axvline(baseline * 100, color="gray", ls=":", label=f"majority class {baseline * 100:.1f}")
    ax.set_yticks(ys, [r["name"] for r in rows], fontsize=8)
    ax.set_xlabel(f"{metric} (%): mean, sd, seeds")
    ax.grid(axis="x", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    bx.axvline(0, color="k", lw=0.8)
    bx.set_xlabel(f"{metric} minus {reference_name or 'reference'} (points), 95% interval")
    bx.grid(axis="x", alpha=0.3)
    return _save(fig, path, title)
