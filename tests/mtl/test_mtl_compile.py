"""A multi-task distillation step traces as one graph: ``torch.compile(distillation_step,
fullgraph=True)`` over the student on every task batch, each task's teacher and the multi-task EMD
loss (one batched solve, per-task layer-weight updates, the EMD layer mixtures), with the same loss,
gradients and layer weights as eager (see tests/nn/test_loss_compile.py for the single-task step)."""

from __future__ import annotations

import copy

import helpers
import pytest
import torch

pytest.importorskip("transformers")

from bert_emd.mtl import (  # noqa: E402
    MechanismConfig,
    MultiTaskEMDLoss,
    MultiTaskModel,
    TaskSpec,
    TeacherSet,
    distillation_step,  # noqa: E402
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, B, L, D = 50, 4, 8, 32


def _bert(layers: int, seed: int, num_labels: int | None = None):
    torch.manual_seed(seed)
    if num_labels is None:
        return helpers.tiny_bert("encoder-no-pool", vocab=VOCAB, hidden=D, layers=layers)
    return helpers.tiny_bert(vocab=VOCAB, hidden=D, layers=layers, labels=num_labels).eval()


def _batch(task: str, g: torch.Generator, n_labels: int) -> dict:
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[: B // 2, -3:] = 0
    return {"task": task, "input_ids": ids, "attention_mask": mask, "labels": ids[:, 1] % n_labels}


@pytest.mark.slow  # dynamo traces three BERTs and the loss
@pytest.mark.parametrize("source,fused", [("scores", False), ("probs", True)])
def test_distillation_step_compiles_as_one_graph(source, fused):
    ts = [TaskSpec("t0", "single", 2, data={"train": "x.csv"}), TaskSpec("t1", "single", 3, data={"train": "x.csv"})]
    student = MultiTaskModel(_bert(2, 0), ts, MechanismConfig(hierarchy=True, hierarchy_mode="emd", dropout=0.0))
    teachers = TeacherSet({"t0": _bert(3, 1, 2), "t1": _bert(4, 2, 3)})
    e_student, e_teachers = copy.deepcopy(student), copy.deepcopy(teachers)
    kw = dict(attention_source=source, fused_attention=fused, beta=1.0)
    loss_fn = MultiTaskEMDLoss.from_models(ts, student, teachers, **kw)
    e_loss = MultiTaskEMDLoss.from_models(ts, e_student, e_teachers, **kw)
    e_loss.load_state_dict(loss_fn.state_dict())
    g = torch.Generator().manual_seed(0)
    steps = [[_batch("t0", g, 2), _batch("t1", g, 3)], [_batch("t1", g, 3), _batch("t0", g, 2)]]
    # transformers installs its output-capturing hooks on a model's first forward, under a lock
    # dynamo cannot enter: one eager forward of each Hugging Face model first
    with torch.no_grad():
        for model in (student.encoder, *teachers.models.values()):
            model(input_ids=steps[0][0]["input_ids"], output_hidden_states=True)

    def forward(student, teachers, loss_fn, batches):
        return distillation_step(student, teachers, loss_fn, batches)[0]

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    for step in steps:
        got = compiled(student, teachers, loss_fn, step)
        want = forward(e_student, e_teachers, e_loss, step)
        got.backward()
        want.backward()
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    # the student's whole gradient: AOTAutograd's decompositions (softmax, layer norm backward)
    # round differently in float32, ~3e-5 of the norm after two steps
    pairs = [(p.grad, q.grad) for p, q in zip(student.parameters(), e_student.parameters()) if q.grad is not None]
    g_c, g_e = (torch.cat([x.flatten() for x in side]) for side in zip(*pairs))
    assert len(pairs) > 10 and (g_c - g_e).norm() <= 2e-4 * g_e.norm()
    for (name, a), b in zip(loss_fn.state_dict().items(), e_loss.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
