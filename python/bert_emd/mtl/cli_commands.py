"""``bert-emd mtl {train, evaluate, demo, study}``: multi-task training (and multi-task distillation)
from a YAML configuration, evaluation of a saved multi-task model, the multi-task demo, and the
multi-task study (every mechanism against fair single-task baselines, with seeds and intervals).

    bert-emd mtl train --config tasks.yaml [--output-dir DIR] [--max-steps N] [--fused-attention]
                       [TrainingArguments ...]
    bert-emd mtl evaluate --model DIR [--config tasks.yaml] [--split validation] [--output metrics.json]
    bert-emd mtl demo [--quick] [--output-dir DIR]
    bert-emd mtl study [--quick] [--output-dir DIR] [--resume] [--seeds N] [--rows ROWS] [--dev-only]

Wire into the ``bert-emd`` parser with :func:`add_subcommands` and run with :func:`dispatch`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .config import MTLConfig
from .yaml_config import load_config

__all__ = ["add_subcommands", "dispatch", "evaluate_model", "format_table", "main", "train_from_config"]


# ----------------------------------------------------------------------------- parser
def add_subcommands(sub: Any) -> None:
    """Add ``mtl`` (with ``train``, ``evaluate``, ``demo``, ``study``) to the ``bert-emd`` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    mtl = sub.add_parser("mtl", allow_abbrev=False, formatter_class=fmt, description=__doc__,
                         help="multi-task learning: train / evaluate from a YAML task file, demo, study")
    msub = mtl.add_subparsers(dest="mtl_command", required=True)
    p = msub.add_parser("train", allow_abbrev=False, help="train a multi-task model (or distil) from a YAML config",
                        description="Extra --flags are passed to transformers.TrainingArguments "
                        "(e.g. --bf16, --gradient_accumulation_steps 2).")
    p.add_argument("--config", required=True, help="multi-task YAML file (see examples/mtl_tasks.yaml)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                   help="overrides training.output_dir")
    p.add_argument("--max-steps", type=int, default=None, help="overrides training.max_steps")
    p.add_argument("--epochs", type=float, default=None, help="overrides training.epochs")
    p.add_argument("--seed", type=int, default=None, help="overrides training.seed")
    p.add_argument("--resume", default=None, help="resume from this checkpoint folder")
    p.add_argument("--progress", action="store_true", help="show the Trainer's progress bars")
    p.add_argument("--fused-attention", action="store_true",
                   help="distillation: attention costs from the hooked queries and keys "
                        "(bert_emd.attention_costs): no attention maps are formed, the student and the "
                        "teachers keep their attention implementation (SDPA); overrides "
                        "distillation.fused_attention: false")
    p.add_argument("--allow-untrained-teacher", action="store_true",
                   help="distillation: go on (with a warning) when a task's teacher checkpoint lacks its task "
                        "head, which is then random (seeded by --seed); by default such a teacher is refused; "
                        "overrides distillation.allow_untrained_teacher: false")
    p = msub.add_parser("evaluate", allow_abbrev=False, help="score a saved multi-task model on each task")
    p.add_argument("--model", required=True, help="folder written by 'bert-emd mtl train'")
    p.add_argument("--config", default=None,
                   help="YAML file whose tasks' data to score (default: the data recorded in the model folder)")
    p.add_argument("--split", default="validation", choices=["validation", "test", "train"], help="split to score")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-eval-samples", type=int, default=None, help="score the first N rows of each task")
    p.add_argument("--output", default=None, help="write the metrics to this JSON file")
    p = msub.add_parser("demo", allow_abbrev=False, help="multi-task demo: tweets + BBC News on MiniLM (offline)")
    from .demo import add_mtl_demo_args

    add_mtl_demo_args(p)
    p = msub.add_parser("study", allow_abbrev=False, formatter_class=fmt,
                        help="every mechanism against single-task baselines: seeds, intervals, diagnostics (offline)",
                        description="Multi-task study on the demo's tasks (tweets + BBC News, MiniLM): each "
                        "mechanism, hybrids and samplers against single-task training with the same batches and "
                        "with the same encoder updates; paired bootstrap intervals. See docs/mtl-study.md.")
    from .study import add_study_args

    add_study_args(p)


def dispatch(args: argparse.Namespace, rest: list[str]) -> int:
    """Run ``bert-emd mtl <mtl_command>``; ``rest``: extra TrainingArguments flags (train only)."""
    from ..distill.cli_commands import HF_MODULES, require_hf

    cmd = args.mtl_command
    if cmd != "train" and rest:
        raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
    if cmd in ("train", "evaluate"):  # (the demo and the study check their own)
        require_hf((*HF_MODULES, "yaml"))
    if cmd == "train":
        cfg = load_config(args.config)
        for flag, on in (("--fused-attention", args.fused_attention),
                         ("--allow-untrained-teacher", args.allow_untrained_teacher)):
            if on and not cfg.distillation.enabled:
                raise UsageError(f"{flag} applies to distillation, and {args.config} has no enabled "
                                 "'distillation' section")
        if args.allow_untrained_teacher:
            cfg.distillation.allow_untrained_teacher = True
        res = train_from_config(
            cfg, output_dir=args.output_dir, max_steps=args.max_steps, epochs=args.epochs, seed=args.seed,
            resume=args.resume, extra=rest, progress=args.progress, fused_attention=args.fused_attention or None,
        )
        if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate: once, not per rank
            print(format_table(res["eval"], cfg))
            print(f"model and results: {res['output_dir']}")
        return 0
    if cmd == "evaluate":
        res = evaluate_model(args.model, config=args.config, split=args.split, batch_size=args.batch_size,
                             limit=args.max_eval_samples)
        print(format_table(res))
        if args.output:
            Path(args.output).write_text(json.dumps(res, indent=1))
        return 0
    if cmd == "demo":
        from .demo import run_mtl_demo

        run_mtl_demo(args)
        return 0
    if cmd == "study":
        from .study import run_study

        run_study(args)
        return 0
    raise UsageError(f"unknown mtl command {cmd!r}")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m bert_emd.mtl.cli_commands mtl train ...``) until wired into the CLI."""
    parser = argparse.ArgumentParser(prog="bert-emd")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args, rest = parser.parse_known_args(argv)
    return dispatch(args, rest)


# ----------------------------------------------------------------------------- helpers
def format_table(res: dict[str, Any], cfg: MTLConfig | None = None) -> str:
    """Markdown table: one row per task (headline metric, other metrics, n), then the macro average."""
    rows = ["| task | metric | value | other metrics | n |", "|---|---|---|---|---|"]
    for task, scores in res["tasks"].items():
        items = [(k, v) for k, v in scores.items() if k not in ("loss", "n")]
        head, value = items[0]
        other = ", ".join(f"{k} {v:.4f}" for k, v in items[1:])
        rows.append(f"| {task} | {head} | {value:.4f} | {other} | {scores.get('n', '')} |")
    rows.append(f"| **macro average** | | **{res['macro_avg']:.4f}** | | |")
    return "\n".join(rows)


def _quiet(progress: bool) -> None:
    import transformers
    from datasets.utils.logging import disable_progress_bar

    if not progress:
        transformers.logging.set_verbosity_error()
        disable_progress_bar()


def _tokenizer(cfg: MTLConfig) -> Any:
    from ..model_files import load_tokenizer

    src = cfg.model.tokenizer or cfg.model.encoder
    if src is None:
        raise UsageError(f"{cfg.source}: model.encoder is required (a local Hugging Face encoder folder)")
    return load_tokenizer(src)


def check_model_folders(cfg: MTLConfig) -> None:
    """The model folders the config names (``model.encoder``, the teachers) exist and are model
    folders: a one-line :class:`~bert_emd.errors.UsageError` naming the field otherwise, before
    anything is loaded."""
    from ..model_files import check_model_folder

    if cfg.model.encoder is None:
        raise UsageError(f"{cfg.source}: model.encoder is required (a local Hugging Face encoder folder)")
    check_model_folder(cfg.model.encoder, f"{cfg.source}: model.encoder")
    if not cfg.distillation.enabled:
        return
    if cfg.distillation.teacher is not None:
        _check_multitask_folder(cfg.distillation.teacher, f"{cfg.source}: distillation.teacher")
        return
    for i, spec in enumerate(cfg.tasks):
        if spec.teacher is not None and not os.path.isfile(os.path.join(spec.teacher, "mtl_config.json")):
            check_model_folder(spec.teacher, f"{cfg.source}: tasks[{i}] ({spec.name!r}).teacher")


def _check_multitask_folder(path: str, where: str) -> None:
    from ..errors import MissingFileError
    from .model import CONFIG_NAME

    if not os.path.isdir(path):
        raise MissingFileError(f"{where} {path}: no such folder")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise MissingFileError(f"{where} {path} has no {CONFIG_NAME} (not a folder saved by bert-emd mtl train)")


def prepare_data(cfg: MTLConfig, tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tokenised ``{task: train split}`` and ``{task: validation split}`` (first rows only when
    ``training.limit_train`` / ``limit_eval`` are set)."""
    from .data import load_task_data, tokenize_task

    train, dev = {}, {}
    tr = cfg.training
    for spec in cfg.tasks:
        data = load_task_data(spec)
        if "train" not in data.splits:
            raise UsageError(f"task {spec.name!r}: no training file (data.train)")
        limit = {"train": tr.limit_train, "validation": tr.limit_eval}
        tok = tokenize_task(spec, data, tokenizer, spec.max_length or tr.max_length, limit)
        train[spec.name] = tok["train"]
        if "validation" in tok:
            dev[spec.name] = tok["validation"]
    return train, dev


