"""DistillationTrainer: training, logging, checkpoints without the teacher, exact resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from bert_emd.distill.trainer import LOSS_STATE_NAME, TRANSPORT_NAME, DistillationTrainer  # noqa: E402
from bert_emd.nn import BertEMDLoss  # noqa: E402
from helpers import VOCAB, tiny_config  # noqa: E402
from transformers import BertForSequenceClassification, TrainerCallback, TrainingArguments  # noqa: E402

ROWS, BATCH = 12, 4  # 3 steps per epoch


def dataset(seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(ROWS):
        n = int(torch.randint(5, 14, (1,), generator=g))
        ids = [2, *torch.randint(5, len(VOCAB), (n,), generator=g).tolist(), 3]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": int(torch.randint(0, 3, (1,), generator=g))})
    return Dataset.from_list(rows)


def collate(features):
    length = max(len(f["input_ids"]) for f in features)
    pad = lambda xs: xs + [0] * (length - len(xs))
    return {
        "input_ids": torch.tensor([pad(f["input_ids"]) for f in features]),
        "attention_mask": torch.tensor([pad(f["attention_mask"]) for f in features]),
        "labels": torch.tensor([f["labels"] for f in features]),
    }


def models(dropout: float = 0.1, source: str = "probs"):
    torch.manual_seed(0)
    attn = {"attn_implementation": "eager"}
    teacher = BertForSequenceClassification._from_config(tiny_config(3, layers=4, dropout=dropout), **attn)
    torch.manual_seed(1)
    student = BertForSequenceClassification._from_config(tiny_config(3, layers=2, dropout=dropout), **attn)
    loss = BertEMDLoss.from_models(student, teacher, beta=1.0, attention_source=source)
    return student, teacher, loss


def make_trainer(out, *, epochs=2, callbacks=None, dropout=0.1, source="probs", **kw):
    student, teacher, loss = models(dropout, source)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        num_train_epochs=epochs, learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=2,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=7, **kw,
    )
    ds = dataset()
    return DistillationTrainer(model=student, args=args, teacher=teacher, distill_loss=loss, train_dataset=ds,
                               eval_dataset=ds, data_collator=collate, callbacks=callbacks)


def test_trains_logs_and_saves_without_teacher(tmp_path):
    tr = make_trainer(tmp_path, epochs=1)
    proj0 = tr.distill_loss.projection.weight.detach().clone()
    tr.train()
    logs = [e for e in tr.state.log_history if "loss" in e]
    assert len(logs) == 3
    for e in logs:
        for part in ("attention", "hidden", "embedding", "prediction"):
            assert e[f"loss_{part}"] > 0
        assert sum(e[f"w_student.{i}"] for i in range(2)) == pytest.approx(1.0)
        assert sum(e[f"w_teacher.{j}"] for j in range(4)) == pytest.approx(1.0)
    # the projection is optimised (it is in the optimizer), the layer weights moved from uniform
    in_opt = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert id(tr.distill_loss.projection.weight) in in_opt
    assert not torch.equal(proj0, tr.distill_loss.projection.weight.detach())
    assert logs[-1]["w_teacher.0"] != pytest.approx(0.25, abs=1e-6)
    # the teacher is frozen and stays in eval mode
    assert not tr.teacher.training and not any(p.requires_grad for p in tr.teacher.parameters())

    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / LOSS_STATE_NAME).is_file() and (ckpt / TRANSPORT_NAME).is_file()
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    layers = {k.split("encoder.layer.")[1].split(".")[0] for k in saved if "encoder.layer." in k}
    assert layers == {"0", "1"}  # the student's two layers, no teacher weight
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in tr.model.parameters())
    state = torch.load(ckpt / LOSS_STATE_NAME, weights_only=True)
    assert set(state) >= {"projection.weight", "projection.bias", "layer_weights.student_weight",
                          "layer_weights.teacher_weight"}
    transport = json.loads((ckpt / TRANSPORT_NAME).read_text())
    assert len(transport["hidden"]["plan"]) == 2 and len(transport["hidden"]["plan"][0]) == 4
    assert sum(map(sum, transport["attention"]["plan"])) == pytest.approx(1.0)

    # evaluation runs the student alone: the layer weights and projection stay as they are
    before = {k: v.clone() for k, v in tr.distill_loss.state_dict().items()}
    metrics = tr.evaluate()
    assert "eval_loss" in metrics
    for k, v in tr.distill_loss.state_dict().items():
        assert torch.equal(v, before[k]), k


class Kill(TrainerCallback):
    """Simulates a crash right after the checkpoint of step ``at`` is written."""

    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"killed after step {self.at}")


@pytest.mark.slow  # three training runs
def test_resume_reaches_the_uninterrupted_weights(tmp_path):
    # 2 epochs of 3 steps, dropout on, killed mid-epoch: the resume must restore the data order,
    # the RNG, the optimizer and scheduler, and our projection and layer weights. Pre-softmax
    # scores (the original's attention source) also exercise the hooks across trainers.
    source = "scores"
    full = make_trainer(tmp_path / "full", source=source)
    full.train()

    crashed = make_trainer(tmp_path / "crash", source=source, callbacks=[Kill(4)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert (tmp_path / "crash" / "checkpoint-4" / LOSS_STATE_NAME).is_file()
    assert not (tmp_path / "crash" / "checkpoint-6").exists()

    resumed = make_trainer(tmp_path / "crash", source=source)
    resumed.train(resume_from_checkpoint=str(tmp_path / "crash" / "checkpoint-4"))

    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"student {name}")
    for (name, a), (_, b) in zip(full.distill_loss.state_dict().items(), resumed.distill_loss.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"loss {name}")
    # and the weights are not trivially equal to the start
    assert resumed.distill_loss.layer_weights.teacher_weight[0].item() != pytest.approx(0.25, abs=1e-6)


def test_resume_from_a_foreign_checkpoint_fails_clearly(tmp_path):
    tr = make_trainer(tmp_path, epochs=1)
    tr.train()
    ckpt = tmp_path / "checkpoint-2"
    os.unlink(ckpt / LOSS_STATE_NAME)
    again = make_trainer(tmp_path, epochs=1)
    with pytest.raises(FileNotFoundError, match="not a checkpoint of a distillation run"):
        again.train(resume_from_checkpoint=str(ckpt))


def test_gradient_accumulation_scales_the_mean_loss(tmp_path):
    # Prediction-only loss (no layer weights that change per micro-batch): 2 micro-batches of 2
    # must give the same update as one batch of 4 (the Trainer divides our mean loss by 2).
    # Plain SGD: the update is proportional to the gradient (Adam would blow up rounding noise
    # of gradients that are zero in exact arithmetic, e.g. the key biases').
    def run(out, batch, accum):
        torch.manual_seed(0)
        teacher = BertForSequenceClassification(tiny_config(3, layers=4))
        torch.manual_seed(1)
        student = BertForSequenceClassification(tiny_config(3, layers=2))
        loss = BertEMDLoss.from_models(student, teacher, use_attention=False, use_hidden=False, use_embedding=False)
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accum, max_steps=2, learning_rate=0.1, optim="sgd",
                                 report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                                 train_sampling_strategy="sequential", max_grad_norm=1e9)
        ds = dataset().map(lambda r: {"input_ids": r["input_ids"][:8] + [0] * (8 - len(r["input_ids"][:8])),
                                      "attention_mask": [1] * min(8, len(r["input_ids"]))
                                      + [0] * (8 - min(8, len(r["input_ids"])))})
        tr = DistillationTrainer(model=student, args=args, teacher=teacher, distill_loss=loss, train_dataset=ds,
                                 data_collator=collate)
        tr.train()
        return tr.model.state_dict()

    a = run(tmp_path / "a", 4, 1)
    b = run(tmp_path / "b", 2, 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
