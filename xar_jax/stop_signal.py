"""Stopping on SIGTERM or SIGINT without losing work: the run ends at a point it can resume from.

Training finishes the step in flight, saves a checkpoint with the data iterator and exits;
ADM sampling (``--mode=sample``/``eval``) finishes the shard in flight. Exit codes after such a
stop: **0 for SIGTERM** (a scheduler's or `launch/stop.sh`'s stop, a preemption: the run stopped
where it should), **130 for SIGINT** (Ctrl-C, the shell's convention, so `train && eval` does not
go on). A second signal while the run saves is logged and ignored: the save completes (SIGKILL
still stops at once; Orbax's atomic rename then leaves the previous checkpoints intact).

Where the stop step comes from:

* **jax.distributed running** (multi-host, or any launch with ``--distributed=on``): JAX's
  preemption service owns SIGTERM (its handler, installed by ``jax.distributed.initialize``,
  tells every process through the coordinator) and `multihost_utils.reached_preemption_sync_point`
  names the step on which every process stops: the processes agree without a collective of
  ours. SIGINT is forwarded to that service as a SIGTERM of this process.
* **one process without it**: our own handlers set a flag, read after each step.

Sampling never needs agreement (each process writes its own shards), so it always uses our
handlers; `launch/stop.sh` signals every worker.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

log = logging.getLogger("xar_jax.stop_signal")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}


class Stopped(Exception):  # noqa: N818 (not an error: the run stopped as asked)
    """A run stopped on a signal at a resumable point; ``exit_code`` is the process's exit status.

    Its message is the one line the run prints about it (where its work was saved).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 0)


def _preemption_service() -> bool:
    """Whether jax.distributed runs with its preemption service (on by default)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "SIGTERM or a preemption notice"


class StopSignals:
    """Catches SIGTERM and SIGINT while installed (a context manager; main thread only).

    Args:
      what: what the run finishes before it stops (for the log line), e.g. 'the step in flight'.
      sync_steps: ask JAX's preemption sync point for the stop step when jax.distributed runs
        (training); False: always our own handlers (sampling).
    """

    def __init__(self, what: str, *, sync_steps: bool = False):
        self.what = what
        self.received: int | None = None  # The first signal caught here.
        self._service = sync_steps and _preemption_service()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only: nothing to catch.
        # With JAX's service, SIGTERM stays its handler (installed in C++, so Python sees none).
        signums = (signal.SIGINT,) if self._service else STOP_SIGNALS
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            log.warning(
                "%s again: already stopping; finishing and saving first (SIGKILL stops "
                "at once, keeping the checkpoints saved before).",
                signal_name(signum),
            )
            return
        self.received = signum
        log.warning("%s: finishing %s, then saving and stopping.", signal_name(signum), self.what)
        if self._service:
            os.kill(os.getpid(), signal.SIGTERM)  # To JAX's service: every process learns of it.

    @property
    def synchronised(self) -> bool:
        """Whether JAX's preemption sync picks the stop step (jax.distributed runs)."""
        return bool(self._service)

    def requested(self) -> bool:
        """Whether a signal arrived here (sampling's check between shards)."""
        return self.received is not None

    def reached(self, step: int) -> bool:
        """Whether to stop after ``step``: call after every step, on every process.

        With jax.distributed, True only at the step JAX's preemption sync picks (the same on every
        process, a step none has passed); alone, True after a signal arrived here.
        """
        if self._service:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.received is not None

    def stopped(self, message: str) -> Stopped:
        """The `Stopped` to raise once the work is saved; ``message`` says where it is."""
        return Stopped(message, self.received or signal.SIGTERM)
