"""``bert-emd finetune | distill | evaluate | plot | demo | study``: the training commands of the CLI.

:func:`add_subcommands` registers them on the ``bert-emd`` parser and :func:`dispatch` runs one.
Options of our own use dashes (``--teacher``, ``--max-length``); every other option is a
``transformers.TrainingArguments`` option with its own underscore spelling
(``--num_train_epochs 3 --per_device_train_batch_size 32 --bf16 --gradient_accumulation_steps 2
--resume_from_checkpoint DIR --ddp_backend gloo ...``) and passes through unchanged, so the same
command runs on one CPU, one GPU, and under ``torchrun --nproc_per_node=K`` / ``accelerate
launch``. ``--help-training`` lists them.

The ``run_*`` functions behind the commands take an argv list and return a summary dict; the
demo calls them in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError, require

__all__ = [
    "COMMANDS",
    "HF_MODULES",
    "add_subcommands",
    "dispatch",
    "require_hf",
    "run_distill",
    "run_evaluate",
    "run_finetune",
    "training_arguments",
]

COMMANDS = ("finetune", "distill", "evaluate", "plot", "demo", "study")
# the modules of the ``hf`` extra that training and evaluation import (checked before importing any)
HF_MODULES = ("transformers", "accelerate", "datasets", "sklearn", "scipy")

logger = logging.getLogger(__name__)

# Our defaults for TrainingArguments; anything given on the command line overrides them.
_TRAINING_DEFAULTS = [
    "--report_to", "none",
    "--eval_strategy", "epoch",
    "--save_strategy", "epoch",
    "--logging_steps", "10",
    "--save_total_limit", "2",
]
_TRAINING_EPILOG = (
    "Any transformers.TrainingArguments option passes through with its own spelling, e.g. "
    "--num_train_epochs 3 --per_device_train_batch_size 32 --learning_rate 3e-5 --bf16 "
    "--gradient_accumulation_steps 2 --resume_from_checkpoint DIR --seed 1. Defaults changed "
    "here: --report_to none --eval_strategy epoch --save_strategy epoch --logging_steps 10 "
    "--save_total_limit 2. List them all with --help-training. Multi-GPU: torchrun "
    "--nproc_per_node=K -m bert_emd.cli distill ... (or accelerate launch -m bert_emd.cli ...)."
)


# ----------------------------------------------------------------------------- parser
def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (a GLUE task folder, or CSV / TSV / JSONL files)")
    g.add_argument("--task", help="GLUE task: cola, sst-2, mrpc, sts-b, qqp, mnli, qnli, rte, wnli")
    g.add_argument("--data-dir", help="GLUE task folder (train.tsv, dev.tsv; MNLI dev_matched.tsv)")
    g.add_argument("--train-file", help="generic training file (.csv, .tsv, .jsonl)")
    g.add_argument("--validation-file", help="generic validation file")
    g.add_argument("--test-file", help="generic test file (labels optional)")
    g.add_argument("--text-column", default="text", help="text column of generic files (default: text)")
    g.add_argument("--text-pair-column", default=None, help="second text column of sentence-pair files")
    g.add_argument("--label-column", default="label", help="label column of generic files (default: label)")
    g.add_argument("--labels", default=None, help="comma-separated class names in index order (default: "
                   "sorted labels of the training file)")
    g.add_argument("--regression", action="store_true", help="generic files: float labels (Pearson/Spearman)")
    g.add_argument("--encoding", default="utf-8", help="text encoding of CSV/TSV files (default: utf-8)")
    g.add_argument("--max-length", type=int, default=128, help="maximum tokens per example (default: 128)")
    g.add_argument("--pad-to-max-length", action="store_true",
                   help="pad every example to --max-length (default: pad per batch)")
    g.add_argument("--max-train-samples", type=int, default=None, help="use the first N training rows")
    g.add_argument("--max-eval-samples", type=int, default=None, help="use the first N rows of the dev split(s)")
    g.add_argument("--max-test-samples", type=int, default=None,
                   help="use the first N rows of the test split (default: --max-eval-samples)")


def _add_output_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=required,
                   help="run folder: checkpoints, final model, metrics.json, plots")
    p.add_argument("--help-training", action="store_true", help="list every TrainingArguments option and exit")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots at the end of the run")


def _add_loss_args(p: argparse.ArgumentParser) -> None:
    from ..nn.config import EMDLossConfig

    d = EMDLossConfig()  # the defaults of the library, the CLI and the YAML distillation section
    g = p.add_argument_group("BERT-EMD loss (bert_emd.nn.BertEMDLoss, options of bert_emd.nn.EMDLossConfig)")
    g.add_argument("--mapping", default="emd", choices=["emd", "skip", "last", "uniform"],
                   help="layer mapping: emd (learned, default) or a fixed one (skip: TinyBERT's)")
    g.add_argument("--prediction-only", action="store_true",
                   help="no layer-to-layer terms: distil the teacher's predictions only")
    g.add_argument("--no-prediction", action="store_true",
                   help="no prediction term: layer-to-layer (attention, hidden, embedding) terms only, as "
                        "TinyBERT's intermediate-layer stage; the labels are not used")
    g.add_argument("--beta", type=float, default=d.beta,
                   help=f"weight of the layer and embedding terms ({d.beta:g}; the original script's default: 0.01)")
    g.add_argument("--theta", type=float, default=d.theta,
                   help=f"weight of attention + hidden inside beta ({d.theta:g})")
    g.add_argument("--t-emd", type=float, default=d.T_emd, help=f"cost-attention temperature T_emd ({d.T_emd:g})")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"prediction-loss temperature T ({d.temperature:g})")
    g.add_argument("--gold-weight", type=float, default=None,
                   help=f"share of the gold-label prediction term; the soft (teacher) term gets 1 - gold_weight "
                        f"({d.gold_weight:g})")
    g.add_argument("--alpha", type=float, default=None,
                   help="deprecated: the soft share, 1 - gold_weight (use --gold-weight)")
    g.add_argument("--normalize", default=d.normalize, choices=["sum", "softmax", "double_softmax"],
                   help="cost-attention normalisation (double_softmax: the paper's runs)")
    g.add_argument("--attention-source", default="probs", choices=["probs", "scores"],
                   help="attention maps compared: post-softmax probs (eager attention) or pre-softmax "
                        "scores (hooks; the original's choice)")
    g.add_argument("--fused-attention", action="store_true",
                   help="attention costs from the hooked queries and keys (bert_emd.attention_costs), "
                        "either source: no attention maps are formed, the models keep their attention "
                        "implementation (SDPA)")
    g.add_argument("--separate-weights", action="store_true",
                   help="separate layer weights for attention and hidden (default: one shared pair)")
    g.add_argument("--no-attention", action="store_true", help="drop the attention term")
    g.add_argument("--no-hidden", action="store_true", help="drop the hidden-state term")
    g.add_argument("--no-embedding", action="store_true", help="drop the embedding term")
    g.add_argument("--token-mask", action="store_true", help="average hidden costs over real tokens only")
    g.add_argument("--per-sample", action="store_true", help="one transport problem per example")
    g.add_argument("--backend", default="auto", help="backend of layer_costs and emd (auto, cpu, cuda, ...)")


def add_subcommands(sub: Any) -> None:
    """Register ``finetune``, ``distill``, ``evaluate``, ``plot`` and ``demo`` on ``sub`` (the
    ``add_subparsers()`` object of the ``bert-emd`` parser)."""
    p = sub.add_parser("finetune", allow_abbrev=False, help="fine-tune a teacher from a local checkpoint on a task",
                       epilog=_TRAINING_EPILOG)
    p.add_argument("--model", required=True, help="local checkpoint folder (e.g. a BertModel or a classifier)")
    _add_data_args(p)
    _add_output_arg(p)

    p = sub.add_parser("distill", allow_abbrev=False, help="distil a fine-tuned teacher into a student with BERT-EMD",
                       epilog=_TRAINING_EPILOG)
    p.add_argument("--teacher", required=True, help="fine-tuned teacher folder (a *ForSequenceClassification)")
    p.add_argument("--allow-untrained-teacher", action="store_true",
                   help="go on (with a warning) when the teacher's checkpoint lacks its task head, which is then "
                        "random (seeded by --seed); by default such a teacher is refused")
    g = p.add_argument_group("student (one of --student, --student-layers, --init-from-teacher-layers)")
    g.add_argument("--student", help="local student checkpoint folder")
    g.add_argument("--student-layers", type=int, help="fresh student: number of transformer layers")
    g.add_argument("--student-hidden", type=int, help="fresh student: hidden size (default: the teacher's)")
    g.add_argument("--student-heads", type=int, help="fresh student: attention heads (default: the teacher's)")
    g.add_argument("--student-ffn", type=int, help="fresh student: FFN (intermediate) size (default: the teacher's)")
    g.add_argument("--init-from-teacher-layers", help="student = teacher copy keeping these 0-based layers, e.g. 2,5")
    g.add_argument("--init-embeddings-from-teacher", action="store_true",
                   help="fresh student with the teacher's hidden size: copy the teacher's embeddings")
    g.add_argument("--freeze-word-embeddings", action="store_true", help="do not train the word embeddings")
    _add_loss_args(p)
    _add_data_args(p)
    _add_output_arg(p)

    p = sub.add_parser("evaluate", allow_abbrev=False, help="score a model folder on a task split",
                       epilog="TrainingArguments options such as --per_device_eval_batch_size pass through.")
    p.add_argument("--model", required=True, help="model folder (with its tokenizer)")
    p.add_argument("--split", default="validation", help="split to score: validation (default), test, train, "
                   "validation_mismatched (MNLI)")
    p.add_argument("--output", help="write the metrics to this JSON file")
    p.add_argument("--latency-examples", type=int, default=0,
                   help="also time single-example CPU inference over N examples (ms per example)")
    _add_data_args(p)
    _add_output_arg(p, required=False)

    p = sub.add_parser("plot", allow_abbrev=False,
                       help="draw layer weights, transport plans and loss curves of a run (PNG)")
    p.add_argument("run_dir", help="output folder of a distill (or finetune) run, or one of its checkpoints")
    p.add_argument("--out", help="folder for the PNG files (default: RUN_DIR/plots)")

    from .demo import add_demo_args

    p = sub.add_parser("demo", allow_abbrev=False,
                       help="offline end-to-end demo: fine-tune MiniLM on tweets, distil three ways")
    add_demo_args(p)

    from .study import add_study_args

    p = sub.add_parser("study", allow_abbrev=False,
                       help="offline study of layer mappings in TinyBERT's two stages (EMD, skip, last, uniform, "
                            "baselines), with seeds and paired bootstrap intervals")
    add_study_args(p)


def dispatch(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the command ``args.command`` (one of :data:`COMMANDS`); ``rest``: the unparsed
    arguments (TrainingArguments options)."""
    if args.command == "plot":
        _no_rest("plot", rest)
        require_hf(("matplotlib",))
        from .plots import plot_run

        for path in plot_run(args.run_dir, args.out):
            print(path)
        return 0
    if args.command == "demo":
        from .demo import run_demo

        _no_rest("demo", rest)
        run_demo(args)
        return 0
    if args.command == "study":
        from .study import run_study

        _no_rest("study", rest)
        run_study(args)
        return 0
    require_hf()
    if getattr(args, "help_training", False):
        from transformers import HfArgumentParser, TrainingArguments

        HfArgumentParser(TrainingArguments).print_help()
        return 0
    runner = {"finetune": _finetune, "distill": _distill, "evaluate": _evaluate}[args.command]
    summary = runner(args, rest)
    if args.command == "evaluate":
        print(json.dumps(summary["metrics"], indent=1))
    return 0


