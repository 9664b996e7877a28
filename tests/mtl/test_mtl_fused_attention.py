"""Multi-task distillation with ``fused_attention``: the attention costs come from the hooked
queries and keys (``bert_emd.attention_costs``), equal to the map-based costs, without attention
maps or eager attention; ``bert-emd mtl train --fused-attention`` (or the YAML's
``distillation.fused_attention`` / ``attention_source``) end to end; clear errors."""

from __future__ import annotations

import copy
import json

import helpers
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")

import bert_emd.mtl as mtl  # noqa: E402
from bert_emd.errors import UsageError  # noqa: E402
from bert_emd.mtl.cli_commands import main  # noqa: E402
from helpers import make_teacher, sentiment_rows, write_table  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

VOCAB, L, B, D = 50, 10, 8, 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_calls(monkeypatch):
    """(output_attentions requested?, attention implementation) of every Hugging Face model call."""
    calls: list[tuple[bool, str]] = []
    forward = PreTrainedModel.__call__

    def spy(self, *a, **kw):
        calls.append((bool(kw.get("output_attentions")), self.config._attn_implementation))
        return forward(self, *a, **kw)

    monkeypatch.setattr(PreTrainedModel, "__call__", spy)
    return calls


def bert(layers: int, seed: int, num_labels: int | None = None, heads: int = 4):
    """A tiny BERT (seeded): the bare encoder without pooler, or a classifier with ``num_labels``."""
    torch.manual_seed(seed)
    if num_labels is None:
        return helpers.tiny_bert("encoder-no-pool", vocab=VOCAB, hidden=D, layers=layers, heads=heads)
    return helpers.tiny_bert(vocab=VOCAB, hidden=D, layers=layers, heads=heads, labels=num_labels).eval()


def specs() -> list[mtl.TaskSpec]:
    return [mtl.TaskSpec("t0", "single", 2, data={"train": "x.csv"}),
            mtl.TaskSpec("t1", "single", 3, data={"train": "x.csv"})]


def batch(task: str, g: torch.Generator, n_labels: int) -> dict:
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[: B // 2, -3:] = 0  # padded rows: the padding mask matters
    return {"task": task, "input_ids": ids, "attention_mask": mask, "labels": ids[:, 1] % n_labels}


def models(multitask_teacher: bool):
    ts = specs()
    student = mtl.MultiTaskModel(bert(2, 0), ts, mtl.MechanismConfig(dropout=0.0))
    if multitask_teacher:
        teacher = mtl.MultiTaskModel(bert(4, 1), ts, mtl.MechanismConfig(dropout=0.0)).eval()
        teachers = mtl.TeacherSet(multitask=teacher)
    else:
        teachers = mtl.TeacherSet({"t0": bert(3, 1, 2), "t1": bert(4, 2, 3)})
    return ts, student, teachers


def to_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model whose Hugging Face (sub)models run SDPA attention."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("multitask_teacher", [False, True], ids=["per-task-teachers", "multitask-teacher"])
@pytest.mark.parametrize("source", ["probs", "scores"])
def test_fused_attention_equals_the_map_based_loss(model_calls, source, multitask_teacher):
    """Same models, same batches (three task batches in a step, one task twice, so a teacher runs
    twice in it): the fused run's attention terms, total, student gradients and layer weights equal
    the map-based run's (probs: eager ``output_attentions``; scores: maps formed from the hooks),
    while the fused run requests no maps and keeps SDPA."""
    ts, student, teachers = models(multitask_teacher)
    f_student, f_teachers = to_sdpa(student), to_sdpa(teachers)  # (copied before any hook is attached)
    kw = dict(attention_source=source, beta=1.0, normalize="sum")
    ref = mtl.MultiTaskEMDLoss.from_models(ts, student, teachers, **kw)
    fused = mtl.MultiTaskEMDLoss.from_models(ts, f_student, f_teachers, fused_attention=True, **kw)
    fused.load_state_dict(ref.state_dict())  # the same projections
    assert ref.wants_attention_maps is (source == "probs") and not fused.wants_attention_maps
    g = torch.Generator().manual_seed(0)
    steps = [[batch("t0", g, 2), batch("t1", g, 3), batch("t0", g, 2)], [batch("t1", g, 3)]]
    for step in steps:
        model_calls.clear()
        total_r, parts_r, _ = mtl.distillation_step(student, teachers, ref, step)
        maps = source == "probs"  # the map-based probs run needs eager attention maps
        assert model_calls and all(c == (maps, "eager") for c in model_calls), model_calls
        model_calls.clear()
        total_f, parts_f, _ = mtl.distillation_step(f_student, f_teachers, fused, step)
        assert model_calls and all(c == (False, "sdpa") for c in model_calls), model_calls
        for key, v in parts_r.items():
            assert parts_f[key].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-7), key
        assert parts_f["attention"] > 0
        assert total_f.item() == pytest.approx(total_r.item(), rel=1e-5)
        student.zero_grad()
        f_student.zero_grad()
        total_r.backward()
        total_f.backward()
        # the student's whole gradient (eager vs SDPA rounding in the other terms: ~5e-5 of its norm)
        fused_params = dict(f_student.named_parameters())
        names = [n for n, p in student.named_parameters() if p.grad is not None]
        g_r = torch.cat([student.get_parameter(n).grad.flatten() for n in names])
        g_f = torch.cat([fused_params[n].grad.flatten() for n in names])
        assert (g_f - g_r).norm() <= 2e-4 * g_r.norm()
    for task, w in ref.task_layer_weights().items():
        for who in ("student", "teacher"):
            torch.testing.assert_close(fused.task_layer_weights()[task][who], w[who], rtol=1e-5, atol=1e-7)
    ref.detach_models()
    fused.detach_models()


