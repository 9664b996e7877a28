"""BertEMDLoss and LayerEMDLoss: fidelity to the original algorithm, modes, errors, training."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("transformers")

import helpers  # noqa: E402
from _original_bert_emd import OriginalBertEMD, original_total_loss, tinybert_skip_loss  # noqa: E402
from bert_emd.nn import BertEMDLoss, CostAttention, LayerEMDLoss, fixed_plan, skip_mapping  # noqa: E402
from bert_emd.nn.hooks import find_self_attention  # noqa: E402
from transformers import (  # noqa: E402
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB, SEQ, BATCH = 60, 10, 4


def tiny_bert(hidden, layers, *, heads=4, attn="eager", labels=3, init=0.1, seed=0):
    torch.manual_seed(seed)
    return helpers.tiny_bert(attn=attn, vocab=VOCAB, hidden=hidden, layers=layers, heads=heads, labels=labels,
                             init=init)


def make_batch(seed, batch=BATCH, seq=SEQ, labels=3):
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):  # some padded rows
        mask[b, seq - (b % 3) * 2 :] = 0
    y = torch.randint(0, labels, (batch,), generator=g)
    return ids, mask, y


def run(model, ids, mask, attentions=True):
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=attentions)


def hand_scores(model, hidden_states, mask):
    """Pre-softmax scores of a BERT model, recomputed from each layer's input hidden states."""
    out = []
    for i, layer in enumerate(model.bert.encoder.layer):
        sa = layer.attention.self
        b, length, _ = hidden_states[i].shape
        h, dh = sa.num_attention_heads, sa.attention_head_size
        q = sa.query(hidden_states[i]).view(b, length, h, dh).transpose(1, 2)
        k = sa.key(hidden_states[i]).view(b, length, h, dh).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / dh**0.5
        out.append(s + ((1.0 - mask.float()) * -10000.0)[:, None, None, :])
    return out


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize(
    "source,normalize,shared",
    [("probs", "double_softmax", True),  # the paper's configuration; the other two are slow
     pytest.param("scores", "sum", True, marks=pytest.mark.slow),
     pytest.param("scores", "softmax", False, marks=pytest.mark.slow)],
)
def test_fidelity_to_original_20_steps(source, normalize, shared):
    """Losses, student gradients and layer weights equal the transcription of the original."""
    pytest.importorskip("pyemd")  # the original's solver
    m, n, beta, t_emd, temp, alpha = 2, 4, 0.5, 2.0, 2.0, 0.7
    student = tiny_bert(32, m, seed=1)
    teacher = tiny_bert(48, n, seed=2).eval()
    loss_fn = BertEMDLoss.from_models(
        student,
        teacher,
        attention_source=source,
        normalize=normalize,
        share_weights=shared,
        beta=beta,
        T_emd=t_emd,
        temperature=temp,
        gold_weight=1.0 - alpha,  # the original's alpha is the soft share
    )
    oracle = OriginalBertEMD(m, n, T_emd=t_emd, normalize=normalize, seperate=not shared, solver="pyemd")
    params = list(student.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    moved = 0.0
    for step in range(20):
        ids, mask, y = make_batch(step)
        so = run(student, ids, mask, attentions=source == "probs")
        with torch.no_grad():
            to = run(teacher, ids, mask, attentions=source == "probs")
        total, parts = loss_fn(so, to, labels=y, attention_mask=mask)

        if source == "probs":
            s_att, t_att = so.attentions, to.attentions
        else:
            s_att, t_att = (
                hand_scores(student, so.hidden_states, mask),
                hand_scores(teacher, to.hidden_states, mask),
            )
        s_reps = [loss_fn.projection(h) for h in so.hidden_states]
        ref, ref_parts = original_total_loss(
            oracle,
            s_att,
            t_att,
            s_reps,
            to.hidden_states,
            so.logits,
            to.logits,
            y,
            beta=beta,
            T=temp,
            alpha=alpha,
        )
        close(total, ref)
        for key in ("attention", "hidden", "embedding", "prediction"):
            close(parts[key], ref_parts[key])
        close(loss_fn.hidden_loss.last_plan, oracle.last["rep"][0][:m, m:])
        close(loss_fn.attention_loss.last_plan, oracle.last["att"][0][:m, m:])
        close(loss_fn.student_weight["attention"], oracle.att_student_weight)
        close(loss_fn.teacher_weight["attention"], oracle.att_teacher_weight)
        close(loss_fn.student_weight["hidden"], oracle.rep_student_weight)
        close(loss_fn.teacher_weight["hidden"], oracle.rep_teacher_weight)

        grads = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
        for p, g, r in zip(params, grads, ref_grads):
            if r is None:
                assert g is None or not g.abs().any()
                continue
            close(g, r)
            p.grad = g
        opt.step()
        w = loss_fn.student_weight["hidden"]
        moved = max(moved, float((w - 1.0 / m).abs().max()))
    # The weights really were updated (the comparison above is not between two uniform vectors).
    assert moved > 1e-4


def test_transcription_solvers_agree():
    """The oracle's pyemd call on the padded square problem and POT on the same problem agree."""
    pytest.importorskip("pyemd")
    pytest.importorskip("ot")
    rng = np.random.default_rng(0)
    for _ in range(20):
        m, n = 3, 7
        d = rng.random((m, n))
        a = rng.dirichlet(np.ones(m))
        b = rng.dirichlet(np.ones(n))
        big = np.zeros((m + n, m + n))
        big[:m, m:], big[m:, :m] = d, d.T
        pa, pb = np.concatenate([a, np.zeros(n)]), np.concatenate([np.zeros(m), b])
        from _original_bert_emd import _emd_with_flow

        f1 = _emd_with_flow(pa, pb, big, "pyemd")
        f2 = _emd_with_flow(pa, pb, big, "pot")
        assert abs((f1 * big).sum() - (f2 * big).sum()) < 1e-9


# ----------------------------------------------------------------------------- LayerEMDLoss modes
def rand_layers(count, b=3, length=5, d=6, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, length, d, generator=g).requires_grad_(grad) for _ in range(count)]


