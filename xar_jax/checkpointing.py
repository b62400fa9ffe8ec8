"""Orbax checkpoints of the train state and the data iterator, with a safe resume.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``. ``state`` is the whole `TrainState`
(restored directly into its sharded layout); ``data`` is the Grain iterator position, so a
resumed run sees exactly the examples an uninterrupted run would.

Saves are asynchronous and collective (every process calls `save`). Orbax writes each step to a
temporary directory and renames it when complete, so a run killed mid-save leaves no half
checkpoint under its final name. A final directory damaged later (truncated or deleted files) is
detected at restore: the newest readable checkpoint is used instead, with a warning, and the
damaged one is moved to ``<workdir>/checkpoints_unreadable/`` (never deleted). At most one is set
aside per start: a second unreadable one stops the run, since that points at the storage.

A checkpoint whose arrays have other names or shapes than the config gives is *not* damaged: the
check against the stored metadata (`CheckpointMismatchError`) comes before any restore and
touches nothing. Sampling restores only the EMA params (`restore_params`, a partial restore).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from xar_jax.errors import UserError

log = logging.getLogger("xar_jax.checkpointing")


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint holds other arrays than the config describes (not damage: nothing is moved)."""


class UnreadableCheckpointError(RuntimeError):
    """More than one checkpoint was unreadable in one start."""


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{'params/encoder/.../kernel': shape}`` of a TrainState, dict or Orbax metadata tree."""

    def name(entry) -> str:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(e) for e in path): tuple(leaf.shape) for path, leaf in leaves}


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
        read_only: bool = False,
    ):
        # epath: local paths and gs:// buckets alike.
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        self.every_steps = every_steps
        self.read_only = read_only
        if read_only:
            # A reader saves, keeps, creates and cleans up nothing (Orbax would otherwise reset
            # each of these options of a read-only manager, with a warning apiece).
            self._options = ocp.CheckpointManagerOptions(
                read_only=True, save_interval_steps=0, create=False, cleanup_tmp_directories=False
            )
        else:
            self._options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                keep_period=keep_period or None,
                enable_async_checkpointing=async_save,
                # Leftovers of saves interrupted before their atomic rename (never a finished step).
                cleanup_tmp_directories=True,
            )
        # The handler of every item is named up front, so the stored metadata can be read before
        # any restore. Sampling makes partial restores of the params (PyTree handler) and never
        # reads the data iterator.
        handlers = {
            "state": (
                ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler()
            ),
            "data": grain.checkpoint.CheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=self._options, item_handlers=handlers
        )

    # ------------------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
        """Starts an (async) save of ``state`` and the iterator position at ``step``."""
        if step in self._manager.all_steps():
            return
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
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

        Shardings may differ from those the checkpoint was saved with (another mesh): Orbax
        reads each shard of the new layout from the stored arrays.

        Args:
          abstract_state: TrainState of `jax.ShapeDtypeStruct` with shardings.
          data_iterator: the Grain iterator whose position is restored in place (or None).

        Returns:
          ``(state, step)`` or None when there is no checkpoint.

        Raises:
          CheckpointMismatchError: the newest checkpoint holds arrays of other shapes or names
            than ``abstract_state`` (another config). Nothing is moved.
          UnreadableCheckpointError: a second unreadable checkpoint in one start.
        """
        return self._restore_newest(
            lambda step: self._restore(step, abstract_state, data_iterator),
            lambda step: self._check_against(step, abstract_state, ""),
        )

    def restore_params(
        self, abstract_params: Any, *, use_ema: bool = True
    ) -> tuple[Any, int] | None:
        """The EMA (or raw) params of the newest readable checkpoint, nothing else.

        An Orbax partial restore: the optimizer state and the other params are not read.

        Returns:
          ``(params, step)`` or None when there is no checkpoint.
        """
        field = "ema_params" if use_ema else "params"
        target = {field: abstract_params}

        def restore(step):
            args = ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            )
            return self._manager.restore(step, args=ocp.args.Composite(state=args))["state"][field]

        return self._restore_newest(restore, lambda step: self._check_against(step, target, ""))

    def _restore_newest(self, restore, check) -> tuple[Any, int] | None:
        moved = None
        for step in reversed(self.all_steps()):
            try:
                check(step)
                return restore(step), step
            except CheckpointMismatchError:
                raise
            except Exception as e:  # Orbax raises many types for damaged files.
                reason = f"{type(e).__name__}: {str(e)[:300]}"
                if moved is not None:
                    raise UnreadableCheckpointError(
                        f"Checkpoint step {step} in {self.directory} is unreadable too ({reason}), "
                        f"after step {moved} was set aside in this start. Stopping without moving "
                        "more: two damaged checkpoints suggest a problem with the storage or the "
                        "environment, not with one file. Nothing else was changed."
                    ) from e
                log.warning(
                    "Checkpoint step %d in %s is unreadable (%s); %s and falling back to the "
                    "previous one.",
                    step,
                    self.directory,
                    reason,
                    "leaving it (read-only)" if self.read_only else "setting it aside",
                )
                if not self.read_only:
                    self._move_aside(step)
                moved = step
        return None

    def _check_against(self, step: int, target: Any, prefix: str) -> None:
        """Raises CheckpointMismatchError when ``target``'s leaves differ from the stored ones.

        Reading the metadata of a damaged checkpoint raises something else (it is unreadable).
        """
        stored = _leaf_shapes(self._manager.item_metadata(step)["state"].tree)
        wanted = _leaf_shapes(target)
        problems = [f"{k}: missing from the checkpoint" for k in wanted if k not in stored]
        problems += [
            f"{k}: stored {stored[k]}, config gives {shape}"
            for k, shape in wanted.items()
            if k in stored and stored[k] != shape
        ]
        if problems:
            more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
            raise CheckpointMismatchError(
                f"Checkpoint step {step} in {self.directory} does not fit this config: "
                f"{'; '.join(problems[:6])}{more}. It was not touched; use the config it was "
                "written with, or another workdir."
            )

    def _restore(self, step, abstract_state, data_iterator):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
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
            multihost_utils.sync_global_devices(f"xar_checkpoint_move_aside_{step}")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
