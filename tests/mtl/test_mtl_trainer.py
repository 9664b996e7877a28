"""``bert-emd mtl train / evaluate`` on the Trainer: a tiny local encoder, a sentence task and a tagging
task; multi-task distillation with per-task teachers and two tasks per step."""

import json

import helpers
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")

from bert_emd.mtl.cli_commands import evaluate_model, main  # noqa: E402
from bert_emd.mtl.model import MultiTaskModel  # noqa: E402

WORDS = helpers.MTL_WORDS


pytestmark = pytest.mark.usefixtures("one_thread")


def _bert_cfg(layers: int, **kw):
    return helpers.mtl_bert_config(layers, **kw)


_config = helpers.mtl_config


def test_mtl_train_then_evaluate(mtl_workspace, capsys):
    out = mtl_workspace["root"] / "run_plain"
    cfg = _config(mtl_workspace, out)
    assert main(["mtl", "train", "--config", str(cfg), "--max-steps", "24"]) == 0
    printed = capsys.readouterr().out
    assert "| sent | acc |" in printed and "| tag | token_acc |" in printed and "macro average" in printed
    for f in ("model.safetensors", "mtl_config.json", "encoder/config.json", "mtl_results.json", "tokenizer.json"):
        assert (out / f).is_file(), f
    res = json.loads((out / "mtl_results.json").read_text())
    assert res["global_step"] == 24 and set(res["eval"]["tasks"]) == {"sent", "tag"}
    # the log history (logging every 4 steps) with each task's training loss
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert [h["step"] for h in logged] == [4, 8, 12, 16, 20, 24]
    assert all("loss_sent" in h or "loss_tag" in h for h in logged)
    scores = res["eval"]["tasks"]
    assert scores["sent"]["n"] == 16 and 0 <= scores["tag"]["token_acc"] <= 1
    assert res["eval"]["macro_avg"] == pytest.approx((scores["sent"]["acc"] + scores["tag"]["token_acc"]) / 2)
    assert set(res["layer_weights"]) == {"sent", "tag"} and len(res["layer_weights"]["sent"]) == 2
    assert max(abs(w - 0.5) for ws in res["layer_weights"].values() for w in ws) > 1e-4  # they trained
    # the saved folder reloads and scores the same
    again = evaluate_model(out)
    for t in ("sent", "tag"):
        for k, v in scores[t].items():
            assert again["tasks"][t][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (t, k)
    metrics = mtl_workspace["root"] / "m.json"
    assert main(["mtl", "evaluate", "--model", str(out), "--output", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["macro_avg"] == pytest.approx(res["eval"]["macro_avg"], rel=1e-5)
    model = MultiTaskModel.from_pretrained(out)
    assert model.mechanisms.enabled == ["hierarchy", "gate"]


@pytest.mark.parametrize("strategy", ["epoch", "steps"])
def test_mtl_train_evaluates_during_training(mtl_workspace, strategy):
    # regression: the Trainer refuses an eval_strategy without an eval_dataset, so `mtl train` with
    # validation files and eval_strategy epoch (the default, and examples/mtl_tasks.yaml) crashed
    out = mtl_workspace["root"] / f"run_eval_{strategy}"
    # (with "steps", evaluation runs every logging_steps)
    cfg = _config(mtl_workspace, out, training={"eval_strategy": strategy, "logging_steps": 3})
    assert main(["mtl", "train", "--config", str(cfg), "--max-steps", "6"]) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_macro_avg" in h]
    assert evals, history
    assert all({"eval_sent_acc", "eval_tag_token_acc"} <= set(h) for h in evals)
    res = json.loads((out / "mtl_results.json").read_text())
    assert evals[-1]["eval_macro_avg"] == pytest.approx(res["eval"]["macro_avg"], rel=1e-6)


def test_mtl_training_loss_falls(mtl_workspace):
    from bert_emd.mtl.cli_commands import train_from_config
    from bert_emd.mtl.yaml_config import load_config

    out = mtl_workspace["root"] / "run_falls"
    cfg = load_config(_config(mtl_workspace, out, mechanisms={"pooling": "mean", "dropout": 0.0}))
    res = train_from_config(cfg, max_steps=60)
    first = res["eval"]["tasks"]
    assert first["sent"]["acc"] > 0.8, first  # separable toy data
    hist = json.loads((out / "mtl_results.json").read_text())
    assert hist["training_loss"] < 0.69  # mean over the run, below the 2-class chance loss


def test_mtl_distill_two_tasks_per_step(mtl_workspace):
    out = mtl_workspace["root"] / "run_distill"
    t = mtl_workspace["teachers"]
    cfg = _config(mtl_workspace, out, mechanisms={"hierarchy": {"mode": "emd"}},
                  training={"tasks_per_step": 2, "save_strategy": "steps", "logging_steps": 3},
                  distillation={"beta": 1.0, "teacher_annealing": True, "normalize": "sum"})
    raw = yaml.safe_load(cfg.read_text())
    raw["tasks"][0]["teacher"] = str(t["sent"])
    raw["tasks"][1]["teacher"] = str(t["tag"])
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["mtl", "train", "--config", str(cfg), "--max-steps", "6"]) == 0
    res = json.loads((out / "mtl_results.json").read_text())
    w = res["emd_layer_weights"]
    assert len(w["sent"]["teacher"]) == 3 and len(w["tag"]["student"]) == 2
    # hierarchy mode "emd": the student's mixtures are the tasks' EMD student weights
    for task in ("sent", "tag"):
        assert res["layer_weights"][task] == pytest.approx(w[task]["student"], abs=1e-6)
    assert (out / "distill_loss.pt").is_file() and (out / "checkpoint-6" / "distill_loss.pt").is_file()
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert logged and {"loss_sent", "loss_tag", "w_sent_teacher.0"} <= set(logged[-1])


def test_resume_matches_uninterrupted_run(mtl_workspace):
    """A run stopped at a checkpoint and resumed reaches the uninterrupted run's weights (the
    task sampler replays the same batches)."""
    from bert_emd.mtl.cli_commands import train_from_config
    from bert_emd.mtl.yaml_config import load_config
    from safetensors.torch import load_file

    full = mtl_workspace["root"] / "run_full"
    cfg = load_config(_config(mtl_workspace, full, sampler={"kind": "proportional"},
                              training={"save_strategy": "steps", "logging_steps": 4}))
    train_from_config(cfg, max_steps=8, evaluate=False)
    part = mtl_workspace["root"] / "run_part"
    cfg2 = load_config(_config(mtl_workspace, part, sampler={"kind": "proportional"},
                               training={"save_strategy": "steps", "logging_steps": 4}))
    train_from_config(cfg2, max_steps=8, evaluate=False, resume=str(full / "checkpoint-4"))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_mixture_parameters_get_their_own_learning_rate(mtl_workspace, tmp_path):
    from bert_emd.mtl import MechanismConfig, TaskSpec, make_sampler
    from bert_emd.mtl.trainer import MultiTaskTrainer
    from datasets import Dataset
    from transformers import TrainingArguments

    specs = [TaskSpec("a", "single", 2, data={"train": "x.csv"}), TaskSpec("b", "single", 2, data={"train": "x.csv"})]
    model = MultiTaskModel(transformers.BertModel(_bert_cfg(2)), specs, MechanismConfig(hierarchy=True))
    ds = Dataset.from_dict({"input_ids": [[2, 5, 3]] * 4, "attention_mask": [[1, 1, 1]] * 4, "labels": [0, 1, 0, 1]})
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, report_to="none", use_cpu=True)
    trainer = MultiTaskTrainer(model, args, train_sets={"a": ds, "b": ds}, sampler=make_sampler("uniform", [4, 4]),
                               mixture_lr=0.5)
    opt = trainer.create_optimizer()
    mix = {id(p) for m in model.mixtures.values() for p in m.parameters()}
    groups = [(g["lr"], {id(p) for p in g["params"]}) for g in opt.param_groups]
    assert [lr for lr, ids in groups if ids & mix] == [0.5]
    assert any(ids == mix for _, ids in groups)
    assert sum(len(ids) for _, ids in groups) == len(list(model.parameters()))  # every parameter exactly once