def require_hf(modules: tuple[str, ...] = HF_MODULES) -> None:
    """A :class:`~bert_emd.errors.MissingExtraError` naming ``pip install "bert-emd[hf]"`` unless
    every module in ``modules`` is installed (checked without importing them)."""
    for module in modules:
        require(module, "hf")


def _no_rest(cmd: str, rest: list[str]) -> None:
    if rest:
        raise UsageError(f"unrecognized arguments: {' '.join(rest)}")


def _parse(command: str, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="bert-emd")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    return parser.parse_known_args([command, *argv])


def run_finetune(argv: list[str]) -> dict[str, Any]:
    """``bert-emd finetune ARGV`` in-process; returns the run summary (metrics, paths, times)."""
    return _finetune(*_parse("finetune", argv))


def run_distill(argv: list[str]) -> dict[str, Any]:
    """``bert-emd distill ARGV`` in-process; returns the run summary."""
    return _distill(*_parse("distill", argv))


def run_evaluate(argv: list[str]) -> dict[str, Any]:
    """``bert-emd evaluate ARGV`` in-process; returns ``{"metrics": ..., ...}``."""
    return _evaluate(*_parse("evaluate", argv))


# ----------------------------------------------------------------------------- helpers
def training_arguments(rest: list[str], output_dir: str, defaults: list[str] | None = None) -> Any:
    """``TrainingArguments`` from pass-through options (ours as defaults, the user's win)."""
    from transformers import HfArgumentParser, TrainingArguments

    argv = [*(_TRAINING_DEFAULTS if defaults is None else defaults), *rest, "--output_dir", output_dir]
    try:
        (targs,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        if "not used by the HfArgumentParser" in str(err):
            raise UsageError(f"{err} (neither an option of this command nor a TrainingArguments "
                             "option; see --help and --help-training)") from None
        raise UsageError(f"invalid TrainingArguments: {err}") from None
    return targs


def _load_data(args: argparse.Namespace, *, test: bool = False) -> Any:
    from .data import load_glue, load_table

    generic = any(getattr(args, k) for k in ("train_file", "validation_file", "test_file"))
    if args.task and generic:
        raise UsageError("give either --task/--data-dir (GLUE) or --train-file/--validation-file, not both")
    if args.task:
        if not args.data_dir:
            raise UsageError(f"--task {args.task} needs --data-dir (the folder with train.tsv and dev.tsv)")
        return load_glue(args.task, args.data_dir, test=test)
    if not generic:
        raise UsageError("no data: give --task and --data-dir, or --train-file / --validation-file / --test-file")
    labels = None if args.labels is None else [x.strip() for x in args.labels.split(",")]
    return load_table(
        args.train_file,
        args.validation_file,
        args.test_file,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        label_list=labels,
        regression=args.regression,
        encoding=args.encoding,
    )


def _tokenized(args: argparse.Namespace, data: Any, tokenizer: Any) -> Any:
    from .data import tokenize

    limit = {"train": args.max_train_samples}
    for split in data.splits:
        if split == "test":
            limit[split] = args.max_test_samples if args.max_test_samples is not None else args.max_eval_samples
        elif split != "train":
            limit[split] = args.max_eval_samples
    return tokenize(data, tokenizer, max_length=args.max_length, pad_to_max_length=args.pad_to_max_length,
                    limit=limit)


def _trainer_kwargs(targs: Any, tok: Any, tokenizer: Any, data: Any) -> dict[str, Any]:
    """The Trainer arguments finetune and distill share: the splits, collator, tokenizer and the
    task's metrics; evaluation is switched off when there is no validation split."""
    from .metrics import compute_metrics_fn

    eval_ds = tok.get("validation")
    if eval_ds is None and targs.eval_strategy != "no":
        targs.eval_strategy = "no"
    return dict(args=targs, train_dataset=tok["train"], eval_dataset=eval_ds,
                data_collator=_collator(tokenizer, targs), processing_class=tokenizer,
                compute_metrics=compute_metrics_fn(data.metric_task, data.is_regression))


def _collator(tokenizer: Any, targs: Any) -> Any:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if (targs.fp16 or targs.bf16) else None)


