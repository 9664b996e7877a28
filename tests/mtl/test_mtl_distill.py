"""Multi-task EMD distillation: one batched EMD call per step, equal to separate solves; per-task
layer weights that diverge when the tasks' teachers carry the signal in different layers."""

from types import SimpleNamespace

import bert_emd
import bert_emd.nn.emd_terms as emd_terms
import helpers
import pytest
import torch
from bert_emd.mtl import (
    MechanismConfig,
    MultiTaskEMDLoss,
    MultiTaskModel,
    TaskDistillInput,
    TaskSpec,
    TeacherSet,
    distillation_step,
)
from bert_emd.nn import CostAttention
from bert_emd.ops.layer_costs import layer_costs
from torch import nn

transformers = pytest.importorskip("transformers")

VOCAB, L, B, D = 50, 10, 16, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def bert(layers: int, seed: int, num_labels: int | None = None):
    """A tiny BERT (seeded): the bare encoder without pooler, or a classifier with ``num_labels``."""
    torch.manual_seed(seed)
    if num_labels is None:
        return helpers.tiny_bert("encoder-no-pool", vocab=VOCAB, hidden=D, layers=layers, heads=4)
    return helpers.tiny_bert(vocab=VOCAB, hidden=D, layers=layers, heads=4, labels=num_labels).eval()


def specs(n_labels=(2, 3)) -> list[TaskSpec]:
    return [TaskSpec(f"t{i}", "single", n, data={"train": "x.csv"}) for i, n in enumerate(n_labels)]


