"""Data-parallel multi-task evaluation: :func:`bert_emd.mtl.evaluation.eval_shard` (which examples a rank
scores) and ``bert-emd mtl train`` under ``torchrun --nproc_per_node=2`` (gloo, CPU) with validation
data, where both evaluations -- the Trainer's ``evaluate`` after step 1 and the final one of the CLI --
run :func:`~bert_emd.mtl.evaluation.evaluate_tasks` with ``distributed``: each rank scores only its
contiguous shard of every task's examples and every rank returns the results of one process scoring
everything.

The validation sets: 7 sentences and 9 tagged rows of 1 to 8 words (odd sizes, rows of different
lengths: different padding in each batch, and tagging batch losses that are means over different
numbers of labelled tokens), and a task of 1 row (rank 1 scores nothing there and still takes part
in the gather). Batches of 3 examples: the shards' batches ([0, 3), [3, 5) | [5, 8), [8, 9) of the
tagging task) start elsewhere than one process's ([0, 3), [3, 6), [6, 9)), so the loss, a mean over
each of one process's batches, is recomputed from the gathered logits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")

import helpers  # noqa: E402
from bert_emd.mtl.evaluation import eval_shard  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # multi-process


EVAL_BATCH = 3
EVAL_ROWS = {"sent": 7, "tag": 9, "tiny": 1}
# driver: <folder> <CLI arguments...>. Each rank appends one line per evaluate_tasks call to
# <folder>/eval.rank<RANK>.jsonl: its `distributed` argument, the (task, examples) of every forward
# it ran, and the results it returned
DRIVER = """\
import json, os, sys
import bert_emd.mtl.evaluation as mt
from bert_emd.cli import main
from bert_emd.mtl.model import MultiTaskModel
folder, rank = sys.argv[1], os.environ["RANK"]
forwards = None
forward = MultiTaskModel.forward
def counting_forward(self, task, *args, **kwargs):
    if forwards is not None:
        forwards.append([task, len(kwargs["input_ids"])])
    return forward(self, task, *args, **kwargs)
MultiTaskModel.forward = counting_forward
evaluate_tasks = mt.evaluate_tasks
def recording_evaluate_tasks(*args, **kwargs):
    global forwards
    forwards = []
    try:
        res = evaluate_tasks(*args, **kwargs)
    finally:
        seen, forwards = forwards, None
    with open(os.path.join(folder, "eval.rank%s.jsonl" % rank), "a") as f:
        f.write(json.dumps({"distributed": kwargs.get("distributed"), "forwards": seen, "result": res}) + "\\n")
    return res
