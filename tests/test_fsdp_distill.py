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

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from _distill_fixtures import free_port, make_teacher, sentiment_rows, tiny_config, write_table  # noqa: E402
from bert_emd.distill.cli_commands import run_distill  # noqa: E402
from bert_emd.distill.trainer import fsdp_unsupported_reason  # noqa: E402


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
    with pytest.raises(SystemExit) as err:
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
    base = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_FSDP"}
    full_env = {**base, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    full_env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def test_two_process_torchrun_fsdp_is_refused(data, tmp_path):
    """``torchrun --nproc_per_node 2 ... --fsdp full_shard`` (gloo): every rank stops with the
    message (before this check, accelerate ran it as DDP without a word)."""
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "bert_emd.cli", "distill",
           *_argv(data, out, "--fsdp", "full_shard", "--ddp_backend", "gloo")]
    proc = _run(cmd, {})
    assert proc.returncode != 0
    _assert_fsdp_message(proc.stdout + proc.stderr)
    assert not (out / "model.safetensors").exists()


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
