"""What a run prints: our own progress lines, third-party noise held back, user errors in brief.

`configure_logging` sets each library's level deliberately: our ``xar_jax.*`` loggers at INFO; the
libraries that log routine INFO through absl or Python logging (Orbax's per-save lines, JAX's
backend probing) at WARNING, so their warnings and errors still show. `report_user_error` prints
a `xar_jax.errors.UserError` (or a flag error) as ``error: ...`` on stderr for the exit code 2.
"""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging

# Libraries whose INFO lines are routine (one per checkpoint file, per backend probe, per
# asyncio loop) and would otherwise be most of a run's log.
QUIET_LOGGERS = (
    "absl",
    "jax",
    "orbax",
    "grain",
    "etils",
    "tensorstore",
    "asyncio",
    "fsspec",
    "gcsfs",
    "google",
    "urllib3",
    "tensorflow_datasets",
)


# Warnings that are known to be harmless here, by logger: (the logger, a piece of the message).
# Orbax warns on every read-only manager (how sampling reads a workdir); gcsfs tries GCS's moveTo
# call first, which emulators and some buckets lack, and then does the copy-and-delete it falls
# back to (the move happens either way).
HARMLESS = (
    ("absl", "Given directory is read only"),
    ("gcsfs", "moveTo"),
)


class _DropHarmless(logging.Filter):
    def __init__(self, pieces: tuple[str, ...]):
        super().__init__()
        self.pieces = pieces

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(piece in message for piece in self.pieces)


def configure_logging() -> None:
    """Our lines at INFO; the libraries' at WARNING, less the known-harmless ones. Call once, at
    the start of a command."""
    absl_logging.set_verbosity(absl_logging.INFO)  # The root level: our INFO lines pass.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("xar_jax").setLevel(logging.INFO)
    for name in {name for name, _ in HARMLESS}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless(tuple(p for n, p in HARMLESS if n == name)))


def report_user_error(message: str, hint: str = "") -> None:
    """Prints ``error: message`` (and a hint line) to stderr."""
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(hint, file=sys.stderr)
