"""BertEMDLoss under DDP: 2 gloo processes on CPU hold identical layer weights, equal to one
process on the concatenated batch (the cost matrices are all-reduced before solving)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # multi-process runs
STEPS, GLOBAL_BATCH, SEQ, VOCAB = 4, 8, 8, 50


def _models():
    import helpers

    def mk(hidden, layers, seed):
        torch.manual_seed(seed)
        return helpers.tiny_bert(attn="sdpa", vocab=VOCAB, hidden=hidden, layers=layers, init=0.2)

    return mk(32, 2, 1), mk(48, 4, 2).eval()


def _batch(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    mask = torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.long)
    y = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
    return ids, mask, y


def _train(rank, world, per_sample):
    """Run STEPS steps on this rank's share of each global batch; return what to compare."""
    from bert_emd.nn import BertEMDLoss

    student, teacher = _models()
    loss_fn = BertEMDLoss.from_models(student, teacher, attention_source="scores", beta=1.0, per_sample=per_sample)
    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student)
    opt = torch.optim.SGD(list(model.parameters()) + list(loss_fn.parameters()), lr=0.1)
    share = GLOBAL_BATCH // world
    out = {"weights": [], "loss": []}
    for step in range(STEPS):
        ids, mask, y = (t[rank * share : (rank + 1) * share] for t in _batch(step))
        so = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with torch.no_grad():
            to = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        total, _ = loss_fn(so, to, labels=y, attention_mask=mask)
        opt.zero_grad()
        total.backward()
        opt.step()
        w = loss_fn.layer_weights
        out["weights"].append(torch.cat([w.student_weight, w.teacher_weight]).clone())
        out["loss"].append(total.detach().clone())
    out["params"] = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
    out["projection"] = torch.cat([p.detach().reshape(-1) for p in loss_fn.parameters()])
    return out


MODES = (False, True)  # per_sample


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # both modes in one launch: starting the processes is most of this test's time
        result = {ps: _train(rank, world, ps) for ps in MODES}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("per_sample", MODES)
def test_ddp_two_ranks_match_one_process(two_ranks, per_sample):
    r0, r1 = two_ranks[0][per_sample], two_ranks[1][per_sample]
    single = _train(0, 1, per_sample)
    for step in range(STEPS):
        # bitwise identical across ranks: both solve the same (all-reduced) problem
        assert torch.equal(r0["weights"][step], r1["weights"][step]), step
        torch.testing.assert_close(r0["weights"][step], single["weights"][step], atol=1e-6, rtol=1e-6)
        mean_loss = (r0["loss"][step] + r1["loss"][step]) / 2
        torch.testing.assert_close(mean_loss, single["loss"][step], atol=1e-5, rtol=1e-5)
    # the weights moved away from uniform, so the comparison is not vacuous
    assert (r0["weights"][-1][:2] - 0.5).abs().max() > 1e-4
    torch.testing.assert_close(r0["params"], single["params"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r0["projection"], r1["projection"], atol=0, rtol=0)
    torch.testing.assert_close(r0["projection"], single["projection"], atol=1e-5, rtol=1e-4)