def test_per_sample_equals_per_example_loop():
    m, n, b = 3, 5, 4
    s = rand_layers(m, b=b, seed=1, grad=True)
    t = rand_layers(n, b=b, seed=2)
    batched = LayerEMDLoss(m, n, per_sample=True, normalize="softmax", temperature=3.0)
    loss = batched(s, t)
    (g_batched,) = torch.autograd.grad(loss, [s[0]])

    ref = CostAttention(m, n, normalize="softmax", temperature=3.0)
    losses, cs, ct = [], [], []
    for i in range(b):
        single = LayerEMDLoss(m, n, update_weights=False, cost_attention=ref)
        li, cost, plan = single.transport([x[i : i + 1] for x in s], [x[i : i + 1] for x in t])
        losses.append(li)
        c1, c2 = CostAttention.contributions(plan, cost)
        cs.append(c1)
        ct.append(c2)
    ref_loss = torch.stack(losses).mean()
    (g_ref,) = torch.autograd.grad(ref_loss, [s[0]])
    close(loss, ref_loss)
    close(g_batched, g_ref)
    ref.finalize(*ref.propose(torch.stack(cs).mean(0), torch.stack(ct).mean(0)))
    close(batched.student_weight, ref.student_weight)
    close(batched.teacher_weight, ref.teacher_weight)
    assert batched.last_plan.shape == (b, m, n)


def test_skip_mapping_definition():
    assert skip_mapping(4, 12) == [2, 5, 8, 11]  # TinyBERT: teacher_atts[i*k + k - 1]
    assert skip_mapping(6, 12) == [1, 3, 5, 7, 9, 11]
    assert skip_mapping(4, 6) == [1, 2, 4, 5]  # round half up: 1.5 -> 2, 4.5 -> 5
    assert skip_mapping(3, 3) == [0, 1, 2]
    p = fixed_plan("uniform", 2, 3)
    close(p, torch.full((2, 3), 1 / 6))


