"""TaskSpec and the multi-task YAML configuration: valid files load, errors name file and field."""

import re
import textwrap

import pytest
from bert_emd.mtl.checks import ConfigError
from bert_emd.mtl.config import MechanismConfig, TaskSpec
from bert_emd.mtl.yaml_config import load_config, load_tasks

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

    example = Path(__file__).resolve().parents[2] / "examples" / "mtl_tasks.yaml"
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


# ----------------------------------------------------------------------------- value checks of every field
TASK = {"name": "a", "type": "single", "num_labels": 2, "data": {"train": "x.csv"}}


def _cfg(tmp_path, task=None, **sections):
    """config_from_dict on one task plus ``sections``; errors and warnings start with 'cfg.yaml'."""
    from bert_emd.mtl.yaml_config import config_from_dict

    return config_from_dict({"tasks": [task or TASK], **sections}, source="cfg.yaml", base_dir=tmp_path)


def _task(**over):
    t = {**TASK, **over}
    if "data" in over:
        t["data"] = {**TASK["data"], **over["data"]}
    return t


BAD_VALUES = [
    # distillation: switches are YAML booleans, numbers are numbers, teacher is a path
    ("distillation", "enabled", "yes", "true or false is required, got 'yes'"),
    ("distillation", "enabled", 1, "true or false is required, got 1"),
    ("distillation", "teacher_annealing", "false", "true or false is required"),
    ("distillation", "use_attention", 0, "true or false is required, got 0"),
    ("distillation", "use_hidden", 0, "true or false is required, got 0"),
    ("distillation", "use_embedding", "no", "true or false is required"),
    ("distillation", "use_prediction", None, "true or false is required, got None"),
    ("distillation", "fused_attention", 1, "true or false is required, got 1"),
    ("distillation", "gold_weight", "0.5", r"a number in \[0, 1\] is required, got '0.5'"),
    ("distillation", "gold_weight", 1.5, r"a number in \[0, 1\] is required, got 1.5"),
    ("distillation", "gold_weight", True, r"a number in \[0, 1\] is required, got True"),
    ("distillation", "gold_weight", float("nan"), r"a number in \[0, 1\] is required, got nan"),
    ("distillation", "teacher", 5, r"a string \(or null\) is required, got int 5"),
    ("distillation", "teacher", "", r"a non-empty string \(or null\) is required, got ''"),
    ("distillation", "beta", -1, "a number >= 0 is required, got -1"),
    ("distillation", "theta", "1", "a number >= 0 is required, got '1'"),
    ("distillation", "T_emd", 0, "a number > 0 is required, got 0"),
    ("distillation", "temperature", False, "a number > 0 is required, got False"),
    ("distillation", "normalize", ["sum"], "'sum', 'softmax' or 'double_softmax' is required"),
    # training
    ("training", "use_cpu", "no", "true or false is required, got 'no'"),
    ("training", "use_cpu", 0, "true or false is required, got 0"),
    ("training", "weight_decay", -0.1, "a number >= 0 is required, got -0.1"),
    ("training", "weight_decay", "0.01", "a number >= 0 is required, got '0.01'"),
    ("training", "weight_decay", True, "a number >= 0 is required, got True"),
    ("training", "warmup_ratio", 1, r"a number in \[0, 1\) is required, got 1"),
    ("training", "warmup_ratio", -0.1, r"a number in \[0, 1\) is required"),
    ("training", "warmup_ratio", "0.1", r"a number in \[0, 1\) is required, got '0.1'"),
    ("training", "seed", "42", r"an integer in \[0, 4294967295\] is required, got '42'"),
    ("training", "seed", 4.2, "an integer in .* is required, got 4.2"),
    ("training", "seed", -1, "an integer in .* is required, got -1"),
    ("training", "seed", True, "an integer in .* is required, got True"),
    ("training", "seed", 2**32, "an integer in .* is required, got 4294967296"),
    ("training", "limit_train", 0, r"an integer >= 1 \(or null\) is required, got 0"),
    ("training", "limit_train", "10", r"an integer >= 1 \(or null\) is required, got '10'"),
    ("training", "limit_eval", 1.5, r"an integer >= 1 \(or null\) is required, got 1.5"),
    ("training", "limit_eval", True, r"an integer >= 1 \(or null\) is required, got True"),
    ("training", "output_dir", "", "a non-empty string is required, got ''"),
    ("training", "output_dir", 5, "a string is required, got int 5"),
    ("training", "output_dir", None, "a string is required, got NoneType None"),
    ("training", "mixture_lr", float("nan"), r"a number > 0 \(or null\) is required, got nan"),
    ("training", "eval_strategy", ["no"], "'no', 'epoch' or 'steps' is required"),
    # model
    ("model", "encoder", 5, r"a string \(or null\) is required, got int 5"),
    ("model", "encoder", "", r"a non-empty string \(or null\) is required"),
    ("model", "tokenizer", ["tok"], r"a string \(or null\) is required, got list"),
    ("model", "attn_implementation", 3, r"a string \(or null\) is required, got int 3"),
    ("model", "attn_implementation", "", r"a non-empty string \(or null\) is required"),
    ("model", "student_layers", "2,5", r"a list of integers >= 0 \(or null\) is required, got '2,5'"),
    ("model", "student_layers", 2, r"a list of integers >= 0 \(or null\) is required, got 2"),
    ("model", "student_layers", [1, -1], r"a list of integers >= 0 \(or null\) is required, got \[1, -1\]"),
    ("model", "student_layers", [1.0, 2], "a list of integers >= 0"),
    ("model", "student_layers", [True], "a list of integers >= 0"),
    ("model", "student_layers", [2, 5, 2], r"distinct layer indices are required, got \[2, 5, 2\]"),
    # sampler
    ("sampler", "kind", ["uniform"], r"unknown sampler \['uniform'\]"),
    ("sampler", "anneal_to", "0.2", r"a number >= 0 \(or null\) is required, got '0.2'"),
    ("sampler", "anneal_to", float("nan"), r"a number >= 0 \(or null\) is required, got nan"),
]


