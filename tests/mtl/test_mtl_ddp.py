"""``bert-emd mtl train`` under ``torchrun --nproc_per_node=2`` (DDP, gloo, CPU), with one and with two
task batches per step, plain and with a ``distillation:`` section (EMD layer mapping; per-task teachers
of 3 and 4 layers, or one multi-task teacher): it completes, every rank trains on the same tasks in
every step (the trainer's per-step DEBUG line, written to a file per rank), and it reaches the weights
of one process with twice the per-device batch.

Why the two runs must agree: the task sampler is seeded by (seed, epoch), so every rank and the
single process draw the same task sequence and the same global task batches of 2 x 4 = 8 examples
(each rank takes every other example of the batch). Every task loss is a mean over the batch's
examples (sentence task) or labelled tokens (tagging task), and DDP averages the ranks' gradients,
so the mean of the ranks' gradients is the single process's gradient *only when every rank holds as
many examples and labelled tokens as the other*: here every row has exactly five one-token words
(which also leaves nothing to pad, so no rank pads to another length), every task has at least 8
rows (no task batch is short, which would split unevenly), and nothing is batch-dependent (no
dropout, no ``private`` mechanism, whose orthogonality loss couples a batch's examples). With rows
of different lengths the tagging loss would weight tokens differently on one and on two processes,
by design of the per-rank mean (as in any DDP run of ``transformers.Trainer``). Plain SGD: Adam
would magnify float noise in near-zero gradients. For the same reason the logged task losses
(``loss_<task>`` of every step, in the last checkpoint's ``trainer_state.json``) must be the single
process's: the trainer averages the ranks' means, and equal counts make that the mean over both.

Distilling, the same holds term by term. Every cost D[i, j] of a task batch (MSE of projected
student and teacher hidden states, of attention maps), the embedding MSE and the prediction loss
(soft cross-entropy and gold loss, over examples or labelled tokens) is a mean over equally many
elements on each rank, so the mean of the ranks' costs is the single process's cost. Each rank
all-reduces (averages) its stacked costs before the batched EMD solve, so every rank solves the
single process's transport problems and gets its plans F; the mean over the ranks of the gradients
of their losses sum(F * D_rank) is the single process's sum(F * dD); the cost-attention update reads
the averaged costs, so each
task's layer weights are the single process's, and *the same on both ranks* (checked exactly: rank 1
dumps its loss state too). The projections W live in the loss, outside the student's DDP wrapper:
their gradients are averaged over the ranks by a backward hook, as single-task ``BertEMDLoss`` does;
without it each rank would step W with its own half-batch gradient and the ranks' W would drift
apart (and from the single process's). Layer weights are compared at every logged step (``w_*``,
and ``mix_*``: with ``hierarchy.mode: emd`` the student's layer mixtures are the EMD weights) and
saved with the model and the checkpoint (``distill_loss.pt``: W and the ``CostAttention`` weights).
(A plan is a vertex of the transport polytope, piecewise constant in the costs: rounding differences
between the averaged and the single process's costs could switch it only at a near-tie of two
vertices, which would show as a failure of these comparisons, not as a silent drift.)
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")

import helpers  # noqa: E402
from bert_emd.cli import main  # noqa: E402
from bert_emd.distill.trainer import LOSS_STATE_NAME  # noqa: E402
from helpers import assert_same_logged_losses  # noqa: E402

WORDS = helpers.MTL_WORDS
STEPS = 6
# the per-step line of MultiTaskTrainer._log_step_tasks
STEP_LINE = re.compile(r"rank (\d+) of (\d+), step (\d+): (.*)")
# runs the CLI with the trainer's per-step debug line written to <folder>/tasks.rank<RANK>.log; a
# distillation run also leaves each rank's loss state (projections, layer weights) after training in
# <folder>/distill_loss.rank<RANK>.pt (only rank 0 saves the model and checkpoints)
DRIVER = """\
import logging, os, sys
import torch
from bert_emd.cli import main
from bert_emd.mtl.trainer import MultiTaskDistillationTrainer
handler = logging.FileHandler(os.path.join(sys.argv[1], "tasks.rank%s.log" % os.environ["RANK"]))
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("bert_emd.mtl.trainer")
log.setLevel(logging.DEBUG)
log.addHandler(handler)
train = MultiTaskDistillationTrainer.train
def train_and_dump(self, *args, **kwargs):
    result = train(self, *args, **kwargs)
    path = os.path.join(sys.argv[1], "distill_loss.rank%s.pt" % os.environ["RANK"])
    torch.save(self.distill_loss.state_dict(), path)
    return result