@pytest.mark.parametrize("mapping", ["skip", "last", "uniform"])
def test_fixed_mappings_equal_definitions(mapping):
    m, n = 2, 6
    s = rand_layers(m, seed=3, grad=True)
    t = rand_layers(n, seed=4)
    loss = LayerEMDLoss(m, n, mapping=mapping)(s, t)
    if mapping == "skip":
        ref = sum(F.mse_loss(s[i], t[j]) for i, j in zip(range(m), [2, 5]))
    elif mapping == "last":
        ref = F.mse_loss(s[-1], t[-1])
    else:
        ref = sum(F.mse_loss(s[i], t[j]) for i in range(m) for j in range(n)) / (m * n)
    close(loss, ref)
    g = torch.autograd.grad(loss, s, allow_unused=True, materialize_grads=True)
    r = torch.autograd.grad(ref, s, allow_unused=True, materialize_grads=True)
    for a, b in zip(g, r):
        close(a, b)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("kind", ["hidden", "attention"])
def test_sparse_mapping_costs_match_layer_costs(kind, per_sample):
    """skip/last compute their pairs in plain torch: same floor/mask/per-sample semantics."""
    m, n, b, length = 2, 4, 3, 6
    g = torch.Generator().manual_seed(7)
    shape = (b, length, 5) if kind == "hidden" else (b, 2, length, length)
    s = [torch.randn(shape, generator=g) * 100 for _ in range(m)]  # some entries <= -100
    t = [torch.randn(shape, generator=g) * 100 for _ in range(n)]
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 4:] = 0
    opts = dict(per_sample=per_sample, attention_floor=-100.0 if kind == "attention" else None)
    full = LayerEMDLoss(m, n, mapping="uniform", **opts).transport(s, t, mask)[1]
    for mapping in ("skip", "last"):
        cost = LayerEMDLoss(m, n, mapping=mapping, **opts).transport(s, t, mask)[1]
        used = fixed_plan(mapping, m, n) > 0
        torch.testing.assert_close(cost[..., used], full[..., used], atol=1e-5, rtol=1e-6)
        assert not cost[..., ~used].any()


def test_skip_mapping_equals_tinybert_branch_of_original():
    """BertEMDLoss(mapping='skip') on scores = the original's TinyBERT (tb_onestep) loss."""
    student, teacher = tiny_bert(32, 2, seed=5), tiny_bert(48, 4, seed=6).eval()
    loss_fn = BertEMDLoss.from_models(
        student, teacher, mapping="skip", attention_source="scores", use_prediction=False, beta=1.0
    )
    ids, mask, _ = make_batch(0)
    so = run(student, ids, mask, attentions=False)
    with torch.no_grad():
        to = run(teacher, ids, mask, attentions=False)
    total, parts = loss_fn(so, to, attention_mask=mask)
    s_reps = [loss_fn.projection(h) for h in so.hidden_states]
    att, rep = tinybert_skip_loss(
        hand_scores(student, so.hidden_states, mask),
        hand_scores(teacher, to.hidden_states, mask),
        s_reps,
        to.hidden_states,
    )
    close(parts["attention"], att)
    close(parts["hidden"] + parts["embedding"], rep)
    close(total, att + rep)


