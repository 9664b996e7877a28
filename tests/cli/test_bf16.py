"""Mixed precision end to end on the CPU: ``bert-emd distill`` and ``bert-emd mtl train`` with
``--use_cpu True --bf16 True`` (the Trainer's bf16 mode: CPU autocast to bfloat16 over float32
master weights), with our ops in the loop.

What shows that the bf16 path really ran (and not silently fp32): every ``nn.Linear`` of the
student *and of the teacher* returns bfloat16 during training (autocast was on around both; the
teacher runs under the trainer's ``accelerator.autocast()``), the attention costs of the hooked
queries and keys (``--attention-source scores``, and ``fused_attention``) receive bfloat16 inputs,
and every cost matrix comes out float32 (``layer_costs`` / ``attention_costs`` accumulate in fp32)
and is solved in float64 (``emd``). The training loss must fall and every logged term stay finite;
the saved student keeps the Trainer's float32 master weights.

Also: a checkpoint saved in bfloat16 (transformers 5 loads a checkpoint in its saved dtype) as
teacher, student or multi-task encoder must still train float32 weights (see
``bert_emd.model_files.float32_kwargs``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")

import bert_emd.nn.emd_terms as emd_terms  # noqa: E402
import helpers  # noqa: E402
from bert_emd.distill.cli_commands import run_distill  # noqa: E402
from bert_emd.distill.trainer import TRANSPORT_NAME, DistillationTrainer  # noqa: E402
from bert_emd.mtl.cli_commands import main as mtl_main  # noqa: E402
from bert_emd.mtl.trainer import MultiTaskTrainer  # noqa: E402
from helpers import make_teacher, sentiment_rows, write_table  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, one thread


_config = helpers.mtl_config

BF16 = ["--use_cpu", "True", "--bf16", "True"]
STEPS = 30

# one call of a spied op: (op, dtypes of its first argument, of its second (empty for emd), output dtype,
# dims of one layer: of the teacher's first tensor (the student's may come stacked, [M, ...]); emd: of the cost)
Call = tuple[str, frozenset, frozenset, torch.dtype, int]


def _flat(x: Any) -> list[torch.Tensor]:
    """The tensors of a tensor or of (nested) lists / tuples of tensors."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flat(item)]
    return []


def spy_ops(monkeypatch: pytest.MonkeyPatch, module: Any, names: tuple[str, ...]) -> list[Call]:
    """Wrap the ops ``names`` (``layer_costs``, ``attention_costs``, ``emd``) where ``module`` calls
    them and record one :data:`Call` per call (the output of ``emd`` is its plan)."""
    calls: list[Call] = []

    def wrap(name: str, real: Callable) -> Callable:
        def spy(first: Any, second: Any = None, *args: Any, **kwargs: Any) -> Any:
            out = real(first, second, *args, **kwargs)
            res = out if isinstance(out, torch.Tensor) else out.plan
            a, b = _flat(first), [] if name == "emd" else _flat(second)
            calls.append((name, frozenset(t.dtype for t in a), frozenset(t.dtype for t in b), res.dtype,
                          (b[0] if b else a[0]).dim()))
            return out

        return spy

    for name in names:
        monkeypatch.setattr(module, name, wrap(name, getattr(module, name)))
    return calls


def spy_linear_dtypes(monkeypatch: pytest.MonkeyPatch, trainer_cls: type) -> dict[str, set[torch.dtype]]:
    """Output dtypes of every ``nn.Linear`` of the student (``"student"``) and of the teacher
    (``"teacher"``, when the trainer has one) in the training steps of ``trainer_cls``: forward hooks
    installed at its first ``compute_loss``."""
    seen: dict[str, set[torch.dtype]] = {"student": set(), "teacher": set()}
    real = trainer_cls.compute_loss

    def compute_loss(self: Any, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(self, "_dtype_hooks", False):
            self._dtype_hooks = True
            for who, m in (("student", self.model), ("teacher", getattr(self, "teacher", None))):
                for mod in m.modules() if m is not None else ():
                    if isinstance(mod, nn.Linear):
                        mod.register_forward_hook(lambda _m, _i, out, who=who: seen[who].add(out.dtype))
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_cls, "compute_loss", compute_loss)
    return seen


def training_logs(out: Path) -> list[dict[str, float]]:
    """The training entries (those with a ``loss``) of a run's ``trainer_state.json``, in step order."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h]


def assert_finite_and_falling(logs: list[dict[str, float]], keys: tuple[str, ...] = ("loss",), k: int = 6) -> None:
    """Every logged ``loss*`` value is finite, and each of ``keys`` falls by 10 % or more from the
    mean of its first ``k`` logged values to the mean of its last ``k``."""
    for h in logs:
        assert all(math.isfinite(v) for name, v in h.items() if name.startswith("loss")), h
    for key in keys:
        values = [h[key] for h in logs if key in h]
        first, last = sum(values[:k]) / k, sum(values[-k:]) / k
        assert last < 0.9 * first, (key, values)


def to_bfloat16(folder: Path, auto_cls: Any) -> Path:
    """Save the checkpoint in ``folder`` again in bfloat16 (config ``dtype`` included)."""
    auto_cls.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


def assert_float32_checkpoint(out: Path) -> None:
    """Every tensor of ``out/model.safetensors`` is float32."""
    from safetensors.torch import load_file

    dtypes = {v.dtype for v in load_file(str(out / "model.safetensors")).values()}
    assert dtypes == {torch.float32}, dtypes


@pytest.fixture(scope="module")
def distill_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny 4-layer teacher and 32 training rows, shared by the distillation runs."""
    root = tmp_path_factory.mktemp("bf16")
    return {"teacher": make_teacher(root / "teacher"), "train": write_table(root / "train.csv", sentiment_rows(32))}


