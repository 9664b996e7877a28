"""Task samplers: empirical frequencies over 10^4 draws match the formulas; batch sampler."""

import numpy as np
import pytest
import torch
from bert_emd.mtl.samplers import EpochShuffleSampler, MultiTaskBatchSampler, make_sampler

SIZES = {"big": 8000, "mid": 1500, "small": 100}
DRAWS = 10_000


def _freq(idx: np.ndarray, t: int) -> np.ndarray:
    return np.bincount(idx, minlength=t) / len(idx)


def _expected(alpha: float) -> np.ndarray:
    n = np.array(list(SIZES.values()), dtype=np.float64)
    w = n**alpha
    return w / w.sum()


def _tolerance(p: np.ndarray) -> np.ndarray:
    # 5 standard deviations of a binomial frequency over DRAWS draws (false alarm ~1e-6)
    return 5 * np.sqrt(p * (1 - p) / DRAWS) + 1e-9


@pytest.mark.parametrize(
    "kind, kwargs, alpha",
    [
        ("proportional", {}, 1.0),
        ("uniform", {}, 0.0),
        ("temperature", {"temperature": 2.0}, 0.5),
        ("temperature", {"temperature": 5.0}, 0.2),
        ("power", {}, 0.75),
    ],
)
def test_empirical_frequencies_match_formula(kind, kwargs, alpha, rng):
    sampler = make_sampler(kind, SIZES, **kwargs)
    p = _expected(alpha)
    assert np.allclose(sampler.probabilities(), p, rtol=1e-12)
    seed = int(torch.randint(0, 2**31 - 1, (), generator=rng))  # fresh per run, printed by the fixture
    idx = sampler.draw(DRAWS, seed=seed)
    freq = _freq(idx, 3)
    assert np.all(np.abs(freq - p) <= _tolerance(p)), (kind, seed, freq, p)


def test_distributions_differ():
    # the formulas are really different: proportional starves the small task, uniform does not
    prop = make_sampler("proportional", SIZES).draw(DRAWS, seed=1)
    unif = make_sampler("uniform", SIZES).draw(DRAWS, seed=1)
    assert _freq(prop, 3)[2] < 0.03 and _freq(unif, 3)[2] > 0.3


def test_annealing_moves_the_exponent():
    s = make_sampler("proportional", SIZES, anneal_to=0.2)
    assert s.exponent(0.0) == 1.0 and s.exponent(1.0) == pytest.approx(0.2) and s.exponent(0.5) == pytest.approx(0.6)
    for progress, alpha in ((0.0, 1.0), (0.5, 0.6), (1.0, 0.2)):
        p = _expected(alpha)
        assert np.allclose(s.probabilities(progress), p)
        freq = _freq(s.draw(DRAWS, seed=7, progress=progress), 3)
        assert np.all(np.abs(freq - p) <= _tolerance(p)), (progress, freq, p)
    # a schedule over the whole run: the first half is richer in the big task than the second
    sched = s.schedule(np.random.default_rng(3), DRAWS, 0.0, 1.0)
    first, second = _freq(sched[: DRAWS // 2], 3), _freq(sched[DRAWS // 2 :], 3)
    assert first[0] > second[0] + 0.1


def test_epoch_shuffle_counts_exactly():
    s = make_sampler("epoch_shuffle", SIZES, batch_size=32)
    assert isinstance(s, EpochShuffleSampler)
    batches = np.array([250, 47, 4])  # ceil(n / 32)
    assert s.steps_per_epoch == batches.sum()
    sched = s.schedule(np.random.default_rng(0), 3 * s.steps_per_epoch)
    for e in range(3):  # every epoch holds every batch exactly once
        epoch = sched[e * s.steps_per_epoch : (e + 1) * s.steps_per_epoch]
        assert np.array_equal(np.bincount(epoch, minlength=3), batches)
    assert not np.array_equal(sched[: s.steps_per_epoch], np.sort(sched[: s.steps_per_epoch]))  # shuffled
    freq = _freq(s.schedule(np.random.default_rng(1), DRAWS), 3)
    p = batches / batches.sum()
    assert np.all(np.abs(freq - p) <= _tolerance(p))


def test_sampler_errors():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("softmax", SIZES)
    with pytest.raises(ValueError, match="anneal"):
        make_sampler("epoch_shuffle", SIZES, anneal_to=0.5)
    with pytest.raises(ValueError, match="positive integers"):
        make_sampler("uniform", {"a": 0, "b": 3})
    with pytest.raises(ValueError, match="temperature"):
        make_sampler("temperature", SIZES, temperature=0.0)


def test_batch_sampler_one_task_per_batch_and_reproducible():
    sizes = [50, 20, 7]
    offsets = np.cumsum([0] + sizes[:-1])
    bs = MultiTaskBatchSampler(sizes, make_sampler("uniform", sizes), batch_size=8, seed=3, num_epochs=2)
    assert len(bs) == 7 + 3 + 1
    bs.set_epoch(0)
    epoch0 = list(bs)
    assert len(epoch0) == len(bs)
    seen = {t: [] for t in range(3)}
    for batch in epoch0:
        tasks = {int(np.searchsorted(offsets, i, side="right") - 1) for i in batch}
        assert len(tasks) == 1  # one task per batch
        t = tasks.pop()
        assert len(batch) == min(8, sizes[t])
        assert all(0 <= i - offsets[t] < sizes[t] for i in batch)
        seen[t].extend(batch)
    # a task walks through its shuffled data without repeating before it is exhausted
    for t, idx in seen.items():
        first = idx[: sizes[t]]
        assert len(set(first)) == len(first)
    bs.set_epoch(0)
    assert list(bs) == epoch0  # same (seed, epoch) -> same batches (exact resume)
    bs.set_epoch(1)
    assert list(bs) != epoch0


def test_batch_sampler_tasks_per_step_and_ranks():
    sizes = [40, 40]
    sampler = make_sampler("proportional", sizes)
    bs = MultiTaskBatchSampler(sizes, sampler, batch_size=4, tasks_per_step=2, seed=0)
    assert len(bs) == 10
    for batch in bs:
        assert len(batch) == 8  # two task batches of 4
    ranks = [MultiTaskBatchSampler(sizes, sampler, batch_size=4, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    for b0, b1 in zip(*ranks):
        assert len(b0) == len(b1) == 2 and not set(b0) & set(b1)
        assert (b0[0] < 40) == (b1[0] < 40)  # both ranks on the same task in every step
