"""Streaming reads and atomic streaming writes of large ``.npz`` image files (ADM's sample format).

An ADM sample file is an uncompressed ``.npz`` whose ``arr_0`` is ``(N, H, W, 3)`` uint8: 50k
images at 256x256 are 9.8 GB. These helpers read it in row ranges and write it from chunks, so
neither side holds all images in memory. Files written here load with ``np.load`` and ADM's
evaluator.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def _write_member_header(f: Any, shape: tuple[int, ...], dtype: np.dtype) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_2_0(f, header)


def write_npz_streaming(
    path: str | os.PathLike,
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    chunks: Iterable[np.ndarray],
    extra: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Writes ``path`` (.npz): array ``name`` streamed from ``chunks``, plus small ``extra`` arrays.

    The file is written to a temporary name in the same directory and renamed when complete, so
    ``path`` is either absent or whole. An existing ``path`` is replaced only by a complete file.

    Args:
      path: the output file.
      name: the streamed array's key (``'arr_0'`` for ADM).
      shape: its full shape; the chunks are consecutive row blocks ``(n_i, *shape[1:])``.
      dtype: its dtype; every chunk must have it.
      chunks: the row blocks, in order; their rows must add up to ``shape[0]``.
      extra: further arrays stored whole (e.g. ``labels``).

    Raises:
      ValueError: a chunk of the wrong dtype or trailing shape, or the wrong total number of rows.
    """
    path = os.fspath(path)
    dtype = np.dtype(dtype)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                _write_member_header(member, tuple(shape), dtype)
                rows = 0
                for chunk in chunks:
                    chunk = np.asarray(chunk)
                    if chunk.dtype != dtype or chunk.shape[1:] != tuple(shape[1:]):
                        raise ValueError(
                            f"Chunk of {name} has shape {chunk.shape} and dtype {chunk.dtype}; "
                            f"expected (n, {', '.join(map(str, shape[1:]))}) {dtype}."
                        )
                    member.write(np.ascontiguousarray(chunk).tobytes())
                    rows += len(chunk)
                if rows != shape[0]:
                    raise ValueError(f"Chunks of {name} hold {rows} rows, expected {shape[0]}.")
            for key, value in (extra or {}).items():
                with zf.open(key + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class NpzArrayReader:
    """Reads row ranges of one array of an ``.npz`` without loading the whole array.

    Works for stored and compressed members (compressed ones are decompressed as they are read;
    reading ranges in increasing order is then the fast path).

    Example::

        with NpzArrayReader('samples.npz') as images:      # arr_0 (N, H, W, 3) uint8
            for start in range(0, len(images), 256):
                batch = images.read(start, start + 256)
    """

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"npz file not found: {self.path}")
        self._zip = zipfile.ZipFile(self.path)
        member = key + ".npy"
        if member not in self._zip.namelist():
            names = sorted(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))
            self._zip.close()
            raise ValueError(f"{self.path} has no array {key!r}; it holds {names}.")
        self._file = self._zip.open(member)
        version = np.lib.format.read_magic(self._file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._file)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._file)
        if fortran or dtype.hasobject or not shape:
            self.close()
            raise ValueError(f"{self.path}:{key} must be a C-ordered, non-object array with rows.")
        self.shape, self.dtype = tuple(shape), dtype
        self._data_start = self._file.tell()
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (clipped to the array) as a new array."""
        start, stop = max(0, start), min(stop, self.shape[0])
        if stop <= start:
            return np.empty((0, *self.shape[1:]), self.dtype)
        offset = self._data_start + start * self._row_bytes
        if self._file.tell() != offset:
            self._file.seek(offset)
        data = self._file.read((stop - start) * self._row_bytes)
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:]).copy()

    def close(self) -> None:
        self._file.close()
        self._zip.close()

    def __enter__(self) -> NpzArrayReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
