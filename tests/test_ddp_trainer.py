"""``bert-emd distill`` with two gloo CPU processes matches one process, launched by
``torchrun --nproc_per_node=2`` and by ``accelerate launch`` (2 processes).

One process with batch 8 and two processes with batch 4 each see the same global batches
(sequential sampler, every example padded to the same length, no dropout), so with plain SGD
(Adam would magnify float noise in gradients that are zero in exact arithmetic) the distilled
student, the projection and the layer weights must agree to float rounding: every rank solves
the transport problem of the all-reduced costs, and the projection's gradient is averaged.
A run that silently fell back to one process with batch 4 would train on other batches (rows 0-3
and 4-7 instead of 0-7 and 8-15), so the comparison also proves that both ranks took part. The
logged loss parts (``loss_<part>`` at every step) must also be the one process's: the trainer
averages them over the ranks, as ``Trainer`` does its ``loss``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from _distill_fixtures import (  # noqa: E402
    assert_same_logged_losses,
    free_port,
    make_teacher,
    sentiment_rows,
    write_table,
)
from bert_emd.distill.cli_commands import run_distill  # noqa: E402
from bert_emd.distill.trainer import LOSS_STATE_NAME  # noqa: E402


def _argv(teacher, train, out, batch):
    return [
        "--teacher", str(teacher), "--train-file", str(train), "--labels", "negative,positive",
        "--student-layers", "2", "--beta", "1.0", "--pad-to-max-length", "--max-length", "16",
        "--output-dir", str(out), "--no-plots",
        "--use_cpu", "True", "--per_device_train_batch_size", str(batch),
        "--train_sampling_strategy", "sequential", "--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.1",
        "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "3",
        "--dataloader_num_workers", "0", "--logging_steps", "1",
    ]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> dict[str, Path]:
    """The teacher, the training table and the one-process reference run (batch 8), shared by the launchers."""
    root = tmp_path_factory.mktemp("ddp_trainer")
    teacher = make_teacher(root / "teacher", num_labels=2, dropout=0.0)
    train = write_table(root / "train.csv", sentiment_rows(16))
    single = root / "single"
    run_distill(_argv(teacher, train, single, 8))
    return {"teacher": teacher, "train": train, "single": single}


def _check_two_processes_match_one(
    ref: dict[str, Path], out: Path, launcher: list[str], env: dict[str, str] | None = None
) -> None:
    """Run ``launcher -m bert_emd.cli distill`` (2 processes, batch 4 each) into ``out`` and assert
    that it reaches the one-process run's student, projection and layer weights.

    Args:
        ref: :func:`single_run`'s teacher, training table and reference output folder.
        out: output folder of the two-process run.
        launcher: the launcher's command line up to (not including) ``-m bert_emd.cli``.
        env: extra environment variables for the launcher.
    """
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    cmd = [*launcher, "-m", "bert_emd.cli", "distill", *_argv(ref["teacher"], ref["train"], out, 4),
           "--ddp_backend", "gloo"]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from safetensors.torch import load_file

    single = ref["single"]
    a, b = load_file(str(single / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    start = make_start(ref["teacher"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=k)
        moved += int(not torch.allclose(a[k], start[k]))
    assert moved > len(a) // 2  # the students trained (not two copies of the initial weights)
    la = torch.load(single / LOSS_STATE_NAME, weights_only=True)
    lb = torch.load(out / LOSS_STATE_NAME, weights_only=True)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-4, atol=2e-6, msg=k)
    assert la["layer_weights.teacher_weight"][0].item() != pytest.approx(0.25, abs=1e-6)
    # two processes with batch 4 made the same two global steps
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 4
    # ... and logged the one process's loss parts at both steps. Each rank's part is a mean over its
    # 4 rows, with as many terms on each rank: MSEs over [4, 16, ...] elements (every row is padded to
    # 16 tokens, and without --token-mask padding counts too), KL and cross-entropy means over the
    # rows; the layer terms weigh the costs by the plan of the all-reduced costs, which is the single
    # process's plan. So the mean over the two ranks of their means is the mean over all 8 rows, the
    # one process's value, up to float rounding. Rank 0's own parts (its 4 rows only) would not be.
    assert_same_logged_losses(single / "trainer_state.json", out / "trainer_state.json", 2)


def test_two_gloo_processes_match_one(single_run, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    _check_two_processes_match_one(single_run, tmp_path / "ddp", launcher)


def test_accelerate_launch_matches_one(single_run, tmp_path):
    """``accelerate launch`` with 2 local processes.

    accelerate 1.15 starts several CPU processes on one machine only through ``mpirun`` (``--cpu``
    with ``--mpirun_hostfile``); ``--cpu --num_processes 2`` without a hostfile runs ONE process.
    Its ``--multi_gpu`` launcher is the one that starts N local processes (through
    ``torch.distributed.run``, with accelerate's environment); it needs no GPU, and the Trainer's
    ``--use_cpu True`` puts the ranks on the CPU with gloo.
    """
    pytest.importorskip("accelerate")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    # an empty HF_HOME: a default accelerate config in the user's cache (deepspeed, fp16, ...) would
    # otherwise fill in every setting not given on the command line
    _check_two_processes_match_one(single_run, tmp_path / "accelerate", launcher, {"HF_HOME": str(tmp_path / "hf")})


def make_start(teacher) -> dict[str, torch.Tensor]:
    """The student's initial weights (built as the CLI builds it, same seed)."""
    from bert_emd.distill.students import student_from_config
    from transformers import AutoConfig, set_seed

    set_seed(3)
    cfg = AutoConfig.from_pretrained(str(teacher))
    return {k: v.detach().clone() for k, v in student_from_config(cfg, num_layers=2).state_dict().items()}
