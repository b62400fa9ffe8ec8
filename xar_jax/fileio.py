"""Atomic, overwriting file writes on local paths and ``gs://`` alike (through `etils.epath`).

Every artifact a run writes outside Orbax (sample grids, ``samples.npz``, ``metrics.json``,
``eval.json``, ``run.json``) goes through `write_bytes`: the data lands under a temporary name in
the target's directory, then `replace` moves it over the target. A reader sees the old file or the
new one, never half of one, and a second evaluation in the same workdir replaces the first's files
instead of failing (`epath.Path.rename` refuses an existing target; `replace` does not).
On an object store the final copy is one object write, which is atomic per object.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import numpy as np
from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an `epath.Path`; local paths are made absolute (gs:// stays as it is)."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> epath.Path:
    """Writes ``data`` to ``path`` atomically, replacing any existing file; makes parents."""
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: two processes writing the same target never share one.
    tmp = target.parent / f".tmp-{uuid.uuid4().hex[:12]}-{target.name}"
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def write_text(path: str | os.PathLike, text: str) -> epath.Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any) -> epath.Path:
    return write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(as_path(path).read_text())


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> epath.Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes(path, buffer.getvalue())


def write_png(path: str | os.PathLike, image: np.ndarray) -> epath.Path:
    """A uint8 image (H, W, C) with C in {1, 3} as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return write_bytes(path, buffer.getvalue())
