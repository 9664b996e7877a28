"""``bert-emd mtl train`` under ``torchrun --nproc_per_node=2`` (DDP, gloo, CPU), with one and with two
task batches per step: it completes, every rank trains on the same tasks in every step (the trainer's
per-step DEBUG line, written to a file per rank), and it reaches the weights of one process with
twice the per-device batch.

Why the two runs must agree: the task sampler is seeded by (seed, epoch), so every rank and the
single process draw the same task sequence and the same global task batches of 2 x 4 = 8 examples
(each rank takes every other example of the batch). Every task loss is a mean over the batch's
examples (sentence task) or labelled tokens (tagging task), and DDP averages the ranks' gradients,
so the mean of the ranks' gradients is the single process's gradient *only when every rank holds as
many examples and labelled tokens as the other*: here every row has exactly five one-token words
(which also leaves nothing to pad, so no rank pads to another length), every task has at least 8
rows (no task batch is short, which would split unevenly), and nothing is batch-dependent (no
dropout, no ``private`` mechanism, whose orthogonality loss couples a batch's examples). With rows
of different lengths the tagging loss would weight tokens differently on one and on two processes,
by design of the per-rank mean (as in any DDP run of ``transformers.Trainer``). Plain SGD: Adam
would magnify float noise in near-zero gradients. For the same reason the logged task losses
(``loss_<task>`` of every step, in the last checkpoint's ``trainer_state.json``) must be the single
process's: the trainer averages the ranks' means, and equal counts make that the mean over both.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")

from _distill_fixtures import assert_same_logged_losses, free_port  # noqa: E402
from bert_emd.cli import main  # noqa: E402

WORDS = [f"w{i}" for i in range(30)]
STEPS = 6
# the per-step line of MultiTaskTrainer._log_step_tasks
STEP_LINE = re.compile(r"rank (\d+) of (\d+), step (\d+): (.*)")
# runs the CLI with the trainer's per-step debug line written to <folder>/tasks.rank<RANK>.log
DRIVER = """\
import logging, os, sys
from bert_emd.cli import main
handler = logging.FileHandler(os.path.join(sys.argv[1], "tasks.rank%s.log" % os.environ["RANK"]))
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("bert_emd.mtl.trainer")
log.setLevel(logging.DEBUG)
log.addHandler(handler)
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes (OMP_NUM_THREADS=1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny dropout-free encoder with a word-level tokenizer, and two tasks of 32 five-word rows."""
    root = tmp_path_factory.mktemp("mtl_ddp")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = transformers.BertTokenizerFast(vocab=vocab)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    transformers.BertModel(cfg).save_pretrained(root / "encoder")
    tok.save_pretrained(root / "encoder")
    rnd = random.Random(0)
    with open(root / "sent.csv", "w") as f:
        f.write("text,label\n")
        for _ in range(32):
            y = rnd.randint(0, 1)
            f.write(" ".join(WORDS[rnd.randrange(15) + 15 * y] for _ in range(5)) + f",{'pos' if y else 'neg'}\n")
    with open(root / "tag.jsonl", "w") as f:
        for _ in range(32):
            toks = [rnd.choice(WORDS) for _ in range(5)]
            f.write(json.dumps({"tokens": toks, "tags": ["ABC"[int(t[1:]) // 10] for t in toks]}) + "\n")
    return root


def _config(root: Path, out: Path, batch_size: int, tasks_per_step: int) -> Path:
    """A two-task YAML (sentence classification + tagging, hierarchy and gate, uniform sampler)."""
    cfg = {
        "model": {"encoder": str(root / "encoder")},
        "mechanisms": {"hierarchy": {"mode": "learned"}, "gate": True, "dropout": 0.0},
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
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _argv(config: Path) -> list[str]:
    # one checkpoint, at the last step: the only trainer_state.json (log_history) a run writes
    return ["mtl", "train", "--config", str(config), "--max-steps", str(STEPS), "--optim", "sgd",
            "--dataloader_num_workers", "0", "--save_strategy", "steps", "--save_steps", str(STEPS)]


def _steps(lines: list[str]) -> list[tuple[int, int, int, list[tuple[str, int]]]]:
    """(rank, world size, step, [(task, examples), ...]) of each per-step debug line."""
    out = []
    for m in filter(None, map(STEP_LINE.fullmatch, lines)):
        batches = [(t, int(n)) for t, n in (part.split(" x ") for part in m[4].split(", "))]
        out.append((int(m[1]), int(m[2]), int(m[3]), batches))
    return out


@pytest.mark.parametrize("tasks_per_step", [1, 2])
def test_two_gloo_processes_same_tasks_and_match_one(workspace, tmp_path, caplog, tasks_per_step):
    """With ``tasks_per_step=2`` a step holds two task batches (one batch of 16 / 8 examples when the
    sampler draws the same task twice): they run in one forward of the DDP-wrapped model."""
    from safetensors.torch import load_file

    single = tmp_path / "single"
    with caplog.at_level(logging.DEBUG, logger="bert_emd.mtl.trainer"):
        assert main(_argv(_config(workspace, single, 8, tasks_per_step))) == 0
    one = _steps([r.getMessage() for r in caplog.records if r.name == "bert_emd.mtl.trainer"])
    assert [(rank, world, step) for rank, world, step, _ in one] == [(0, 1, s) for s in range(STEPS)]

    ddp = tmp_path / "ddp"
    logs = tmp_path / "logs"
    logs.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(driver), str(logs),
           *_argv(_config(workspace, ddp, 4, tasks_per_step)),
           "--ddp_backend", "gloo"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # (a) it completes and saves the model and the results
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = [json.loads((d / "mtl_results.json").read_text()) for d in (single, ddp)]
    assert res[0]["global_step"] == res[1]["global_step"] == STEPS

    # (b) every rank trained on the same tasks in every step as the single process, with half of
    # each of its task batches (4 examples of 8 per sampled task batch)
    ranks = [_steps((logs / f"tasks.rank{r}.log").read_text().splitlines()) for r in (0, 1)]
    for r, lines in enumerate(ranks):
        assert [(rank, world, step) for rank, world, step, _ in lines] == [(r, 2, s) for s in range(STEPS)]
    expected = [[(t, n // 2) for t, n in batches] for *_, batches in one]
    assert {t for batches in expected for t, _ in batches} == {"sent", "tag"}  # both tasks took steps
    assert all(n % 8 == 0 for *_, batches in one for _, n in batches)
    if tasks_per_step == 2:  # some step held two different tasks' batches
        assert any(len(batches) == 2 for *_, batches in one)
    for lines in ranks:
        assert [batches for *_, batches in lines] == expected

    # (c) the same weights (encoder, heads, gates, layer mixtures) and the same training loss (the
    # Trainer averages the ranks' losses) as one process with batch 8
    a, b = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=k)
    start = load_file(str(workspace / "encoder" / "model.safetensors"))
    moved = [k for k in start if not torch.allclose(start[k], a[f"encoder.{k}"])]
    assert len(moved) > len(start) // 2  # the encoder trained (not two copies of the initial weights)
    assert res[1]["training_loss"] == pytest.approx(res[0]["training_loss"], rel=1e-4, abs=1e-6)
    # (d) the same logged task losses at every step (logging_steps 1): each rank's loss_<task> is its
    # mean over its 4 of the task batch's 8 examples (sentence task) or over their 20 of 40 labelled
    # tokens (tagging: five one-token words per row), as many on each rank, so the trainer's mean over
    # the ranks is the single process's mean over all 8 / 40, up to float rounding. Rank 0's own
    # means (half the batch) would not be.
    state = f"checkpoint-{STEPS}/trainer_state.json"
    assert_same_logged_losses(single / state, ddp / state, STEPS)