def batch(task: str, g: torch.Generator, n_labels: int) -> dict:
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[: B // 2, -2:] = 0
    return {"task": task, "input_ids": ids, "attention_mask": mask, "labels": (ids[:, 1] % n_labels)}


def random_outputs(g, m, layers, heads=4):
    return {
        "hidden_states": tuple(torch.randn(B, L, D, generator=g, dtype=torch.float64) for _ in range(layers + 1)),
        "attentions": tuple(torch.rand(B, heads, L, L, generator=g, dtype=torch.float64) for _ in range(layers)),
        "logits": torch.randn(B, m, generator=g, dtype=torch.float64),
    }


def test_batched_solve_equals_separate_solves(rng):
    """Teachers of 3 and 5 layers: the [K, M, 5] problem with zero-weight padding has the optimum of each
    unpadded problem."""
    ts = specs()
    loss = MultiTaskEMDLoss(ts, 2, D, {"t0": 3, "t1": 5}, {"t0": D, "t1": D}, update_weights=False,
                            use_prediction=False, use_embedding=False).double()
    # non-uniform layer weights, as after some training
    for ca in loss.cost_attention.values():
        ca.student_weight.copy_(torch.softmax(torch.randn(2, generator=rng, dtype=torch.float64), 0))
        n = ca.num_teacher_layers
        ca.teacher_weight.copy_(torch.softmax(torch.randn(n, generator=rng, dtype=torch.float64), 0))
    items = [
        TaskDistillInput("t0", random_outputs(rng, 2, 2), random_outputs(rng, 2, 3)),
        TaskDistillInput("t1", random_outputs(rng, 3, 2), random_outputs(rng, 3, 5)),
    ]
    total, parts = loss(items)
    for item in items:
        ca = loss.cost_attention[item.task]
        proj = loss.projections[item.task]
        s, t = item.student, item.teacher
        d_h = layer_costs([proj(h) for h in s["hidden_states"][1:]], list(t["hidden_states"][1:]))
        d_a = layer_costs(list(s["attentions"]), list(t["attentions"]))
        for feature, d in (("hidden", d_h), ("attention", d_a)):
            alone = bert_emd.emd(d.detach(), ca.student_weight, ca.teacher_weight).cost
            # (the parts are reported in fp32)
            assert parts[f"{item.task}/{feature}"].item() == pytest.approx(alone.item(), rel=1e-6)
            # the plan never sends mass to a padded column (only N_t columns come back)
            assert loss.last[item.task][f"{feature}_plan"].shape == (2, ca.num_teacher_layers)
    expected = sum(loss.beta * (parts[f"{t}/attention"] + parts[f"{t}/hidden"]) for t in ("t0", "t1")) / 2
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # the gradient reaches the projections (through the costs; the plans are constants)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.projections.parameters())


def test_one_emd_call_per_step(monkeypatch, rng):
    calls = []
    real = emd_terms.emd

    def counting(cost, a=None, b=None, **kw):
        calls.append(tuple(cost.shape))
        return real(cost, a, b, **kw)

    monkeypatch.setattr(emd_terms, "emd", counting)
    ts = specs()
    student = MultiTaskModel(bert(2, 0), ts, MechanismConfig(dropout=0.0))
    teachers = TeacherSet({"t0": bert(3, 1, 2), "t1": bert(4, 2, 3)})
    loss = MultiTaskEMDLoss(ts, 2, D, {"t0": 3, "t1": 4}, {"t0": D, "t1": D}, teacher_groups=teachers.groups)
    g = torch.Generator().manual_seed(0)
    distillation_step(student, teachers, loss, [batch("t0", g, 2), batch("t1", g, 3)])
    assert calls == [(4, 2, 4)]  # 2 tasks x (attention, hidden), padded to the deeper teacher
    calls.clear()
    distillation_step(student, teachers, loss, [batch("t1", g, 3)])
    assert calls == [(2, 2, 4)]


class SignalTeacher(nn.Module):
    """A synthetic teacher of N layers: layer ``signal`` (1-based) and the embedding output carry a
    fixed function of the tokens; every other layer is fresh noise (no student can match it)."""

    def __init__(self, layers: int, signal: int, num_labels: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(num_hidden_layers=layers, hidden_size=D, num_labels=num_labels)
        self.register_buffer("table", torch.randn(VOCAB, D, generator=g))
        self.register_buffer("head", torch.randn(D, num_labels, generator=g))
        self.noise = torch.Generator().manual_seed(seed + 1)
        self.layers, self.signal = layers, signal

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=True, **_):
        sig = self.table[input_ids]
        hs = [sig] + [sig if j == self.signal else torch.randn(sig.shape, generator=self.noise)
                      for j in range(1, self.layers + 1)]
        return {"hidden_states": tuple(hs), "logits": sig.mean(1) @ self.head}


def test_per_task_layer_weights_diverge():
    ts = specs()
    student = MultiTaskModel(bert(2, 0), ts, MechanismConfig(dropout=0.0))
    teachers = TeacherSet({"t0": SignalTeacher(4, 1, 2, seed=10), "t1": SignalTeacher(4, 3, 3, seed=20)})
    loss = MultiTaskEMDLoss(ts, 2, D, {"t0": 4, "t1": 4}, {"t0": D, "t1": D}, teacher_groups=teachers.groups,
                            use_attention=False, normalize="sum", beta=1.0)
    params = list(student.parameters()) + list(loss.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    hidden = []
    for step in range(80):
        b = [batch("t0", g, 2), batch("t1", g, 3)]
        total, parts, _ = distillation_step(student, teachers, loss, b, progress=step / 80)
        opt.zero_grad()
        total.backward()
        opt.step()
        hidden.append(parts["hidden"].item())
    w = loss.task_layer_weights()
    t0, t1 = w["t0"]["teacher"], w["t1"]["teacher"]
    assert int(t0.argmax()) == 0 and int(t1.argmax()) == 2, (t0, t1)  # layers 1 and 3 (0-based 0 and 2)
    assert (t0 - t1).abs().sum() > 0.3, (t0, t1)
    assert sum(hidden[-10:]) < 0.9 * sum(hidden[:10])  # the student learned to match the signal layers
    # the same teacher for both tasks gives the same weights: the divergence comes from the teachers
    same = MultiTaskEMDLoss(ts, 2, D, {"t0": 4, "t1": 4}, {"t0": D, "t1": D}, use_attention=False, normalize="sum",
                            use_prediction=False, teacher_groups={"t0": "one", "t1": "one"})
    one = SignalTeacher(4, 1, 2, seed=10)
    out = {"hidden_states": tuple(torch.randn(B, L, D) for _ in range(3))}
    with torch.no_grad():
        tout = one(torch.randint(3, VOCAB, (B, L)))
        same([TaskDistillInput("t0", out, tout), TaskDistillInput("t1", out, tout)])
    assert torch.allclose(same.cost_attention["t0"].teacher_weight, same.cost_attention["t1"].teacher_weight)


def test_hierarchy_emd_mode_reads_the_task_weights():
    ts = specs()
    student = MultiTaskModel(bert(2, 0), ts, MechanismConfig(hierarchy=True, hierarchy_mode="emd", dropout=0.0))
    teachers = TeacherSet({"t0": bert(3, 1, 2), "t1": bert(4, 2, 3)})
    loss = MultiTaskEMDLoss(ts, 2, D, {"t0": 3, "t1": 4}, {"t0": D, "t1": D}, normalize="sum")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        total, _, _ = distillation_step(student, teachers, loss, [batch("t0", g, 2), batch("t1", g, 3)])
        total.backward()  # the weights set in place after the forward must not break backward
    for t in ("t0", "t1"):
        assert torch.allclose(student.mixtures[t].weights.double(), loss.cost_attention[t].student_weight, atol=1e-6)
    assert not torch.allclose(student.mixtures["t0"].weights, torch.full((2,), 0.5))


def test_teacher_annealing_and_gold_weight(rng):
    ts = specs((3,))
    loss = MultiTaskEMDLoss(ts, 2, D, {"t0": 2}, {"t0": D}, teacher_annealing=True, use_attention=False,
                            use_hidden=False, use_embedding=False, temperature=2.0)
    assert [loss.gold_share(p) for p in (0.0, 0.25, 1.0, 2.0)] == [0.0, 0.25, 1.0, 1.0]
    s = torch.randn(B, 3, generator=rng)
    t = torch.randn(B, 3, generator=rng)
    y = torch.randint(0, 3, (B,), generator=rng)
    item = TaskDistillInput("t0", {"logits": s}, {"logits": t}, labels=y)
    soft, _ = loss([item], progress=0.0)
    gold, _ = loss([item], progress=1.0)
    mid, parts = loss([item], progress=0.5)
    assert gold.item() == pytest.approx(nn.functional.cross_entropy(s, y).item(), rel=1e-6)
    ce = -(torch.softmax(t / 2, -1) * torch.log_softmax(s / 2, -1)).mean() * 4
    assert soft.item() == pytest.approx(ce.item(), rel=1e-6)
    assert mid.item() == pytest.approx(0.5 * (soft.item() + gold.item()), rel=1e-6)
    assert parts["gold_weight"].item() == 0.5
    fixed = MultiTaskEMDLoss(ts, 2, D, {"t0": 2}, {"t0": D}, gold_weight=0.3, use_attention=False)
    assert fixed.gold_share(0.9) == 0.3


def test_distillation_trains_with_hf_teachers():
    ts = specs()
    student = MultiTaskModel(bert(2, 0), ts, MechanismConfig(gate=True, dropout=0.0))
    teachers = TeacherSet({"t0": bert(3, 1, 2), "t1": bert(4, 2, 3)})
    loss = MultiTaskEMDLoss(ts, 2, D, {"t0": 3, "t1": 4}, {"t0": D, "t1": D}, beta=1.0, gold_weight=0.0)
    opt = torch.optim.AdamW(list(student.parameters()) + list(loss.parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    totals = []
    for _ in range(40):
        total, parts, _ = distillation_step(student, teachers, loss, [batch("t0", g, 2), batch("t1", g, 3)])
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
        assert set(parts) >= {"t0/hidden", "t1/attention", "prediction", "embedding"}
    assert sum(totals[-5:]) < 0.7 * sum(totals[:5]), totals
    w = loss.task_layer_weights()
    assert w["t0"]["teacher"].shape == (3,) and w["t1"]["teacher"].shape == (4,)


def test_errors_are_clear():
    ts = specs()
    loss = MultiTaskEMDLoss(ts, 2, D, {"t0": 3, "t1": 4}, {"t0": D, "t1": D})
    g = torch.Generator().manual_seed(0)
    s = random_outputs(g, 2, 2)
    bad_teacher = random_outputs(g, 2, 2)  # 2 layers, 3 expected
    with pytest.raises(ValueError, match="task 't0': the teacher returned 3 hidden states, expected 4"):
        loss([TaskDistillInput("t0", s, bad_teacher)])
    with pytest.raises(ValueError, match="needs either per-task teachers or one multi-task teacher"):
        TeacherSet()
    with pytest.raises(ValueError, match="no teacher layer count"):
        MultiTaskEMDLoss(ts, 2, D, {"t0": 3}, {"t0": D})
    ca = CostAttention(2, 3)
    assert ca.student_weight.sum() == 1  # sanity of the imported rule


@pytest.mark.parametrize("with_labels", [True, False])
def test_tagging_prediction_weights_tokens_instead_of_indexing(rng, with_labels):
    """The tagging prediction term equals prediction_loss over the counted tokens (boolean indexed),
    computed with a 0/1 token weight (no host sync on a GPU); a batch without a counted token gives
    0 with a zero gradient."""
    from bert_emd.nn import prediction_loss

    ts = [TaskSpec("tag", "tagging", 4, data={"train": "x.jsonl"})]
    loss = MultiTaskEMDLoss(ts, 2, D, {"tag": 2}, {"tag": D}, gold_weight=0.3, use_attention=False,
                            use_hidden=False, use_embedding=False, temperature=2.0)
    s = torch.randn(3, 7, 4, generator=rng, requires_grad=True)
    t = torch.randn(3, 7, 4, generator=rng)
    labels = torch.randint(0, 4, (3, 7), generator=rng)
    labels[0, 5:] = -100
    labels[2, :3] = -100
    am = (labels != -100).long()
    item = TaskDistillInput("tag", {"logits": s}, {"logits": t}, labels=labels if with_labels else None,
                            attention_mask=am)
    got, _ = loss([item])
    keep = labels != -100
    want, _, _ = prediction_loss(s[keep], t[keep], labels[keep] if with_labels else None, temperature=2.0,
                                 gold_weight=0.3 if with_labels else 0.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    g_got, = torch.autograd.grad(got, s)
    g_want, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g_got, g_want)
    none = torch.full((3, 7), -100)
    empty = TaskDistillInput("tag", {"logits": s}, {"logits": t}, labels=none if with_labels else None,
                             attention_mask=torch.zeros(3, 7, dtype=torch.long))
    zero, _ = loss([empty])
    assert zero.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(zero, s)[0]) == 0