# ----------------------------------------------------------------------------- behaviour
def test_state_dict_resume_continues_identically():
    student, teacher = tiny_bert(32, 2, seed=7), tiny_bert(48, 4, seed=8).eval()
    a = BertEMDLoss.from_models(student, teacher, beta=1.0)
    for step in range(3):
        ids, mask, y = make_batch(step)
        with torch.no_grad():
            a(run(student, ids, mask), run(teacher, ids, mask), labels=y, attention_mask=mask)
    assert not torch.allclose(a.layer_weights.student_weight, torch.full((2,), 0.5, dtype=torch.float64))
    b = BertEMDLoss.from_models(student, teacher, beta=1.0)
    b.load_state_dict(a.state_dict())
    ids, mask, y = make_batch(9)
    with torch.no_grad():
        so, to = run(student, ids, mask), run(teacher, ids, mask)
        la, _ = a(so, to, labels=y, attention_mask=mask)
        lb, _ = b(so, to, labels=y, attention_mask=mask)
    assert torch.equal(la, lb)
    assert torch.equal(a.layer_weights.teacher_weight, b.layer_weights.teacher_weight)


def test_separate_weights_have_their_own_buffers():
    student, teacher = tiny_bert(32, 2, seed=1), tiny_bert(48, 4, seed=2).eval()
    loss_fn = BertEMDLoss.from_models(student, teacher, share_weights=False, attention_source="scores")
    keys = set(loss_fn.state_dict())
    assert "attention_loss.cost_attention.student_weight" in keys
    assert "hidden_loss.cost_attention.teacher_weight" in keys
    ids, mask, y = make_batch(0)
    with torch.no_grad():
        loss_fn(run(student, ids, mask, False), run(teacher, ids, mask, False), labels=y, attention_mask=mask)
    sw = loss_fn.student_weight
    assert not torch.allclose(sw["attention"], sw["hidden"])


def test_sdpa_probs_error_names_the_fix():
    student = tiny_bert(32, 2, attn="sdpa")
    teacher = tiny_bert(48, 4, attn="sdpa").eval()
    loss_fn = BertEMDLoss.from_models(student, teacher)
    ids, mask, y = make_batch(0)
    with torch.no_grad():
        so, to = run(student, ids, mask), run(teacher, ids, mask)
    with pytest.raises(ValueError, match='attn_implementation="eager".*"scores"'):
        loss_fn(so, to, labels=y, attention_mask=mask)
    # scores work with SDPA (the hooks must be in place before the forwards)
    scores_fn = BertEMDLoss.from_models(student, teacher, attention_source="scores")
    so = run(student, ids, mask, False)
    with torch.no_grad():
        to = run(teacher, ids, mask, False)
    total, parts = scores_fn(so, to, labels=y, attention_mask=mask)
    assert torch.isfinite(total) and parts["attention"] > 0


def test_head_count_and_length_mismatch_errors():
    student, teacher = tiny_bert(32, 2, heads=2), tiny_bert(48, 4, heads=4).eval()
    loss_fn = BertEMDLoss.from_models(student, teacher)
    ids, mask, y = make_batch(0)
    with torch.no_grad():
        so, to = run(student, ids, mask), run(teacher, ids, mask)
    with pytest.raises(ValueError, match="attention heads"):
        loss_fn(so, to, labels=y)
    student = tiny_bert(32, 2, heads=4)
    with torch.no_grad():
        so = run(student, ids[:, :6], mask[:, :6])
    with pytest.raises(ValueError, match="sequence length"):
        BertEMDLoss.from_models(student, teacher)(so, to, labels=y)
    with pytest.raises(ValueError, match="output_hidden_states"):
        BertEMDLoss.from_models(student, teacher)(student(input_ids=ids), to, labels=y)


