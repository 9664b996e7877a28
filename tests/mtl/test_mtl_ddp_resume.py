"""``bert-emd mtl train --resume`` under ``torchrun --nproc_per_node=2`` (DDP, gloo, CPU), plain and
with a ``distillation:`` section: a two-process run interrupted after step N (a checkpoint there) and
resumed from ``checkpoint-N`` continues exactly as the uninterrupted two-process run of 2N steps.

The interrupted run is the uninterrupted run's command line (``--max-steps 2N``, a checkpoint every N
steps) stopped by a callback right after step N is saved, as a killed run would be. Stopping it with
``--max-steps N`` instead would change its first N steps: the linear learning-rate decay (to 0 at step
N) and, distilling, the teacher-annealing gold share (``global_step / max_steps``).

Each task keeps its first 16 rows (2 task batches of 2 x 4 examples) and N falls one step into the
second epoch of the task sampler, so the resume must restore the epoch of the ranks' batch sampler
(its task sequence and each task's shuffles are seeded by (seed, epoch)) and skip the epoch's first
step on every rank, besides restoring the weights, the optimiser, the learning-rate schedule, the
progress (teacher annealing) and -- distilling -- the loss state (``distill_loss.pt``: projections
and per-task ``CostAttention`` layer weights, loaded by every rank). Checked: every rank trains on
exactly the uninterrupted run's examples (task, input ids, labels) at every step after N, the logged
losses (task losses, distillation terms, layer weights, learning rate, gradient norm) of every step
and the final weights and loss state (on both ranks) are the uninterrupted run's (to rel 1e-5; they
agree bitwise here). Without the epoch (a sampler that accelerate's skipping wrapper hid from the
Trainer's ``set_epoch``, see ``get_train_dataloader``) the resumed ranks trained on the first epoch's
batches again (its steps 2, 3, ... in place of the second epoch's), and these comparisons failed from
step N + 1 on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")

import helpers  # noqa: E402
from bert_emd.distill.trainer import LOSS_STATE_NAME  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # multi-process


ROWS = 16  # training rows kept per task (training.limit_train)
# driver: <folder> <stop after step, 0: never> <CLI arguments...>. Each rank appends the examples of
# every step (task, input ids, labels) to <folder>/batches.rank<RANK>.jsonl and, distilling, leaves
# its loss state after training in <folder>/distill_loss.rank<RANK>.pt
DRIVER = """\
import json, os, sys
import torch
from transformers import Trainer, TrainerCallback
from bert_emd.cli import main
from bert_emd.mtl.trainer import _MultiTaskMixin
folder, stop_after, rank = sys.argv[1], int(sys.argv[2]), os.environ["RANK"]
log_step_tasks = _MultiTaskMixin._log_step_tasks
def record_batches(self, batches):
    names = self._model().task_names
    row = {"step": self.state.global_step,
           "batches": [[names[int(b["task"])], b["input_ids"].tolist(), b["labels"].tolist()] for b in batches]}
    with open(os.path.join(folder, "batches.rank%s.jsonl" % rank), "a") as f:
        f.write(json.dumps(row) + "\\n")
    log_step_tasks(self, batches)
_MultiTaskMixin._log_step_tasks = record_batches
class StopAfter(TrainerCallback):  # runs after the default flow callback, which asks for the checkpoint
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= stop_after:
            control.should_training_stop = True
train = Trainer.train
def train_and_dump(self, *args, **kwargs):
    if stop_after:
        self.add_callback(StopAfter())
    result = train(self, *args, **kwargs)
    if hasattr(self, "distill_loss"):
        torch.save(self.distill_loss.state_dict(), os.path.join(folder, "distill_loss.rank%s.pt" % rank))
    return result
Trainer.train = train_and_dump
sys.exit(main(sys.argv[3:]))
"""


def _config(mtl_ddp_workspace: Path, out: Path, tasks_per_step: int, distill: str | None) -> Path:
    """The two-task YAML of the multi-task DDP tests (batch 4 per process), each task cut to its first
    :data:`ROWS` rows."""
    path = helpers.mtl_ddp_config(mtl_ddp_workspace, out, 4, tasks_per_step, distill)
    cfg = yaml.safe_load(path.read_text())
    cfg["training"]["limit_train"] = ROWS
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(tmp_path: Path, name: str, config: Path, steps: int, save_steps: int, *, stop_after: int = 0,
           resume: Path | None = None) -> Path:
    """Run ``mtl train`` (``--max-steps steps``, a checkpoint every ``save_steps``) in two gloo
    processes, stopped after step ``stop_after`` when given; returns the folder of the ranks' records."""
    logs = tmp_path / f"logs_{name}"
    logs.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    argv = ["mtl", "train", "--config", str(config), "--max-steps", str(steps), "--optim", "sgd",
            "--dataloader_num_workers", "0", "--save_strategy", "steps", "--save_steps", str(save_steps)]
    if resume is not None:
        argv += ["--resume", str(resume)]
    helpers.torchrun_two(driver, [str(logs), str(stop_after), *argv])
    return logs


