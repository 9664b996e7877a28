"""Shared runner of the "compile every Triton kernel for sm_80 and sm_90 without a GPU" tests.

The interpreter (TRITON_INTERPRET=1, set by conftest.py for this process) replaces @triton.jit
functions, so compilation is checked in a fresh subprocess without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_compile_script(script: str, *, timeout: int) -> list[dict]:
    """Run ``script`` (which prints a JSON list as its last line) without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), str(ROOT / "tests"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_for_targets(fn, signature: dict, constexprs: dict, warps: int, **tags) -> list[dict]:
    """Compile one Triton kernel for sm_80 and sm_90 (run inside :func:`run_compile_script`'s child,
    which has no interpreter): one record a target with what the tests check. ``tags`` are copied
    into every record (e.g. the setup's name)."""
    import triton
    from triton.backends.compiler import GPUTarget

    out = []
    for cc in (80, 90):
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
        out.append({"kernel": fn.__name__, "cc": cc, "ptx_target": f".target sm_{cc}" in k.asm["ptx"],
                    "cubin": len(k.asm["cubin"]), "mma": "mma" in k.asm["ptx"], "shared": k.metadata.shared,
                    **tags})
    return out


def assert_compiled(results: list[dict], count: int, kernels: set[str]) -> None:
    """``count`` records, each with PTX for its target, a real cubin and a launch that fits a block's
    shared memory (A100 163 KiB, H100 227 KiB), covering exactly ``kernels``."""
    assert len(results) == count
    for r in results:
        assert r["ptx_target"], r
        assert r["cubin"] > 1000, r
        assert r["shared"] <= (163 if r["cc"] == 80 else 227) * 1024, r
    assert {r["kernel"] for r in results} == kernels
