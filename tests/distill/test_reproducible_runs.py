"""Never distil from (or score) an untrained head; the same seed gives the same weights.

A teacher, the model ``bert-emd evaluate`` scores and the per-task teachers of ``bert-emd mtl train``
are used for their predictions: a checkpoint without its task head (a bare ``BertModel`` loaded as a
classifier, whose head ``from_pretrained`` would initialise at random) is refused in one line that
names the folder, the missing weights and the fix. ``--allow-untrained-teacher`` (YAML:
``distillation.allow_untrained_teacher``) goes on with one warning.

Every command seeds (``--seed`` / ``training.seed``) before it builds or loads any model, so two runs
with the same seed and inputs produce bit-identical weights, the random head of an allowed untrained
teacher included (it was drawn before the seed was set, so such a distillation gave another student
every run).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")

import helpers  # noqa: E402
from bert_emd.cli import main  # noqa: E402
from bert_emd.distill.trainer import LOSS_STATE_NAME  # noqa: E402
from helpers import cli_user_error, make_teacher, sentiment_rows, write_table  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = ["--use_cpu", "True", "--disable_tqdm", "True", "--per_device_train_batch_size", "4", "--max-length", "24",
        "--max_steps", "3", "--save_strategy", "no", "--eval_strategy", "no", "--no-plots", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A bare encoder checkpoint (no classification head), a fine-tuned-like classifier (both with
    dropout, so that training draws random numbers too) and a training table."""
    root = tmp_path_factory.mktemp("reproducible")
    return {"root": root,
            "encoder": make_teacher(root / "encoder", classifier=False, dropout=0.1, seed=1),
            "teacher": make_teacher(root / "teacher", num_labels=2, dropout=0.1, seed=2),
            "train": write_table(root / "train.csv", sentiment_rows(16))}


def _data(ws: dict[str, Path]) -> list[str]:
    return ["--train-file", str(ws["train"]), "--labels", "negative,positive"]


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys() and a, what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _loss_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / LOSS_STATE_NAME, weights_only=True)


# ----------------------------------------------------------------------------- refusals
def test_distill_refuses_a_teacher_without_its_head(ws, capsys):
    out = ws["root"] / "refused"
    argv = ["distill", "--teacher", str(ws["encoder"]), *_data(ws), "--student-layers", "2", "--output-dir", str(out),
            *FAST]
    msg = cli_user_error(argv, capsys, "bert-emd distill", after_progress=True)
    assert msg.startswith(f"the teacher {ws['encoder']} has no trained task head: classifier.bias, classifier.weight "
                          "not in the checkpoint")
    assert f"bert-emd finetune --model {ws['encoder']}" in msg and "--allow-untrained-teacher" in msg
    assert not (out / "model.safetensors").exists()


def test_evaluate_refuses_a_model_without_its_head(ws, capsys):
    argv = ["evaluate", "--model", str(ws["encoder"]), "--validation-file", str(ws["train"]), "--labels",
            "negative,positive", "--use_cpu", "True"]
    msg = cli_user_error(argv, capsys, "bert-emd evaluate", after_progress=True)
    assert msg.startswith(f"the model to evaluate {ws['encoder']} has no trained task head: classifier.bias, "
                          "classifier.weight not in the checkpoint")
    assert "bert-emd finetune" in msg and "--allow" not in msg  # nothing to opt out to: random scores


