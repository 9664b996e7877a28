"""Loading of the compiled C++/CUDA kernels, and compiling them on first use.

Two ways to have the kernels (``bert_emd._build`` describes both builds):

1. **Ahead of time**: ``bert_emd._C`` inside the installed package, built by ``setup.py`` when
   torch was importable at build time (``pip install --no-build-isolation .``, ``make install``).
   It is loaded only if ``_C.build.json`` beside it names the running torch: a library built for
   another torch has another C++ ABI, and loading it could crash or misbehave (the ABI guard).
2. **On first use**: otherwise (a plain ``pip install``, whose isolated build environment has no
   torch), the sources shipped in the package are compiled with ``torch.utils.cpp_extension``
   (ninja) the first time a C++ kernel is asked for, into
   ``~/.cache/bert_emd/<torch version>-<python>-<cpu|cuda>-<hash of sources and flags>/``, and
   loaded from there by every later process. A file lock makes concurrent first uses (DDP ranks)
   compile once; a failed compile is recorded so that later processes do not retry it, and
   ``bert-emd build`` compiles (or retries) ahead of time.

Importing this module never compiles, imports no compiler machinery and never queries CUDA: it
loads an existing build (one ``dlopen``) or records why there is none. Where no build can be had
(no C++ compiler), the ``torch`` and ``triton`` backends serve, with one warning.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import _build

__all__ = ["BuildError", "build", "build_info", "ensure", "extension_error", "has_extension",
           "loaded_from", "on_load"]

LIB_NAME = "bert_emd_C"
JIT_ENV = "BERT_EMD_JIT"  #: 0 turns compile-on-first-use off (an existing build still loads)
_READY, _FAILED, _LOCK = "READY", "FAILED", ".lock"


class BuildError(RuntimeError):
    """The C++ kernels could not be compiled (the message says why and where the log is)."""


_state_lock = threading.RLock()
_loaded_from: str | None = None  # "package" (ahead of time) or the cache folder's path
_error: str | None = None  # why nothing is loaded
_callbacks: list[Callable[[], None]] = []
_gave_up = False  # ensure() found no way to the kernels in this process


def has_extension() -> bool:
    """True when the compiled kernels are loaded (``torch.ops.bert_emd.emd_exact`` and friends)."""
    return _loaded_from is not None


def extension_error() -> str | None:
    """Why the compiled kernels are not loaded, or None when they are."""
    return None if has_extension() else _error


def loaded_from() -> str | None:
    """``"package"`` for the ahead-of-time ``bert_emd._C``, the cache folder of a first-use
    build, or None."""
    return _loaded_from


def on_load(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the kernels are loaded: now if they are, else right after a first-use
    compile. The ops use it to register fake kernels and autograd rules on the C++ schemas."""
    with _state_lock:
        if has_extension():
            fn()
        else:
            _callbacks.append(fn)


def _loaded(where: str) -> None:
    global _loaded_from, _error
    _loaded_from, _error = where, None
    build_info.cache_clear()
    for fn in _callbacks:
        fn()
    _callbacks.clear()


# ----------------------------------------------------------------------------- loading
def _abi_mismatch(meta: dict | None, running: str) -> str | None:
    """The ABI guard: None if an ahead-of-time build recorded as ``meta`` may be loaded into
    torch ``running``, else the message that says why not and what to do."""
    fix = ("reinstall bert-emd against this torch (`pip install --force-reinstall --no-deps bert-emd`), "
           "or run `bert-emd build` to compile the kernels for it into the cache")
    if meta is None or "torch" not in meta:
        return f"bert_emd._C has no record of the torch it was built for ({_build.META_NAME} is missing): {fix}"
    if meta["torch"] != running:
        return (f"bert_emd._C was built for torch {meta['torch']} but torch {running} is running; a C++ "
                f"extension built for another torch must not be loaded: {fix}")
    return None