def _problem_type(data: Any) -> str:
    return "regression" if data.is_regression else "single_label_classification"


def _write_json(path: Path, obj: Any) -> None:
    from .trainer import atomic_save

    atomic_save(obj, str(path), as_json=True)


def _evaluate_splits(trainer: Any, tok: Any, train_split: str = "train") -> dict[str, dict[str, float]]:
    """Evaluate every labelled non-training split; {split: metrics}."""
    out = {}
    for split, ds in tok.items():
        if split == train_split or "labels" not in ds.column_names or len(ds) == 0:
            continue
        prefix = "eval" if split == "validation" else split
        out[split] = trainer.evaluate(eval_dataset=ds, metric_key_prefix=prefix)
    return out


def _finish(trainer: Any, targs: Any, tok: Any, extra: dict[str, Any], t0: float) -> dict[str, Any]:
    metrics = _evaluate_splits(trainer, tok)
    trainer.save_model()
    trainer.save_state()
    summary = {"output_dir": targs.output_dir, "metrics": metrics, "wall_s": time.time() - t0, **extra}
    if trainer.is_world_process_zero():
        _write_json(Path(targs.output_dir) / "metrics.json", summary)
    return summary


def _seeded_arguments(rest: list[str], output_dir: str, defaults: list[str] | None = None) -> Any:
    """:func:`training_arguments`, then the run's ``--seed`` set (``transformers.set_seed``: Python,
    NumPy, torch) before the command builds or loads any model: every weight drawn at random (a
    fresh student, a head missing from a checkpoint) is then the same in two runs with the same
    seed, and on every rank of a distributed run."""
    from transformers import set_seed

    targs = training_arguments(rest, output_dir, defaults)
    set_seed(targs.seed)
    return targs


