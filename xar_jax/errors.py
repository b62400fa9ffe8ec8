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
