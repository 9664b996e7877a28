"""A whole BertEMDLoss step traces as one graph: ``torch.compile(forward, fullgraph=True)`` over the
student's and teacher's forward and the loss (EMD mapping, layer-weight update); AOTAutograd
compiles the backward as the second graph.

A step that dynamo captures without a graph break is one that CUDA graphs can replay
(``mode="reduce-overhead"``): nothing in it needs the host between kernels. ``aot_eager`` runs the
captured graph with eager kernels, so the test checks the capture (and that the compiled step
computes what the eager one does: loss, gradients and the updated layer weights) without paying
for Inductor's code generation on the CPU."""

from __future__ import annotations

import copy

import helpers
import pytest
import torch
from bert_emd.nn import BertEMDLoss

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, B, L = 40, 3, 9


def _models():
    torch.manual_seed(0)
    student = helpers.tiny_bert(vocab=VOCAB, hidden=16, layers=2, labels=3, init=0.2)
    teacher = helpers.tiny_bert(vocab=VOCAB, hidden=32, layers=4, labels=3, init=0.2).eval()
    return student, teacher


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 6:] = 0
    return ids, am, torch.tensor([0, 2, 1])


def _forward(student, teacher, loss_fn):
    """The compiled region: both forwards and the loss (AOTAutograd compiles its backward as a
    second graph; ``loss.backward()`` itself stays outside, as in any compiled training loop)."""

    maps = loss_fn.attention_source == "probs" and not loss_fn.fused_attention  # the models' own maps

    def forward(ids, am, labels):
        s_out = student(input_ids=ids, attention_mask=am, output_hidden_states=True,
                        output_attentions=maps)
        with torch.no_grad():
            t_out = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=maps)
        loss, _ = loss_fn(s_out, t_out, labels=labels, attention_mask=am)
        return loss

    return forward


@pytest.mark.slow  # dynamo traces two BERTs and the loss: about a minute of CPU per case
@pytest.mark.parametrize("source,per_sample,fused", [
    ("probs", False, False),  # attention maps from output_attentions
    ("scores", True, False),  # query/key hooks, one transport problem per example
    ("scores", False, True),  # the fused attention-cost op on the hooked queries and keys
    ("probs", True, True),
])
def test_loss_step_compiles_as_one_graph(source, per_sample, fused):
    student, teacher = _models()
    kw = dict(attention_source=source, per_sample=per_sample, fused_attention=fused, beta=1.0)
    loss_fn = BertEMDLoss.from_models(student, teacher, **kw)
    e_student, e_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    e_loss = BertEMDLoss.from_models(e_student, e_teacher, **kw)
    e_loss.load_state_dict(loss_fn.state_dict())
    batch = _batch()
    # transformers installs its output-capturing hooks on a model's first forward, under a lock
    # that dynamo cannot enter: one eager forward first (as a training loop's first step would)
    with torch.no_grad():
        for model in (student, teacher):
            model(input_ids=batch[0], attention_mask=batch[1], output_hidden_states=True,
                  output_attentions=source == "probs" and not fused)

    torch._dynamo.reset()
    compiled = torch.compile(_forward(student, teacher, loss_fn), backend="aot_eager", fullgraph=True)
    eager = _forward(e_student, e_teacher, e_loss)
    for _ in range(2):  # the second step reads the layer weights the first one wrote
        got, want = compiled(*batch), eager(*batch)
        got.backward()
        want.backward()
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(student.named_parameters(), e_student.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(loss_fn.state_dict().items(), e_loss.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