def _prepare_training(command: str, args: argparse.Namespace, rest: list[str], tokenizer_path: str,
                      folders: dict[str, str | None]):
    """Seeded TrainingArguments (:func:`_seeded_arguments`), the task data, the tokenizer of
    ``tokenizer_path`` and the tokenised splits (loaded once, main process first); training data is
    required. ``folders``: ``{option: path}`` of the model folders the command loads, checked
    first."""
    from .students import check_model_folder, load_tokenizer

    targs = _seeded_arguments(rest, args.output_dir)
    for option, folder in folders.items():
        if folder is not None:
            check_model_folder(folder, option)
    with targs.main_process_first(desc="load data"):
        data = _load_data(args)
        tokenizer = load_tokenizer(tokenizer_path)
        tok = _tokenized(args, data, tokenizer)
    if "train" not in tok:
        raise UsageError(f"{command} needs training data (--data-dir with train.tsv, or --train-file)")
    return targs, data, tokenizer, tok


# ----------------------------------------------------------------------------- finetune
def _finetune(args: argparse.Namespace, rest: list[str]) -> dict[str, Any]:
    from transformers import Trainer

    from .students import count_parameters, load_model

    t0 = time.time()
    targs, data, tokenizer, tok = _prepare_training("finetune", args, rest, args.model, {"--model": args.model})
    model = load_model(args.model, num_labels=data.num_labels, problem_type=_problem_type(data),
                       label_list=data.label_list, role="model to fine-tune")
    trainer = Trainer(model=model, **_trainer_kwargs(targs, tok, tokenizer, data))
    train_out = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    extra = {"command": "finetune", "task": data.name, "parameters": count_parameters(model),
             "train_metrics": train_out.metrics}
    summary = _finish(trainer, targs, tok, extra, t0)
    if trainer.is_world_process_zero() and not args.no_plots:
        _try_plots(targs.output_dir)
    return summary


