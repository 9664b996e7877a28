"""Field checks of the multi-task configuration: each raises :class:`ConfigError` naming the
field (``"section.field: <what is required>, got <value>"``), and :func:`build_dataclass` builds a
dataclass from a mapping with unknown, missing and mistyped fields reported the same way."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from ..errors import UsageError

__all__ = [
    "ConfigError",
    "build_dataclass",
    "is_int",
    "is_number",
    "require_bool",
    "require_choice",
    "require_int",
    "require_number",
    "require_str",
]


class ConfigError(UsageError):
    """An invalid task / multi-task configuration; the message names the file and the field (a
    :class:`~bert_emd.errors.UsageError`, so a ``ValueError``: one line from the ``bert-emd``
    command)."""


# One helper per kind of check. Each raises ConfigError("<name>: <what is required>, got <value>");
# ``name`` is "section.field" (or the bare field where _build adds the prefix, as in DataFiles).
# bool is a subclass of int: YAML ``true`` is never accepted as a number.


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def require_bool(v: Any, name: str) -> bool:
    """``v`` must be YAML ``true`` / ``false`` (not ``"yes"``, not ``0``)."""
    if not isinstance(v, bool):
        raise ConfigError(f"{name}: true or false is required, got {v!r}")
    return v


def _or_null(what: str, optional: bool) -> str:
    return f"{what} (or null)" if optional else what


def require_int(
    v: Any, name: str, *, lo: int | None = None, hi: int | None = None, optional: bool = False,
    what: str | None = None,
) -> int | None:
    """An integer (not a bool) in ``[lo, hi]`` (either bound optional), or None when ``optional``."""
    if v is None and optional:
        return None
    if is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi):
        return v
    if what is None:
        what = "an integer" + (f" in [{lo}, {hi}]" if lo is not None and hi is not None
                               else f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else "")
    raise ConfigError(f"{name}: {_or_null(what, optional)} is required, got {v!r}")


def require_number(
    v: Any, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
    hi_open: bool = False, optional: bool = False,
) -> float | None:
    """A number (int or float, not a bool, not NaN) in the range given by ``lo`` / ``hi`` (closed
    unless ``lo_open`` / ``hi_open``), or None when ``optional``. Returns ``v`` unchanged."""
    if v is None and optional:
        return None
    ok = is_number(v) and not (isinstance(v, float) and math.isnan(v))
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if ok:
        return v
    if lo is not None and hi is not None:
        what = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        what = f"a number {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        what = f"a number {'<' if hi_open else '<='} {hi}"
    else:
        what = "a number"
    raise ConfigError(f"{name}: {_or_null(what, optional)} is required, got {v!r}")


def require_str(v: Any, name: str, *, optional: bool = False, nonempty: bool = True) -> str | None:
    """A string (a :class:`os.PathLike` is turned into one), non-empty unless ``nonempty`` is
    False, or None when ``optional``. Returns the string."""
    if v is None and optional:
        return None
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str):
        raise ConfigError(f"{name}: {_or_null('a string', optional)} is required, got {type(v).__name__} {v!r}")
    if nonempty and not v.strip():
        raise ConfigError(f"{name}: {_or_null('a non-empty string', optional)} is required, got {v!r}")
    return v


def require_choice(v: Any, name: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings); the message lists them."""
    if not isinstance(v, str) or v not in choices:
        quoted = [repr(c) for c in choices]
        what = " or ".join(quoted) if len(quoted) <= 2 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise ConfigError(f"{name}: {what} is required, got {v!r}")
    return v



def build_dataclass(cls: type, d: Mapping[str, Any], where: str, nested: Mapping[str, type] | None = None) -> Any:
    """``cls(**d)`` with unknown / missing fields and type errors reported as :class:`ConfigError`
    naming ``where``; ``nested``: ``{field: dataclass}`` of fields built from their own mapping."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: a mapping is required, got {type(d).__name__} {d!r}")
    names = {f.name for f in fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), sorted(names), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown field {', '.join(hints)}; known fields: {', '.join(sorted(names))}")
    from dataclasses import MISSING

    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in d]
    if missing:
        raise ConfigError(f"{where}: missing required field {missing[0]!r}")
    kwargs = dict(d)
    for name, sub in (nested or {}).items():
        if name in kwargs:
            kwargs[name] = build_dataclass(sub, kwargs[name] or {}, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        msg = str(err)
        if msg.startswith(where):
            raise ConfigError(msg) from None
        sep = "." if msg.split(":")[0] in names else ": "  # "field: ..." -> "where.field: ..."
        raise ConfigError(f"{where}{sep}{msg}") from None
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None
