"""``bert-emd distill`` under ``torchrun --nproc_per_node=2`` (DDP, gloo, CPU) matches one process.

One process with batch 8 and two processes with batch 4 each see the same global batches
(sequential sampler, every example padded to the same length, no dropout), so with plain SGD
(Adam would magnify float noise in gradients that are zero in exact arithmetic) the distilled
student, the projection and the layer weights must agree to float rounding: every rank solves
the transport problem of the all-reduced costs, and the projection's gradient is averaged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from _distill_fixtures import make_teacher, sentiment_rows, write_table  # noqa: E402
from bert_emd.distill.cli_commands import run_distill  # noqa: E402
from bert_emd.distill.trainer import LOSS_STATE_NAME  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(teacher, train, out, batch):
    return [
        "--teacher", str(teacher), "--train-file", str(train), "--labels", "negative,positive",
        "--student-layers", "2", "--beta", "1.0", "--pad-to-max-length", "--max-length", "16",
        "--output-dir", str(out), "--no-plots",
        "--use_cpu", "True", "--per_device_train_batch_size", str(batch),
        "--train_sampling_strategy", "sequential", "--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.1",
        "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "3",
        "--dataloader_num_workers", "0",
    ]


def test_two_gloo_processes_match_one(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", num_labels=2, dropout=0.0)
    train = write_table(tmp_path / "train.csv", sentiment_rows(16))

    single = tmp_path / "single"
    run_distill(_argv(teacher, train, single, 8))

    ddp = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "bert_emd.cli", "distill", *_argv(teacher, train, ddp, 4),
           "--ddp_backend", "gloo"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from safetensors.torch import load_file

    a, b = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    start = make_start(teacher)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=k)
        moved += int(not torch.allclose(a[k], start[k]))
    assert moved > len(a) // 2  # the students trained (not two copies of the initial weights)
    la = torch.load(single / LOSS_STATE_NAME, weights_only=True)
    lb = torch.load(ddp / LOSS_STATE_NAME, weights_only=True)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-4, atol=2e-6, msg=k)
    assert la["layer_weights.teacher_weight"][0].item() != pytest.approx(0.25, abs=1e-6)
    # the run really was distributed: two processes with batch 4 made the same two global steps
    state = json.loads((ddp / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 4


def make_start(teacher) -> dict[str, torch.Tensor]:
    """The student's initial weights (built as the CLI builds it, same seed)."""
    from bert_emd.distill.students import student_from_config
    from transformers import AutoConfig, set_seed

    set_seed(3)
    cfg = AutoConfig.from_pretrained(str(teacher))
    return {k: v.detach().clone() for k, v in student_from_config(cfg, num_layers=2).state_dict().items()}
