"""File I/O that works the same on local disk and on ``gs://`` (etils ``epath``; gcsfs for GCS).

Every artifact a run writes outside Orbax (sample grids, ``samples.npz``, ``metrics.json``,
``eval.json``, ``run.json``, latent-cache shards) goes through `write_bytes` or `upload_file`: the
data lands under a temporary name in the target's directory, then `replace` moves it over the
target. A reader sees the old file or the new one, never a part of one, and a second evaluation in
the same workdir replaces the first's files instead of failing (``epath.Path.rename`` refuses an
existing target; ``replace`` does not). Locally that is ``os.replace`` after an fsync; on GCS an
object appears only once its upload completes, and the move is a server-side copy and delete, so a
preempted writer leaves at most a stray ``*.tmp-*`` object.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import uuid
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from xar_jax.errors import CorruptInputError, describe

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for URIs such as ``gs://bucket/dir`` (anything with a scheme), False for local paths."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an `epath.Path`; local paths are made absolute (gs:// stays as it is)."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def exists(path: PathLike) -> bool:
    return epath.Path(path).exists()


def forget_listings(path: PathLike) -> None:
    """Drops cached directory listings at and above a ``gs://`` ``path`` (no-op locally).

    gcsfs keeps every listing it made; files that other processes wrote since then stay invisible
    to `exists` and `list_names` until it is dropped.
    """
    if not is_remote(path):
        return
    try:
        fs = epath.backend.fsspec_backend.fs(os.fspath(path))
    except ImportError:  # No gcsfs: epath reads gs:// through TensorFlow, which caches nothing.
        return
    fs.invalidate_cache(os.fspath(path))


def list_names(path: PathLike) -> list[str]:
    """Names of the entries of directory ``path`` ([] if it does not exist)."""
    path = as_path(path)
    return [p.name for p in path.iterdir()] if path.exists() else []


def makedirs(path: PathLike) -> None:
    """Creates ``path`` and its parents if missing (on GCS directories are implicit: a no-op)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _temporary_sibling(path: epath.Path) -> epath.Path:
    # Unique per host, process and call: two writers of one target never share a temporary.
    suffix = f"tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.parent / f"{path.name}.{suffix}"


def _move_over(tmp: epath.Path, path: epath.Path) -> None:
    """Moves ``tmp`` over ``path``: ``os.replace`` locally; on GCS a server-side copy and delete
    (what gcsfs's move falls back to after trying GCS's moveTo call, which logs an error
    traceback wherever that call is missing, e.g. on an emulator)."""
    if is_remote(path):
        tmp.copy(path, overwrite=True)
        tmp.unlink()
    else:
        tmp.replace(path)


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
    """Writes ``data`` to ``path`` atomically, replacing any existing file; makes parents."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        if is_remote(path):
            tmp.write_bytes(data)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _move_over(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def write_text(path: PathLike, text: str) -> epath.Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, value: Any) -> epath.Path:
    return write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike, *, remedy: str = "") -> Any:
    """The JSON value in ``path``.

    Raises:
      CorruptInputError naming the file (and ``remedy``) when it is not readable JSON.
    """
    path = as_path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError.
        raise CorruptInputError(
            f"{path} is damaged: not readable JSON ({describe(e, 120)}). {remedy}".strip()
        ) from None


def write_npz(path: PathLike, **arrays: np.ndarray) -> epath.Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes(path, buffer.getvalue())


def write_png(path: PathLike, image: np.ndarray) -> epath.Path:
    """A uint8 image (H, W, C) with C in {1, 3} as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return write_bytes(path, buffer.getvalue())


def download_file(path: PathLike, local: PathLike) -> None:
    """Copies ``path`` (local or ``gs://``) to the local file ``local``, streamed, atomically: a
    copy cut short leaves a temporary file, never a partial ``local``."""
    local = os.path.abspath(os.fspath(local))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = os.fspath(_temporary_sibling(epath.Path(local)))
    try:
        with as_path(path).open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, local)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def upload_file(local: PathLike, path: PathLike) -> None:
    """Copies the finished local file ``local`` to ``path`` (local or ``gs://``) atomically.

    For files that a library can only write locally (ArrayRecord shards): write them on local
    disk, then publish them with this.
    """
    path = epath.Path(path)
    tmp = _temporary_sibling(path)
    try:
        epath.Path(local).copy(tmp, overwrite=True)  # Streamed: shards need not fit in memory.
        _move_over(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
