"""Test configuration. Runs before any test module imports triton or transformers."""

import os

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before any
# @triton.jit decorator executes, so before bert_emd / emd_kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Never reach for the Hugging Face hub (a lookup hangs ~30 s before failing offline).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _cuda_available() -> bool:
    # Queried lazily (at collection of a marked test, never at import of this file's module
    # level by test modules) so CPU-only machines never initialise CUDA.
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if not any("cuda" in item.keywords for item in items):
        return
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> torch.Generator:
    """A generator seeded per test from a fresh seed printed on failure (inputs differ each run)."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("BERT_EMD_TEST_SEED") is None \
        else int(os.environ["BERT_EMD_TEST_SEED"])
    print(f"BERT_EMD_TEST_SEED={seed}")
    g = torch.Generator().manual_seed(seed)
    return g


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models on a shared machine: threads only add
    contention); modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
