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
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from bert_emd.distill.cli_commands import run_distill  # noqa: E402
from bert_emd.distill.trainer import LOSS_STATE_NAME  # noqa: E402
from helpers import (  # noqa: E402
    assert_close,
    assert_same_logged_losses,
    child_env,
    free_port,
    make_teacher,
    sentiment_rows,
    torchrun_command,
    write_table,
)

pytestmark = pytest.mark.slow  # multi-process runs


def _argv(teacher, train, out, batch, *extra):
    """The distill command line; ``extra`` options come last and so override these (argparse keeps the last)."""
    return [
        "--teacher", str(teacher), "--train-file", str(train), "--labels", "negative,positive",
        "--student-layers", "2", "--beta", "1.0", "--pad-to-max-length", "--max-length", "16",
        "--output-dir", str(out), "--no-plots",
        "--use_cpu", "True", "--per_device_train_batch_size", str(batch),
        "--train_sampling_strategy", "sequential", "--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.1",
        "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "3",
        "--dataloader_num_workers", "0", "--logging_steps", "1", *extra,
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


def launch_command(ref: dict[str, Path], out: Path, launcher: list[str], batch: int = 4, extra: tuple[str, ...] = (),
                   env: dict[str, str] | None = None,
                   target: tuple[str, ...] = ("-m", "bert_emd.cli")) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``launcher target distill`` (gloo, ``batch`` rows per
    process, then ``extra``) on :func:`single_run`'s teacher and table into ``out``.

    Args:
        ref: :func:`single_run`'s teacher and training table (a dict with those two keys suffices).
        out: output folder of the launched run.
        launcher: the launcher's command line up to (not including) ``target``.
        batch: ``--per_device_train_batch_size``.
        extra: more distill options (after the defaults of :func:`_argv`, so they override them).
        env: extra environment variables for the launcher.
        target: what the launcher runs: ``-m bert_emd.cli``, or a driver script and its own arguments
            (which then receives the CLI's arguments, ``distill ...``).
    """
    full_env = child_env(**(env or {}))
    cmd = [*launcher, *target, "distill", *_argv(ref["teacher"], ref["train"], out, batch, *extra),
           "--ddp_backend", "gloo"]
    return cmd, full_env


def _launch(ref: dict[str, Path], out: Path, launcher: list[str], batch: int = 4, extra: tuple[str, ...] = (),
            env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``launcher -m bert_emd.cli distill`` (:func:`launch_command`, whose arguments these are) and,
    with ``check``, assert that it succeeded (else the caller inspects the returned process)."""
    cmd, full_env = launch_command(ref, out, launcher, batch, extra, env)
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_same_weights(teacher: Path, reference: Path, out: Path) -> None:
    """The runs saved in ``reference`` and ``out`` reached the same student, projection and layer
    weights (to float rounding), and the student moved away from its initial weights."""
    from safetensors.torch import load_file

    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    start = make_start(teacher)
    for k in a:
        assert_close(a[k], b[k], torch.float32, "train", msg=k)
        moved += int(not torch.allclose(a[k], start[k]))
    assert moved > len(a) // 2  # the students trained (not two copies of the initial weights)
    la = torch.load(reference / LOSS_STATE_NAME, weights_only=True)
    lb = torch.load(out / LOSS_STATE_NAME, weights_only=True)
    for k in la:
        assert_close(la[k], lb[k], torch.float32, "train", msg=k)
    assert la["layer_weights.teacher_weight"][0].item() != pytest.approx(0.25, abs=1e-6)


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
        check: assert that it succeeded (else the caller inspects the returned process).
    """
    _launch(ref, out, launcher, env=env)
    single = ref["single"]
    _assert_same_weights(ref["teacher"], single, out)
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
    _check_two_processes_match_one(single_run, tmp_path / "ddp", torchrun_command())


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


def test_gradient_accumulation_matches_one_process_accumulating(single_run, tmp_path):
    """2 processes x batch 2 x ``--gradient_accumulation_steps 2`` reach one process with batch 4 x 2
    accumulation steps -- not one process with batch 8, although both see the same rows per step.

    The layer weights (``CostAttention``) are updated in the loss's forward, with no gradient: once
    per micro-batch, not once per optimizer step. In the accumulating runs every optimizer step
    (rows 0-7, then 8-15) is two micro-batches (rows 0-3, then 4-7): the first micro-batch's transport
    costs move the weights that the second one's plan uses. Two ranks with 2 rows each solve the
    transport problem of their all-reduced costs, the mean over the same 4 rows as one process with
    batch 4, so they make the same per-micro-batch updates (accelerate deals rank r the per-device
    batches r, r+2, ...: micro-batch k of the step is rows 4k..4k+3 on the two ranks together). The
    gradients also agree: each rank's micro-batch loss (its mean, divided by 2 by the Trainer) is
    linear in its costs under the shared plan; DDP averages the student's summed gradients over the
    ranks at the last micro-batch, and the projection's hook averages each micro-batch's gradient
    (sum of averages = average of sums). One process with batch 8 updates the weights once per
    step, from all 8 rows: a different trajectory, checked to differ below.
    """
    teacher, train = single_run["teacher"], single_run["train"]
    accumulate = ("--gradient_accumulation_steps", "2")
    reference = tmp_path / "single_accumulating"
    run_distill(_argv(teacher, train, reference, 4, *accumulate))
    out = tmp_path / "ddp_accumulating"
    _launch(single_run, out, torchrun_command(), batch=2, extra=accumulate)
    _assert_same_weights(teacher, reference, out)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 2
    # the logged parts are means over the micro-batches and the ranks: the one process's means
    assert_same_logged_losses(reference / "trainer_state.json", out / "trainer_state.json", 2)
    # batch 8 without accumulation (one weight update per step) is another trajectory
    ours = torch.load(out / LOSS_STATE_NAME, weights_only=True)["layer_weights.teacher_weight"]
    batch8 = torch.load(single_run["single"] / LOSS_STATE_NAME, weights_only=True)["layer_weights.teacher_weight"]
    assert not torch.allclose(ours, batch8, rtol=1e-3, atol=1e-5), (ours, batch8)


def test_resume_reaches_the_uninterrupted_two_process_run(single_run, tmp_path):
    """A 2-process run stopped after step 3 of 4 (``--max_steps 3`` with a checkpoint there) and
    resumed from ``checkpoint-3`` with ``--max_steps 4`` reaches the uninterrupted 2-process run.

    16 rows, 8 per global step: step 3 is the first of epoch 2, so the resume must skip one global
    batch of the epoch on each rank (accelerate's sharded loader), restore the optimizer and the
    projection and layer weights (``distill_loss.pt``, written by rank 0, loaded by every rank) and
    the log history. A constant learning rate: stopping through ``--max_steps`` would otherwise
    change the schedule of the first 3 steps (a linear decay to 0 at step 3 instead of step 4).
    """
    constant = ("--lr_scheduler_type", "constant")
    full = tmp_path / "full"
    _launch(single_run, full, torchrun_command(), extra=(*constant, "--max_steps", "4"))
    stopped = tmp_path / "stopped"
    _launch(single_run, stopped, torchrun_command(),
            extra=(*constant, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "3"))
    checkpoint = stopped / "checkpoint-3"
    assert (checkpoint / LOSS_STATE_NAME).is_file()
    _launch(single_run, stopped, torchrun_command(),
            extra=(*constant, "--max_steps", "4", "--resume_from_checkpoint", str(checkpoint)))
    _assert_same_weights(single_run["teacher"], full, stopped)
    assert json.loads((stopped / "trainer_state.json").read_text())["global_step"] == 4
    assert_same_logged_losses(full / "trainer_state.json", stopped / "trainer_state.json", 4)


def make_start(teacher) -> dict[str, torch.Tensor]:
    """The student's initial weights (built as the CLI builds it, same seed)."""
    from bert_emd.distill.students import student_from_config
    from transformers import AutoConfig, set_seed

    set_seed(3)
    cfg = AutoConfig.from_pretrained(str(teacher))
    return {k: v.detach().clone() for k, v in student_from_config(cfg, num_layers=2).state_dict().items()}


def test_ranks_the_trainer_would_run_alone_are_refused(single_run, tmp_path):
    """torchrun on CPU without ``--use_cpu True``: transformers only warns and every rank would train
    its own student into the same folder; ``bert-emd distill`` stops first, naming the fix."""
    out = tmp_path / "alone"
    proc = _launch(single_run, out, torchrun_command(), extra=("--use_cpu", "False"), check=False)
    assert proc.returncode != 0
    assert "2 processes share a torch.distributed process group" in proc.stderr
    assert "--use_cpu True" in proc.stderr
    assert not (out / "model.safetensors").exists()
