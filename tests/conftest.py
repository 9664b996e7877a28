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


def pytest_configure(config):
    # pytest-xdist workers (pyproject's addopts start 2): an equal share of the cores each, so that
    # intra-op threads do not oversubscribe the machine
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def pytest_collection_modifyitems(config, items):
    if not any("cuda" in item.keywords for item in items):
        return
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEFAULT_SEED = 1234


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None,
                     help=f"seed of the rng fixture (default {DEFAULT_SEED}, or BERT_EMD_TEST_SEED); "
                          "use another to explore fresh inputs")


def _seed(config) -> int:
    opt = config.getoption("--seed")
    if opt is not None:
        return opt
    env = os.environ.get("BERT_EMD_TEST_SEED")
    return DEFAULT_SEED if env is None else int(env)


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator seeded with the run's fixed seed (``--seed`` / ``BERT_EMD_TEST_SEED`` override
    it); a failing test that used it reports the seed, so the failure can be replayed."""
    seed = _seed(request.config)
    request.node.user_properties.append(("seed", seed))
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if report.failed and seeds:
        report.sections.append(("seed", f"rng fixture seed {seeds[0]}: replay with --seed {seeds[0]}"))


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models on a shared machine: threads only add
    contention); modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The tiny multi-task workspaces (built once per module that uses them; see tests/helpers.py)
@pytest.fixture(scope="module")
def mtl_workspace(tmp_path_factory):
    """A tiny encoder, a teacher per task and two small tasks (sentences, tags) with dev splits."""
    import helpers

    return helpers.build_mtl_workspace(tmp_path_factory.mktemp("mtl"))


@pytest.fixture(scope="module")
def mtl_ddp_workspace(tmp_path_factory):
    """The multi-process tests' workspace: tiny encoder, per-task and multi-task teachers, two tasks."""
    import helpers

    return helpers.build_mtl_ddp_workspace(tmp_path_factory.mktemp("mtl_ddp"))