MultiTaskDistillationTrainer.train = train_and_dump
sys.exit(main(sys.argv[2:]))
"""
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # multi-process


_config = helpers.mtl_ddp_config
TEACHERS, MULTITASK_TEACHER = helpers.MTL_DDP_TEACHERS, helpers.MTL_DDP_MULTITASK_TEACHER


def _argv(config: Path) -> list[str]:
    # one checkpoint, at the last step: the only trainer_state.json (log_history) a run writes
    return ["mtl", "train", "--config", str(config), "--max-steps", str(STEPS), "--optim", "sgd",
            "--dataloader_num_workers", "0", "--save_strategy", "steps", "--save_steps", str(STEPS)]


def _steps(lines: list[str]) -> list[tuple[int, int, int, list[tuple[str, int]]]]:
    """(rank, world size, step, [(task, examples), ...]) of each per-step debug line."""
    out = []
    for m in filter(None, map(STEP_LINE.fullmatch, lines)):
        batches = [(t, int(n)) for t, n in (part.split(" x ") for part in m[4].split(", "))]
        out.append((int(m[1]), int(m[2]), int(m[3]), batches))
    return out


torchrun_two = helpers.torchrun_two


def _run_one_and_two(mtl_ddp_workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, tasks_per_step: int,
                     distill: str | None) -> tuple[Path, Path, Path]:
    """Train one process with batch 8 and two gloo processes with batch 4 each (same config otherwise,
    ``distill`` as :func:`_config`),
    and check that (a) both complete and (b) every rank trained on the single process's tasks, with half
    of each of its task batches, at every step.

    Returns:
        (single-process output folder, two-process output folder, the folder of the ranks' logs and,
        distilling, their final loss states).
    """
    single = tmp_path / "single"
    with caplog.at_level(logging.DEBUG, logger="bert_emd.mtl.trainer"):
        assert main(_argv(_config(mtl_ddp_workspace, single, 8, tasks_per_step, distill))) == 0
    one = _steps([r.getMessage() for r in caplog.records if r.name == "bert_emd.mtl.trainer"])
    assert [(rank, world, step) for rank, world, step, _ in one] == [(0, 1, s) for s in range(STEPS)]

    ddp = tmp_path / "ddp"
    logs = tmp_path / "logs"
    logs.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # (a) it completes and saves the model and the results
    torchrun_two(driver, [str(logs), *_argv(_config(mtl_ddp_workspace, ddp, 4, tasks_per_step, distill))])
    res = [json.loads((d / "mtl_results.json").read_text()) for d in (single, ddp)]
    assert res[0]["global_step"] == res[1]["global_step"] == STEPS

    # (b) every rank trained on the same tasks in every step as the single process, with half of
    # each of its task batches (4 examples of 8 per sampled task batch)
    ranks = [_steps((logs / f"tasks.rank{r}.log").read_text().splitlines()) for r in (0, 1)]
    for r, lines in enumerate(ranks):
        assert [(rank, world, step) for rank, world, step, _ in lines] == [(r, 2, s) for s in range(STEPS)]
    expected = [[(t, n // 2) for t, n in batches] for *_, batches in one]
    assert {t for batches in expected for t, _ in batches} == {"sent", "tag"}  # both tasks took steps
    assert all(n % 8 == 0 for *_, batches in one for _, n in batches)
    if tasks_per_step == 2:  # some step held two different tasks' batches
        assert any(len(batches) == 2 for *_, batches in one)
    for lines in ranks:
        assert [batches for *_, batches in lines] == expected
    return single, ddp, logs


def _assert_same_model(mtl_ddp_workspace: Path, single: Path, ddp: Path) -> None:
    """The two runs saved the same weights (encoder, heads, gates, layer mixtures) and training loss,
    and the encoder moved away from its initial weights."""
    from safetensors.torch import load_file

    a, b = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=k)
    start = load_file(str(mtl_ddp_workspace / "encoder" / "model.safetensors"))
    moved = [k for k in start if not torch.allclose(start[k], a[f"encoder.{k}"])]
    assert len(moved) > len(start) // 2  # the encoder trained (not two copies of the initial weights)
    res = [json.loads((d / "mtl_results.json").read_text()) for d in (single, ddp)]
    assert res[1]["training_loss"] == pytest.approx(res[0]["training_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("tasks_per_step", [1, 2])
def test_two_gloo_processes_same_tasks_and_match_one(mtl_ddp_workspace, tmp_path, caplog, tasks_per_step):
    """With ``tasks_per_step=2`` a step holds two task batches (one batch of 16 / 8 examples when the
    sampler draws the same task twice): they run in one forward of the DDP-wrapped model."""
    single, ddp, _ = _run_one_and_two(mtl_ddp_workspace, tmp_path, caplog, tasks_per_step, distill=None)
    # (c) the same weights (encoder, heads, gates, layer mixtures) and the same training loss (the
    # Trainer averages the ranks' losses) as one process with batch 8
    _assert_same_model(mtl_ddp_workspace, single, ddp)
    # (d) the same logged task losses at every step (logging_steps 1): each rank's loss_<task> is its
    # mean over its 4 of the task batch's 8 examples (sentence task) or over their 20 of 40 labelled
    # tokens (tagging: five one-token words per row), as many on each rank, so the trainer's mean over
    # the ranks is the single process's mean over all 8 / 40, up to float rounding. Rank 0's own
    # means (half the batch) would not be.
    state = f"checkpoint-{STEPS}/trainer_state.json"
    assert_same_logged_losses(single / state, ddp / state, STEPS)


@pytest.mark.parametrize("tasks_per_step, teacher", [(1, "per_task"), (2, "per_task"), (2, "multitask")])
def test_distillation_two_gloo_processes_same_tasks_and_match_one(mtl_ddp_workspace, tmp_path, caplog, tasks_per_step,
                                                                   teacher):
    """Multi-task EMD distillation (see the module docstring): (a) and (b) as without teachers; (c) the
    same student; (d) the same loss state (projections, per-task layer weights), identical on both ranks
    and equal to the single process's, in the output folder and the checkpoint; (e) the same logged loss
    terms and layer weights at every step. With the multi-task teacher both tasks share one projection
    (and with two task batches per step, both tasks' costs reach its gradient in one backward)."""
    single, ddp, logs = _run_one_and_two(mtl_ddp_workspace, tmp_path, caplog, tasks_per_step, distill=teacher)
    # (c) the student
    _assert_same_model(mtl_ddp_workspace, single, ddp)

    # (d) the loss state: every rank holds the same projections and layer weights (the costs are
    # averaged before the solve, W's gradient in backward: exactly the same numbers on both ranks) ...
    ranks = [torch.load(logs / f"distill_loss.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:
        torch.testing.assert_close(ranks[1][k], ranks[0][k], rtol=0, atol=0, msg=k)
    # ... which rank 0 saved with the model and in the checkpoint, and which are the single process's
    for folder in (".", f"checkpoint-{STEPS}"):
        a = torch.load(single / folder / LOSS_STATE_NAME, weights_only=True)
        b = torch.load(ddp / folder / LOSS_STATE_NAME, weights_only=True)
        assert a.keys() == b.keys() == ranks[0].keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=k)
            torch.testing.assert_close(b[k], ranks[0][k], rtol=0, atol=0, msg=k)
    if teacher == "multitask":
        hidden = {"multitask": MULTITASK_TEACHER[2]}
        layers = {task: MULTITASK_TEACHER[1] for task in TEACHERS}
    else:
        hidden = {task: spec[4] for task, spec in TEACHERS.items()}
        layers = {task: spec[3] for task, spec in TEACHERS.items()}
    assert set(a) == {f"projections.{g}.{p}" for g in hidden for p in ("weight", "bias")} | {
        f"cost_attention.{task}.{who}_weight" for task in TEACHERS for who in ("student", "teacher")}
    for g, d in hidden.items():
        assert a[f"projections.{g}.weight"].shape == (d, 32)
    for task, n in layers.items():
        w = a[f"cost_attention.{task}.teacher_weight"]
        # the layer weights trained (not the initial uniform weights)
        assert w.shape == (n,) and not torch.allclose(w, torch.full((n,), 1 / n, dtype=w.dtype)), (task, w)
    res = [json.loads((d / "mtl_results.json").read_text()) for d in (single, ddp)]
    for task in TEACHERS:
        for who in ("student", "teacher"):
            assert res[1]["emd_layer_weights"][task][who] == pytest.approx(
                res[0]["emd_layer_weights"][task][who], rel=1e-4, abs=2e-6)

    # (e) at every step: the task losses, the distillation terms (loss_distill_attention, _hidden,
    # _embedding, _prediction, _aux, _gold_weight: each rank's sum(F * D_rank) etc., averaged over the
    # ranks) and the layer weights (w_<task>_<student|teacher>.i, mix_<task>.i)
    state = f"checkpoint-{STEPS}/trainer_state.json"
    assert_same_logged_losses(single / state, ddp / state, STEPS, prefixes=("loss_", "w_", "mix_"))
    logged = [h for h in json.loads((single / state).read_text())["log_history"] if "loss" in h]
    for term in ("attention", "hidden", "embedding", "prediction", "gold_weight"):
        assert all(f"loss_distill_{term}" in h for h in logged), term
    assert all(h["loss_distill_attention"] > 1e-3 for h in logged)  # the attention terms count
    assert {f"w_tag_teacher.{layers['tag'] - 1}", "mix_tag.1"} <= set(logged[-1])


def test_ranks_the_trainer_would_run_alone_are_refused(mtl_ddp_workspace, tmp_path):
    """torchrun on CPU without ``use_cpu``: transformers only warns and every rank would train its
    own model into the same folder; ``bert-emd mtl train`` stops with the fix instead."""
    out = tmp_path / "alone"
    config = _config(mtl_ddp_workspace, out, 4, 1)
    cfg = yaml.safe_load(config.read_text())
    cfg["training"]["use_cpu"] = False
    config.write_text(yaml.safe_dump(cfg))
    proc = torchrun_two(["-m", "bert_emd.cli"], _argv(config), check=False)
    assert proc.returncode != 0
    assert "2 processes share a torch.distributed process group" in proc.stderr
    assert "--use_cpu True" in proc.stderr
    assert not (out / "model.safetensors").exists()