def _fused(cfg: MTLConfig, fused_attention: bool | None) -> bool:
    """``fused_attention`` if given (the CLI flag), else ``distillation.fused_attention``."""
    return cfg.distillation.fused_attention if fused_attention is None else bool(fused_attention)


def _needs_attention_maps(cfg: MTLConfig, fused_attention: bool | None = None) -> bool:
    """Only the unfused ``"probs"`` attention term reads maps (eager attention); ``"scores"`` and
    the fused path read the hooked queries and keys instead."""
    d = cfg.distillation
    return d.enabled and d.use_attention and d.attention_source == "probs" and not _fused(cfg, fused_attention)


def build_model(cfg: MTLConfig, *, fused_attention: bool | None = None) -> Any:
    """The multi-task model on ``model.encoder`` (optionally keeping only ``model.student_layers``);
    eager attention when distilling attention maps (unfused ``"probs"`` only; ``fused_attention``:
    None reads ``distillation.fused_attention``)."""
    from .model import MultiTaskModel

    if cfg.model.encoder is None:
        raise UsageError(f"{cfg.source}: model.encoder is required (a local Hugging Face encoder folder)")
    attn = cfg.model.attn_implementation
    if _needs_attention_maps(cfg, fused_attention):
        attn = "eager"  # attention maps for the attention costs
    model = MultiTaskModel.from_encoder(cfg.model.encoder, cfg.tasks, cfg.mechanisms, attn_implementation=attn)
    if cfg.model.student_layers:
        from ..distill.students import student_from_teacher_layers

        encoder = student_from_teacher_layers(model.encoder, cfg.model.student_layers)
        model = MultiTaskModel(encoder, cfg.tasks, cfg.mechanisms)
    return model