# ----------------------------------------------------------------------------- same seed, same weights
@pytest.mark.parametrize("start", ["untrained-teacher-layers", "config"])
def test_distill_same_seed_same_student(ws, tmp_path, caplog, start):
    """untrained-teacher-layers: a bare encoder as teacher (allowed, one warning) and a student copied
    from its layers 1 and 3 -- head included, so the student starts from the teacher's random head.
    config: a trained teacher and a fresh 2-layer student."""
    if start == "config":
        extra = ["--teacher", str(ws["teacher"]), "--student-layers", "2"]
    else:
        extra = ["--teacher", str(ws["encoder"]), "--allow-untrained-teacher", "--init-from-teacher-layers", "1,3"]
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("other_seed", 6)):
        out = tmp_path / name
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bert_emd"):
            assert main(["distill", *extra, *_data(ws), "--output-dir", str(out), *FAST, "--seed", str(seed)]) == 0
        warned = [r.getMessage() for r in caplog.records if "not in the checkpoint" in r.getMessage()]
        if start == "config":
            assert warned == []
        else:
            assert len(warned) == 1 and str(ws["encoder"]) in warned[0] and "--allow-untrained-teacher" in warned[0]
        runs[name] = (_weights(out), _loss_state(out))
    _assert_bitwise_equal(runs["a"][0], runs["b"][0], "student")
    _assert_bitwise_equal(runs["a"][1], runs["b"][1], "loss state")
    assert any(not torch.equal(v, runs["other_seed"][0][k]) for k, v in runs["a"][0].items())  # the seed matters


def test_finetune_same_seed_same_model(ws, tmp_path):
    """A bare encoder gets a fresh head (expected here: fine-tuning trains it), drawn from the seed."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["finetune", "--model", str(ws["encoder"]), *_data(ws), "--output-dir", str(out), *FAST,
                     "--seed", "5"]) == 0
        runs.append(_weights(out))
    _assert_bitwise_equal(*runs, "fine-tuned model")


def _mtl_config(mtl_ddp_workspace: Path, out: Path, allow_in_yaml: bool) -> Path:
    """The two-task distillation YAML of the multi-task DDP tests, with the bare encoder as both tasks'
    teacher (its sequence / token classification heads are not in its checkpoint)."""
    path = helpers.mtl_ddp_config(mtl_ddp_workspace, out, 4, 1, "per_task")
    cfg = yaml.safe_load(path.read_text())
    for task in cfg["tasks"]:
        task["teacher"] = str(mtl_ddp_workspace / "encoder")
    if allow_in_yaml:
        cfg["distillation"]["allow_untrained_teacher"] = True
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_mtl_train_refuses_a_teacher_without_its_head(mtl_ddp_workspace, tmp_path, capsys):
    out = tmp_path / "refused"
    argv = ["mtl", "train", "--config", str(_mtl_config(mtl_ddp_workspace, out, False)), "--max-steps", "2"]
    msg = cli_user_error(argv, capsys, "bert-emd mtl train", after_progress=True)
    assert msg.startswith(f"the teacher of task 'sent' {mtl_ddp_workspace / 'encoder'} has no trained task head: "
                          "classifier.bias, classifier.weight not in the checkpoint")
    assert "bert-emd finetune" in msg
    assert "--allow-untrained-teacher (distillation.allow_untrained_teacher: true)" in msg
    assert not (out / "model.safetensors").exists()


def test_mtl_train_same_seed_same_student(mtl_ddp_workspace, tmp_path, caplog):
    """Allowed (by the YAML field, then by the CLI flag): the two teachers' random heads, the student's
    heads and the loss's projections are drawn from training.seed, so both runs are bit-identical."""
    runs = []
    for name, allow_in_yaml in (("yaml", True), ("flag", False)):
        out = tmp_path / name
        argv = ["mtl", "train", "--config", str(_mtl_config(mtl_ddp_workspace, out, allow_in_yaml)), "--max-steps", "3",
                "--optim", "sgd", *([] if allow_in_yaml else ["--allow-untrained-teacher"])]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bert_emd"):
            assert main(argv) == 0
        warned = [r.getMessage() for r in caplog.records if "not in the checkpoint" in r.getMessage()]
        assert len(warned) == 2 and "task 'sent'" in warned[0] and "task 'tag'" in warned[1]  # one per teacher
        runs.append((_weights(out), _loss_state(out)))
    _assert_bitwise_equal(runs[0][0], runs[1][0], "multi-task student")
    _assert_bitwise_equal(runs[0][1], runs[1][1], "multi-task loss state")