def _try_package() -> tuple[bool, str | None]:
    """Load the ahead-of-time ``bert_emd._C`` if there is one for this torch."""
    try:
        spec = importlib.util.find_spec("bert_emd._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None or Path(spec.origin).parent != Path(__file__).parent:
        return False, None  # (a library elsewhere, e.g. found by another install's import hook, is not ours)
    meta_path = Path(spec.origin).parent / _build.META_NAME
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = None
    why = _abi_mismatch(meta, torch.__version__)
    if why is not None:
        return False, why
    try:
        from . import _C  # noqa: F401  (registers the TORCH_LIBRARY schemas and kernels)
    except ImportError as exc:
        return False, f"bert_emd._C could not be imported ({exc}); run `bert-emd build`"
    return True, None


def _plan() -> _build.BuildPlan:
    return _build.plan(torch.__version__, torch.version.cuda)


def _cache_dir(p: _build.BuildPlan) -> Path:
    return _build.cache_root() / p.key()


def _try_cache() -> tuple[bool, str | None, bool]:
    """Load a finished first-use build for this torch, these sources and flags. Returns (loaded,
    why not, whether compiling now could help: not without sources or a compiler, not after a
    recorded failure, not when the cached build is there but does not load)."""
    try:
        p = _plan()
    except FileNotFoundError as exc:
        return False, str(exc), False
    folder = _cache_dir(p)
    ready = folder / _READY
    if ready.is_file():
        lib = Path(ready.read_text().strip())
        try:
            torch.ops.load_library(str(lib))
        except OSError as exc:
            return False, f"the cached build {lib} could not be loaded ({exc}); run `bert-emd build --force`", False
        _loaded(str(folder))
        return True, None, False
    if (folder / _FAILED).is_file():
        first = (folder / _FAILED).read_text().strip().splitlines()[:1] or ["unknown error"]
        return False, (f"compiling the C++ kernels failed earlier ({first[0]}; log: {folder / _FAILED}); "
                       "fix the cause and run `bert-emd build`"), False
    if _build.find_cxx() is None:
        return False, (f"not compiled, and no C++ compiler was found ({os.environ.get('CXX', 'c++')}): install "
                       "one (e.g. g++ >= 10) and run `bert-emd build` for the C++ kernels"), False
    return False, (f"not compiled yet for torch {torch.__version__}: compiles on the first use of a C++ kernel "
                   f"(about 2 minutes on 2 cores; cached in {folder}), or now with `bert-emd build`"), True


def _load_at_import() -> None:
    global _error
    ok, why_pkg = _try_package()
    if ok:
        _loaded("package")
        return
    ok, why_cache, _ = _try_cache()
    if ok:
        return
    if why_pkg is not None:
        # an installed build that must not be used is worth saying at once, not at first use
        warnings.warn(f"bert-emd: {why_pkg}", RuntimeWarning, stacklevel=3)
    _error = why_cache if why_pkg is None else f"{why_pkg}. {why_cache}"


# ----------------------------------------------------------------------------- compiling
def ensure(compile: bool = True) -> bool:
    """Make the compiled kernels available if possible; True when they are loaded.

    With ``compile`` (and unless ``BERT_EMD_JIT=0``) a missing build is compiled now, with one
    progress line. A build that cannot be had (no compiler, a failed compile) warns once and
    returns False: the callers then use the ``torch`` / ``triton`` backends."""
    global _gave_up, _error
    if has_extension():
        return True
    if _gave_up or not compile or os.environ.get(JIT_ENV, "1").strip() == "0":
        return False
    with _state_lock:
        if has_extension():
            return True
        if _gave_up:
            return False
        ok, why, buildable = _try_cache()
        if ok:
            return True
        _error = why
        if buildable:
            try:
                build()
                return True
            except BuildError as exc:
                _error = str(exc)
        _gave_up = True  # decided for this process: one warning, no further attempts
        warnings.warn(f"bert-emd: C++ kernels unavailable: {_error}. Using the PyTorch/Triton backends.",
                      RuntimeWarning, stacklevel=3)
        return False


@contextlib.contextmanager
def _file_lock(path: Path, waiting_message: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``; released by the kernel if the holder dies."""
    import fcntl

    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting_message, file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_locked(folder: Path, compile_fn: Callable[[Path], Path], *, force: bool = False,
                 describe: str = "the C++ kernels") -> Path:
    """The cache protocol around one compile: under an exclusive lock on ``folder``, return the
    library recorded in ``folder/READY`` if there is one (another process built it), else run
    ``compile_fn(folder) -> library path`` and record it (``READY`` is written atomically, last).
    A failure is recorded in ``folder/FAILED`` and raised as :class:`BuildError`; later calls
    raise it again without compiling unless ``force``."""
    folder.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder / _LOCK, f"bert-emd: waiting for another process compiling {describe} ({folder})"):
        ready, failed = folder / _READY, folder / _FAILED
        if force:
            for f in (ready, failed):
                f.unlink(missing_ok=True)
        if ready.is_file():
            return Path(ready.read_text().strip())
        if failed.is_file():
            raise BuildError(f"compiling {describe} failed earlier (log: {failed}); run `bert-emd build --force`")
        try:
            lib = compile_fn(folder)
        except Exception as exc:  # the compiler's output is in the message
            failed.write_text(f"{type(exc).__name__}: {exc}\n")
            first = str(exc).strip().splitlines()[:1] or [type(exc).__name__]
            raise BuildError(f"compiling {describe} failed ({first[0]}); full log: {failed}") from exc
        tmp = folder / f".{_READY}.{os.getpid()}"
        tmp.write_text(f"{lib}\n")
        os.replace(tmp, ready)
        return lib


_COMPILE_SCRIPT = """
import json, sys
from torch.utils import cpp_extension
kw = json.loads(sys.argv[1])
print(cpp_extension.load(**kw))
"""


def build(force: bool = False, verbose: bool = False) -> Path:
    """Compile the C++ (and, with a CUDA torch and nvcc, CUDA) kernels for the running torch
    into the cache and load them (unless kernels are loaded already); return the cache folder.
    ``bert-emd build`` calls this.

    The compile runs in a child process (``torch.utils.cpp_extension.load``, which also checks
    that the library loads); its output goes to ``build.log`` in the cache folder.

    Raises:
        BuildError: no compiler, or the compile failed (the message names the log file).
    """
    p = _plan()
    folder = _cache_dir(p)
    if _build.find_cxx() is None:
        raise BuildError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')}); install one (e.g. g++ >= 10)")

    def compile_fn(where: Path) -> Path:
        import subprocess

        kind = "C++ and CUDA" if p.cuda else "C++"
        print(f"bert-emd: compiling the {kind} kernels for torch {torch.__version__} (once per torch "
              f"version and source change; about 2 minutes on 2 cores) into {where} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        builddir = where / "build"
        if builddir.exists():  # leftovers of an interrupted compile
            shutil.rmtree(builddir)
        builddir.mkdir()
        kwargs = dict(
            name=LIB_NAME, sources=[str(s) for s in p.sources], extra_cflags=p.cxx_flags,
            extra_cuda_cflags=p.nvcc_flags if p.cuda else None, extra_ldflags=p.ld_flags,
            extra_include_paths=p.include_dirs(), build_directory=str(builddir), verbose=True,
            with_cuda=p.cuda, is_python_module=False,  # the library only registers ops
        )
        log = where / "build.log"
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(kwargs)],
                                  stdout=fh, stderr=subprocess.STDOUT, text=True)
        text = log.read_text()
        if verbose:
            print(text, file=sys.stderr)
        if proc.returncode != 0:
            errors = [ln for ln in text.splitlines() if "error" in ln.lower()]
            raise BuildError("\n".join([*(errors[:1] or ["the compiler failed"]), *text.splitlines()[-40:]]))
        print(f"bert-emd: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return Path(text.strip().splitlines()[-1])

    with _state_lock:
        lib = build_locked(folder, compile_fn, force=force)
        if not has_extension():
            torch.ops.load_library(str(lib))
            _loaded(str(folder))
    return folder


# ----------------------------------------------------------------------------- build facts
@functools.lru_cache(maxsize=1)
def build_info() -> dict[str, str]:
    """Key/value facts the extension was compiled with (``cuda``, ``openmp``, ``cuda_max_nodes``)."""
    if not has_extension():
        return {}
    raw = torch.ops.bert_emd.build_info()
    return dict(kv.split("=", 1) for kv in raw.split(";") if kv)


def built_with_cuda() -> bool:
    return build_info().get("cuda") == "1"


def cuda_max_nodes() -> int:
    return int(build_info().get("cuda_max_nodes", "0"))


_load_at_import()  # last: it runs the registrations and build_info's cache reset defined above