# ----------------------------------------------------------------------------- distill
def _teacher_layers(args: argparse.Namespace) -> list[int] | None:
    """Check the student options (exactly one way to get a student) before anything is loaded;
    the parsed ``--init-from-teacher-layers`` indices, if given."""
    chosen = [k for k in ("student", "student_layers", "init_from_teacher_layers") if getattr(args, k)]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --student PATH, --student-layers M (with --student-hidden/"
                         "--student-heads/--student-ffn), --init-from-teacher-layers I,J,...")
    if not args.init_from_teacher_layers:
        return None
    try:
        return [int(x) for x in args.init_from_teacher_layers.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--init-from-teacher-layers: expected comma-separated integers, got "
                         f"{args.init_from_teacher_layers!r}") from None


def _build_student(args: argparse.Namespace, teacher: Any, data: Any, attn: str | None) -> Any:
    from .students import load_model, student_from_config, student_from_teacher_layers

    layers = _teacher_layers(args)
    if args.student:
        return load_model(args.student, num_labels=data.num_labels, problem_type=_problem_type(data),
                          attn_implementation=attn, label_list=data.label_list, role="student")
    if layers is not None:
        return student_from_teacher_layers(teacher, layers)
    student = student_from_config(
        teacher.config,
        num_layers=args.student_layers,
        hidden_size=args.student_hidden,
        num_heads=args.student_heads,
        intermediate_size=args.student_ffn,
        attn_implementation=attn,
    )
    logger.info("student: %d layers built from the teacher's config, initialised at random (head included)",
                args.student_layers)
    if args.init_embeddings_from_teacher:
        s_emb, t_emb = student.base_model.embeddings, teacher.base_model.embeddings
        if student.config.hidden_size != teacher.config.hidden_size:
            raise UsageError("--init-embeddings-from-teacher needs the teacher's hidden size")
        s_emb.load_state_dict(t_emb.state_dict())
    return student


