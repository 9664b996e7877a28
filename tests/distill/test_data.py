"""bert_emd.distill.data: GLUE folders in their real layouts, generic files, errors, tokenisation."""

from __future__ import annotations

import pytest

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from bert_emd.distill.data import GLUE_TASKS, load_glue, load_table, normalize_task_name, tokenize  # noqa: E402
from helpers import GLUE_FIXTURES, make_tokenizer, write_glue, write_table  # noqa: E402

# (task, n train rows, first train text, first text pair, first label as stored)
EXPECTED = {
    "cola": (3, "Our friends won't buy this analysis, let alone the next one we propose.", None, 1),
    "sst-2": (3, "hide new secretions from the parental units ", None, 0),
    "mrpc": (2, 'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his '
             "evidence .", 'Referring to him as only " the witness " , Amrozi accused his brother of deliberately '
             "distorting his evidence .", 1),
    "sts-b": (2, "A plane is taking off.", "An air plane is taking off.", 5.0),
    "qqp": (2, "How is the life of a math student? Could you describe your own experiences?",
            "Which level of prepration is enough for the exam jlpt5?", 0),
    "mnli": (4, "Conceptually cream skimming has two basic dimensions - product and geography.",
             "Product and geography are what make cream skimming work. ", 2),
    "qnli": (3, "When did the third Digimon series begin?", "Unlike the two seasons before it and most of the "
             "seasons that followed, Digimon Tamers takes a darker approach.", 1),
    "rte": (2, "No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq.", 1),
    "wnli": (2, "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.", "The carrot had a hole.",
             1),
}


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_glue_layouts(tmp_path, task):
    folder = write_glue(tmp_path, task)
    data = load_glue(task.upper(), folder)
    n, text, pair, label = EXPECTED[task]
    train = data.splits["train"]
    assert len(train) == n
    assert train[0]["text"] == text
    assert data.has_pair == (pair is not None)
    if pair is not None:
        assert train[0]["text_pair"] == pair
    assert train[0]["label"] == pytest.approx(label)
    assert data.is_regression == (task == "sts-b")
    # dev rows: every labelled data row of the fixture
    dev_file = "dev_matched.tsv" if task == "mnli" else "dev.tsv"
    n_dev = len(GLUE_FIXTURES[task][dev_file]) - (0 if task == "cola" else 1)
    assert len(data.splits["validation"]) == n_dev
    if task == "mnli":
        assert len(data.splits["validation_mismatched"]) == 2
        assert data.label_list == ["contradiction", "entailment", "neutral"]
        # dev files have five annotator columns before gold_label: the label is still the gold one
        assert data.splits["validation"]["label"] == [2, 1, 1, 0]
    if task == "sts-b":
        assert data.splits["validation"]["label"] == pytest.approx([5.0, 4.75])
        assert data.num_labels == 1
    if task == "cola":
        assert data.splits["validation"]["label"] == [1, 0]


def test_task_names():
    assert normalize_task_name("SST2") == "sst-2"
    assert normalize_task_name("STS_B") == "sts-b"
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'.*cola"):
        normalize_task_name("squad")


def test_glue_missing_file(tmp_path):
    folder = write_glue(tmp_path, "rte")
    (folder / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"dev.tsv not found.*holds: train.tsv"):
        load_glue("rte", folder)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_glue("rte", tmp_path / "nowhere")


def test_glue_missing_column(tmp_path):
    folder = write_glue(tmp_path, "sst-2")
    (folder / "train.tsv").write_text("text\tlabel\nsome text\t1\n")
    with pytest.raises(ValueError, match=r"train.tsv: missing text column 'sentence'; header has: text, label"):
        load_glue("sst-2", folder)


def test_glue_unknown_label(tmp_path):
    folder = write_glue(tmp_path, "rte")
    (folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"dev.tsv, row 2: unknown label 'maybe'.*'entailment', 'not_entailment'"):
        load_glue("rte", folder)