@pytest.mark.parametrize(
    "section, name, value, match", BAD_VALUES, ids=[f"{s}.{n}={v!r}" for s, n, v, _ in BAD_VALUES]
)
def test_bad_field_value_names_section_and_field(tmp_path, section, name, value, match):
    """A mistyped or out-of-range value is a ConfigError 'cfg.yaml: section.field: <expected>, got <value>'."""
    with pytest.raises(ConfigError, match=rf"^cfg\.yaml: {section}\.{name}: {match}"):
        _cfg(tmp_path, **{section: {name: value}})


GOOD_VALUES = [
    ("distillation", "enabled", True, True),
    ("distillation", "teacher_annealing", True, True),
    ("distillation", "use_attention", False, False),
    ("distillation", "use_hidden", False, False),
    ("distillation", "use_embedding", False, False),
    ("distillation", "use_prediction", False, False),
    ("distillation", "gold_weight", 0, 0),
    ("distillation", "gold_weight", 1, 1),
    ("distillation", "gold_weight", 0.5, 0.5),
    ("distillation", "T_emd", 2, 2),
    ("training", "use_cpu", True, True),
    ("training", "weight_decay", 0, 0),
    ("training", "warmup_ratio", 0, 0),
    ("training", "warmup_ratio", 0.5, 0.5),
    ("training", "seed", 0, 0),
    ("training", "seed", 2**32 - 1, 2**32 - 1),
    ("training", "limit_train", 1, 1),
    ("training", "limit_eval", None, None),
    ("training", "mixture_lr", None, None),
    ("model", "attn_implementation", "sdpa", "sdpa"),
    ("model", "attn_implementation", "flash_attention_3", "flash_attention_3"),  # transformers checks the name
    ("model", "attn_implementation", None, None),
    ("model", "student_layers", [2, 5], [2, 5]),
    ("model", "student_layers", [5, 0], [5, 0]),
    ("model", "student_layers", [], []),
    ("model", "student_layers", None, None),
    ("sampler", "anneal_to", 0, 0),
]


