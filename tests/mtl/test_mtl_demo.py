"""The multi-task demo end to end on tiny stand-ins (a tiny encoder, a few tweets, a few BBC-style
articles): the splits, the runs, the table and the layer-weight plot."""

import argparse
import csv
import json

import helpers
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from bert_emd.mtl.demo import BBC_TOPICS, prepare_bbc, results_table, run_mtl_demo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return helpers.build_mtl_demo_stand_ins(tmp_path_factory.mktemp("mtl_demo"))


def test_prepare_bbc_split(inputs, tmp_path):
    info = prepare_bbc(inputs["bbc"], tmp_path)
    assert (info["train"], info["dev"], info["test"]) == (48, 6, 6)
    rows = list(csv.DictReader(open(tmp_path / "train.csv")))
    assert {r["label"] for r in rows} <= set(BBC_TOPICS) and all("\n" not in r["text"] for r in rows)
    again = tmp_path / "again"
    prepare_bbc(inputs["bbc"], again)
    assert (again / "test.csv").read_text() == (tmp_path / "test.csv").read_text()  # fixed split


def test_demo_runs_and_reports(inputs, tmp_path, capsys):
    out = tmp_path / "demo"
    args = argparse.Namespace(quick=False, budget="tiny", output_dir=str(out), progress=False,
                              runs="hierarchy", encoder=str(inputs["encoder"]),
                              tweets_csv=str(inputs["tweets"]), bbc_dir=str(inputs["bbc"]))
    res = run_mtl_demo(args)
    assert list(res["runs"]) == ["hierarchy"]  # (the other runs differ only in their mechanism flags)
    for run in res["runs"].values():
        assert set(run["tasks"]) == {"sentiment", "news"}
        for scores in run["tasks"].values():
            assert 0 <= scores["dev"]["acc"] <= 1 and 0 <= scores["test"]["acc"] <= 1
    weights = res["runs"]["hierarchy"]["layer_weights"]
    assert set(weights) == {"sentiment", "news"} and len(weights["news"]) == 3
    table = (out / "results.md").read_text()
    assert table.strip() == results_table(res)
    assert "| hierarchy | hierarchy |" in table and "macro test" in table
    assert (out / "plots" / "layer_weights.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["budget"] == "tiny"
    assert "macro dev" in capsys.readouterr().out
