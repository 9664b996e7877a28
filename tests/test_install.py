"""Installing and loading the kernels: the ABI guard, the first-use build cache (its key, its
lock, its failure record), a pure-Python install without a compiler, and the import cost.

The real first-use compile (minutes) is proven by CI, which installs the sdist and the wheel
with plain pip into fresh environments and runs the drop-in snippets there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from bert_emd import _build, _ext

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- ABI guard
def test_abi_guard_refuses_a_build_for_another_torch():
    why = _ext._abi_mismatch({"torch": "2.14.1+cu130"}, "2.13.0+cpu")
    assert why is not None
    assert "2.14.1+cu130" in why and "2.13.0+cpu" in why and "bert-emd build" in why
    assert _ext._abi_mismatch(None, "2.13.0") is not None  # no record: never loaded blind
    assert _ext._abi_mismatch({"torch": "2.13.0"}, "2.13.0") is None


def test_the_package_build_records_its_torch():
    """The ahead-of-time build in this environment carries its record and was loaded."""
    if _ext.loaded_from() != "package":
        pytest.skip("no ahead-of-time build in this environment")
    meta = json.loads((Path(_ext.__file__).parent / _build.META_NAME).read_text())
    assert meta["torch"] == torch.__version__


# ----------------------------------------------------------------------------- cache key
def test_cache_key_follows_sources_flags_and_torch(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", src)
    monkeypatch.delenv("BERT_EMD_FORCE_CPU", raising=False)
    plan = _build.plan("2.13.0+cpu", None, src)
    base = plan.key()  # read now: a key hashes the files as they are when it is asked for
    assert not plan.cuda and base.startswith("torch2.13.0-cpu-")
    assert _build.plan("2.13.0+cpu", None, src).key() == base  # stable
    assert _build.plan("2.14.1", None, src).key() != base  # torch version
    monkeypatch.setenv("BERT_EMD_DEBUG", "1")
    assert _build.plan("2.13.0+cpu", None, src).key() != base  # flags
    monkeypatch.delenv("BERT_EMD_DEBUG")
    with open(src / "core" / "transport_simplex.h", "a") as fh:
        fh.write("\n// edited\n")
    assert _build.plan("2.13.0+cpu", None, src).key() != base  # any header


def test_plan_lists_the_sources():
    p = _build.plan(torch.__version__, None, ROOT / "csrc")
    names = {s.name for s in p.sources}
    assert {"ops.cpp", "emd_cpu.cpp", "layer_costs_cpu.cpp", "sinkhorn_cpu.cpp"} <= names
    assert not any(n.endswith(".cu") for n in names)  # a CPU torch builds CPU kernels only


# ----------------------------------------------------------------------------- the lock
_RACE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bert_emd import _ext
    folder, counter = Path(sys.argv[1]), Path(sys.argv[2])
    def compile_fn(where):
        with open(counter, "a") as fh:
            fh.write("compiled\\n")
        time.sleep(1.5)
        lib = where / "lib.so"
        lib.write_text("x")
        return lib
    print(_ext.build_locked(folder, compile_fn))
""")


def test_concurrent_first_uses_compile_once(tmp_path):
    """Two processes (two DDP ranks) reach the first use at once: one compiles, the other waits
    for it and gets the same library."""
    folder, counter = tmp_path / "key", tmp_path / "count.txt"
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(folder), str(counter)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert counter.read_text().count("compiled") == 1
    assert {o[0].strip() for o in outs} == {str(folder / "lib.so")}
    assert any("waiting for another process" in o[1] for o in outs)
    assert (folder / "READY").read_text().strip() == str(folder / "lib.so")


def test_a_failed_compile_is_recorded_and_not_retried(tmp_path):
    calls = []

    def failing(where):
        calls.append(where)
        raise RuntimeError("error: 'x' was not declared in this scope\nmore output")

    with pytest.raises(_ext.BuildError, match="not declared"):
        _ext.build_locked(tmp_path, failing)
    assert "more output" in (tmp_path / "FAILED").read_text()
    with pytest.raises(_ext.BuildError, match="failed earlier"):
        _ext.build_locked(tmp_path, failing)
    assert len(calls) == 1
    lib = tmp_path / "lib.so"
    assert _ext.build_locked(tmp_path, lambda where: lib, force=True) == lib  # `bert-emd build --force`
    assert not (tmp_path / "FAILED").exists()


