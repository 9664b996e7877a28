"""The multi-task demo end to end on tiny stand-ins (a tiny encoder, a few tweets, a few BBC-style
articles): the splits, the runs, the table and the layer-weight plot."""

import argparse
import csv
import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from bert_emd.mtl.demo import BBC_TOPICS, prepare_bbc, results_table, run_mtl_demo  # noqa: E402

WORDS = ["good", "bad", "ok", "market", "film", "vote", "goal", "chip", "the", "a", "is", "new"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtl_demo")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = transformers.BertTokenizerFast(vocab=vocab)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    enc = root / "encoder"
    transformers.BertModel(cfg).save_pretrained(enc)
    tok.save_pretrained(enc)
    rnd = random.Random(0)
    tweets = root / "tweets.csv"
    with open(tweets, "w", encoding="latin-1", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentiment", "confidence", "text"])
        for _ in range(80):
            s = rnd.choice(["negative", "neutral", "positive"])
            w.writerow([s, "0.9", " ".join(rnd.choice(WORDS) for _ in range(5))])
    bbc = root / "bbc"
    for k, topic in enumerate(BBC_TOPICS):
        (bbc / topic).mkdir(parents=True)
        for i in range(12):
            body = " ".join(WORDS[3 + k] for _ in range(6))
            (bbc / topic / f"{i:03d}.txt").write_text(f"{WORDS[3 + k]} title\n\n{body}")
    return {"root": root, "encoder": enc, "tweets": tweets, "bbc": bbc}


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