def test_fused_attention_misconfigured_errors():
    ts, student, teachers = models(False)
    g = torch.Generator().manual_seed(0)
    step = [batch("t0", g, 2)]
    unhooked = mtl.MultiTaskEMDLoss(ts, 2, D, {"t0": 3, "t1": 4}, {"t0": D, "t1": D}, fused_attention=True)
    hint = r"fused_attention=True needs the models hooked: build the loss with MultiTaskEMDLoss.from_models"
    with pytest.raises(RuntimeError, match=hint):
        mtl.distillation_step(student, teachers, unhooked, step)
    outputs = {"hidden_states": tuple(torch.randn(B, L, D) for _ in range(3)), "logits": torch.randn(B, 2)}
    t_out = {"hidden_states": tuple(torch.randn(B, L, D) for _ in range(4)), "logits": torch.randn(B, 2)}
    with pytest.raises(RuntimeError, match=hint):  # called directly without the queries and keys
        unhooked([mtl.TaskDistillInput("t0", outputs, t_out)])
    scores = mtl.MultiTaskEMDLoss(ts, 2, D, {"t0": 3, "t1": 4}, {"t0": D, "t1": D}, attention_source="scores")
    with pytest.raises(RuntimeError, match="attention_source='scores' needs the models hooked"):
        mtl.distillation_step(student, teachers, scores, step)
    with pytest.raises(ValueError, match="attention_source must be 'probs' or 'scores', got 'maps'"):
        mtl.MultiTaskEMDLoss(ts, 2, D, {"t0": 3, "t1": 4}, {"t0": D, "t1": D}, attention_source="maps")
    # the map-based loss without maps points to the fused path
    maps = mtl.MultiTaskEMDLoss(ts, 2, D, {"t0": 3, "t1": 4}, {"t0": D, "t1": D})
    with pytest.raises(ValueError, match="task 't0': the student returned no .* fused_attention=True"):
        maps([mtl.TaskDistillInput("t0", outputs, t_out)])
    # heads are compared one by one: a 2-head student against 4-head teachers
    narrow = mtl.MultiTaskModel(bert(2, 0, heads=2), ts, mtl.MechanismConfig(dropout=0.0))
    loss = mtl.MultiTaskEMDLoss.from_models(ts, narrow, teachers, fused_attention=True)
    with pytest.raises(ValueError, match=r"task 't0': student attention \(8, 2, 10, 10\) and teacher attention "
                                         r"\(8, 4, 10, 10\) differ"):
        mtl.distillation_step(narrow, teachers, loss, step)
    loss.detach_models()
    # a model without BERT-family attention cannot be hooked
    with pytest.raises(ValueError, match="no BERT-family self-attention module"):
        unhooked.attach(student, mtl.TeacherSet({"t0": torch.nn.Linear(2, 2), "t1": bert(4, 2, 3)}))


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 2-layer encoder, teachers of 3 and 4 layers, two sentiment tasks (local files only)."""
    root = tmp_path_factory.mktemp("mtl_fused")
    make_teacher(root / "encoder", classifier=False, layers=2, seed=0)
    make_teacher(root / "teacher_a", num_labels=2, layers=3, seed=1)
    make_teacher(root / "teacher_b", num_labels=2, layers=4, seed=2)
    for name, seed in (("a", 0), ("b", 1)):
        write_table(root / f"{name}_train.csv", sentiment_rows(16, seed=seed))
        write_table(root / f"{name}_dev.csv", sentiment_rows(8, seed=seed + 10))
    return root


def _config(root, out, distillation: bool = True, **distill_keys):
    data = {"label_list": ["negative", "positive"]}
    cfg = {
        "model": {"encoder": str(root / "encoder")},
        "sampler": {"kind": "uniform"},
        "training": {"output_dir": str(out), "batch_size": 4, "lr": 1e-3, "max_length": 24, "logging_steps": 1,
                     "eval_strategy": "no", "save_strategy": "no", "seed": 1, "tasks_per_step": 2},
        "tasks": [
            {"name": n, "type": "single", "num_labels": 2, "teacher": str(root / f"teacher_{n}"),
             "data": {"train": f"{n}_train.csv", "validation": f"{n}_dev.csv", **data}}
            for n in ("a", "b")
        ],
    }
    if distillation:
        cfg["distillation"] = {"beta": 1.0, "normalize": "sum", **distill_keys}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_mtl_train_fused_attention_cli(workspace, model_calls):
    """``bert-emd mtl train --fused-attention``: no model is asked for maps or switched to eager
    attention, the run is recorded as fused, and it logs the map-based run's attention terms."""
    runs = {}
    for fused in (False, True):
        out = workspace / f"run_fused{int(fused)}"
        model_calls.clear()
        argv = ["mtl", "train", "--config", str(_config(workspace, out)), "--max-steps", "2"]
        assert main(argv + (["--fused-attention"] if fused else [])) == 0
        res = json.loads((out / "mtl_results.json").read_text())
        assert res["fused_attention"] is fused and res["attention_source"] == "probs"
        if fused:
            assert model_calls and all(c == (False, "sdpa") for c in model_calls), model_calls
        else:  # eager everywhere, maps requested in training (not in evaluation)
            assert all(impl == "eager" for _, impl in model_calls) and any(a for a, _ in model_calls)
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        runs[fused] = [h for h in history if "loss_distill_attention" in h]
        assert len(runs[fused]) == 2
    for a, b in zip(runs[False], runs[True]):
        assert b["loss_distill_attention"] > 0
        assert b["loss_distill_attention"] == pytest.approx(a["loss_distill_attention"], rel=1e-4, abs=1e-8)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_mtl_train_fused_attention_needs_distillation(workspace):
    out = workspace / "run_plain"
    with pytest.raises(UsageError, match="--fused-attention applies to distillation"):
        main(["mtl", "train", "--config", str(_config(workspace, out, distillation=False)), "--fused-attention"])


