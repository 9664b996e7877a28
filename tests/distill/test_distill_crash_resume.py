"""A two-process ``bert-emd distill`` (torchrun, 2 gloo processes on the CPU) killed with SIGKILL
between two checkpoints and resumed from its newest checkpoint reaches the uninterrupted run's
student, loss state (projection, layer weights) and logged losses bit for bit.

The kill is deterministic: a driver runs the CLI with a callback that, at the end of step 3 (one
step after ``checkpoint-2`` was written, one before ``checkpoint-4``), writes each rank's pid to a
marker file and blocks. Both ranks only get there after step 2's checkpoint is complete (rank 0
writes the model, ``distill_loss.pt``, optimizer, scheduler and ``trainer_state.json``; each rank its
RNG state; step 3's gradient all-reduce orders both after it). The test then SIGKILLs the launcher's
process group and each worker's (torchrun starts every worker in a session of its own): nothing runs
any exit code, as after a crash or an OOM kill. Step 3's work is lost and redone by the resumed run.

The learning-rate schedule is the default linear decay over ``--max_steps 6`` in all runs (the
killed run is the uninterrupted run's command line), and AdamW: the resumed run must restore the
optimizer's moments, the schedule, the RNG states (dropout), the data order and ``distill_loss.pt``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from bert_emd.distill.trainer import LOSS_STATE_NAME  # noqa: E402
from helpers import (  # noqa: E402
    make_teacher,
    sentiment_rows,
    torchrun_command,  # noqa: E402
    write_table,
)
from test_ddp_trainer import _launch, launch_command  # noqa: E402

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY, HANG_AT = 6, 2, 3
# driver: <marker folder> <step to hang at> <CLI arguments...>
DRIVER = """\
import os, sys, time
from transformers import Trainer, TrainerCallback
from bert_emd.cli import main
folder, hang_at = sys.argv[1], int(sys.argv[2])
class Hang(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == hang_at:
            path = os.path.join(folder, "rank%s.pid" % os.environ["RANK"])
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            time.sleep(3600)
train = Trainer.train
def train_hanging(self, *args, **kwargs):
    self.add_callback(Hang())
    return train(self, *args, **kwargs)
Trainer.train = train_hanging
sys.exit(main(sys.argv[3:]))
"""


def _kill_between_checkpoints(ref: dict[str, Path], out: Path, extra: tuple[str, ...], tmp_path: Path) -> None:
    """Launch the run through the hanging driver, wait until both ranks hang at step HANG_AT, then
    SIGKILL the launcher's process group and each worker's."""
    driver, markers = tmp_path / "driver.py", tmp_path / "markers"
    driver.write_text(DRIVER)
    markers.mkdir()
    cmd, env = launch_command(ref, out, torchrun_command(), extra=extra,
                              target=(str(driver), str(markers), str(HANG_AT)))
    log = (tmp_path / "killed.log").open("w")
    launcher = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while len(pids) < 2:
            assert launcher.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the ranks never reached step {HANG_AT}"
            files = sorted(markers.glob("rank*.pid"))
            pids = [int(f.read_text()) for f in files] if len(files) == 2 else []
            time.sleep(0.2)
    finally:
        for group in (launcher.pid, *pids):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait(timeout=60)
        log.close()
    assert launcher.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in pids):  # the workers are dead too (not left training, holding the port)
        assert time.monotonic() < deadline, [pid for pid in pids if _running(pid)]
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a killed orphan waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_sigkill_between_checkpoints_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file
    from transformers.trainer_utils import get_last_checkpoint

    ref = {"teacher": make_teacher(tmp_path / "teacher", num_labels=2, dropout=0.1),
           "train": write_table(tmp_path / "train.csv", sentiment_rows(16))}
    # 16 rows, 2 x 4 per step: 2 steps per epoch; a checkpoint every 2 steps (save_total_limit 2)
    extra = ("--max_steps", str(STEPS), "--optim", "adamw_torch", "--learning_rate", "1e-3", "--save_strategy",
             "steps", "--save_steps", str(SAVE_EVERY))
    full = tmp_path / "full"
    _launch(ref, full, torchrun_command(), extra=extra)

    run = tmp_path / "run"
    _kill_between_checkpoints(ref, run, extra, tmp_path)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (run / "model.safetensors").exists()
    newest = get_last_checkpoint(str(run))
    assert Path(newest).name == "checkpoint-2"
    _launch(ref, run, torchrun_command(), extra=(*extra, "--resume_from_checkpoint", newest))

    for folder in (".", f"checkpoint-{STEPS}"):
        a, b = load_file(str(full / folder / "model.safetensors")), load_file(str(run / folder / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (folder, k)
        la = torch.load(full / folder / LOSS_STATE_NAME, weights_only=True)
        lb = torch.load(run / folder / LOSS_STATE_NAME, weights_only=True)
        assert la.keys() == lb.keys()
        for k in la:
            assert torch.equal(la[k], lb[k]), (folder, k)
    # every logged step (loss, loss parts, layer weights, learning rate, gradient norm), exactly
    def logged(folder: Path) -> dict[int, dict[str, float]]:
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h for h in history if "loss" in h}

    a, b = logged(full), logged(run)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step] == b[step], step
