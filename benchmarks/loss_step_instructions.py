"""Instructions per BertEMDLoss step, counted by callgrind: a host-time measure that does not move
with the machine's load.

On a shared machine timings of a few milliseconds move by 20 % or more from run to run, even on
the thread's CPU clock (the other jobs share the caches). Instruction counts do not: the same
script gives the same count to 0.1 %, so a change to the loss's Python or its op count can be
judged on a busy machine. The workload is ``bench_overhead.py``'s ``loss`` (a forward and
backward on model outputs of the tiny sizes, so nearly every instruction is host overhead), for
the losses ``emd``, ``skip`` and ``pred``.

How: each loss runs in its own ``python`` under ``valgrind --tool=callgrind --instr-atstart=no``;
after three warm-up steps the child switches instrumentation on with ``callgrind_control``, runs
``--steps`` steps, and switches it off; the count over those steps, divided by ``--steps``, is
printed. Instructions are not time (a step of 6M instructions took about 4 ms of thread time on
the 2-core AMD EPYC of benchmarks/RESULTS.md), but fewer instructions for the same work is less
host time on any CPU.

Usage: python benchmarks/loss_step_instructions.py [--steps 5] [--losses emd,skip,pred]
Needs valgrind (Debian: ``apt install valgrind``). About a minute per loss (they run in parallel).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def _child(loss: str, steps: int) -> None:
    """Run under callgrind: warm up, count ``steps`` steps."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    import bench_overhead as bo

    torch.set_num_threads(1)
    step, _, _ = bo.loss_step(loss, torch.Generator().manual_seed(0))

    for _ in range(3):
        step()
    pid = str(os.getpid())
    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
    for _ in range(steps):
        step()
    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="counted steps per loss (default 5)")
    p.add_argument("--losses", default="emd,skip,pred", help="comma-separated subset of emd,skip,pred")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args.steps)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("loss_step_instructions: needs valgrind (callgrind) on the PATH", file=sys.stderr)
        return 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    losses = [x for x in args.losses.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        procs = {
            loss: subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/{loss}.out",
                 sys.executable, str(HERE), "--child", loss, "--steps", str(args.steps)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for loss in losses
        }
        counts = {}
        for loss, proc in procs.items():
            out, _ = proc.communicate()
            found = re.search(r"Collected\s*:\s*([\d,]+)", out)
            if proc.returncode != 0 or not found:
                print(f"{loss}: callgrind run failed (exit {proc.returncode})\n{out[-2000:]}", file=sys.stderr)
                return 1
            counts[loss] = int(found.group(1).replace(",", "")) / args.steps
    for loss, c in counts.items():
        print(f"{loss}: {c / 1e6:.2f}M instructions per step")
    if {"emd", "skip", "pred"} <= counts.keys():
        emd, skip, pred = counts["emd"], counts["skip"], counts["pred"]
        print(f"emd / skip {emd / skip:.2f}x; emd - pred {(emd - pred) / 1e6:.2f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