def build_loss(args: argparse.Namespace, student: Any, teacher: Any, data: Any) -> Any:
    """The ``BertEMDLoss`` configured by the ``distill`` options."""
    layers_off = args.prediction_only
    use_attention = not (layers_off or args.no_attention)
    if use_attention:
        hs = student.config.num_attention_heads
        ht = teacher.config.num_attention_heads
        if hs != ht:
            raise UsageError(f"the student has {hs} attention heads and the teacher {ht}: BERT-EMD compares "
                             f"attention head by head; use --student-heads {ht} or --no-attention")
    try:
        return _loss_from_models(args, student, teacher, data, use_attention, layers_off)
    except ValueError as err:  # the loss checks its options (temperatures, terms, mapping) when built
        raise UsageError(str(err)) from err


def check_backend(backend: str, device: Any) -> None:
    """A :class:`~bert_emd.errors.UsageError` now, instead of an error at the first training step,
    if ``--backend`` names no backend or one that cannot run the loss's ops on ``device``."""
    if backend == "auto":
        return
    import torch

    from .._backends import BackendError, select

    for op in ("layer_costs", "emd"):
        try:
            select(op, backend, torch.device(device))
        except (ValueError, BackendError) as err:
            raise UsageError(f"--backend {backend}: {err}") from None


def loss_config(args: argparse.Namespace, use_attention: bool = True, layers_off: bool = False) -> Any:
    """The :class:`~bert_emd.nn.EMDLossConfig` of the ``distill`` loss options (``--alpha``, the
    deprecated soft share, becomes ``gold_weight = 1 - alpha`` with a DeprecationWarning)."""
    from ..nn.config import EMDLossConfig

    gold = {} if args.gold_weight is None else {"gold_weight": args.gold_weight}
    if args.alpha is not None and gold:
        raise UsageError("--alpha is the deprecated form of --gold-weight (alpha = 1 - gold_weight): pass one")
    return EMDLossConfig.from_options(
        beta=args.beta, theta=args.theta, T_emd=args.t_emd, temperature=args.temperature, alpha=args.alpha,
        normalize=args.normalize, attention_source=args.attention_source, fused_attention=args.fused_attention,
        use_attention=use_attention, use_hidden=not (layers_off or args.no_hidden),
        use_embedding=not (layers_off or args.no_embedding), use_prediction=not args.no_prediction,
        token_mask=args.token_mask, backend=args.backend, **gold,
    )


def _loss_from_models(args: argparse.Namespace, student: Any, teacher: Any, data: Any, use_attention: bool,
                      layers_off: bool) -> Any:
    from bert_emd.nn import BertEMDLoss

    return BertEMDLoss.from_models(
        student, teacher, config=loss_config(args, use_attention, layers_off),
        share_weights=not args.separate_weights, mapping=args.mapping, per_sample=args.per_sample,
        task="regression" if data.is_regression else "classification",
    )


def _distill(args: argparse.Namespace, rest: list[str]) -> dict[str, Any]:
    from transformers import set_seed

    from .students import count_parameters, freeze_word_embeddings, load_model
    from .trainer import (
        DistillationTrainer,
        data_parallel_reason,
        deepspeed_unsupported_reason,
        fsdp_unsupported_reason,
        unsynchronised_ranks_reason,
    )

    t0 = time.time()
    _teacher_layers(args)  # the student options, before anything is loaded
    targs, data, tokenizer, tok = _prepare_training("distill", args, rest, args.teacher,
                                                    {"--teacher": args.teacher, "--student": args.student})
    checks = (fsdp_unsupported_reason, deepspeed_unsupported_reason, unsynchronised_ranks_reason, data_parallel_reason)
    for check in checks:  # before loading any model
        if (reason := check(targs)) is not None:
            raise UsageError(reason)
    check_backend(args.backend, targs.device)
    # post-softmax maps from the models need eager attention; the fused path reads Q and K instead
    needs_maps = args.attention_source == "probs" and not (
        args.fused_attention or args.prediction_only or args.no_attention)
    attn = "eager" if needs_maps else None
    # the teacher predicts: a checkpoint without its task head (a bare encoder) is refused unless
    # --allow-untrained-teacher (then the head is drawn from the run's seed, set above)
    untrained_ok = args.allow_untrained_teacher
    head = {"num_labels": data.num_labels, "problem_type": _problem_type(data)} if untrained_ok else {}
    teacher = load_model(args.teacher, attn_implementation=attn, role="teacher", predicts=True,
                         allow_untrained=untrained_ok, opt_out="--allow-untrained-teacher", **head)
    if teacher.config.num_labels != data.num_labels:
        raise UsageError(f"the teacher {args.teacher} has {teacher.config.num_labels} outputs, the data "
                         f"{data.num_labels} labels: fine-tune the teacher on this task first (bert-emd finetune)")
    set_seed(targs.seed)  # the student's initial weights do not depend on what loading the teacher drew
    student = _build_student(args, teacher, data, attn)
    student.config.problem_type = _problem_type(data)
    if args.freeze_word_embeddings:
        freeze_word_embeddings(student)
    loss = build_loss(args, student, teacher, data)
    trainer = DistillationTrainer(model=student, teacher=teacher, distill_loss=loss,
                                  **_trainer_kwargs(targs, tok, tokenizer, data))
    train_out = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    extra = {
        "command": "distill",
        "task": data.name,
        "teacher": str(args.teacher),
        "parameters": count_parameters(student),
        "teacher_parameters": count_parameters(teacher),
        "mapping": "prediction-only" if args.prediction_only else args.mapping,
        "attention_source": args.attention_source,
        "fused_attention": args.fused_attention,
        "beta": args.beta,
        "train_metrics": train_out.metrics,
        "layer_weights": _weights(loss),
    }
    summary = _finish(trainer, targs, tok, extra, t0)
    loss.detach_models()
    if trainer.is_world_process_zero() and not args.no_plots:
        _try_plots(targs.output_dir)
    return summary