def _batches(logs: Path, rank: int) -> dict[int, list]:
    """{step (0-based): [[task, input ids, labels] of each task batch]} that ``rank`` trained on."""
    rows = [json.loads(line) for line in (logs / f"batches.rank{rank}.jsonl").read_text().splitlines()]
    out = {r["step"]: r["batches"] for r in rows}
    assert len(out) == len(rows), "a step was trained twice"
    return out


def _logged(path: Path) -> dict[int, dict[str, float]]:
    """{step: its training log (loss, loss_<task>, distillation terms, w_*, mix_*, learning_rate, ...)}."""
    history = json.loads(path.read_text())["log_history"]
    return {h["step"]: h for h in history if "loss" in h}


def _assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=f"{what}: {k}")


@pytest.mark.parametrize("distill, tasks_per_step, n", [(None, 1, 5), ("per_task", 2, 3)])
def test_resume_continues_the_uninterrupted_two_process_run(mtl_ddp_workspace, tmp_path, distill, tasks_per_step, n):
    """Plain: one task batch per step (4 steps per epoch), N = 5. Distilling (per-task teachers of 3 and
    4 layers, teacher annealing, EMD layer mixtures): two task batches per step (2 steps per epoch),
    N = 3. Either way step N + 1 is the second step of the sampler's second epoch."""
    from safetensors.torch import load_file

    config = _config(mtl_ddp_workspace, tmp_path / "full", tasks_per_step, distill)
    full_logs = _train(tmp_path, "full", config, 2 * n, n)
    full = tmp_path / "full"
    config = _config(mtl_ddp_workspace, tmp_path / "run", tasks_per_step, distill)
    stopped_logs = _train(tmp_path, "stopped", config, 2 * n, n, stop_after=n)
    run = tmp_path / "run"
    checkpoint = run / f"checkpoint-{n}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == n
    assert not (run / f"checkpoint-{2 * n}").exists()  # it was interrupted
    resumed_logs = _train(tmp_path, "resumed", config, 2 * n, n, resume=checkpoint)

    # the data: the interrupted run trained on steps 0..N-1, the resumed one on steps N..2N-1 only, each
    # rank on the uninterrupted run's examples at every step (not the sampler's first epoch again)
    for rank in (0, 1):
        ref, first, second = (_batches(logs, rank) for logs in (full_logs, stopped_logs, resumed_logs))
        assert sorted(ref) == list(range(2 * n))
        assert sorted(first) == list(range(n)) and sorted(second) == list(range(n, 2 * n))
        for step in range(2 * n):
            assert (first if step < n else second)[step] == ref[step], (rank, step)
    ranks = [_batches(full_logs, r) for r in (0, 1)]
    assert ranks[0][n] != ranks[1][n]  # each rank has its own half of every task batch
    assert {t for step in ranks[0].values() for t, *_ in step} == {"sent", "tag"}

    # the logged losses (and layer weights, learning rate, gradient norm) of every step
    ref, got = _logged(full / "trainer_state.json"), _logged(run / "trainer_state.json")
    assert sorted(ref) == sorted(got) == list(range(1, 2 * n + 1))
    assert 1 < ref[n]["epoch"] < 2  # the checkpoint is inside the second epoch
    for step in ref:
        assert ref[step].keys() == got[step].keys(), step
        for k, v in ref[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-5, abs=1e-8), (step, k, ref[step][k], got[step][k])
    resumed_keys = {k for step in range(n + 1, 2 * n + 1) for k in ref[step]}
    assert {"loss_sent", "loss_tag", "learning_rate", "grad_norm", "mix_sent.0"} <= resumed_keys
    assert ref[2 * n]["learning_rate"] < ref[n]["learning_rate"]  # the linear decay, resumed mid-way

    # the final weights (student, heads, gates, layer mixtures)
    for folder in (".", f"checkpoint-{2 * n}"):
        _assert_close_states(load_file(str(full / folder / "model.safetensors")),
                             load_file(str(run / folder / "model.safetensors")), folder)
    if distill:
        # the loss state: projections and per-task layer weights, in the model folder and the last
        # checkpoint (rank 0) and on both ranks after training
        pairs = [(full / f / LOSS_STATE_NAME, run / f / LOSS_STATE_NAME) for f in (".", f"checkpoint-{2 * n}")]
        pairs += [(full_logs / f"distill_loss.rank{r}.pt", resumed_logs / f"distill_loss.rank{r}.pt") for r in (0, 1)]
        for a, b in pairs:
            _assert_close_states(torch.load(a, weights_only=True), torch.load(b, weights_only=True), str(b))
        assert any(k.startswith("cost_attention.tag.") for k in torch.load(pairs[0][0], weights_only=True))
        assert {"w_tag_teacher.3", "w_sent_student.1", "loss_distill_attention"} <= set(ref[2 * n])