@pytest.mark.parametrize(
    "section, name, value, expected", GOOD_VALUES, ids=[f"{s}.{n}={v!r}" for s, n, v, _ in GOOD_VALUES]
)
def test_good_field_value_passes(tmp_path, section, name, value, expected):
    sections = {section: {name: value}}
    if section == "distillation":
        sections["distillation"]["teacher"] = "t"
    if section == "sampler":
        sections["sampler"]["kind"] = "power"
    cfg = _cfg(tmp_path, **sections)
    assert getattr(getattr(cfg, section), name) == expected


def test_good_path_values_are_resolved(tmp_path):
    cfg = _cfg(tmp_path, _task(teacher="teach"), model={"encoder": "enc", "tokenizer": "tok"},
               training={"output_dir": "out"}, distillation={"teacher": "mt"})
    assert cfg.tasks[0].teacher == str(tmp_path / "teach") and cfg.distillation.teacher == str(tmp_path / "mt")
    assert (cfg.model.encoder, cfg.model.tokenizer) == (str(tmp_path / "enc"), str(tmp_path / "tok"))
    assert cfg.training.output_dir == str(tmp_path / "out")


BAD_TASK_VALUES = [
    ({"teacher": 5}, r"\.teacher: a string \(or null\) is required, got int 5"),
    ({"teacher": ""}, r"\.teacher: a non-empty string \(or null\) is required"),
    ({"loss_weight": "1"}, r"\.loss_weight: a number > 0 is required, got '1'"),
    ({"loss_weight": True}, r"\.loss_weight: a number > 0 is required, got True"),
    ({"loss_weight": float("nan")}, r"\.loss_weight: a number > 0 is required, got nan"),
    ({"max_length": 1.5}, r"\.max_length: an integer >= 2 \(or null\) is required, got 1.5"),
    ({"num_labels": "3"}, r"\.num_labels: an integer >= 2 is required, got '3'"),
    ({"data": {"encoding": "utf-9"}}, r"\.data\.encoding: a known text encoding .* is required, got 'utf-9'"),
    ({"data": {"train": ""}}, r"\.data\.train: a non-empty string is required, got ''"),
    ({"data": {"text_column": ""}}, r"\.data\.text_column: a non-empty string is required"),
    ({"data": {"label_column": 3}}, r"\.data\.label_column: a string is required, got int 3"),
]


@pytest.mark.parametrize("over, match", BAD_TASK_VALUES, ids=[str(o) for o, _ in BAD_TASK_VALUES])
def test_bad_task_value_names_task_and_field(tmp_path, over, match):
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: tasks\[0\] \('a'\)" + match):
        _cfg(tmp_path, _task(**over))


