"""Errors that are the user's to fix: reported in a line or two, with exit code 2, no traceback.

Anything else that goes wrong is an internal error and keeps its traceback. Each user error names
what is wrong and what is allowed (a config field and its allowed values, a file and the command
that creates it, a workdir and how to proceed).
"""


class UserError(Exception):
    """A mistake in the user's flags, config, files or workdir; nothing was changed by it."""


class ConfigError(UserError, ValueError):
    """A config field's value is not allowed."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the run needs does not exist."""


class CorruptInputError(UserError, ValueError):
    """A file the run reads is damaged (truncated, bit-flipped) or not what its name says."""


def describe(error: BaseException, limit: int = 200) -> str:
    """``Type: message`` of ``error`` on one line, cut to ``limit`` characters (library errors
    can span pages)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
