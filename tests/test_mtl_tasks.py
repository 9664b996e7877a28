"""TaskSpec and the multi-task YAML configuration: valid files load, errors name file and field."""

import textwrap

import pytest
from bert_emd.mtl.tasks import ConfigError, MechanismConfig, TaskSpec, load_config, load_tasks

GOOD = """
model:
  encoder: enc
mechanisms:
  hierarchy: {mode: learned}
  private: {dim: 32, heads: 2, gamma: 0.05}
  adversarial: {lambda: 0.1}
  gate: true
sampler:
  kind: temperature
  temperature: 3
  anneal_to: 0.5
training:
  batch_size: 8
  tasks_per_step: 2
tasks:
  - name: sentiment
    type: single_sentence
    data: {train: data/s.csv, validation: data/s_dev.csv, label_list: [neg, neu, pos], encoding: latin-1}
    tap_layer: 4
  - name: nli
    type: sentence_pair
    num_labels: 3
    data: {train: /abs/nli.jsonl, text_pair_column: hypothesis}
    metric: macro_f1
    loss_weight: 0.5
  - name: sts
    type: regression
    data: {glue: STS-B, data_dir: glue/STS-B}
  - name: ner
    type: token_tagging
    num_labels: 5
    data: {train: ner.jsonl}
"""


