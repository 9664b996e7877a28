"""Exceptions that tell a user what to change.

:class:`UsageError` marks a mistake in what the user asked for (a path that does not exist, a
column missing from a data file, a config field of the wrong type, an option value out of range,
a launch mode that cannot work). The ``bert-emd`` command prints it as one line,
``bert-emd <command>: error: <message>``, and exits with status 2; any other exception is a bug
and keeps its traceback. It subclasses :class:`ValueError`, so library callers that catch
``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["MissingExtraError", "MissingFileError", "UsageError"]


class UsageError(ValueError):
    """The user's input or options are wrong; the message says what was expected."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what the command needs): a
    :class:`UsageError` (one line from the CLI) that is still a ``FileNotFoundError`` for library
    callers."""


class MissingExtraError(UsageError, ImportError):
    """A command needs an optional dependency group (an *extra*) that is not installed."""

    def __init__(self, extra: str, module: str, what: str = "this command") -> None:
        self.extra, self.module = extra, module
        super().__init__(f'{what} needs {module}, which is not installed: pip install "bert-emd[{extra}]"')


def require(module: str, extra: str = "hf", what: str = "this command") -> None:
    """Raise :class:`MissingExtraError` unless ``module`` can be imported (checked without importing it)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(extra, module, what)
