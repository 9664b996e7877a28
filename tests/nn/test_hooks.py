"""Attention-score capture on the query/key projections of BERT-family models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

import helpers  # noqa: E402
from bert_emd.nn.hooks import AttentionScoreCapture, additive_mask, find_self_attention  # noqa: E402
from transformers import (  # noqa: E402
    RobertaConfig,
    RobertaModel,
)

B, L, V = 3, 9, 50


def bert(attn, layers=2):
    torch.manual_seed(0)
    return helpers.tiny_bert("encoder", attn=attn, vocab=V, layers=layers, init=0.2).eval()


def roberta(attn):
    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
    )
    return RobertaModel._from_config(cfg, attn_implementation=attn).eval()


def distilbert(attn):
    torch.manual_seed(0)
    return helpers.tiny_distilbert(vocab=V, attn=attn, dropout=0.0, attention_dropout=0.0, initializer_range=0.2).eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def by_hand(model, hidden_states, mask):
    """QK^T / sqrt(d_head) + (1 - mask) * -10000, from each layer's input and its own q/k Linear."""
    out = []
    specs = find_self_attention(model)
    for i, spec in enumerate(specs):
        x = hidden_states[i]
        q = x @ spec.query.weight.T + spec.query.bias
        k = x @ spec.key.weight.T + spec.key.bias
        h = spec.num_heads
        q = q.view(B, L, h, -1).permute(0, 2, 1, 3)
        k = k.view(B, L, h, -1).permute(0, 2, 3, 1)
        s = torch.matmul(q, k) / (q.shape[-1] ** 0.5)
        out.append(s + (1.0 - mask[:, None, None, :].float()) * -10000.0)
    return out


@pytest.mark.parametrize("family", [bert, roberta, distilbert])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_scores_equal_hand_computation(family, attn):
    model = family(attn)
    ids, mask = inputs()
    with AttentionScoreCapture(model) as cap:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = cap.scores(mask)
        assert cap.num_layers == len(out.hidden_states) - 1
    ref = by_hand(model, out.hidden_states, mask)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == (B, model.config.num_attention_heads, L, L)
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [bert, distilbert])
def test_softmax_of_scores_is_eager_attention(family):
    model = family("eager")
    ids, mask = inputs()
    cap = AttentionScoreCapture(model)
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for s, p in zip(cap.scores(mask), out.attentions):
        torch.testing.assert_close(torch.softmax(s, -1), p, atol=1e-5, rtol=1e-5)
    cap.remove()


def test_captures_reset_each_forward_and_hooks_remove():
    model = bert("sdpa")
    ids, mask = inputs()
    cap = AttentionScoreCapture(model)
    model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids[:, :5], attention_mask=mask[:, :5])
    got = cap.scores(mask[:, :5])
    assert len(got) == 2 and got[0].shape[-1] == 5
    cap.remove()
    model(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="no attention captured"):
        cap.scores()


def test_scores_carry_gradients_to_query_and_key():
    model = bert("sdpa").train()
    ids, mask = inputs()
    cap = AttentionScoreCapture(model)
    model(input_ids=ids, attention_mask=mask)
    sum(s.sum() for s in cap.scores()).backward()
    spec = cap.specs[0]
    assert spec.query.weight.grad.abs().sum() > 0 and spec.key.weight.grad.abs().sum() > 0


def test_errors():
    with pytest.raises(ValueError, match="no BERT-family self-attention"):
        find_self_attention(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        additive_mask(torch.ones(2, 1, 4))
    model = bert("eager")
    ids, mask = inputs()
    cap = AttentionScoreCapture(model)
    model(input_ids=ids)
    with pytest.raises(ValueError, match="attention_mask must be"):
        cap.scores(mask[:, :4])