def _write(tmp_path, text, name="tasks.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_config_loads(tmp_path):
    path = _write(tmp_path, GOOD)
    cfg = load_config(path)
    names = [t.name for t in cfg.tasks]
    assert names == ["sentiment", "nli", "sts", "ner"]
    s, nli, sts, ner = cfg.tasks
    assert s.type == "single" and s.num_labels == 3 and s.metric == "acc" and s.tap_layer == 4
    assert s.data.train == str(tmp_path / "data/s.csv")  # relative to the YAML file
    assert s.data.encoding == "latin-1"
    assert nli.type == "pair" and nli.loss_weight == 0.5 and nli.data.train == "/abs/nli.jsonl"
    assert sts.type == "regression" and sts.num_labels == 1 and sts.metric == "pearson"
    assert sts.data.glue == "sts-b"
    assert ner.type == "tagging" and ner.metric == "token_acc"
    m = cfg.mechanisms
    assert m.enabled == ["hierarchy", "private", "adversarial", "gate"]
    assert (m.private_dim, m.private_heads, m.gamma, m.adversarial_weight) == (32, 2, 0.05, 0.1)
    assert cfg.sampler.kind == "temperature" and cfg.sampler.temperature == 3
    assert cfg.training.tasks_per_step == 2
    assert cfg.model.encoder == str(tmp_path / "enc")
    assert not cfg.distillation.enabled
    assert [t.name for t in load_tasks(path)] == names
    # round trip through to_dict
    again = TaskSpec.from_dict(s.to_dict())
    assert again == s


def test_mechanisms_as_a_list_and_defaults():
    assert MechanismConfig.from_value(["gate", "label_embedding"]).enabled == ["gate", "label_embedding"]
    assert MechanismConfig.from_value(None).enabled == []
    assert MechanismConfig.from_value({"private": {"enabled": False, "dim": 8}}).enabled == []


@pytest.mark.parametrize(
    "text, match",
    [
        ("tasks: []", r"tasks\.yaml: tasks: a non-empty list"),
        ("model: {}", r"tasks\.yaml: missing 'tasks'"),
        ("taks: []\ntasks: []", r"unknown section 'taks'"),
        ("tasks:\n  - {name: a, type: clasification, num_labels: 2, data: {train: x.csv}}",
         r"tasks\[0\] \('a'\)\.type: unknown task type 'clasification'"),
        ("tasks:\n  - {name: a, type: single, data: {train: x.csv}}", r"tasks\[0\] \('a'\)\.num_labels: required"),
        ("tasks:\n  - {name: a, type: single, num_labels: 1, data: {train: x.csv}}",
         r"tasks\[0\] \('a'\)\.num_labels: an integer >= 2"),
        ("tasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x.csv, label_list: [x, y, z]}}",
         r"num_labels: 2 does not match data.label_list"),
        ("tasks:\n  - {name: a, type: pair, num_labels: 2, data: {train: x.csv}}", r"text_pair_column: required"),
        ("tasks:\n  - {name: a, type: single, num_labels: 2}", r"tasks\[0\] \('a'\)\.data: no data"),
        ("tasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x.csv}, metric: pearson}",
         r"\.metric: 'pearson' is not a single metric"),
        ("tasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x.csv}, lossweight: 2}",
         r"unknown field 'lossweight' \(did you mean 'loss_weight'\?\)"),
        ("tasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x.csv}, loss_weight: 0}",
         r"loss_weight: a number > 0"),
        ("tasks:\n  - {name: a b, type: single, num_labels: 2, data: {train: x.csv}}", r"\.name: 'a b' may hold"),
        ("tasks:\n  - {type: single, num_labels: 2, data: {train: x.csv}}",
         r"tasks\[0\]: missing required field 'name'"),
        ("tasks:\n  - {name: a, type: single, num_labels: 2, data: {trian: x.csv}}",
         r"tasks\[0\] \('a'\)\.data: unknown field 'trian' \(did you mean 'train'\?\)"),
        ("tasks:\n  - {name: a, type: single, num_labels: 2, data: {train: 5}}",
         r"tasks\[0\] \('a'\)\.data\.train: a string is required"),
        ("tasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x.csv}}\n"
         "  - {name: a, type: single, num_labels: 2, data: {train: y.csv}}", r"duplicate task name"),
        ("tasks:\n  - {name: a, type: regression, data: {glue: nope, data_dir: d}}",
         r"\.data\.glue: unknown GLUE task"),
        ("mechanisms: [hierarchy, sharing]\ntasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x}}",
         r"mechanisms\[1\]: unknown mechanism 'sharing'"),
        ("mechanisms: {private: {size: 3}}\ntasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x}}",
         r"mechanisms\.private\.size: unknown option"),
        ("mechanisms: {gate: yes please}\ntasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x}}",
         r"mechanisms\.gate: true or false"),
        ("sampler: {kind: softmax}\ntasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x}}",
         r"sampler\.kind: unknown sampler 'softmax'"),
        ("training: {batch_size: 0}\ntasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x}}",
         r"training\.batch_size: an integer >= 1"),
        ("mechanisms: [adversarial]\ntasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x}}",
         r"mechanisms\.adversarial: the task discriminator needs at least 2 tasks"),
        ("tasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x}, tap_layer: 2}",
         r"tap_layer is set but the 'hierarchy' mechanism is off"),
        ("distillation: {beta: 0.01}\ntasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x}}",
         r"tasks\[0\] \('a'\)\.teacher: distillation needs a teacher"),
        ("distillation: {teacher: t, attention_source: maps}\ntasks:\n  - {name: a, type: single, num_labels: 2, "
         "data: {train: x}}", r"tasks\.yaml: distillation\.attention_source: 'probs' or 'scores' is required, "
                              r"got 'maps'"),
        ("distillation: {teacher: t, fused_attention: yes please}\ntasks:\n  - {name: a, type: single, "
         "num_labels: 2, data: {train: x}}",
         r"tasks\.yaml: distillation\.fused_attention: true or false is required, got 'yes please'"),
        ("distillation: {teacher: t, fused_atention: true}\ntasks:\n  - {name: a, type: single, num_labels: 2, "
         "data: {train: x}}",
         r"distillation: unknown field 'fused_atention' \(did you mean 'fused_attention'\?\)"),
        ("tasks:\n  - name: a\n    type: [single\n", r"tasks\.yaml: line \d+, column \d+: invalid YAML"),
        ("", r"tasks\.yaml: empty file"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config("/nonexistent/tasks.yaml")


def test_example_config_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "mtl_tasks.yaml"
    cfg = load_config(example)
    assert [t.name for t in cfg.tasks] == ["sentiment", "news"]
    assert cfg.mechanisms.enabled == ["hierarchy", "gate"] and cfg.sampler.kind == "temperature"


def test_distillation_attention_options(tmp_path):
    """``distillation.attention_source`` / ``fused_attention``: defaults ("probs", false) and parsed values."""
    task = "tasks:\n  - {name: a, type: single, num_labels: 2, data: {train: x}}\n"
    d = load_config(_write(tmp_path, "distillation: {teacher: t}\n" + task)).distillation
    assert (d.attention_source, d.fused_attention) == ("probs", False)
    text = "distillation: {teacher: t, attention_source: scores, fused_attention: true}\n" + task
    d = load_config(_write(tmp_path, text)).distillation
    assert d.enabled and (d.attention_source, d.fused_attention) == ("scores", True)
