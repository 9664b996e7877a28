"""Atomic checkpoints: a checkpoint folder appears complete or not at all, rotation and the
best-model record still work, and a save killed half-way leaves the previous checkpoint as the
newest one a resume would pick."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from bert_emd.distill.checkpoints import PARTIAL_PREFIX, AtomicCheckpoints  # noqa: E402
from helpers import tiny_config  # noqa: E402
from transformers import BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 40, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


class AtomicTrainer(AtomicCheckpoints, Trainer):
    pass


class _Killed(Exception):
    pass


def _trainer(out: Path, cls=AtomicTrainer, **kw) -> Trainer:
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, save_steps=2,
                             save_strategy="steps", logging_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, **kw)
    data = _Data()
    return cls(model=BertForSequenceClassification(tiny_config(2, layers=1)), args=args, train_dataset=data,
               eval_dataset=data)


def test_checkpoints_are_complete_and_no_staging_is_left(tmp_path):
    _trainer(tmp_path).train()
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint-2", "checkpoint-4"], names
    for ckpt in names:
        files = set(os.listdir(tmp_path / ckpt))
        assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", "model.safetensors"} <= files, files


def test_rotation_and_best_model_point_at_final_folders(tmp_path):
    t = _trainer(tmp_path, save_total_limit=1, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss")
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None and PARTIAL_PREFIX not in best and os.path.isdir(best)
    assert all(not n.startswith(PARTIAL_PREFIX) for n in os.listdir(tmp_path))


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_newest(tmp_path):
    class KilledOnSecondSave(AtomicTrainer):
        def _save_rng_state(self, output_dir):  # the last files of a save, after model and optimizer
            if self.state.global_step == 4:
                raise _Killed
            return super()._save_rng_state(output_dir)

    with pytest.raises(_Killed):
        _trainer(tmp_path, cls=KilledOnSecondSave).train()
    assert not (tmp_path / "checkpoint-4").exists()
    assert (tmp_path / f"{PARTIAL_PREFIX}checkpoint-4").exists()  # what a killed save leaves
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    # resuming from it finishes the run and replaces the partial folder
    _trainer(tmp_path).train(resume_from_checkpoint=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]


def test_without_the_mixin_the_half_written_checkpoint_would_be_picked(tmp_path):
    """The failure the mixin prevents, shown on plain Trainer (guards the test above)."""
    class Killed(Trainer):
        def _save_rng_state(self, output_dir):
            if self.state.global_step == 4:
                raise _Killed
            return super()._save_rng_state(output_dir)

    with pytest.raises(_Killed):
        _trainer(tmp_path, cls=Killed).train()
    newest = get_last_checkpoint(str(tmp_path))
    assert newest == str(tmp_path / "checkpoint-4")
    assert "trainer_state.json" not in os.listdir(newest)
