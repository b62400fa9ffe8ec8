"""What a workdir remembers about its run, and the lock that keeps one trainer per workdir.

``<workdir>/run.json`` is written by the first training start: the config, the resolved mesh, the
process and device counts, the JAX and xar-jax versions. Every later start (a resume, ``--mode=
sample``, ``--mode=eval``) compares its own config with it *before* touching a checkpoint:

* **model fields** (`model.config_signature`, the signature converted weights are checked with:
  the sizes, the entity layout, the parameter layout) must match, or the run stops and names each
  differing field: such a config cannot restore these checkpoints, and trying would only look
  like corruption. Use a new workdir instead.
* **run fields** of a resume (the mesh, the data pipeline and global batch) may change only when
  the user says so with ``--allow_change=mesh`` / ``--allow_change=data``; the state is then
  resharded onto the new mesh, and with a new pipeline the data iterator starts afresh.
* everything else (learning rate, number of steps, logging, sampling settings) may change freely.

``<workdir>/train.lock`` names the trainer that holds the workdir (host, pid, heartbeat). A second
trainer is refused. A lock whose process is gone (same host, pid not alive) or whose heartbeat is
older than `STALE_AFTER_SECONDS` (another host) is stale and taken over, with a warning.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import time
from typing import Any

import jax
import ml_collections

from xar_jax import fileio
from xar_jax.errors import CorruptInputError, UserError
from xar_jax.model import PRESETS, config_signature, preset_signature
from xar_jax.train_config import config_field

log = logging.getLogger("xar_jax.workdir")

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"  # The effective config of the latest training start.
LOCK_FILE = "train.lock"
STALE_AFTER_SECONDS = 15 * 60
HEARTBEAT_SECONDS = 60
ALLOWED_CHANGES = ("mesh", "data")

_DEFAULT_PRNG = "threefry2x32"  # JAX's default PRNG, left out of run records.
# Fields whose change makes the saved data-iterator position meaningless.
_DATA_FIELDS = ("seed", "train.global_batch_size")


class WorkdirMismatchError(UserError, ValueError):
    """The config does not fit the run recorded in the workdir (nothing was touched)."""


class WorkdirLockedError(UserError, RuntimeError):
    """Another live trainer holds the workdir."""


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _recorded_model(recorded: dict[str, Any]) -> dict[str, Any]:
    """A run record's model signature in today's form: records that named a preset
    (``model.preset``) list its sizes instead."""
    recorded = dict(recorded)
    preset = recorded.pop("model.preset", "")
    if preset in PRESETS:
        recorded.update(preset_signature(preset))
    return recorded


def model_signature(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`xar_jax.model.config_signature` of the experiment's (resolved) config, plus its PRNG when
    not JAX's default: the PRNG decides the size of the train state's key (runs recorded before
    the field existed used the default)."""
    sig = config_signature(config)
    if config.get("prng_impl", _DEFAULT_PRNG) != _DEFAULT_PRNG:
        sig["prng_impl"] = config.prng_impl
    return sig