# ----------------------------------------------------------------------------- a pure-Python install
def _pure_install(tmp_path: Path) -> Path:
    """The packages as a plain pip install lays them out: Python files and bert_emd/_csrc, no
    compiled library."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "python" / "bert_emd", site / "bert_emd",
                    ignore=shutil.ignore_patterns("*.so", _build.META_NAME, "__pycache__"))
    shutil.copytree(ROOT / "emd_kernels", site / "emd_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", site / "bert_emd" / "_csrc")
    return site


def _run(site: Path, code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(site), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                          cwd=site, timeout=300)


def _solves_with_one_warning(site: Path, env: dict[str, str], calls: int, words: str) -> None:
    """In a fresh process on ``site``: ``calls`` solves of a 2x2 problem give the right value and
    exactly one warning, which contains ``words``; the kernels stay unloaded."""
    code = textwrap.dedent(f"""
        import warnings
        import torch, bert_emd
        from bert_emd import _ext
        assert bert_emd.__file__.startswith({str(site)!r}), bert_emd.__file__
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range({calls}):
                r = bert_emd.emd(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        assert abs(float(r.cost)) < 1e-12
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1 and {words!r} in msgs[0], msgs
        assert not _ext.has_extension()
        print("ok")
    """)
    out = _run(site, code, env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_without_a_compiler_the_python_backends_serve_with_one_warning(tmp_path):
    site = _pure_install(tmp_path)
    env = {"CXX": str(tmp_path / "no-such-compiler"), "BERT_EMD_CACHE": str(tmp_path / "cache")}
    _solves_with_one_warning(site, env, 3, "no C++ compiler")
    info = _run(site, "from bert_emd.cli import main; main(['info'])", env)
    assert info.returncode == 0, info.stderr
    assert "no C++ compiler was found" in info.stdout and "bert-emd build" in info.stdout
    assert "auto -> torch" in info.stdout


def test_without_the_sources_the_python_backends_serve_with_one_warning(tmp_path):
    """An install that lost bert_emd/_csrc (a compiler is there): nothing to compile, one warning
    naming that, never an exception from the first-use build."""
    site = _pure_install(tmp_path)
    shutil.rmtree(site / "bert_emd" / "_csrc")
    _solves_with_one_warning(site, {"BERT_EMD_CACHE": str(tmp_path / "cache")}, 2, "sources")


def test_a_build_for_another_torch_is_not_loaded(tmp_path):
    """The ABI guard at import: a recorded mismatch is named, with the fix, and not loaded."""
    if _ext.loaded_from() != "package":
        pytest.skip("no ahead-of-time build in this environment")
    site = _pure_install(tmp_path)
    lib = next(Path(_ext.__file__).parent.glob("_C*.so"))
    shutil.copy(lib, site / "bert_emd" / lib.name)
    (site / "bert_emd" / _build.META_NAME).write_text(json.dumps({"torch": "1.0.0"}))
    env = {"CXX": str(tmp_path / "no-such-compiler"), "BERT_EMD_CACHE": str(tmp_path / "cache")}
    out = _run(site, "import bert_emd; from bert_emd import _ext; print(_ext.has_extension())", env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert f"built for torch 1.0.0 but torch {torch.__version__} is running" in out.stderr


# ----------------------------------------------------------------------------- import cost
def test_import_pulls_no_heavy_modules():
    code = ("import sys, bert_emd, bert_emd.nn; heavy = ['torch._dynamo', 'triton', 'transformers', "
            "'torch.utils.cpp_extension']; print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_backend_query_is_marked_constant_for_dynamo_as_the_decorator_would():
    import torch._dynamo
    from bert_emd import _backends

    def probe():
        return True

    before = set(vars(probe))
    torch._dynamo.assume_constant_result(probe)
    added = {k: getattr(probe, k) for k in set(vars(probe)) - before}
    assert added and all(getattr(_backends._has_kernel, k, None) == v for k, v in added.items())