def test_regression_and_no_labels():
    student = tiny_bert(32, 2, labels=1, seed=3)
    teacher = tiny_bert(48, 4, labels=1, seed=4).eval()
    loss_fn = BertEMDLoss.from_models(student, teacher, gold_weight=0.75, temperature=3.0)
    ids, mask, _ = make_batch(0)
    y = torch.randn(BATCH)
    so = run(student, ids, mask)
    with torch.no_grad():
        to = run(teacher, ids, mask)
    _, parts = loss_fn(so, to, labels=y, attention_mask=mask)
    soft = F.mse_loss(so.logits.view(-1), to.logits.view(-1))
    gold = F.mse_loss(so.logits.view(-1), y)
    close(parts["prediction"], 0.25 * soft + 0.75 * gold)
    _, parts = loss_fn(so, to, attention_mask=mask)
    close(parts["prediction"], soft)
    assert "prediction_gold" not in parts


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
@pytest.mark.parametrize("source", ["probs", "scores"])
def test_other_families(family, source):
    torch.manual_seed(0)
    if family == "roberta":

        def mk(h, n):
            cfg = RobertaConfig(
                vocab_size=VOCAB,
                hidden_size=h,
                num_hidden_layers=n,
                num_attention_heads=4,
                intermediate_size=2 * h,
                max_position_embeddings=40,
                num_labels=2,
            )
            return RobertaForSequenceClassification._from_config(cfg, attn_implementation="eager")
    else:

        def mk(h, n):
            return helpers.tiny_distilbert(vocab=VOCAB, hidden=h, layers=n, classifier=True)

    student, teacher = mk(32, 2), mk(48, 4).eval()
    loss_fn = BertEMDLoss.from_models(student, teacher, attention_source=source, beta=1.0)
    ids, mask, y = make_batch(0, labels=2)
    ids = ids.clamp_min(3)  # RoBERTa: keep clear of the padding id in position ids
    so = run(student, ids, mask, source == "probs")
    with torch.no_grad():
        to = run(teacher, ids, mask, source == "probs")
    total, parts = loss_fn(so, to, labels=y, attention_mask=mask)
    total.backward()
    assert torch.isfinite(total) and parts["attention"] > 0 and parts["hidden"] > 0
    q = find_self_attention(student)[0].query  # attention gradients reach the first layer
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert loss_fn.projection.weight.grad is not None


