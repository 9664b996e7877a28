"""The ``bert-emd`` command: ``info`` (what is built and usable here, and why the rest is not),
``bench`` (kernel micro-benchmarks), ``finetune`` / ``distill`` / ``evaluate`` / ``plot``
(distillation with Hugging Face Trainer), ``demo`` (the offline demo), ``mtl`` (multi-task)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

BENCHES: dict[str, str] = {
    "emd": "bench_emd",
    "costs": "bench_layer_costs",
    "sinkhorn": "bench_sinkhorn",
    "attention": "bench_attention_costs",
    "distill-step": "bench_distill_step",
    "import": "bench_import",
    "overhead": "bench_overhead",
}


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _backends, _ext

    print(f"bert-emd {__version__}")
    print(f"  python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"  torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), "
          f"triton {_version('triton')}, transformers {_version('transformers')}")
    if _ext.has_extension():
        info = _ext.build_info()
        where = _ext.loaded_from()
        origin = "built with the package" if where == "package" else f"compiled on first use, cached in {where}"
        print(f"  C++ kernels: loaded, {origin} (CUDA kernels: {'yes' if info.get('cuda') == '1' else 'no'}, "
              f"OpenMP: {'yes' if info.get('openmp') == '1' else 'no'}, "
              f"CUDA EMD capacity M+N <= {info.get('cuda_max_nodes')})")
    else:
        print(f"  C++ kernels: not loaded -- {_ext.extension_error()}")
    print(f"  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    devices = ["cpu"]
    # Only here, on explicit request, is CUDA queried.
    cuda = torch.cuda.is_available()
    print(f"  CUDA device: {torch.cuda.get_device_name() if cuda else 'none visible'}")
    if cuda:
        devices.append("cuda")
    for dev in devices:
        print(f"\nbackends for {dev} tensors (auto picks the first usable in order):")
        table = _backends.explain(dev)
        for op, reasons in table.items():
            order = _backends._OP_BACKENDS[op].get(dev, ())
            auto = _backends.select(op, "auto", torch.device(dev))
            if _backends.host_fallback(op, dev):
                auto = "cpu kernel on the host (inputs copied there and back: no CUDA kernel built)"
            print(f"  {op}: auto -> {auto}   (order: {', '.join(order)})")
            for backend, why in reasons.items():
                mark = "usable" if why is None else f"no: {why}"
                print(f"      {backend:7s} {mark}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Compile the C++ (and CUDA) kernels for the running torch into the cache now, instead of
    on first use."""
    import time

    from . import _ext

    if _ext.loaded_from() == "package" and not args.force:
        print("bert-emd build: the kernels built with the package match this torch; nothing to compile "
              "(--force compiles a cached copy anyway)")
        return 0
    t0 = time.perf_counter()
    try:
        folder = _ext.build(force=args.force, verbose=args.verbose)
    except _ext.BuildError as err:
        print(f"bert-emd build: error: {err}", file=sys.stderr)
        return 1
    print(f"bert-emd build: kernels ready in {folder} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _load_bench(name: str) -> Callable[[list[str]], int]:
    """Import a benchmark script's ``main`` from the source tree's ``benchmarks/`` folder."""
    module = BENCHES[name]
    here = Path(__file__).resolve()
    for root in [Path.cwd(), *here.parents]:
        folder = root / "benchmarks"
        if (folder / f"{module}.py").exists():
            sys.path.insert(0, str(folder))
            try:
                return importlib.import_module(module).main
            finally:
                sys.path.remove(str(folder))
    raise SystemExit(
        f"bert-emd bench {name}: benchmarks/{module}.py not found; run from a source checkout of bert-emd"
    )


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    return int(_load_bench(args.which)(rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bert-emd", description=__doc__)
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of a user error instead of one line (or set {DEBUG_ENV}=1)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, built kernels, usable backends and why others are not")
    bld = sub.add_parser("build", help="compile the C++ kernels for this torch now (otherwise: on first use)")
    bld.add_argument("--force", action="store_true", help="recompile even if a build exists (or failed before)")
    bld.add_argument("--verbose", action="store_true", help="show the compiler's output")
    b = sub.add_parser("bench", help="kernel micro-benchmarks (extra flags go to the script, e.g. --quick)")
    b.add_argument("which", choices=sorted(BENCHES), help="which benchmark")
    from .distill.cli_commands import add_subcommands
    from .mtl.cli_commands import add_subcommands as add_mtl_subcommands

    add_subcommands(sub)  # finetune, distill, evaluate, plot, demo
    add_mtl_subcommands(sub)  # mtl {train, evaluate, demo}
    sub.choices["demo"].add_argument(
        "--mtl", action="store_true", help="the multi-task demo instead: tweets (sentiment) + BBC News (topics)"
    )
    return p


DEBUG_ENV = "BERT_EMD_DEBUG"


def main(argv: list[str] | None = None) -> int:
    """``bert-emd``: run one command; in a distributed run (torchrun / accelerate launch) tear the
    process group down once it has finished on every rank.

    A :class:`bert_emd.errors.UsageError` (a mistake in what the user asked for) is printed as one
    line, ``bert-emd <command>: error: <message>``, with exit status 2; ``--debug`` (anywhere on
    the command line) or ``BERT_EMD_DEBUG=1`` shows its traceback instead. Other exceptions are
    bugs and propagate with their traceback."""
    from .errors import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
    argv = [a for a in argv if a != "--debug"]
    try:
        code = _main(argv)
    except UsageError as err:
        if debug:
            raise
        print(f"{_command_name(argv)}: error: {err}", file=sys.stderr)
        return 2
    _end_distributed()
    return code


def _command_name(argv: list[str]) -> str:
    """``bert-emd`` plus the (sub)command words of ``argv``, for one-line error messages."""
    words = ["bert-emd"]
    for a in argv:
        if a.startswith("-"):
            break
        words.append(a)
        if a != "mtl" or len(words) > 2:
            break
    return " ".join(words)


def _end_distributed() -> None:
    """Destroy the process group a distributed training command created (after a barrier: every
    rank is done with its collectives and checkpoints). Left alive, its gloo threads could be torn
    down at interpreter exit while running ("terminate called without an active exception"), so a
    rank that had finished its work still died with SIGABRT and the launcher reported a failure.
    Only on success: after an exception on one rank, a barrier would wait for it forever."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch made no group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if args.command == "mtl":
        from .mtl.cli_commands import dispatch as dispatch_mtl

        return dispatch_mtl(args, rest)
    if args.command == "demo" and args.mtl:
        from .mtl.demo import run_mtl_demo

        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        run_mtl_demo(args)
        return 0
    from .distill.cli_commands import COMMANDS, dispatch

    if args.command in COMMANDS:
        return dispatch(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        return cmd_info(args)
    if args.command == "build":
        return cmd_build(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
