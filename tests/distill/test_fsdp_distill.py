"""``bert-emd distill`` refuses FSDP with a clear error that names DDP as the alternative.

Why not FSDP (accelerate 1.15, torch 2.13, transformers 5.x; see
:func:`bert_emd.distill.trainer.fsdp_unsupported_reason`):

- ``DistillationTrainer`` puts the loss's projection W (outside the student) into the student's
  optimizer; accelerate's FSDP2 ``prepare`` swaps every optimizer parameter for its sharded copy
  in the model and fails on W ("A parameter in the optimizer couldn't be switched to its sharded
  version");
- on CPU, accelerate never runs FSDP at all: gloo processes are ``MULTI_CPU``, which drops the
  FSDP plugin, so ``--fsdp full_shard`` or ``accelerate launch --use_fsdp`` silently trained with
  DDP. So a 2-process CPU FSDP run cannot be compared with one process here; these tests check
  that every way of asking for FSDP stops before any training, with the reason.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")

import helpers  # noqa: E402
from bert_emd.distill.cli_commands import run_distill  # noqa: E402
from bert_emd.distill.trainer import fsdp_unsupported_reason  # noqa: E402
from bert_emd.errors import UsageError  # noqa: E402
from helpers import free_port, make_teacher, sentiment_rows, tiny_config, write_table  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    return {"teacher": make_teacher(root / "teacher", num_labels=2), "train": write_table(root / "train.csv",
                                                                                          sentiment_rows(8))}


def _argv(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--teacher", str(data["teacher"]), "--train-file", str(data["train"]), "--labels", "negative,positive",
        "--student-layers", "2", "--max-length", "16", "--output-dir", str(out), "--no-plots", "--use_cpu", "True",
        "--per_device_train_batch_size", "4", "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--disable_tqdm", "True", "--dataloader_num_workers", "0", "--report_to", "none", *extra,
    ]


def _assert_fsdp_message(text: str) -> None:
    assert "does not support FSDP" in text, text[-3000:]
    assert "Use DDP instead" in text and "torchrun" in text, text[-3000:]


def test_reason_only_when_fsdp_is_requested(monkeypatch):
    from transformers import TrainingArguments

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_unsupported_reason(None) is None
    assert fsdp_unsupported_reason(TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")) is None
    _assert_fsdp_message(fsdp_unsupported_reason(None, fsdp_enabled=True))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --use_fsdp sets
    _assert_fsdp_message(fsdp_unsupported_reason(None))


@pytest.mark.parametrize("fsdp", [["--fsdp", "full_shard"], ["--fsdp"]])
def test_cli_refuses_fsdp_before_training(data, tmp_path, monkeypatch, fsdp):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    out = tmp_path / "run"
    with pytest.raises(UsageError) as err:
        run_distill(_argv(data, out, *fsdp))
    _assert_fsdp_message(str(err.value))
    assert not (out / "model.safetensors").exists()


def test_trainer_refuses_fsdp(monkeypatch):
    """The API refuses it too (``DistillationTrainer`` with ``TrainingArguments(fsdp=...)``, or the
    environment of ``accelerate launch --use_fsdp``), before building the accelerator."""
    from bert_emd.distill.trainer import DistillationTrainer
    from bert_emd.nn import BertEMDLoss
    from transformers import BertForSequenceClassification, TrainingArguments

    teacher = BertForSequenceClassification(tiny_config(2, layers=4))
    student = BertForSequenceClassification(tiny_config(2, layers=2))
    loss = BertEMDLoss.from_models(student, teacher)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", fsdp="full_shard")
    with pytest.raises(ValueError, match="does not support FSDP"):
        DistillationTrainer(model=student, args=args, teacher=teacher, distill_loss=loss)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="Use DDP instead"):
        DistillationTrainer(model=student, args=args, teacher=teacher, distill_loss=loss)


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in helpers.child_env(**env).items() if k != "ACCELERATE_USE_FSDP"}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_torchrun_fsdp_is_refused(data, tmp_path):
    """``torchrun --nproc_per_node 2 ... --fsdp full_shard`` (gloo): every rank stops with the
    message (before this check, accelerate ran it as DDP without a word)."""
    out = tmp_path / "torchrun"
    cmd = [*helpers.torchrun_command(), "-m", "bert_emd.cli", "distill",
           *_argv(data, out, "--fsdp", "full_shard", "--ddp_backend", "gloo")]
    proc = _run(cmd, {})
    assert proc.returncode != 0
    _assert_fsdp_message(proc.stdout + proc.stderr)
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_accelerate_launch_use_fsdp_is_refused(data, tmp_path):
    """``accelerate launch --use_fsdp --num_processes 2`` (gloo, CPU): refused through the
    ``ACCELERATE_USE_FSDP`` variable the launcher sets."""
    out = tmp_path / "accelerate"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", "2", "--num_machines", "1", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "bert_emd.cli", "distill", *_argv(data, out, "--ddp_backend", "gloo")]
    # an empty HF_HOME: no default accelerate config from the user's cache
    proc = _run(cmd, {"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode != 0
    _assert_fsdp_message(proc.stdout + proc.stderr)
    assert not (out / "model.safetensors").exists()


def test_deepspeed_is_refused_with_the_fix_named(monkeypatch):
    """``--deepspeed`` / ``accelerate launch --use_deepspeed``: refused (half-precision student
    without autocast against the fp32 projection, which lives outside the student), DDP named."""
    from types import SimpleNamespace

    import torch
    from bert_emd.distill.trainer import DistillationTrainer, deepspeed_unsupported_reason
    from bert_emd.nn import BertEMDLoss
    from transformers import TrainingArguments

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert deepspeed_unsupported_reason(None) is None
    assert deepspeed_unsupported_reason(TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")) is None
    for reason in (deepspeed_unsupported_reason(SimpleNamespace(deepspeed="ds_config.json")),
                   deepspeed_unsupported_reason(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}))):
        assert "does not support DeepSpeed" in reason and "torchrun" in reason
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch --use_deepspeed sets
    assert "does not support DeepSpeed" in deepspeed_unsupported_reason(None)
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        DistillationTrainer(model=torch.nn.Linear(2, 2), args=args, teacher=torch.nn.Linear(2, 2),
                            distill_loss=BertEMDLoss(2, 2, 4, 4))


def test_one_process_driving_several_gpus_is_refused():
    """A plain ``python`` run that sees several GPUs would get ``nn.DataParallel`` from the Trainer:
    refused with one-process-per-GPU launches named; every other mode passes."""
    from types import SimpleNamespace

    from bert_emd.distill.trainer import data_parallel_reason
    from transformers.training_args import ParallelMode

    reason = data_parallel_reason(SimpleNamespace(parallel_mode=ParallelMode.NOT_DISTRIBUTED, n_gpu=4))
    assert "DataParallel" in reason and "torchrun --nproc_per_node=4" in reason and "CUDA_VISIBLE_DEVICES" in reason
    for mode in (ParallelMode.NOT_PARALLEL, ParallelMode.DISTRIBUTED):
        assert data_parallel_reason(SimpleNamespace(parallel_mode=mode, n_gpu=1)) is None
    assert data_parallel_reason(None) is None