mt.evaluate_tasks = recording_evaluate_tasks
sys.exit(main(sys.argv[2:]))
"""


# ----------------------------------------------------------------------------- the shards
@pytest.mark.parametrize("n, world", [(0, 1), (0, 3), (1, 1), (1, 2), (2, 3), (3, 8), (7, 2), (9, 2), (10, 3),
                                      (10, 4), (16, 4), (17, 4), (100, 7)])
def test_shards_are_contiguous_blocks_covering_the_examples_in_rank_order(n, world):
    shards = [eval_shard(n, r, world) for r in range(world)]
    k = -(-n // world)
    assert [i for s in shards for i in s] == list(range(n))  # in rank order, each example once
    for r, s in enumerate(shards):
        assert s.step == 1 and s.start == min(n, r * k) and s.stop == min(n, (r + 1) * k)
        assert len(s) <= k
    assert all(len(s) == k for s in shards[: n // k if k else 0])  # the first ranks get full blocks


def test_shards_of_few_examples():
    assert [list(eval_shard(7, r, 2)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [list(eval_shard(10, r, 4)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    # fewer examples than ranks: the last ranks get none; no examples: nobody gets any
    assert [len(eval_shard(2, r, 4)) for r in range(4)] == [1, 1, 0, 0]
    assert [len(eval_shard(3, r, 8)) for r in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert [len(eval_shard(0, r, 3)) for r in range(3)] == [0, 0, 0]
    assert eval_shard(5, 0, 1) == range(5)


@pytest.mark.parametrize("n, rank, world", [(-1, 0, 1), (4, 0, 0), (4, 2, 2), (4, -1, 2)])
def test_bad_shards_are_refused(n, rank, world):
    with pytest.raises(ValueError):
        eval_shard(n, rank, world)


# ----------------------------------------------------------------------------- two processes
def _eval_data(root: Path) -> dict[str, Path]:
    """Validation files of :data:`EVAL_ROWS` rows of 1 to 8 words."""
    rnd = random.Random(1)
    words = helpers.MTL_WORDS
    paths = {t: root / f"{t}_dev.{'jsonl' if t == 'tag' else 'csv'}" for t in EVAL_ROWS}
    for task in ("sent", "tiny"):
        with open(paths[task], "w") as f:
            f.write("text,label\n")
            for _ in range(EVAL_ROWS[task]):
                y = rnd.randint(0, 1)
                row = " ".join(words[rnd.randrange(15) + 15 * y] for _ in range(rnd.randint(1, 8)))
                f.write(f"{row},{'pos' if y else 'neg'}\n")
    with open(paths["tag"], "w") as f:
        for _ in range(EVAL_ROWS["tag"]):
            toks = [rnd.choice(words) for _ in range(rnd.randint(1, 8))]
            f.write(json.dumps({"tokens": toks, "tags": ["ABC"[int(t[1:]) // 10] for t in toks]}) + "\n")
    return paths


def _config(mtl_ddp_workspace: Path, out: Path) -> Path:
    """The two-task YAML of the multi-task DDP tests (batch 4 per process) with validation files, a
    third task ``tiny`` (a sentence task of one validation row), evaluation after every step, and
    evaluation batches of :data:`EVAL_BATCH`."""
    path = helpers.mtl_ddp_config(mtl_ddp_workspace, out, 4, 1)
    cfg = yaml.safe_load(path.read_text())
    dev = _eval_data(out.parent)
    tiny = json.loads(json.dumps(cfg["tasks"][0]))
    tiny["name"] = "tiny"
    cfg["tasks"].append(tiny)
    for task in cfg["tasks"]:
        task["data"]["validation"] = str(dev[task["name"]])
    cfg["training"].update(eval_strategy="steps", eval_batch_size=EVAL_BATCH)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _assert_same_results(got: dict, ref: dict, what: str) -> None:
    """``got`` is ``ref``: the same tasks and n, metrics to 1e-6, the loss to 1e-5 relative."""
    assert got["tasks"].keys() == ref["tasks"].keys(), what
    for task, scores in ref["tasks"].items():
        assert got["tasks"][task].keys() == scores.keys(), (what, task)
        assert got["tasks"][task]["n"] == scores["n"] == EVAL_ROWS[task], (what, task)
        for k, v in scores.items():
            tol = dict(rel=1e-5) if k == "loss" else dict(rel=0, abs=1e-6)
            assert got["tasks"][task][k] == pytest.approx(v, **tol), (what, task, k)
    assert got["macro_avg"] == pytest.approx(ref["macro_avg"], rel=0, abs=1e-6), what


def test_two_gloo_processes_each_score_their_shard_and_get_the_single_process_results(mtl_ddp_workspace, tmp_path):
    """``bert-emd mtl train --max-steps 1`` on two gloo processes with validation data: the Trainer's
    evaluation after step 1 and the CLI's final one (both of the final weights) are sharded (every
    rank ran forwards of its own shard's examples only, in batches of at most 3) and return on both
    ranks exactly the same results, which are one process's ``evaluate_tasks`` of the saved model
    (logged in ``trainer_state.json`` and written to ``mtl_results.json`` by rank 0)."""
    from bert_emd.mtl import MultiTaskModel
    from bert_emd.mtl.cli_commands import _tokenizer, prepare_data
    from bert_emd.mtl.data import MultiTaskCollator
    from bert_emd.mtl.evaluation import evaluate_tasks
    from bert_emd.mtl.yaml_config import load_config

    out = tmp_path / "ddp"
    config = _config(mtl_ddp_workspace, out)
    logs = tmp_path / "logs"
    logs.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    argv = ["mtl", "train", "--config", str(config), "--max-steps", "1", "--optim", "sgd",
            "--dataloader_num_workers", "0"]
    proc = helpers.torchrun_two(driver, [str(logs), *argv])
    assert proc.stdout.count("macro average") == 1, proc.stdout[-3000:]  # the table: once, not per rank

    # one process scoring the saved model (rank 0's weights, which DDP keeps equal to rank 1's)
    cfg = load_config(str(config))
    tokenizer = _tokenizer(cfg)
    _, eval_sets = prepare_data(cfg, tokenizer)
    assert {t: len(ds) for t, ds in eval_sets.items()} == EVAL_ROWS
    model = MultiTaskModel.from_pretrained(out)
    collator = MultiTaskCollator(list(model.specs.values()), tokenizer.pad_token_id or 0)
    ref = evaluate_tasks(model, eval_sets, collator, batch_size=EVAL_BATCH, device="cpu")

    calls = [[json.loads(line) for line in (logs / f"eval.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [len(c) for c in calls] == [2, 2]  # the Trainer's evaluation at step 1, the CLI's final one
    for r, rank_calls in enumerate(calls):
        for i, call in enumerate(rank_calls):
            assert call["distributed"] is True, (r, i)
            # this rank's forwards: its shard of each task, in batches of EVAL_BATCH
            expected = []
            for task, n in EVAL_ROWS.items():
                shard = len(eval_shard(n, r, 2))
                expected += [[task, min(EVAL_BATCH, shard - s)] for s in range(0, shard, EVAL_BATCH)]
            assert call["forwards"] == expected, (r, i)
            _assert_same_results(call["result"], ref, f"rank {r}, call {i}")
            assert call["result"] == calls[0][i]["result"], (r, i)  # the same numbers on both ranks
    assert [n for task, n in calls[1][0]["forwards"] if task == "tiny"] == []  # rank 1: no tiny example
    # the different batch boundaries matter for the tagging loss (a mean over each batch's tokens):
    # the forwards' batches alone would have given another loss
    assert [b for t, b in calls[1][0]["forwards"] if t == "tag"] == [3, 1]

    # rank 0 wrote what it computed: the final evaluation, and the Trainer's logged metrics
    res = json.loads((out / "mtl_results.json").read_text())
    _assert_same_results(res["eval"], ref, "mtl_results.json")
    logged = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_macro_avg" in h]
    assert len(logged) == 1
    for task, scores in ref["tasks"].items():
        for k, v in scores.items():
            tol = dict(rel=1e-5) if k == "loss" else dict(rel=0, abs=1e-6)
            assert logged[0][f"eval_{task}_{k}"] == pytest.approx(v, **tol), (task, k)
    assert logged[0]["eval_macro_avg"] == pytest.approx(ref["macro_avg"], rel=0, abs=1e-6)


def test_distributed_without_a_process_group_is_the_default(mtl_ddp_workspace, tmp_path):
    """``distributed=True`` in a single process (no process group) scores everything, as the default."""
    from bert_emd.mtl import MultiTaskModel
    from bert_emd.mtl.cli_commands import _tokenizer, build_model, prepare_data
    from bert_emd.mtl.data import MultiTaskCollator
    from bert_emd.mtl.evaluation import evaluate_tasks
    from bert_emd.mtl.yaml_config import load_config

    cfg = load_config(str(_config(mtl_ddp_workspace, tmp_path / "one")))
    tokenizer = _tokenizer(cfg)
    _, eval_sets = prepare_data(cfg, tokenizer)
    model = build_model(cfg)
    assert isinstance(model, MultiTaskModel)
    collator = MultiTaskCollator(list(model.specs.values()), tokenizer.pad_token_id or 0)
    a = evaluate_tasks(model, eval_sets, collator, batch_size=EVAL_BATCH)
    b = evaluate_tasks(model, eval_sets, collator, batch_size=EVAL_BATCH, distributed=True)
    assert a == b and {t: s["n"] for t, s in a["tasks"].items()} == EVAL_ROWS
