"""``bert-emd study``: the paired hierarchical bootstrap on synthetic data with known answers, the
generated reading, ``distill --no-prediction``, and the whole study on a tiny budget (a tiny local
teacher and a synthetic tweet CSV) including ``--resume``."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from bert_emd.distill.study_stats import hierarchical_bootstrap, reading, row_summary


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_exact_cases():
    ones, zeros = np.ones((3, 50)), np.zeros((3, 50))
    r = hierarchical_bootstrap(ones, zeros, n_boot=200)
    assert (r["diff"], r["lo"], r["hi"]) == (1.0, 1.0, 1.0)
    assert (r["seeds"], r["examples"]) == (3, 50)
    same = np.random.default_rng(0).integers(0, 2, size=(3, 40))
    r = hierarchical_bootstrap(same, same, n_boot=200)
    assert (r["diff"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)
    # one seed given as a 1-D vector
    r = hierarchical_bootstrap(np.r_[np.ones(30), np.zeros(10)], np.r_[np.zeros(30), np.zeros(10)], n_boot=100)
    assert r["seeds"] == 1 and r["diff"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        hierarchical_bootstrap(np.ones((2, 5)), np.ones((3, 5)))


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, (3, 300)), rng.integers(0, 2, (3, 300))
    assert hierarchical_bootstrap(a, b, seed=4) == hierarchical_bootstrap(a, b, seed=4)
    assert hierarchical_bootstrap(a, b, seed=4) != hierarchical_bootstrap(a, b, seed=5)


def test_bootstrap_example_level_width_matches_theory():
    # no seed effect: every seed's correctness is an independent Bernoulli draw per example, p 0.7 vs 0.6.
    # The paired difference's sd over examples: var(d) = 0.7*0.3 + 0.6*0.4 = 0.45 per seed; the mean over
    # S seeds of the same N examples averages their (independent) noise: sd ~ sqrt(0.45 / (S N)).
    rng = np.random.default_rng(0)
    S, N = 4, 5000
    a = (rng.random((S, N)) < 0.7).astype(int)
    b = (rng.random((S, N)) < 0.6).astype(int)
    r = hierarchical_bootstrap(a, b, n_boot=1000, seed=0)
    assert r["lo"] < 0.1 < r["hi"]
    half = (r["hi"] - r["lo"]) / 2
    # the seed resampling adds the spread of the per-seed means (same order): within a factor 2 of theory
    theory = 1.96 * np.sqrt(0.45 / (S * N))
    assert theory < half < 2.5 * theory


def test_bootstrap_seed_level_variation_widens_the_interval():
    # A beats B by 10 points under two seeds and loses by 10 under the two others. Averaged over the
    # seeds every example's difference is 0, so resampling the examples alone gives a zero-width
    # interval; resampling the seeds first must give the spread of the seeds (-10 to +10 points).
    S, N = 4, 4000
    a, b = np.zeros((S, N), dtype=int), np.zeros((S, N), dtype=int)
    a[:2, :400] = 1
    b[2:, :400] = 1
    r = hierarchical_bootstrap(a, b, n_boot=2000, seed=0)
    assert r["diff"] == 0.0
    assert r["lo"] == pytest.approx(-0.1, abs=0.026) and r["hi"] == pytest.approx(0.1, abs=0.026)


def test_bootstrap_detects_a_consistent_gain():
    rng = np.random.default_rng(3)
    S, N = 3, 3000
    b = (rng.random((S, N)) < 0.6).astype(int)
    a = b.copy()
    flip = rng.random((S, N)) < 0.1  # A gets right a tenth of the examples B gets wrong, and all B gets right
    a[(b == 0) & flip] = 1
    r = hierarchical_bootstrap(a, b, n_boot=1000)
    assert r["lo"] > 0 and r["diff"] == pytest.approx((a - b).mean())


def test_reading_claims_only_what_the_intervals_support():
    t = row_summary([0.6, 0.61, 0.62])
    rows = [
        {"key": "emd", "name": "EMD", "test": t, "vs_ref": None},
        {"key": "skip", "name": "skip", "test": t, "vs_ref": {"diff": 0.004, "lo": -0.01, "hi": 0.02, "seeds": 3,
                                                            "examples": 3000}},
        {"key": "no-teacher", "name": "no teacher", "test": t,
         "vs_ref": {"diff": -0.05, "lo": -0.07, "hi": -0.03, "seeds": 3, "examples": 3000}},
    ]
    text = reading(rows, reference="emd")
    assert "EMD beats no teacher by 5.0 points" in text and "skip include 0" in text
    assert "no measurable gain over the fixed mappings" in text
    rows[2]["vs_ref"] = {"diff": -0.01, "lo": -0.03, "hi": 0.01, "seeds": 3, "examples": 3000}
    assert "No interval excludes 0" in reading(rows, reference="emd")
    for r in rows[1:]:
        r["vs_ref"]["seeds"] = 1
    assert "one seed" in reading(rows, reference="emd")


# ----------------------------------------------------------------------------- the study, tiny budget
pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from bert_emd.cli import main  # noqa: E402
from helpers import make_teacher, sentiment_rows, tweets_csv  # noqa: E402


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_inputs")
    teacher = make_teacher(root / "enc", layers=6, classifier=False)
    return ["--teacher-model", str(teacher), "--data-csv", str(tweets_csv(root / "tweets.csv", n=120))]


def test_no_prediction_trains_the_layer_terms_only(tmp_path, stand_ins):
    from bert_emd.distill.cli_commands import run_distill, run_finetune

    data = tmp_path / "d.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(sentiment_rows(32))
    common = ["--train-file", str(data), "--labels", "negative,positive", "--max-length", "16", "--no-plots",
              "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
              "--logging_steps", "1", "--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True"]
    teacher = tmp_path / "teacher"
    run_finetune(["--model", stand_ins[1], *common, "--output-dir", str(teacher), "--max_steps", "1"])
    run_distill(["--teacher", str(teacher), *common, "--student-layers", "2", "--no-prediction",
                 "--output-dir", str(tmp_path / "s"), "--max_steps", "2"])
    logs = [e for e in json.loads((tmp_path / "s" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert logs and all(e["loss_prediction"] == 0.0 and e["loss_hidden"] > 0 for e in logs)
    assert main(["distill", "--teacher", str(teacher), *common, "--student-layers", "2", "--no-prediction",
                 "--prediction-only", "--output-dir", str(tmp_path / "t")]) == 2


@pytest.mark.slow  # the whole study pipeline end to end
def test_study_on_a_tiny_budget_and_resume(tmp_path, stand_ins, capsys):
    out = tmp_path / "study"
    argv = ["study", "--budget", "test", "--output-dir", str(out), *stand_ins]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    keys = [r["key"] for r in result["rows"]]
    assert keys == ["emd", "skip", "last", "uniform", "emd-per-sample", "emd-sum", "emd-teacher-layers",
                    "no-stage-1", "no-teacher"]
    n_test = result["data"]["test"]
    for r in result["rows"]:
        assert 0.0 <= r["test"]["mean"] <= 1.0 and r["seeds"] == [0]
        assert (r["vs_ref"] is None) == (r["key"] == "emd")
        run = json.loads((out / "runs" / f"{r['key']}-seed0" / "result.json").read_text())
        assert len(run["test_correct"]) == n_test and set(run["test_correct"]) <= {"0", "1"}
        assert ("stage1" in run) == (r["key"] not in ("no-stage-1", "no-teacher"))
        assert not (out / "runs" / f"{r['key']}-seed0" / "stage2" / "model.safetensors").exists()  # scored, removed
    # stage 1 never sees a gold label: a placeholder label, and no prediction term
    with open(out / "data" / "transfer.csv", encoding="utf-8") as f:
        assert {row["label"] for row in csv.DictReader(f)} == {"negative"}
    hist = json.loads((out / "runs" / "skip-seed0" / "stage1" / "trainer_state.json").read_text())["log_history"]
    assert all(e["loss_prediction"] == 0.0 for e in hist if "loss" in e)
    assert "ETA" in printed and "[9/9]" in printed
    md = (out / "results.md").read_text()
    assert md.strip() in printed
    for needle in ("| EMD | ", "| skip (TinyBERT) |", "reference", "**Reading.**", "git commit", "Machine:",
                   "bert-emd study --budget test", "majority class", "Stage 1"):
        assert needle in md
    assert {p.name for p in (out / "plots").glob("*.png")} == {"accuracy.png", "stage1_loss.png"}
    assert {p.name for p in (out / "plots" / "emd_run").glob("*.png")} == {"layer_weights.png", "transport.png",
                                                                           "loss.png"}

    # a non-empty output folder without --resume: one line, exit status 2
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err
    # --resume: every finished run (and the teacher) is reused; one more seed of two rows runs
    assert main([*argv, "--resume", "--seeds", "2", "--rows", "emd,no-teacher"]) == 0
    printed = capsys.readouterr().out
    assert "teacher: reusing" in printed and printed.count(": cached ") == 2
    result = json.loads((out / "results.json").read_text())
    assert [r["seeds"] for r in result["rows"]] == [[0, 1], [0, 1]]
    assert result["rows"][1]["vs_ref"]["seeds"] == 2
    # another budget in the same folder is refused
    assert main([*argv, "--resume", "--stage2-lr", "0.5"]) == 2
    assert "another budget" in capsys.readouterr().err

    # a dev-only pilot with other learning rates reuses a copied teacher and never reads the test split
    pilot = tmp_path / "pilot"
    pilot.mkdir()
    shutil.copytree(out / "teacher", pilot / "teacher")
    assert main(["study", "--budget", "test", "--output-dir", str(pilot), *stand_ins, "--resume", "--dev-only",
                 "--rows", "emd,skip", "--stage1-lr", "1e-3"]) == 0
    assert "teacher: reusing" in capsys.readouterr().out
    result = json.loads((pilot / "results.json").read_text())
    assert result["dev_only"] and all(r["test"] is None and r["vs_ref"] is None for r in result["rows"])
    assert not list((pilot / "data").glob("test_*.csv"))  # no test subset was even written
    run = json.loads((pilot / "runs" / "skip-seed0" / "result.json").read_text())
    assert run["test_acc"] is None and "test_correct" not in run
    assert "| skip (TinyBERT) |" in (pilot / "results.md").read_text()
