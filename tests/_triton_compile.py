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
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