def train_from_config(
    cfg: MTLConfig,
    *,
    output_dir: str | None = None,
    max_steps: int | None = None,
    epochs: float | None = None,
    seed: int | None = None,
    resume: str | None = None,
    extra: list[str] | None = None,
    progress: bool = False,
    evaluate: bool = True,
    quiet: bool = False,
    fused_attention: bool | None = None,
) -> dict[str, Any]:
    """Train (or distil) the configured multi-task model, evaluate every task, save everything.

    Writes to the output folder: the model (``model.safetensors``, ``mtl_config.json``,
    ``encoder/``, the tokenizer), ``mtl_results.json`` (per-task metrics, macro average, the
    learned layer weights) and the Trainer's ``trainer_state.json``.

    ``progress`` shows the Trainer's progress bars; ``quiet`` drops its printed logs (they stay in
    ``trainer_state.json``); ``extra`` are further TrainingArguments flags. ``fused_attention``
    (distillation; None: ``distillation.fused_attention``, a bool overrides it): attention costs
    from the hooked queries and keys, no attention maps, the models keep their attention
    implementation (see :class:`~bert_emd.mtl.MultiTaskEMDLoss`); ``distillation.attention_source``
    picks ``"probs"`` or ``"scores"``.

    Returns:
        ``{"output_dir", "eval": {"tasks": {...}, "macro_avg"}, "layer_weights", "train_runtime"}``.
    """
    from transformers import HfArgumentParser, TrainingArguments, set_seed

    from .evaluation import evaluate_tasks
    from .samplers import make_sampler
    from .trainer import MultiTaskDistillationTrainer, MultiTaskTrainer

    _quiet(progress)
    tr = cfg.training
    out = output_dir or tr.output_dir
    seed = tr.seed if seed is None else seed
    # before any model, head, projection or teacher is built: the same seed builds the same weights in
    # every run and on every rank (a teacher's missing head, allowed by allow_untrained_teacher, too)
    set_seed(seed)
    check_model_folders(cfg)
    tokenizer = _tokenizer(cfg)
    train_sets, eval_sets = prepare_data(cfg, tokenizer)
    fused_attention = _fused(cfg, fused_attention)
    model = build_model(cfg, fused_attention=fused_attention)
    sizes = {t: len(train_sets[t]) for t in model.task_names}
    n_epochs = tr.epochs if epochs is None else epochs
    total = (max_steps if max_steps is not None else tr.max_steps)
    eval_strategy = tr.eval_strategy if eval_sets else "no"
    base = dict(
        output_dir=out, num_train_epochs=n_epochs, max_steps=total if total is not None else -1,
        per_device_train_batch_size=tr.batch_size, per_device_eval_batch_size=tr.eval_batch_size,
        learning_rate=tr.lr, weight_decay=tr.weight_decay,
        seed=seed, logging_steps=tr.logging_steps, eval_strategy=eval_strategy, save_strategy=tr.save_strategy,
        report_to="none", remove_unused_columns=False, use_cpu=tr.use_cpu, disable_tqdm=not progress,
    )
    if tr.eval_strategy == "steps":
        base["eval_steps"] = tr.logging_steps
    if tr.save_strategy == "steps":
        base["save_steps"] = tr.logging_steps
    argv = [f"--{k}={v}" for k, v in base.items()] + list(extra or [])
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=argv)
    # a task batch spans all processes (each takes its per-device share, as the trainer's batch
    # sampler does): the epoch-shuffle schedule and the warmup count these global batches
    task_batch = args.per_device_train_batch_size * args.world_size
    s = cfg.sampler
    sampler = make_sampler(s.kind, sizes, temperature=s.temperature, power=s.power, anneal_to=s.anneal_to,
                           batch_size=task_batch)
    steps_per_epoch = math.ceil(sum(math.ceil(n / task_batch) for n in sizes.values()) / tr.tasks_per_step)
    total_steps = total if total and total > 0 else math.ceil(steps_per_epoch * n_epochs)
    if args.warmup_steps == 0:  # no --warmup_steps flag: training.warmup_ratio of the run's steps
        args.warmup_steps = int(tr.warmup_ratio * total_steps)
    common = dict(train_sets=train_sets, eval_sets=eval_sets, sampler=sampler, tasks_per_step=tr.tasks_per_step,
                  pad_token_id=tokenizer.pad_token_id or 0, processing_class=tokenizer, mixture_lr=tr.mixture_lr,
                  label_embedding_lr=tr.label_embedding_lr)
    loss = None
    if cfg.distillation.enabled:
        from .loss import MultiTaskEMDLoss
        from .teachers import load_teachers

        d = cfg.distillation
        maps = _needs_attention_maps(cfg, fused_attention)
        teachers = load_teachers(cfg.tasks, multitask_teacher=d.teacher, attn_implementation="eager" if maps else None,
                                 allow_untrained=d.allow_untrained_teacher)
        # (with "scores" or fused_attention, from_models hooks the query/key projections of the student and the
        # teachers)
        loss = MultiTaskEMDLoss.from_models(cfg.tasks, model, teachers, config=d.loss_config(fused_attention),
                                            teacher_annealing=d.teacher_annealing)
        trainer: Any = MultiTaskDistillationTrainer(model, args, teachers=teachers, distill_loss=loss, **common)
    else:
        trainer = MultiTaskTrainer(model, args, **common)
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(out)
    trainer.save_state()  # trainer_state.json (log history: what `bert-emd plot` and the docstring promise)
    res: dict[str, Any] = {"output_dir": out, "train_runtime": result.metrics.get("train_runtime"),
                           "global_step": result.global_step, "training_loss": result.training_loss}
    if evaluate and eval_sets:
        # every rank scores its shard and gets everyone's logits (the same results on every rank;
        # rank 0 writes them below)
        res["eval"] = evaluate_tasks(model, eval_sets, trainer.mtl_collator, batch_size=tr.eval_batch_size,
                                     device=args.device, distributed=args.world_size > 1)
    else:
        res["eval"] = {"tasks": {}, "macro_avg": float("nan")}
    res["layer_weights"] = {t: w.tolist() for t, w in model.layer_weights().items()}
    if loss is not None:
        loss.detach_models()
        emd_w = loss.task_layer_weights()
        res["emd_layer_weights"] = {t: {k: v.tolist() for k, v in w.items()} for t, w in emd_w.items()}
        res["attention_source"] = loss.attention_source
        res["fused_attention"] = loss.fused_attention
    res["mechanisms"] = cfg.mechanisms.enabled
    res["sampler"] = cfg.sampler.kind
    if trainer.args.should_save:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "mtl_results.json").write_text(json.dumps(res, indent=1, default=float))
    return res