def test_glue_stsb_bad_score(tmp_path):
    folder = write_glue(tmp_path, "sts-b")
    text = (folder / "dev.tsv").read_text().replace("4.750", "high")
    (folder / "dev.tsv").write_text(text)
    with pytest.raises(ValueError, match="row 3: label 'high' in column 'score' is not a number"):
        load_glue("sts-b", folder)


def test_glue_test_split(tmp_path):
    folder = write_glue(tmp_path, "qnli")
    (folder / "test.tsv").write_text("index\tquestion\tsentence\n0\tWhat?\tThis.\n1\tWho?\tThat.\n")
    data = load_glue("qnli", folder, test=True)
    assert data.splits["test"]["text_pair"] == ["This.", "That."]
    assert "label" not in data.splits["test"].column_names


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_generic_files(tmp_path, fmt):
    rows = [{"sentence": "good day", "other": "x", "y": "pos"}, {"sentence": "bad day", "other": "y", "y": "neg"},
            {"sentence": "so so", "other": "z", "y": "pos"}]
    train = write_table(tmp_path / f"train.{fmt}", rows)
    dev = write_table(tmp_path / f"dev.{fmt}", rows[:2])
    data = load_table(train, dev, text_column="sentence", text_pair_column="other", label_column="y")
    assert data.label_list == ["neg", "pos"]  # sorted labels of the training file
    assert data.splits["train"]["label"] == [1, 0, 1]
    assert data.splits["validation"]["text_pair"] == ["x", "y"]
    assert data.name == "custom" and data.metric_task is None


def test_generic_numeric_labels_and_regression(tmp_path):
    rows = [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 2}]
    path = write_table(tmp_path / "t.jsonl", rows)
    data = load_table(path)
    assert data.label_list == ["2", "10"]  # numeric order, not string order
    assert data.splits["train"]["label"] == [1, 0, 0]
    reg = load_table(path, regression=True)
    assert reg.is_regression and reg.splits["train"]["label"] == pytest.approx([10.0, 2.0, 2.0])


def test_generic_errors(tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    train = write_table(tmp_path / "train.csv", rows)
    with pytest.raises(FileNotFoundError, match="validation file: file .*missing.csv not found"):
        load_table(train, tmp_path / "missing.csv")
    with pytest.raises(ValueError, match=r"train.csv: missing label column 'gold'; columns are: text, label"):
        load_table(train, label_column="gold")
    with pytest.raises(ValueError, match=r"missing text pair column 'hypothesis'"):
        load_table(train, text_pair_column="hypothesis")
    dev = write_table(tmp_path / "dev.csv", [{"text": "c", "label": "z"}])
    with pytest.raises(ValueError, match=r"dev.csv, row 1: unknown label 'z' in column 'label'; expected one of"):
        load_table(train, dev)
    with pytest.raises(ValueError, match="unknown label 'y'"):
        load_table(train, label_list=["x"])
    with pytest.raises(ValueError, match="unsupported file type '.xml'"):
        bad = tmp_path / "a.xml"
        bad.write_text("<a/>")
        load_table(bad)
    # an unlabelled test file is fine
    test = write_table(tmp_path / "test.csv", [{"text": "q"}])
    data = load_table(train, test_file=test)
    assert "label" not in data.splits["test"].column_names


def test_latin1_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("text,label\ncaf\xe9 ok,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="cannot read as CSV"):
        load_table(path)
    data = load_table(path, encoding="latin-1")
    assert data.splits["train"]["text"] == ["caf\u00e9 ok"]


def test_tokenize_pairs_and_limits(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    data = load_glue("rte", write_glue(tmp_path, "rte", repeat=3))
    enc = tokenize(data, tok, max_length=16, limit={"train": 4})
    train = enc["train"]
    assert len(train) == 4 and len(enc["validation"]) == 3
    assert set(train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert all(len(x) <= 16 for x in train["input_ids"])
    assert 1 in train[0]["token_type_ids"]  # the pair got segment 1
    assert train["labels"][:2] == [1, 0]
    padded = tokenize(data, tok, max_length=16, pad_to_max_length=True)
    assert {len(x) for x in padded["train"]["input_ids"]} == {16}
