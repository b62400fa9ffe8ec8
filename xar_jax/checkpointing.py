"""Orbax checkpoints of the train state and the data iterator, with a safe resume.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``. ``state`` is the whole `TrainState`
(restored directly into its sharded layout); ``data`` is the Grain iterator position, so a
resumed run sees exactly the examples an uninterrupted run would.

Saves are asynchronous and collective (every process calls `save`). Orbax writes each step to a
temporary directory and renames it when complete, so a run killed mid-save leaves no half
checkpoint under its final name. A final directory damaged later (truncated or deleted files) is
detected at restore: the newest readable checkpoint is used instead, with a warning, and the
damaged one is moved to ``<workdir>/checkpoints_unreadable/`` (never deleted).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger("xar_jax.train")


class Checkpointer:
    """Saves every ``every_steps`` steps (and on request), keeps the newest ``max_to_keep`` plus
    every multiple of ``keep_period``; restores the newest readable checkpoint."""

    def __init__(
        self,
        directory: str,
        *,
        every_steps: int,
        max_to_keep: int,
        keep_period: int = 0,
        async_save: bool = True,
    ):
        # epath: local paths and gs:// buckets alike.
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        self.every_steps = every_steps
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
            # Leftovers of saves interrupted before their atomic rename (never a finished step).
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    # ------------------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def reached_preemption(self, step: int) -> bool:
        """True once a preemption notice arrived (multi-process TPU runs; False otherwise)."""
        return bool(self._manager.reached_preemption(step))

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
        """Starts an (async) save of ``state`` and the iterator position at ``step``."""
        if step in self._manager.all_steps():
            return
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # ------------------------------------------------------------------------------------------
    def restore_latest(
        self, abstract_state: Any, data_iterator: Any | None = None
    ) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint into ``abstract_state``'s shardings.

        Args:
          abstract_state: TrainState of `jax.ShapeDtypeStruct` with shardings.
          data_iterator: the Grain iterator whose position is restored in place (or None).

        Returns:
          ``(state, step)`` or None when there is no checkpoint. Unreadable newer checkpoints are
          skipped with a warning and moved aside.
        """
        for step in reversed(self.all_steps()):
            try:
                return self._restore(step, abstract_state, data_iterator), step
            except Exception as e:  # Orbax raises many types for damaged files.
                log.warning(
                    "Checkpoint step %d in %s is unreadable (%s: %s); falling back to the "
                    "previous one.", step, self.directory, type(e).__name__, str(e)[:300]
                )
                self._move_aside(step)
        return None

    def _restore(self, step, abstract_state, data_iterator):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def _move_aside(self, step: int) -> None:
        """Moves a damaged step directory out of the manager's way (process 0), keeping it."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            aside = self.directory.parent / "checkpoints_unreadable"
            aside.mkdir(parents=True, exist_ok=True)
            dst = aside / f"{step}_{int(time.time())}"
            if src.exists():
                src.rename(dst)
                log.warning("Moved unreadable checkpoint %s to %s.", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"xar_checkpoint_move_aside_{step}")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
