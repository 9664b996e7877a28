"""One loss configuration for every way of building the BERT-EMD loss (:class:`EMDLossConfig`):
the library, ``bert-emd distill`` and the multi-task YAML share its defaults; ``alpha`` (the soft
share) is a deprecated alias of ``gold_weight = 1 - alpha``. Also: the package layering (ops <- nn
<- distill / mtl) and the lazy trainers."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bert_emd.mtl import MultiTaskEMDLoss, TaskSpec
from bert_emd.mtl.config import DistillOptions
from bert_emd.nn import BertEMDLoss, EMDLossConfig, prediction_loss

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "bert_emd"


def test_defaults_and_checks():
    cfg = EMDLossConfig()
    assert (cfg.beta, cfg.theta, cfg.T_emd, cfg.temperature, cfg.gold_weight) == (0.001, 1.0, 1.0, 1.0, 0.2)
    assert cfg.floor is None and EMDLossConfig(attention_source="scores").floor == -100.0
    assert EMDLossConfig(attention_source="scores", attention_floor=None).floor is None
    assert cfg.wants_attention_maps and not cfg.needs_hooks
    assert EMDLossConfig(fused_attention=True).needs_hooks
    assert EMDLossConfig(backend={"emd": "cpu"}).backend_for("emd") == "cpu"
    assert EMDLossConfig(backend={"emd": "cpu"}).backend_for("layer_costs") == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 1.0  # type: ignore[misc]
    for bad, match in (
        (dict(attention_source="maps"), "attention_source must be 'probs' or 'scores', got 'maps'"),
        (dict(gold_weight=1.5), r"gold_weight must be in \[0, 1\]"),
        (dict(beta=-1.0), "beta must be a finite number >= 0"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(normalize="max"), "normalize must be one of"),
        (dict(use_attention=False, use_hidden=False, use_embedding=False, use_prediction=False), "all loss terms"),
    ):
        with pytest.raises(ValueError, match=match):
            EMDLossConfig(**bad)


def test_losses_read_the_config():
    cfg = EMDLossConfig(beta=0.5, gold_weight=0.3, attention_source="scores", token_mask=True)
    loss = BertEMDLoss(2, 4, 8, 8, config=cfg)
    assert loss.config is cfg
    assert (loss.beta, loss.gold_weight, loss.attention_floor, loss.token_mask) == (0.5, 0.3, -100.0, True)
    assert loss.alpha == pytest.approx(0.7)
    # keyword arguments are the config's fields, and replace those of config=
    assert BertEMDLoss(2, 4, 8, 8, beta=0.5, gold_weight=0.3, attention_source="scores", token_mask=True).config == cfg
    assert BertEMDLoss(2, 4, 8, 8, config=cfg, beta=0.25).config == dataclasses.replace(cfg, beta=0.25)
    with pytest.raises(TypeError, match="unknown loss option"):
        BertEMDLoss(2, 4, 8, 8, betta=0.5)
    # the classes' signatures name every option (help(), IDEs, callers that inspect them)
    options = {f.name: f.default for f in dataclasses.fields(EMDLossConfig)}
    for cls in (BertEMDLoss, MultiTaskEMDLoss):
        params = inspect.signature(cls).parameters
        assert {name: params[name].default for name in options} == options
        assert "options" not in params and "self" not in params
    ts = [TaskSpec("a", "single", 2, data={"train": "x"})]
    mtl = MultiTaskEMDLoss(ts, 2, 8, {"a": 4}, {"a": 8}, config=cfg)
    assert mtl.config is cfg and mtl.gold_share(0.5) == 0.3
    assert MultiTaskEMDLoss(ts, 2, 8, {"a": 4}, {"a": 8}).config == EMDLossConfig()


def test_alpha_is_a_deprecated_alias_of_one_minus_gold_weight():
    with pytest.warns(DeprecationWarning, match="gold_weight = 1 - alpha"):
        loss = BertEMDLoss(2, 4, 8, 8, alpha=0.75)
    assert loss.gold_weight == pytest.approx(0.25)
    with pytest.raises(TypeError, match="not both"):
        BertEMDLoss(2, 4, 8, 8, alpha=0.75, gold_weight=0.25)
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g), torch.randint(0, 3, (5,), generator=g)
    want, soft, gold = prediction_loss(s, t, y, gold_weight=0.25)
    assert want.item() == pytest.approx((0.75 * soft + 0.25 * gold).item())
    with pytest.warns(DeprecationWarning):
        got, _, _ = prediction_loss(s, t, y, alpha=0.75)
    assert got.item() == pytest.approx(want.item())
    default, _, _ = prediction_loss(s, t, y)
    assert default.item() == pytest.approx((0.8 * soft + 0.2 * gold).item())


def test_yaml_section_builds_the_config():
    assert DistillOptions().loss_config() == EMDLossConfig()
    for f in ("beta", "theta", "T_emd", "temperature", "gold_weight", "normalize", "attention_source"):
        assert getattr(DistillOptions(), f) == getattr(EMDLossConfig(), f)
    d = DistillOptions(enabled=True, beta=1.0, gold_weight=0.5, attention_source="scores")
    assert d.loss_config() == EMDLossConfig(beta=1.0, gold_weight=0.5, attention_source="scores")
    assert d.loss_config(fused_attention=True).fused_attention


def test_cli_options_build_the_config():
    pytest.importorskip("transformers")
    from bert_emd.distill.cli_commands import _parse, loss_config
    from bert_emd.errors import UsageError

    base = ["distill", "--teacher", "t", "--train-file", "x.csv", "--output-dir", "out"]
    args, _ = _parse("distill", base)
    assert loss_config(args) == EMDLossConfig()  # one default for library, CLI and YAML (beta 0.001)
    args, _ = _parse("distill", [*base, "--gold-weight", "0.4", "--beta", "0.01"])
    assert loss_config(args) == EMDLossConfig(gold_weight=0.4, beta=0.01)
    args, _ = _parse("distill", [*base, "--alpha", "0.6"])
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert loss_config(args).gold_weight == pytest.approx(0.4)
    args, _ = _parse("distill", [*base, "--alpha", "0.6", "--gold-weight", "0.4"])
    with pytest.raises(UsageError, match="pass one"):
        loss_config(args)


def test_trainers_are_imported_lazily():
    """``import bert_emd.nn`` / ``bert_emd.mtl`` / ``bert_emd.distill`` do not import
    ``transformers``' Trainer; the packages' trainer names resolve on first access."""
    code = (
        "import sys\n"
        "import bert_emd.nn, bert_emd.mtl, bert_emd.distill\n"
        "assert 'transformers.trainer' not in sys.modules, 'Trainer imported'\n"
        "assert 'bert_emd.distill.trainer' not in sys.modules and 'bert_emd.mtl.trainer' not in sys.modules\n"
        "from bert_emd.distill import DistillationTrainer\n"
        "from bert_emd.mtl import MultiTaskTrainer, MultiTaskDistillationTrainer\n"
        "from transformers import Trainer\n"
        "assert issubclass(DistillationTrainer, Trainer) and issubclass(MultiTaskTrainer, Trainer)\n"
        "assert issubclass(MultiTaskDistillationTrainer, DistillationTrainer)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the ``bert_emd`` modules ``path`` imports (at any level of the file)."""
    package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])  # the file's package
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("bert_emd")}


@pytest.mark.parametrize("layer", ["ops", "nn", "reference"])
def test_imports_point_down(layer):
    """ops <- nn <- distill / mtl <- cli: the lower layers import neither distill nor mtl."""
    for path in sorted((PACKAGE / layer).glob("*.py")):
        up = sorted(m for m in _imported_modules(path) if m.startswith(("bert_emd.distill", "bert_emd.mtl")))
        assert not up, f"{path.relative_to(PACKAGE)} imports {up}"