@pytest.mark.parametrize("keys, fused, source", [({"fused_attention": True}, True, "probs"),
                                                 ({"attention_source": "scores"}, False, "scores")],
                         ids=["yaml-fused", "yaml-scores"])
def test_mtl_train_attention_options_from_yaml(workspace, model_calls, keys, fused, source):
    """``distillation.fused_attention`` / ``attention_source`` in the YAML (no CLI flag) reach the
    loss and ``mtl_results.json``; neither asks any model for maps or switches it to eager."""
    from bert_emd.mtl.cli_commands import train_from_config
    from bert_emd.mtl.yaml_config import load_config

    out = workspace / f"run_yaml_{source}_{int(fused)}"
    cfg = load_config(_config(workspace, out, **keys))
    assert (cfg.distillation.fused_attention, cfg.distillation.attention_source) == (fused, source)
    model_calls.clear()
    train_from_config(cfg, max_steps=2, evaluate=False, quiet=True)
    res = json.loads((out / "mtl_results.json").read_text())
    assert res["fused_attention"] is fused and res["attention_source"] == source
    assert model_calls and all(c == (False, "sdpa") for c in model_calls), model_calls
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    terms = [h["loss_distill_attention"] for h in history if "loss_distill_attention" in h]
    assert len(terms) == 2 and all(t > 0 for t in terms)


def test_attention_maps_requested_only_for_unfused_probs(workspace):
    """Eager attention maps: only unfused ``"probs"``; the CLI flag (a bool) overrides the YAML."""
    from bert_emd.mtl.cli_commands import _needs_attention_maps
    from bert_emd.mtl.yaml_config import load_config

    def needs(flag, **keys):
        return _needs_attention_maps(load_config(_config(workspace, workspace / "maps", **keys)), flag)

    assert needs(None) and needs(False, fused_attention=True)
    assert not needs(True) and not needs(None, fused_attention=True)
    assert not needs(None, attention_source="scores") and not needs(True, attention_source="scores")
    assert not needs(None, use_attention=False)
    assert not _needs_attention_maps(load_config(_config(workspace, workspace / "maps", distillation=False)))
