"""Multi-task mechanisms: gradient reversal, orthogonality loss, layer mixture, gate, label embedding."""

import pytest
import torch
from bert_emd.mtl.mechanisms import (
    GradientReversal,
    LabelEmbedding,
    LayerMixture,
    TaskDiscriminator,
    TaskGate,
    grad_reverse,
    orthogonality_loss,
    pool,
)


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_gradient_reversal_flips_gradient_and_keeps_forward(rng, scale):
    x = torch.randn(5, 7, generator=rng, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, generator=rng, dtype=torch.float64)
    y = grad_reverse(x, scale)
    assert torch.equal(y, x)  # forward unchanged, bit for bit
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -scale * w)
    # the same graph without the layer has the opposite gradient (times 1/scale)
    x2 = x.detach().clone().requires_grad_()
    (x2 * w).sum().backward()
    assert torch.allclose(x.grad, -scale * x2.grad)


def test_gradient_reversal_module_in_a_network(rng):
    lin = torch.nn.Linear(4, 3).double()
    x = torch.randn(6, 4, generator=rng, dtype=torch.float64)
    feats = lin(x)
    out_rev = GradientReversal(1.0)(feats).pow(2).sum()
    g_rev = torch.autograd.grad(out_rev, lin.weight)[0]
    g = torch.autograd.grad(lin(x).pow(2).sum(), lin.weight)[0]
    assert torch.allclose(g_rev, -g)
    with pytest.raises(ValueError, match="scale"):
        GradientReversal(-1.0)


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_orthogonality_loss_zero_for_orthogonal_features():
    # Hadamard columns: mutually orthogonal, zero mean (except column 0), +-1 entries so every row
    # has the same norm: centring and row normalisation keep the columns orthogonal.
    h = _hadamard(8)
    shared, private = h[:, 1:4], h[:, 4:8]
    loss = orthogonality_loss(shared, private)
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    # scaled copies are still orthogonal: the loss ignores each side's scale
    assert orthogonality_loss(3.0 * shared, 0.1 * private).item() == pytest.approx(0.0, abs=1e-20)


def test_orthogonality_loss_positive_otherwise(rng):
    s = torch.randn(16, 8, generator=rng, dtype=torch.float64)
    p = torch.randn(16, 5, generator=rng, dtype=torch.float64)
    assert orthogonality_loss(s, p).item() > 1e-3
    # identical features: S^T S of unit rows has Frobenius norm^2 >= (sum of squares)^2 / d > 0
    same = orthogonality_loss(s, s)
    assert same.item() > orthogonality_loss(s, p).item() * 0.5
    # the value: centred, row-normalised, squared Frobenius norm
    sc = s - s.mean(0)
    pc = p - p.mean(0)
    sc = sc / sc.norm(dim=1, keepdim=True)
    pc = pc / pc.norm(dim=1, keepdim=True)
    assert orthogonality_loss(s, p).item() == pytest.approx(((sc.T @ pc) ** 2).sum().item(), rel=1e-12)


def test_orthogonality_loss_gradient_and_errors(rng):
    s = torch.randn(8, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    p = torch.randn(8, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(orthogonality_loss, (s, p))
    with pytest.raises(ValueError, match="same B"):
        orthogonality_loss(torch.zeros(4, 2), torch.zeros(5, 2))


def test_layer_mixture_learned_and_emd(rng):
    layers = [torch.randn(2, 3, 4, generator=rng) for _ in range(3)]
    mix = LayerMixture(3)
    out = mix(layers)
    assert torch.allclose(out, sum(layers) / 3, atol=1e-6)  # uniform start
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([0.0, 50.0, 0.0]))
    assert torch.allclose(mix(layers), layers[1], atol=1e-5)
    emd_mix = LayerMixture(3, "emd")
    emd_mix.set_weights(torch.tensor([0.0, 0.0, 2.0]))
    assert torch.allclose(emd_mix.weights, torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(emd_mix(layers), layers[2])
    with pytest.raises(RuntimeError):
        mix.set_weights(torch.ones(3))
    with pytest.raises(ValueError, match="expected 3 layers"):
        mix(layers[:2])


def test_gate_label_embedding_discriminator_pool(rng):
    gate = TaskGate(4, 6, init_bias=0.0)
    with torch.no_grad():
        gate.proj.weight.zero_()
    shared = torch.randn(2, 3, 4, generator=rng)
    assert torch.allclose(gate(shared, torch.randn(2, 3, 6, generator=rng)), 0.5 * shared)

    emb = LabelEmbedding({"a": 2, "b": 3}, dim=5)
    h = torch.randn(4, 5, generator=rng)
    la, lb = emb.logits("a", h), emb.logits("b", h)
    assert la.shape == (4, 2) and lb.shape == (4, 3)
    assert torch.allclose(lb, h @ emb.embedding.weight[2:5].T)  # b owns rows 2..4 of the shared matrix

    disc = TaskDiscriminator(5, 2)
    x = torch.randn(4, 5, generator=rng, requires_grad=True)
    ce = torch.nn.functional.cross_entropy(disc(x), torch.zeros(4, dtype=torch.long))
    ce.backward()
    first = disc.net[0].weight.grad.clone()
    # the discriminator descends its loss, the features receive the reversed gradient
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(disc.net(x2), torch.zeros(4, dtype=torch.long)).backward()
    assert torch.allclose(x.grad, -x2.grad)
    assert torch.allclose(first * 2, disc.net[0].weight.grad)  # accumulated twice, same sign

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    x3 = torch.arange(12.0).reshape(2, 3, 2)
    assert torch.equal(pool(x3, mask, "cls"), x3[:, 0])
    assert torch.allclose(pool(x3, mask, "mean"), torch.stack([x3[0, :2].mean(0), x3[1, 0]]))