def data_signature(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields whose change invalidates a saved data-iterator position."""
    sig = {f: config_field(config, f) for f in _DATA_FIELDS}
    sig.update({f"data.{k}": v for k, v in config.data.to_dict().items()})
    return _jsonable(sig)


def mesh_signature(mesh_shape: dict[str, int], process_count: int) -> dict[str, Any]:
    # One slice (dcn = 1) is recorded as before the dcn axis existed, so older runs resume.
    return {
        **{f"mesh.{k}": int(v) for k, v in mesh_shape.items() if k != "dcn" or v != 1},
        "process_count": int(process_count),
    }


def _code_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("xar-jax")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """The contents of ``run.json``."""

    config: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    mesh: dict[str, Any]
    versions: dict[str, str]
    history: list[dict[str, Any]]

    @classmethod
    def for_config(cls, config, mesh_shape, process_count, mode: str) -> RunRecord:
        return cls(
            config=_jsonable(config.to_dict()),
            model=model_signature(config),
            data=data_signature(config),
            mesh=mesh_signature(mesh_shape, process_count),
            versions={"jax": jax.__version__, "xar_jax": _code_version()},
            history=[_history_entry(mode, [])],
        )


def _history_entry(mode: str, accepted: list[str]) -> dict[str, Any]:
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "host": socket.gethostname(),
        "accepted_changes": accepted,
    }


def read_record(workdir: str) -> RunRecord | None:
    """The workdir's `RunRecord`; None when it has none.

    Raises:
      CorruptInputError naming ``run.json`` and what to do when it is damaged.
    """
    path = fileio.as_path(workdir) / RUN_FILE
    if not path.exists():
        return None
    remedy = (
        "It records the run (config, mesh, history); restore it from a backup, or move it "
        "away and the next training start writes a new one from its config "
        "(the checkpoints are still checked against the config at restore)."
    )
    raw = fileio.read_json(path, remedy=remedy)
    missing = [
        f.name
        for f in dataclasses.fields(RunRecord)
        if not isinstance(raw, dict) or f.name not in raw
    ]
    if missing:
        raise CorruptInputError(f"{path} is damaged: no {', '.join(missing)}. {remedy}")
    return RunRecord(**{f.name: raw[f.name] for f in dataclasses.fields(RunRecord)})


def _diff(recorded: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    keys = sorted(set(recorded) | set(wanted))
    return {k: (recorded.get(k), wanted.get(k)) for k in keys if recorded.get(k) != wanted.get(k)}


def _describe(diff: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {old!r} in the workdir, {new!r} now" for k, (old, new) in diff.items())


def check_model(record: RunRecord | None, config, workdir: str, mode: str) -> None:
    """Refuses a config whose model fields differ from the recorded run's.

    Raises:
      WorkdirMismatchError naming every differing field (before any checkpoint is read).
    """
    if record is None:
        return
    diff = _diff(_recorded_model(record.model), model_signature(config))
    if diff:
        raise WorkdirMismatchError(
            f"--mode={mode} refused: {workdir} holds a run with another model ({_describe(diff)}). "
            "Its checkpoints cannot be restored with this config, and nothing was touched. Use "
            "the config the run was started with (it is in run.json), or a new --workdir."
        )


def check_resume(
    record: RunRecord, config, mesh_shape, process_count, workdir: str, allow: tuple[str, ...]
) -> list[str]:
    """The recorded-run checks of a training resume.

    Returns:
      The accepted groups of changes (a subset of ``allow``): 'mesh' means the state is
      resharded onto the new mesh; 'data' that the data iterator starts afresh.

    Raises:
      WorkdirMismatchError naming the differing fields and the flag that would accept them.
    """
    check_model(record, config, workdir, "train")
    accepted, refused = [], []
    for group, diff in (
        ("mesh", _diff(record.mesh, mesh_signature(mesh_shape, process_count))),
        ("data", _diff(record.data, data_signature(config))),
    ):
        if not diff:
            continue
        if group in allow:
            accepted.append(group)
            log.warning(
                "Resuming %s with changed %s fields (--allow_change=%s): %s.",
                workdir,
                group,
                group,
                _describe(diff),
            )
        else:
            refused.append((group, diff))
    if refused:
        details = " ".join(f"[{g}] {_describe(d)}." for g, d in refused)
        flags = " ".join(f"--allow_change={g}" for g, _ in refused)
        raise WorkdirMismatchError(
            f"Resume refused: the config differs from the run recorded in {workdir}/{RUN_FILE}. "
            f"{details} Nothing was touched. If the change is deliberate, pass {flags} "
            "(mesh: the checkpoint is resharded onto the new mesh; data: the data iterator "
            "restarts, since its saved position belongs to the old pipeline); otherwise use the "
            "recorded config or a new --workdir."
        )
    return accepted


def write_effective_config(workdir: str, config: ml_collections.ConfigDict) -> str:
    """``workdir/config.json``: this start's config with its overrides (every start)."""
    return str(
        fileio.write_json(fileio.as_path(workdir) / CONFIG_FILE, _jsonable(config.to_dict()))
    )


def write_record(workdir: str, record: RunRecord) -> None:
    fileio.write_json(fileio.as_path(workdir) / RUN_FILE, dataclasses.asdict(record))


def update_record(
    workdir: str, record: RunRecord, config, mesh_shape, process_count, accepted: list[str]
) -> None:
    """Records a resume: accepted changes become the run's new mesh / data fields."""
    new = RunRecord.for_config(config, mesh_shape, process_count, "train")
    write_record(
        workdir,
        dataclasses.replace(
            record,
            mesh=new.mesh if "mesh" in accepted else record.mesh,
            data=new.data if "data" in accepted else record.data,
            versions=new.versions,
            history=[*record.history, _history_entry("train", accepted)],
        ),
    )


# ----------------------------------------------------------------------------------------------
# The trainer's lock.
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(holder: dict[str, Any]) -> str | None:
    """Why ``holder``'s lock is stale, or None when it may be live."""
    if holder.get("host") == socket.gethostname():
        if not _pid_alive(int(holder.get("pid", -1))):
            return f"process {holder.get('pid')} on this host is gone"
        return None
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > STALE_AFTER_SECONDS:
        return f"its heartbeat is {age / 60:.0f} minutes old"
    return None


class TrainLock:
    """``<workdir>/train.lock``, held by process 0 of a trainer for the run's lifetime."""

    def __init__(self, workdir: str):
        self.path = fileio.as_path(workdir) / LOCK_FILE
        self._holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "heartbeat": time.time(),
        }
        self._last_beat = 0.0

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLockedError naming the holder."""
        if self.path.exists():
            try:
                holder = json.loads(self.path.read_text())
            except (ValueError, OSError):
                holder = {}
            reason = _is_stale(holder) if holder else "it is unreadable"
            if reason is None:
                raise WorkdirLockedError(
                    f"{self.path.parent} is in use by a trainer (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, heartbeat {time.time() - holder['heartbeat']:.0f} s "
                    f"ago). Two trainers on one workdir would overwrite each other's checkpoints; "
                    "stop the other one or use another --workdir. A lock from a killed process "
                    f"is detected (same host) or expires after {STALE_AFTER_SECONDS // 60} minutes "
                    "without heartbeat."
                )
            log.warning("Taking over the stale lock %s (%s).", self.path, reason)
        self._write_exclusive()

    def _write_exclusive(self) -> None:
        text = json.dumps(self._holder)
        if "://" in os.fspath(self.path):
            fileio.write_text(self.path, text)  # Object stores: last writer wins (documented).
        else:
            tmp = f"{self.path}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            if self.path.exists():
                os.replace(tmp, self.path)  # Stale: replace.
            else:
                try:
                    os.link(tmp, self.path)  # Atomic create-if-absent.
                except FileExistsError:
                    os.remove(tmp)
                    raise WorkdirLockedError(f"{self.path} was taken by another trainer.") from None
                os.remove(tmp)

    def heartbeat(self) -> None:
        """Refreshes the heartbeat (at most once a `HEARTBEAT_SECONDS`)."""
        now = time.time()
        if now - self._last_beat < HEARTBEAT_SECONDS:
            return
        self._last_beat = now
        self._holder["heartbeat"] = now
        fileio.write_text(self.path, json.dumps(self._holder))

    def release(self) -> None:
        if self.path.exists():
            try:
                holder = json.loads(self.path.read_text())
            except (ValueError, OSError):
                return
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()