def test_tap_layer_must_be_an_integer(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks\[0\] \('a'\)\.tap_layer: an integer layer index \(or null\)"):
        _cfg(tmp_path, _task(tap_layer="4"), mechanisms=["hierarchy"])
    assert _cfg(tmp_path, _task(tap_layer=-1), mechanisms=["hierarchy"]).tasks[0].tap_layer == -1


def test_direct_taskspec_checks_its_data():
    with pytest.raises(ConfigError, match=r"task 'a'\.data: a mapping of data fields is required, got str"):
        TaskSpec(name="a", type="single", num_labels=2, data="x.csv")
    from pathlib import Path

    from bert_emd.mtl.config import DataFiles

    assert TaskSpec(name="a", type="single", num_labels=2, data=DataFiles(train=Path("x.csv"))).data.train == "x.csv"


@pytest.mark.parametrize(
    "sections, match",
    [
        ({"distillation": "yes"}, r"distillation: a mapping of distillation fields \(or true / false\) is required"),
        ({"distillation": 1}, r"distillation: a mapping of distillation fields"),
        ({"training": []}, r"training: a mapping is required, got list"),
        ({"model": "enc"}, r"model: a mapping is required, got str"),
        ({"sampler": 0}, r"sampler: a mapping is required, got int"),
        ({"model": {"encodr": "e"}}, r"model: unknown field 'encodr' \(did you mean 'encoder'\?\)"),
        ({"distillation": {"teacher": "t", "use_attention": False, "use_hidden": False, "use_embedding": False,
                           "use_prediction": False}},
         r"distillation\.use_attention/use_hidden/use_embedding/use_prediction: all four are false"),
    ],
    ids=["distillation-str", "distillation-int", "training-list", "model-str", "sampler-int", "model-typo",
         "all-terms-off"],
)
def test_bad_section_shapes(tmp_path, sections, match):
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: " + match):
        _cfg(tmp_path, **sections)


def test_empty_sections_are_defaults(tmp_path):
    cfg = _cfg(tmp_path, model=None, sampler=None, training=None, distillation=None)
    assert cfg.model.encoder is None and cfg.sampler.kind == "proportional" and not cfg.distillation.enabled


def test_all_terms_off_is_fine_when_distillation_is_off(tmp_path):
    off = {"use_attention": False, "use_hidden": False, "use_embedding": False, "use_prediction": False}
    with pytest.warns(UserWarning, match="ignoring use_attention, use_hidden, use_embedding, use_prediction"):
        assert not _cfg(tmp_path, distillation={"enabled": False, **off}).distillation.enabled


# ----------------------------------------------------------------------------- distillation.enabled: false
def test_disabled_distillation_warns_about_ignored_fields(tmp_path):
    with pytest.warns(UserWarning) as record:
        cfg = _cfg(tmp_path, distillation={"enabled": False, "teacher": "t", "beta": 0.01, "gold_weight": 0.2})
    assert [str(w.message) for w in record] == ["cfg.yaml: distillation.enabled is false: ignoring teacher, beta"]
    assert not cfg.distillation.enabled


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"distillation": None},
        {"distillation": False},
        {"distillation": {"enabled": False}},
        {"distillation": {"enabled": False, "beta": 0.001, "gold_weight": 0.2, "normalize": "double_softmax"}},
        {"distillation": {"teacher": "t", "beta": 0.01}},  # enabled: nothing is ignored
        {"distillation": True, "tasks": [_task(teacher="t")]},
    ],
    ids=["absent", "null", "false", "enabled-false", "enabled-false-defaults", "enabled", "true"],
)
def test_no_warning_without_ignored_fields(tmp_path, sections):
    import warnings

    sections = dict(sections)
    task = sections.pop("tasks", [None])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cfg(tmp_path, task, **sections)


def test_example_and_demo_configs_do_not_warn(tmp_path):
    import warnings
    from pathlib import Path

    from bert_emd.mtl.demo import BUDGETS, _config

    example = Path(__file__).resolve().parents[2] / "examples" / "mtl_tasks.yaml"
    tasks = [{"name": n, "type": "single", "data": {"train": "t.csv", "validation": "d.csv", "label_list": ["x", "y"]}}
             for n in ("sentiment", "news")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(example)
        cfg = _config(tasks, ["hierarchy", "gate"], tmp_path / "enc", tmp_path / "out", BUDGETS["tiny"], 4)
    assert cfg.training.warmup_ratio == 0.1 and cfg.training.seed == 42


@pytest.mark.parametrize("labels, bad", [([None, "b"], "None"), (["a", True], "True"), (["a", ["b"]], "['b']")])
def test_label_list_entries_must_be_text_or_numbers(tmp_path, labels, bad):
    msg = r"data\.label_list: labels must be strings or numbers, got " + re.escape(bad)
    with pytest.raises(ConfigError, match=msg):
        _cfg(tmp_path, _task(num_labels=2, data={"label_list": labels}))
    cfg = _cfg(tmp_path, _task(num_labels=3, data={"label_list": ["neg", 1, 2.5]}))
    assert cfg.tasks[0].data.label_list == ["neg", "1", "2.5"]