def _weights(loss: Any) -> dict[str, list[float]]:
    from .trainer import loss_weights

    return loss_weights(loss)


def _try_plots(run_dir: str) -> None:
    from .plots import plot_run

    try:
        plot_run(run_dir)
    except Exception as err:  # plots must never fail a finished training run
        print(f"bert-emd: plots not written ({type(err).__name__}: {err})", file=sys.stderr)


# ----------------------------------------------------------------------------- evaluate
def _evaluate(args: argparse.Namespace, rest: list[str]) -> dict[str, Any]:
    import tempfile

    from transformers import Trainer

    from .metrics import compute_metrics_fn
    from .students import check_model_folder, count_parameters, load_model, load_tokenizer

    check_model_folder(args.model, "--model")
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="bert_emd_eval_")
    targs = _seeded_arguments(rest, out_dir, defaults=["--report_to", "none"])
    data = _load_data(args, test=args.split == "test")
    if args.split not in data.splits:
        raise UsageError(f"split {args.split!r} not in the data (have: {', '.join(data.splits)})")
    tokenizer = load_tokenizer(args.model)
    tok = _tokenized(args, data, tokenizer)
    ds = tok[args.split]
    if "labels" not in ds.column_names:
        raise UsageError(f"split {args.split!r} has no labels to score")
    # scored for its predictions: a folder without a trained task head is refused (no opt-out: the
    # scores of a random head measure nothing)
    model = load_model(args.model, num_labels=data.num_labels, problem_type=_problem_type(data),
                       role="model to evaluate", predicts=True)
    trainer = Trainer(model=model, args=targs, data_collator=_collator(tokenizer, targs), processing_class=tokenizer,
                      compute_metrics=compute_metrics_fn(data.metric_task, data.is_regression))
    metrics = trainer.evaluate(eval_dataset=ds, metric_key_prefix=args.split)
    summary: dict[str, Any] = {"model": str(args.model), "split": args.split, "metrics": metrics,
                               "parameters": count_parameters(model)}
    if args.latency_examples:
        summary["latency_ms"] = cpu_latency_ms(model, ds, args.latency_examples)
    if args.output:
        _write_json(Path(args.output), summary)
    return summary


def cpu_latency_ms(model: Any, dataset: Any, n: int, *, warmup: int = 5) -> float:
    """Median wall time (ms) of one forward of a single example on the CPU (batch size 1, no
    padding), over the first ``n`` examples of a tokenised ``dataset``."""
    import statistics

    import torch

    model = model.to("cpu").eval()
    rows = [dataset[i] for i in range(min(n, len(dataset)))]
    if not rows:
        raise UsageError("no examples to time")
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in rows[0]]
    feeds = [{k: torch.tensor([r[k]]) for k in keys} for r in rows]
    times = []
    with torch.inference_mode():
        for f in feeds[: min(warmup, len(feeds))]:
            model(**f)
        for f in feeds:
            t = time.perf_counter()
            model(**f)
            times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)
