"""``bert-emd finetune / distill / evaluate / plot`` end to end on tiny local models and data."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("sklearn")

from bert_emd.cli import build_parser, main  # noqa: E402
from bert_emd.distill.trainer import LOSS_STATE_NAME  # noqa: E402
from helpers import (  # noqa: E402
    cli_user_error,
    make_teacher,
    sentiment_rows,
    write_glue,
    write_table,
)

FAST = ["--use_cpu", "True", "--disable_tqdm", "True", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--max-length", "24"]


def test_bench_still_passes_its_flags_through():
    args, rest = build_parser().parse_known_args(["bench", "emd", "--quick"])
    assert args.command == "bench" and rest == ["--quick"]


@pytest.mark.slow  # three CLI runs end to end
def test_finetune_distill_evaluate_plot_on_a_glue_folder(tmp_path, capsys):
    glue = write_glue(tmp_path / "glue", "sst-2", repeat=4)  # 12 train rows, 8 dev rows
    encoder = make_teacher(tmp_path / "encoder", classifier=False)  # a bare BertModel checkpoint
    teacher = tmp_path / "teacher"
    data = ["--task", "SST-2", "--data-dir", str(glue)]
    assert main(["finetune", "--model", str(encoder), *data, "--output-dir", str(teacher), *FAST,
                 "--num_train_epochs", "1", "--learning_rate", "1e-3", "--no-plots"]) == 0
    t_metrics = json.loads((teacher / "metrics.json").read_text())
    assert 0.0 <= t_metrics["metrics"]["validation"]["eval_acc"] <= 1.0
    assert (teacher / "model.safetensors").is_file() and (teacher / "tokenizer_config.json").is_file()

    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), *data, "--student-layers", "2", "--student-hidden", "16",
                 "--student-ffn", "32", "--beta", "1.0", "--output-dir", str(out), *FAST,
                 "--num_train_epochs", "2", "--logging_steps", "1", "--learning_rate", "1e-3"]) == 0
    # a checkpoint per epoch, each with the loss state; the final model; metrics; plots
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-3", "checkpoint-6"]
    assert all((out / c / LOSS_STATE_NAME).is_file() for c in ckpts)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 16
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["parameters"] < summary["teacher_parameters"]
    assert set(summary["metrics"]) == {"validation"} and "eval_acc" in summary["metrics"]["validation"]
    assert len(summary["layer_weights"]["student"]) == 2 and len(summary["layer_weights"]["teacher"]) == 4
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("loss_hidden" in e and "w_teacher.3" in e for e in history)
    assert {p.name for p in (out / "plots").glob("*.png")} == {"layer_weights.png", "transport.png", "loss.png"}

    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(out), *data, "--output", str(report), "--use_cpu", "True",
                 "--disable_tqdm", "True", "--latency-examples", "3"]) == 0
    stdout = capsys.readouterr().out
    printed = json.loads(stdout[stdout.rindex("{\n"):])  # the metrics, printed as indented JSON last
    assert printed == json.loads(report.read_text())["metrics"]
    assert printed["validation_acc"] == pytest.approx(summary["metrics"]["validation"]["eval_acc"])
    assert json.loads(report.read_text())["latency_ms"] > 0

    assert main(["plot", str(out / "checkpoint-3"), "--out", str(tmp_path / "p")]) == 0
    assert {p.name for p in (tmp_path / "p").glob("*.png")} == {"layer_weights.png", "transport.png", "loss.png"}


def test_distill_student_choices_and_modes_on_csv(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", num_labels=2)
    rows = sentiment_rows(16)
    train = write_table(tmp_path / "train.csv", rows)
    dev = write_table(tmp_path / "dev.jsonl", rows[:8])
    data = ["--train-file", str(train), "--validation-file", str(dev), "--labels", "negative,positive"]
    once = [*FAST, "--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--no-plots"]
    variants = {
        # a copy of teacher layers 1 and 3, TinyBERT's skip mapping, pre-softmax scores
        "layers": ["--init-from-teacher-layers", "1,3", "--mapping", "skip", "--attention-source", "scores"],
        # a student checkpoint folder (the teacher itself: 4 layers), prediction-only
        "path": ["--student", str(teacher), "--prediction-only"],
    }
    for name, extra in variants.items():
        out = tmp_path / name
        assert main(["distill", "--teacher", str(teacher), *data, *extra, "--output-dir", str(out), *once]) == 0
        summary = json.loads((out / "metrics.json").read_text())
        assert "eval_acc" in summary["metrics"]["validation"]
    assert json.loads((tmp_path / "layers" / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((tmp_path / "layers" / "metrics.json").read_text())["mapping"] == "skip"
    assert json.loads((tmp_path / "path" / "metrics.json").read_text())["mapping"] == "prediction-only"


@pytest.mark.parametrize("source", [pytest.param("probs", marks=pytest.mark.slow), "scores"])
def test_distill_fused_attention_keeps_sdpa_and_matches_the_maps(tmp_path, monkeypatch, source):
    """--fused-attention: the attention costs come from the hooked queries and keys, so neither
    model is switched to eager attention nor asked for its maps, and the run logs the attention
    term of the map-based run (same seed, same batches: only the attention implementation and
    the cost kernel differ, to float rounding)."""
    from transformers import PreTrainedModel

    teacher = make_teacher(tmp_path / "teacher", num_labels=2)
    train = write_table(tmp_path / "train.csv", sentiment_rows(16))
    calls: list[tuple[bool, str]] = []
    forward = PreTrainedModel.__call__

    def spy(self, *a, **kw):  # every model call: maps requested? which attention implementation?
        calls.append((bool(kw.get("output_attentions")), self.config._attn_implementation))
        return forward(self, *a, **kw)

    monkeypatch.setattr(PreTrainedModel, "__call__", spy)
    runs = {}
    for fused in (False, True):
        out = tmp_path / f"fused{int(fused)}"
        calls.clear()
        argv = ["distill", "--teacher", str(teacher), "--train-file", str(train), "--labels", "negative,positive",
                "--student-layers", "2", "--attention-source", source, "--beta", "1", "--output-dir", str(out),
                *FAST, "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
                "--no-plots", *(["--fused-attention"] if fused else [])]
        assert main(argv) == 0
        summary = json.loads((out / "metrics.json").read_text())
        assert summary["fused_attention"] is fused and summary["attention_source"] == source
        runs[fused] = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
        maps = source == "probs" and not fused  # only the map-based probs run needs maps and eager attention
        assert calls and all(c == (maps, "eager" if maps else "sdpa") for c in calls), calls
    for a, b in zip(runs[False], runs[True]):
        assert b["loss_attention"] > 0
        assert b["loss_attention"] == pytest.approx(a["loss_attention"], rel=1e-4, abs=1e-8)


def test_distill_regression_on_sts_b(tmp_path):
    glue = write_glue(tmp_path / "glue", "sts-b", repeat=2)
    teacher = make_teacher(tmp_path / "teacher", num_labels=1, problem_type="regression")
    out = tmp_path / "out"
    assert main(["distill", "--teacher", str(teacher), "--task", "sts-b", "--data-dir", str(glue),
                 "--student-layers", "2", "--output-dir", str(out), *FAST, "--max_steps", "1",
                 "--save_strategy", "no", "--no-plots"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]["validation"]
    assert {"eval_pearson", "eval_spearmanr", "eval_corr"} <= set(metrics)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    teacher = make_teacher(tmp_path / "teacher", num_labels=2)
    glue = write_glue(tmp_path / "glue", "rte")
    base = ["distill", "--teacher", str(teacher), "--task", "rte", "--data-dir", str(glue),
            "--output-dir", str(tmp_path / "o"), "--use_cpu", "True"]

    def error(argv, command="bert-emd distill"):
        return cli_user_error(argv, capsys, command, after_progress=True)

    assert "exactly one of --student PATH, --student-layers" in error(base)
    assert "--no_such_option" in error([*base, "--student-layers", "2", "--no_such_option", "1"])
    assert re.search("student has 2 attention heads and the teacher 4.*--no-attention",
                     error([*base, "--student-layers", "2", "--student-heads", "2"]))
    assert re.search(r"indices \[7\] outside \[0, 4\)", error([*base, "--init-from-teacher-layers", "0,7"]))
    three = make_teacher(tmp_path / "t3", num_labels=3)
    assert "has 3 outputs, the data 2 labels" in error(["distill", "--teacher", str(three), *base[3:],
                                                        "--student-layers", "2"])
    assert "no data" in error(["finetune", "--model", str(teacher), "--output-dir", str(tmp_path / "f")],
                              "bert-emd finetune")
    assert "no trainer_state.json or transport.json" in error(["plot", str(tmp_path)], "bert-emd plot")
