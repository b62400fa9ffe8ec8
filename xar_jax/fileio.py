"""File I/O that works the same on local disk and on ``gs://`` (etils ``epath``; gcsfs for GCS).

Atomic writes go to a temporary name in the target's directory, then `replace` the target: a
reader sees the old content or the new one, never a part. Locally that is ``os.replace`` (after an
fsync); on GCS an object appears only once its upload completes, and the rename is a server-side
move (or copy and delete), so a preempted writer leaves at most a stray ``*.tmp-*`` object.
(``epath.Path.rename`` refuses to overwrite; ``replace`` is the overwriting one.)
"""

from __future__ import annotations

import os
import socket
import uuid

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for URIs such as ``gs://bucket/dir`` (anything with a scheme), False for local paths."""
    return "://" in os.fspath(path)


def exists(path: PathLike) -> bool:
    return epath.Path(path).exists()


def makedirs(path: PathLike) -> None:
    """Creates ``path`` and its parents if missing (on GCS directories are implicit: a no-op)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _temporary_sibling(path: epath.Path) -> epath.Path:
    return (
        path.parent / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` (local or ``gs://``) so that readers never see a partial file."""
    path = epath.Path(path)
    tmp = _temporary_sibling(path)
    try:
        if is_remote(path):
            tmp.write_bytes(data)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def upload_file(local: PathLike, path: PathLike) -> None:
    """Copies the finished local file ``local`` to ``path`` (local or ``gs://``) atomically.

    For files that a library can only write locally (ArrayRecord shards): write them on local
    disk, then publish them with this.
    """
    path = epath.Path(path)
    tmp = _temporary_sibling(path)
    try:
        epath.Path(local).copy(tmp, overwrite=True)  # streamed: shards need not fit in memory
        tmp.replace(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
