"""What ``import bert_emd`` costs on top of ``import torch``, in fresh processes.

Each sample starts a new interpreter: ``python -X importtime -c "import torch; import bert_emd"``.
From ``-X importtime`` the cumulative microseconds of the top-level ``torch`` and ``bert_emd``
imports are read (bert_emd's figure excludes torch, which is imported first), and whether the
import pulled in modules that only a kernel launch or a training command needs (dynamo, Triton,
transformers, the C++ extension builder). Median of ``--repeats`` processes; one CSV row.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, markdown_table, provenance  # noqa: E402

HEAVY = ("torch._dynamo", "triton", "transformers", "torch.utils.cpp_extension")
_CODE = ("import torch; import bert_emd, bert_emd.nn; import sys; "
         f"print([m for m in {HEAVY!r} if m in sys.modules])")


def sample() -> tuple[float, float, str]:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", _CODE], capture_output=True, text=True,
                         check=True)
    cumulative = {}
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", line)
        if m and m.group(2) in ("torch", "bert_emd", "bert_emd.nn"):
            cumulative[m.group(2)] = int(m.group(1)) / 1e6
    ours = cumulative.get("bert_emd", 0.0) + cumulative.get("bert_emd.nn", 0.0)
    return cumulative["torch"], ours, out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="fresh processes (default 7)")
    p.add_argument("--quick", action="store_true", help="3 processes")
    p.add_argument("--out-dir", type=Path, default=None, help="where the CSV goes (default benchmarks/results)")
    args = p.parse_args(argv)
    n = 3 if args.quick else args.repeats
    samples = [sample() for _ in range(n)]
    row = {**provenance(), "import_torch_s": statistics.median(s[0] for s in samples),
           "import_bert_emd_s": statistics.median(s[1] for s in samples),
           "heavy_modules_imported": samples[-1][2], "processes": n}
    path = append_csv("import", [row], args.out_dir)
    print(markdown_table([row], ["import_torch_s", "import_bert_emd_s", "heavy_modules_imported", "processes"]))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