def distill_argv(teacher: Path, train: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """``bert-emd distill`` arguments: a fresh 2-layer student, batch 8, Adam at 1e-3, a log per step."""
    return [
        "--teacher", str(teacher), "--train-file", str(train), "--labels", "negative,positive",
        "--beta", "1.0", "--max-length", "16", "--output-dir", str(out), "--no-plots",
        "--per_device_train_batch_size", "8", "--max_steps", str(steps), "--learning_rate", "1e-3",
        "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "3",
        "--logging_steps", "1", *extra,
    ]


@pytest.mark.parametrize("source,fused", [("probs", False), ("scores", False), ("scores", True), ("probs", True)])
def test_distill_bf16(distill_data, tmp_path, monkeypatch, source, fused):
    """``bert-emd distill --bf16`` with each attention source, with the maps (``fused`` False: eager
    ``output_attentions`` for probs, hooks for scores) and with ``--fused-attention`` (costs from the
    hooked queries and keys)."""
    calls = spy_ops(monkeypatch, emd_terms, ("layer_costs", "attention_costs", "emd"))
    linear = spy_linear_dtypes(monkeypatch, DistillationTrainer)
    out = tmp_path / "out"
    run_distill(distill_argv(distill_data["teacher"], distill_data["train"], out, STEPS,
                             "--student-layers", "2", "--attention-source", source, *BF16,
                             *(["--fused-attention"] if fused else [])))
    assert not torch.is_autocast_enabled("cpu")  # autocast ended with the run

    # autocast ran around the student and around the teacher
    assert linear == {"student": {torch.bfloat16}, "teacher": {torch.bfloat16}}
    # our ops: float32 costs from bf16 (autocast) or fp32 inputs, float64 solves; per step one call per
    # cost matrix and one solve per feature. Attention maps and hidden states may reach the ops in fp32
    # even under autocast (CPU autocast runs softmax and LayerNorm in fp32, accelerate casts the
    # student's outputs back to fp32, and the loss and its projection run outside autocast)
    by_op: dict[str, list[Call]] = {}
    for call in calls:
        kind = "hidden" if call[0] == "layer_costs" and call[4] == 3 else "attention" if call[0] != "emd" else "emd"
        by_op.setdefault(kind, []).append(call)
    assert {k: len(v) for k, v in by_op.items()} == {"attention": STEPS, "hidden": STEPS, "emd": 2 * STEPS}
    assert {c[0] for c in by_op["attention"]} == {"attention_costs" if fused else "layer_costs"}
    for name, s, t, res, _ in by_op["attention"] + by_op["hidden"]:
        assert res == torch.float32 and s | t <= {torch.float32, torch.bfloat16}, (name, s, t, res)
    if fused or source == "scores":  # the hooked projections' outputs: bf16 under autocast, on both sides
        assert all(s == t == {torch.bfloat16} for _, s, t, _, _ in by_op["attention"]), by_op["attention"]
    assert {(s, c[3]) for c in by_op["emd"] for s in c[1]} == {(torch.float64, torch.float64)}

    logs = training_logs(out)
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    assert_finite_and_falling(logs, ("loss", "loss_hidden"))
    transport = json.loads((out / TRANSPORT_NAME).read_text())
    for feature in ("attention", "hidden"):
        plan = torch.tensor(transport[feature]["plan"])
        assert torch.isfinite(torch.tensor(transport[feature]["cost"])).all() and abs(plan.sum() - 1) < 1e-6

    # the Trainer keeps float32 master weights under bf16 autocast: the student is saved (and loads) in float32
    assert_float32_checkpoint(out)
    student = transformers.AutoModelForSequenceClassification.from_pretrained(out)  # the checkpoint's dtype
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert torch.isfinite(student(input_ids=torch.tensor([[2, 10, 20, 3]])).logits).all()


@pytest.mark.parametrize("student,bf16", [("--student-layers 2", True), ("--init-from-teacher-layers 1,3", False)])
def test_bfloat16_teacher_checkpoint_distils_a_float32_student(distill_data, tmp_path, student, bf16):
    """A teacher saved in bfloat16: the student (a fresh one from the teacher's config, or a copy of
    teacher layers) still trains and saves float32 weights. Without ``float32_kwargs`` the first run
    trained and saved bfloat16 weights (the student inherited the config's dtype), and the second
    failed (bfloat16 hidden states into the float32 projection)."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(distill_data["teacher"], teacher)
    to_bfloat16(teacher, transformers.AutoModelForSequenceClassification)
    out = tmp_path / "out"
    run_distill(distill_argv(teacher, distill_data["train"], out, 2, *student.split(),
                             *(BF16 if bf16 else ["--use_cpu", "True"])))
    assert all(math.isfinite(v) for h in training_logs(out) for k, v in h.items() if k.startswith("loss"))
    assert_float32_checkpoint(out)


def _mtl_config(ws: dict[str, Any], out: Path, distill: bool, encoder: Path | None = None,
                teachers: dict[str, Path] | None = None) -> Path:
    """The mtl tests' config, one log per step; ``distill``: per-task teachers (``teachers``, default
    the mtl_workspace's), beta 1; ``encoder``: instead of the mtl_workspace's."""
    extra: dict[str, Any] = {"training": {"logging_steps": 1}}
    if encoder is not None:
        extra["model"] = {"encoder": str(encoder)}
    if distill:
        extra.update(mechanisms={"hierarchy": {"mode": "emd"}}, distillation={"beta": 1.0})
    else:
        extra["mechanisms"] = {"pooling": "mean", "dropout": 0.0}
    cfg = _config(ws, out, **extra)
    if distill:
        raw = yaml.safe_load(cfg.read_text())
        for task in raw["tasks"]:
            task["teacher"] = str((teachers or ws["teachers"])[task["name"]])
        cfg.write_text(yaml.safe_dump(raw))
    return cfg


@pytest.mark.parametrize("distill", [False, True], ids=["plain", "distill"])
def test_mtl_train_bf16(mtl_workspace, monkeypatch, distill):
    """``bert-emd mtl train --bf16``, without and with a ``distillation:`` section: the model (and
    the teachers) ran under autocast, and autocast is off again once the run returns; the EMD costs
    are float32 and the multi-task loss runs outside autocast, as the single-task one (its
    projections get and give float32 states, whatever dtype the student's outputs come in), every
    logged term is finite, the loss falls, and the saved model is float32."""
    from bert_emd.mtl.trainer import MultiTaskDistillationTrainer

    steps = 24
    calls = spy_ops(monkeypatch, emd_terms, ("layer_costs", "emd"))
    linear = spy_linear_dtypes(monkeypatch, MultiTaskDistillationTrainer if distill else MultiTaskTrainer)
    out = mtl_workspace["root"] / f"bf16_{'distill' if distill else 'plain'}"
    assert mtl_main(["mtl", "train", "--config", str(_mtl_config(mtl_workspace, out, distill)),
                     "--max-steps", str(steps), *BF16]) == 0
    # autocast ended with the run: the model's step forward re-entered accelerate's autocast-wrapped
    # forward once per task batch, and a torch.autocast instance is not re-entrant (see
    # MultiTaskModel.forward); the plain trainer has no outer autocast to restore the state
    assert not torch.is_autocast_enabled("cpu")
    assert linear == {"student": {torch.bfloat16}, "teacher": {torch.bfloat16} if distill else set()}
    logs = training_logs(out)
    assert [h["step"] for h in logs] == list(range(1, steps + 1))
    assert_finite_and_falling(logs, ("loss", "loss_distill_hidden") if distill else ("loss",))
    if distill:
        costs = [c for c in calls if c[0] == "layer_costs"]
        assert len(costs) >= 2 * steps and {c[3] for c in costs} == {torch.float32}
        hidden = [c for c in costs if c[4] == 3]  # [B, L, d] states: the projected student's
        assert hidden and all(c[1] == {torch.float32} for c in hidden), hidden
        assert {(s, c[3]) for c in calls if c[0] == "emd" for s in c[1]} == {(torch.float64, torch.float64)}
    else:
        assert calls == []
    assert_float32_checkpoint(out)


@pytest.mark.parametrize("bf16", [True, False])
def test_mtl_bfloat16_checkpoints_train_float32(mtl_workspace, tmp_path, bf16):
    """An encoder and teachers saved in bfloat16: multi-task distillation trains and saves float32
    weights. Without ``float32_kwargs``, ``--bf16`` trained (and saved) a bfloat16 encoder, and
    without ``--bf16`` the run failed (bfloat16 states into the float32 heads)."""
    import shutil

    copies = {}
    t = mtl_workspace["teachers"]
    for name, src, auto_cls in (("encoder", mtl_workspace["encoder"], transformers.AutoModel),
                                ("sent", t["sent"], transformers.AutoModelForSequenceClassification),
                                ("tag", t["tag"], transformers.AutoModelForTokenClassification)):
        copies[name] = to_bfloat16(Path(shutil.copytree(src, tmp_path / name)), auto_cls)
    out = mtl_workspace["root"] / f"bf16_checkpoints_{bf16}"
    cfg = _mtl_config(mtl_workspace, out, True, encoder=copies["encoder"], teachers=copies)
    assert mtl_main(["mtl", "train", "--config", str(cfg), "--max-steps", "2",
                     *(BF16 if bf16 else ["--use_cpu", "True"])]) == 0
    assert all(math.isfinite(v) for h in training_logs(out) for k, v in h.items() if k.startswith("loss"))
    assert_float32_checkpoint(out)
