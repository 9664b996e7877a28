"""Task samplers: which task's batch each training step takes.

With n_t training examples in task t:

=================  ===========================================================================
``proportional``   p_t = n_t / sum n                       (exponent alpha = 1)
``uniform``        p_t = 1 / T                             (alpha = 0)
``temperature``    p_t ~ n_t^(1/T)                         (alpha = 1/T)
``power``          p_t ~ n_t^0.75                          (alpha = ``power``)
``epoch_shuffle``  MT-DNN: every epoch, all ceil(n_t / batch) batches of every task, shuffled
=================  ===========================================================================

The first four are one family, p_t(alpha) ~ n_t^alpha, drawn independently per step.
Annealing (``anneal_to``) moves alpha linearly from its start value to ``anneal_to`` as the
training progress goes from 0 to 1 (``anneal_to=0.2`` from ``proportional`` is the annealed
sampling of Stickland & Murray, 2019).

:class:`MultiTaskBatchSampler` turns a sampler into a ``torch.utils.data`` batch sampler over
the concatenation of the tasks' datasets: every batch holds one task's examples (or, with
``tasks_per_step=k``, k tasks' batches one after the other), each task walks through its own
shuffled data and reshuffles when it runs out. Everything is seeded by (seed, epoch): a resumed
run that skips the first batches of an epoch sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = [
    "SAMPLERS",
    "EpochShuffleSampler",
    "ExponentSampler",
    "MultiTaskBatchSampler",
    "TaskSampler",
    "make_sampler",
]

SAMPLERS = ("proportional", "uniform", "temperature", "power", "epoch_shuffle")


def _sizes(sizes: Sequence[int] | Mapping[str, int]) -> tuple[list[str], np.ndarray]:
    if isinstance(sizes, Mapping):
        names, values = list(sizes), list(sizes.values())
    else:
        values = list(sizes)
        names = [str(i) for i in range(len(values))]
    if not values:
        raise ValueError("a task sampler needs at least one task")
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or not np.all(np.isfinite(arr)) or np.any(arr < 1) or np.any(arr != np.round(arr)):
        raise ValueError(f"task sizes must be positive integers, got {dict(zip(names, values))}")
    return names, arr


class TaskSampler:
    """Base class: a distribution over T tasks, possibly depending on the training progress.

    Args:
        sizes: training examples per task (a list, or ``{name: n}``).
    """

    kind = "base"

    def __init__(self, sizes: Sequence[int] | Mapping[str, int]) -> None:
        self.names, self.sizes = _sizes(sizes)

    @property
    def num_tasks(self) -> int:
        return len(self.sizes)

    def probabilities(self, progress: float = 0.0) -> np.ndarray:
        """[T] task probabilities at training progress in [0, 1]."""
        raise NotImplementedError

    def schedule(self, rng: np.random.Generator, num_steps: int, start: float = 0.0, end: float = 0.0) -> np.ndarray:
        """[num_steps] task indices for consecutive steps whose progress runs from ``start`` to
        ``end`` (linearly, for annealing)."""
        raise NotImplementedError

    def draw(self, num: int, *, seed: int = 0, progress: float = 0.0) -> np.ndarray:
        """``num`` independent task indices at a fixed progress (for inspection and tests)."""
        return self.schedule(np.random.default_rng(seed), num, progress, progress)


class ExponentSampler(TaskSampler):
    """p_t ~ n_t^alpha, alpha annealed linearly to ``anneal_to`` over training when given.

    Args:
        sizes: examples per task.
        alpha: the exponent at progress 0 (1 proportional, 0 uniform, 1/T temperature, 0.75 power).
        anneal_to: exponent at progress 1, or None (no annealing).
        kind: the name reported by :attr:`kind`.
    """

    def __init__(
        self,
        sizes: Sequence[int] | Mapping[str, int],
        alpha: float,
        *,
        anneal_to: float | None = None,
        kind: str = "exponent",
    ) -> None:
        super().__init__(sizes)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"sampler exponent alpha must be finite and >= 0, got {alpha}")
        if anneal_to is not None and not (math.isfinite(anneal_to) and anneal_to >= 0):
            raise ValueError(f"anneal_to must be finite and >= 0, got {anneal_to}")
        self.alpha = float(alpha)
        self.anneal_to = None if anneal_to is None else float(anneal_to)
        self.kind = kind

    def exponent(self, progress: float = 0.0) -> float:
        """alpha at training progress in [0, 1]."""
        if self.anneal_to is None:
            return self.alpha
        p = min(max(float(progress), 0.0), 1.0)
        return self.alpha + (self.anneal_to - self.alpha) * p

    def probabilities(self, progress: float = 0.0) -> np.ndarray:
        # n^alpha in log space: no overflow for big data sets and big exponents
        logw = self.exponent(progress) * np.log(self.sizes)
        w = np.exp(logw - logw.max())
        return w / w.sum()

    def schedule(self, rng: np.random.Generator, num_steps: int, start: float = 0.0, end: float = 0.0) -> np.ndarray:
        if num_steps <= 0:
            return np.zeros(0, dtype=np.int64)
        u = rng.random(num_steps)
        if self.anneal_to is None or start == end:
            cdf = np.cumsum(self.probabilities(start))
            idx = np.searchsorted(cdf, u * cdf[-1], side="right")
        else:
            progress = np.linspace(start, end, num_steps)
            idx = np.empty(num_steps, dtype=np.int64)
            for i, (ui, pi) in enumerate(zip(u, progress)):
                cdf = np.cumsum(self.probabilities(float(pi)))
                idx[i] = np.searchsorted(cdf, ui * cdf[-1], side="right")
        return np.minimum(idx, self.num_tasks - 1).astype(np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, alpha={self.alpha}, anneal_to={self.anneal_to})"


class EpochShuffleSampler(TaskSampler):
    """MT-DNN's schedule: each epoch holds every task's ceil(n_t / batch_size) batches once, in a
    random order (so task t's share is its batch count over the total).

    Args:
        sizes: examples per task.
        batch_size: examples per batch.
    """

    kind = "epoch_shuffle"

    def __init__(self, sizes: Sequence[int] | Mapping[str, int], batch_size: int) -> None:
        super().__init__(sizes)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.batches = np.ceil(self.sizes / self.batch_size).astype(np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return int(self.batches.sum())

    def probabilities(self, progress: float = 0.0) -> np.ndarray:
        return self.batches / self.batches.sum()

    def schedule(self, rng: np.random.Generator, num_steps: int, start: float = 0.0, end: float = 0.0) -> np.ndarray:
        """Consecutive shuffled epochs of batches, cut at ``num_steps``."""
        out: list[np.ndarray] = []
        total = 0
        epoch = np.repeat(np.arange(self.num_tasks), self.batches)
        while total < num_steps:
            out.append(rng.permutation(epoch))
            total += len(epoch)
        return np.concatenate(out)[:num_steps] if out else np.zeros(0, dtype=np.int64)

    def __repr__(self) -> str:
        return f"EpochShuffleSampler(batch_size={self.batch_size}, batches={self.batches.tolist()})"


def make_sampler(
    kind: str,
    sizes: Sequence[int] | Mapping[str, int],
    *,
    temperature: float = 2.0,
    power: float = 0.75,
    anneal_to: float | None = None,
    batch_size: int = 32,
) -> TaskSampler:
    """A sampler by name (see the module docstring)."""
    if kind == "proportional":
        return ExponentSampler(sizes, 1.0, anneal_to=anneal_to, kind=kind)
    if kind == "uniform":
        return ExponentSampler(sizes, 0.0, anneal_to=anneal_to, kind=kind)
    if kind == "temperature":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return ExponentSampler(sizes, 1.0 / temperature, anneal_to=anneal_to, kind=kind)
    if kind == "power":
        return ExponentSampler(sizes, power, anneal_to=anneal_to, kind=kind)
    if kind == "epoch_shuffle":
        if anneal_to is not None:
            raise ValueError("the epoch_shuffle sampler has no distribution to anneal (anneal_to must be None)")
        return EpochShuffleSampler(sizes, batch_size)
    raise ValueError(f"unknown sampler {kind!r}; expected one of {', '.join(SAMPLERS)}")


class MultiTaskBatchSampler(Sampler[list[int]]):
    """Batches of global indices into ``ConcatDataset(task datasets)``, one task per batch.

    Args:
        sizes: examples per task (the datasets' lengths, in ConcatDataset order).
        sampler: which task each batch takes.
        batch_size: examples per task batch.
        steps_per_epoch: steps per epoch (default: sum_t ceil(n_t / batch_size) / tasks_per_step,
            rounded up; the epoch-shuffle schedule needs this default).
        num_epochs: epochs of the run (only for the annealing progress).
        tasks_per_step: task batches per step (k > 1: the k batches are yielded as one list,
            in order; the collate function splits them by task).
        seed: base seed; epoch e uses ``(seed, e)``.
        num_replicas, rank: distributed runs: every rank draws the same task sequence and takes
            its own slice of each task batch (so every rank solves the same tasks' transport
            problems in the same order).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        sampler: TaskSampler,
        batch_size: int,
        *,
        steps_per_epoch: int | None = None,
        num_epochs: float = 1.0,
        tasks_per_step: int = 1,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        _, arr = _sizes(sizes)
        if len(arr) != sampler.num_tasks:
            raise ValueError(f"{len(arr)} datasets but the sampler has {sampler.num_tasks} tasks")
        if batch_size < 1 or tasks_per_step < 1:
            raise ValueError(f"batch_size and tasks_per_step must be >= 1, got {batch_size}, {tasks_per_step}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.sizes = arr.astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.tasks_per_step = int(tasks_per_step)
        total_batches = int(np.ceil(self.sizes / batch_size).sum())
        self.steps_per_epoch = int(steps_per_epoch or math.ceil(total_batches / tasks_per_step))
        self.num_epochs = max(float(num_epochs), 1e-9)
        self.seed = int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at the start of every epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def task_schedule(self, epoch: int | None = None) -> np.ndarray:
        """[steps_per_epoch, tasks_per_step] task indices of an epoch."""
        e = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, e, 0])
        n = self.steps_per_epoch * self.tasks_per_step
        start = e / self.num_epochs
        end = min((e + 1) / self.num_epochs, 1.0) - 1.0 / (n * self.num_epochs)
        return self.sampler.schedule(rng, n, start, max(start, end)).reshape(self.steps_per_epoch, self.tasks_per_step)

    def __iter__(self) -> Iterator[list[int]]:
        e = self.epoch
        schedule = self.task_schedule(e)
        rng = np.random.default_rng([self.seed, e, 1])
        perms = [rng.permutation(int(n)) for n in self.sizes]
        pos = [0] * len(self.sizes)
        for row in schedule:
            batch: list[int] = []
            for t in row:
                t = int(t)
                n = int(self.sizes[t])
                take = []
                while len(take) < min(self.batch_size, n):
                    if pos[t] >= n:
                        perms[t] = rng.permutation(n)
                        pos[t] = 0
                    k = min(self.batch_size - len(take), n - pos[t])
                    take.extend(perms[t][pos[t] : pos[t] + k].tolist())
                    pos[t] += k
                if self.num_replicas > 1:
                    take = take[self.rank :: self.num_replicas] or take[:1]
                batch.extend(int(self.offsets[t]) + i for i in take)
            yield batch
        self.epoch = e + 1  # fallback when nobody calls set_epoch