def test_bf16_autocast_close_to_fp32():
    student, teacher = tiny_bert(32, 2, seed=1), tiny_bert(48, 4, seed=2).eval()
    ids, mask, y = make_batch(0)
    vals = []
    for amp in (False, True):
        loss_fn = BertEMDLoss.from_models(student, teacher, attention_source="scores", beta=1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            so = run(student, ids, mask, False)
            with torch.no_grad():
                to = run(teacher, ids, mask, False)
            total, _ = loss_fn(so, to, labels=y, attention_mask=mask)
        total.backward()
        assert total.dtype == torch.float32 and torch.isfinite(total)
        assert torch.isfinite(loss_fn.projection.weight.grad).all()
        loss_fn.detach_models()
        vals.append(float(total.detach()))
    assert abs(vals[0] - vals[1]) < 0.05 * abs(vals[0])


def test_bf16_outputs_without_autocast_meet_the_fp32_projection():
    # a bfloat16 model run without autocast (or a DeepSpeed-style half-precision student) hands the
    # loss bf16 hidden states: the fp32 projection takes them (cast), and the loss equals the one
    # computed from the same states cast to fp32 beforehand
    from transformers.modeling_outputs import SequenceClassifierOutput

    student, teacher = tiny_bert(32, 2, seed=1), tiny_bert(48, 4, seed=2).eval()
    ids, mask, y = make_batch(0)
    so, to = run(student, ids, mask, True), run(teacher, ids, mask, True)

    def cast(out, dtype):
        return SequenceClassifierOutput(logits=out.logits.to(dtype),
                                        hidden_states=tuple(h.to(dtype) for h in out.hidden_states),
                                        attentions=tuple(a.to(dtype) for a in out.attentions))

    vals = []
    for first in (torch.bfloat16, torch.float32):  # the bf16 states themselves, then cast up front
        torch.manual_seed(0)
        loss_fn = BertEMDLoss(2, 4, 32, 48, beta=1.0)
        s_out = cast(cast(so, torch.bfloat16), first)
        total, _ = loss_fn(s_out, cast(to, torch.bfloat16), labels=y, attention_mask=mask)
        assert total.dtype == torch.float32 and torch.isfinite(total)
        vals.append(float(total.detach()))
    assert vals[0] == pytest.approx(vals[1], rel=1e-5)


def test_loss_falls_when_training():
    student, teacher = tiny_bert(32, 2, seed=11, init=0.05), tiny_bert(48, 4, seed=12, init=0.3).eval()
    loss_fn = BertEMDLoss.from_models(student, teacher, attention_source="scores", beta=1.0)
    opt = torch.optim.Adam(list(student.parameters()) + list(loss_fn.parameters()), lr=3e-3)
    ids, mask, y = make_batch(0, batch=8)
    history = []
    for _ in range(40):
        so = run(student, ids, mask, False)
        with torch.no_grad():
            to = run(teacher, ids, mask, False)
        total, parts = loss_fn(so, to, labels=y, attention_mask=mask)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append((total.item(), parts["hidden"].item(), parts["attention"].item()))
    first, last = history[0], history[-1]
    assert last[0] < 0.7 * first[0], history
    assert last[1] < 0.7 * first[1] and last[2] < 0.7 * first[2], history


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", {"layer_costs": "torch"}], ids=["auto", "torch-costs"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_cuda_step_without_host_sync(backend, per_sample):
    student = tiny_bert(32, 2, seed=1).cuda()
    teacher = tiny_bert(48, 4, seed=2).cuda().eval()
    loss_fn = BertEMDLoss.from_models(
        student, teacher, attention_source="scores", backend=backend, per_sample=per_sample
    ).cuda()
    ids, mask, y = (t.cuda() for t in make_batch(0))

    def step(check_sync: bool):
        so = run(student, ids, mask, False)
        with torch.no_grad():
            to = run(teacher, ids, mask, False)
        torch.cuda.synchronize()
        if check_sync:
            torch.cuda.set_sync_debug_mode("error")
        try:
            total, parts = loss_fn(so, to, labels=y, attention_mask=mask)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return total, parts

    step(False)  # warm-up (lazy initialisation may synchronise)
    total, parts = step(True)
    total.backward()
    assert loss_fn.layer_weights.student_weight.device.type == "cuda"
    assert torch.isfinite(total.cpu()) and float(parts["hidden"]) > 0
    # same step on CPU gives the same loss and weights
    cpu_fn = BertEMDLoss.from_models(student.cpu(), teacher.cpu(), attention_source="scores", per_sample=per_sample)
    cpu_fn.load_state_dict({k: v.cpu() for k, v in loss_fn.state_dict().items()})
    cpu_fn.layer_weights.reset()
    ids_c, mask_c, y_c = make_batch(0)
    for _ in range(2):
        so = run(student, ids_c, mask_c, False)
        with torch.no_grad():
            to = run(teacher, ids_c, mask_c, False)
        ref, _ = cpu_fn(so, to, labels=y_c, attention_mask=mask_c)
    torch.testing.assert_close(total.detach().cpu(), ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        loss_fn.layer_weights.student_weight.cpu(), cpu_fn.layer_weights.student_weight, atol=1e-5, rtol=1e-5
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("source", ["probs", "scores"])
def test_cuda_bf16_autocast_close_to_fp32(source):
    student = tiny_bert(32, 2, seed=1).cuda()
    teacher = tiny_bert(48, 4, seed=2).cuda().eval()
    ids, mask, y = (t.cuda() for t in make_batch(0))
    vals = []
    for amp in (False, True):
        loss_fn = BertEMDLoss.from_models(student, teacher, attention_source=source, beta=1.0).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            so = run(student, ids, mask, source == "probs")
            with torch.no_grad():
                to = run(teacher, ids, mask, source == "probs")
            total, _ = loss_fn(so, to, labels=y, attention_mask=mask)
        total.backward()
        assert total.dtype == torch.float32
        assert torch.isfinite(loss_fn.projection.weight.grad).all()
        loss_fn.detach_models()
        vals.append(float(total.detach()))
    assert abs(vals[0] - vals[1]) < 0.05 * abs(vals[0])
