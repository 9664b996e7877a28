"""Print the README's Python block that follows ``<!-- snippet: NAME -->`` (CI runs it as a
new user would paste it)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str, readme: Path = README) -> str:
    text = readme.read_text()
    m = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    if m is None:
        raise SystemExit(f"README.md has no python block after <!-- snippet: {name} -->")
    return m.group(1)


if __name__ == "__main__":
    print(snippet(sys.argv[1]), end="")