def evaluate_model(
    model_dir: str | os.PathLike,
    *,
    config: str | None = None,
    split: str = "validation",
    batch_size: int = 64,
    limit: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Score a saved multi-task model on each task's ``split`` (data from ``config``, or the task
    specs stored in the model folder); returns ``{"tasks": {...}, "macro_avg": ...}``."""
    from ..model_files import load_tokenizer
    from .data import MultiTaskCollator, load_task_data, tokenize_task
    from .evaluation import evaluate_tasks
    from .model import MultiTaskModel

    _quiet(False)
    _check_multitask_folder(os.fspath(model_dir), "--model")
    model = MultiTaskModel.from_pretrained(model_dir)
    specs = list(model.specs.values())
    if config is not None:
        cfg = load_config(config)
        by_name = {t.name: t for t in cfg.tasks}
        unknown = [t for t in by_name if t not in model.specs]
        if unknown:
            raise UsageError(f"{config}: task(s) {unknown} are not tasks of the model in {model_dir} "
                             f"({model.task_names})")
        specs = [by_name[t.name] if t.name in by_name else t for t in specs]
    tokenizer = load_tokenizer(model_dir)
    sets = {}
    for spec in specs:
        data = load_task_data(spec)
        if split not in data.splits:
            print(f"task {spec.name}: no {split} split, skipped")
            continue
        tok = tokenize_task(spec, data, tokenizer, spec.max_length or 128, {split: limit} if limit else None)
        sets[spec.name] = tok[split]
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    res = evaluate_tasks(model, sets, MultiTaskCollator(list(model.specs.values()), tokenizer.pad_token_id or 0),
                         batch_size=batch_size, device=device)
    res["split"] = split
    return res


if __name__ == "__main__":
    import sys

    sys.exit(main())
