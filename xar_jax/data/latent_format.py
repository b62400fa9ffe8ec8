"""The on-disk format of the latent cache, and its random-access reader.

Layout: ``<cache_dir>/<split>/cache_spec.json`` plus ArrayRecord shards
``latents-SSSSS-of-NNNNN.array_record`` (written with ``group_size:1,uncompressed``: moments are
incompressible floats and uncompressed records read about 5x faster than brotli ones). A shard
exists under its final name only once complete (written to a temporary name, fsynced, renamed;
on ``gs://`` written on local disk and uploaded under a temporary name, then moved). The cache may
live on local disk or on GCS: file access goes through etils ``epath``, and array_record reads
``gs://`` shards natively.

Example ``i`` is stored as two consecutive records, ``2i`` (moments of the image) and ``2i + 1``
(moments of its mirror image), so training reads only the orientation it drew: half the bytes.

Record format, version 1 (little-endian)::

    header  = magic b"XARL" | version u16 | dtype u8 (1 = float32, 2 = float16) | mirrored u8
              | height u16 | width u16 | channels u16 | label i32 | crc32 u32
    payload = moments (h, w, c), C order

``crc32`` covers the header bytes before it and the payload, so a flipped bit or a truncated record
is detected. Moments are the VAE encoder's ``[mean, logvar]`` (channels last, logvar not clamped).
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from typing import Any

import numpy as np
from etils import epath

FORMAT_NAME = "xar-latent-cache"
FORMAT_VERSION = 1
SPEC_FILE = "cache_spec.json"
WRITER_OPTIONS = "group_size:1,uncompressed"

_MAGIC = b"XARL"
_HEADER = struct.Struct("<4sHBBHHHiI")
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_DTYPE_CODES = {"float32": 1, "float16": 2}


class RecordFormatError(ValueError):
    """A latent record that does not parse (bad magic, version, size, orientation or checksum)."""


def encode_record(
    moments: np.ndarray, label: int, *, mirrored: bool, dtype: str = "float32"
) -> bytes:
    """Serializes the ``(h, w, c)`` moments of an image (``mirrored``: its mirror) and its label."""
    if moments.ndim != 3:
        raise ValueError(f"moments must be (h, w, c); got {moments.shape}.")
    code = _DTYPE_CODES[dtype]
    payload = np.ascontiguousarray(moments, _DTYPES[code]).tobytes()
    prefix = _HEADER.pack(
        _MAGIC, FORMAT_VERSION, code, int(mirrored), *moments.shape, int(label), 0
    )[:-4]
    crc = zlib.crc32(payload, zlib.crc32(prefix))
    return prefix + struct.pack("<I", crc) + payload


def decode_record(record: bytes, *, mirrored: bool | None = None) -> dict[str, np.ndarray]:
    """Parses a record into ``{'moments': (h, w, c) float32, 'labels': int32}``.

    Args:
      record: bytes of one record.
      mirrored: if given, the orientation the record must have (catches misaligned reads).

    Raises:
      RecordFormatError: the record is truncated, of another format or version, of the wrong
        orientation, or fails its checksum.
    """
    if len(record) < _HEADER.size:
        raise RecordFormatError(f"record of {len(record)} bytes is shorter than the header")
    magic, version, code, is_mirrored, height, width, channels, label, crc = _HEADER.unpack_from(
        record
    )
    if magic != _MAGIC:
        raise RecordFormatError(f"bad magic {magic!r} (expected {_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise RecordFormatError(
            f"record format version {version}; this reader knows {FORMAT_VERSION}"
        )
    if code not in _DTYPES:
        raise RecordFormatError(f"unknown dtype code {code}")
    if mirrored is not None and bool(is_mirrored) != mirrored:
        raise RecordFormatError(f"record has mirrored={bool(is_mirrored)}, expected {mirrored}")
    dtype = _DTYPES[code]
    payload = memoryview(record)[_HEADER.size :]
    if len(payload) != height * width * channels * dtype.itemsize:
        raise RecordFormatError(
            f"payload of {len(payload)} bytes does not match the header's "
            f"{height}x{width}x{channels} {dtype.name}"
        )
    if zlib.crc32(payload, zlib.crc32(memoryview(record)[: _HEADER.size - 4])) != crc:
        raise RecordFormatError("checksum mismatch")
    moments = np.frombuffer(payload, dtype).reshape(height, width, channels)
    # float32 moments stay a read-only view of the record bytes: no copy until batching.
    if dtype != np.float32:
        moments = moments.astype(np.float32)
    return {"moments": moments, "labels": np.int32(label)}


def shard_name(index: int, num_shards: int) -> str:
    return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


def shard_sizes(num_examples: int, shard_size: int) -> list[int]:
    """Examples per shard: ``shard_size`` each, the last one takes the rest."""
    return [min(shard_size, num_examples - start) for start in range(0, num_examples, shard_size)]


def split_dir(cache_dir: str, split: str) -> str:
    # Split names such as 'train[:10%]' become safe directory names.
    return os.path.join(cache_dir, re.sub(r"[^A-Za-z0-9_.-]", "_", split))


def cache_command(split: str, cache_dir: str) -> str:
    return (
        f"python -m xar_jax.data.latent_cache --split={split} --out_dir={cache_dir} "
        "--encoder=MODULE:FACTORY ...  (docs/data.md)"
    )


def existing_names(directory: str) -> set[str]:
    """Names of the files in ``directory`` (local or ``gs://``); empty if it does not exist."""
    try:
        return {p.name for p in epath.Path(directory).iterdir()}
    except FileNotFoundError:
        return set()


def read_spec(directory: str, *, split: str, cache_dir: str) -> dict[str, Any]:
    """Reads ``cache_spec.json`` of a split directory, with a clear error when it is absent."""
    path = epath.Path(directory) / SPEC_FILE
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"No latent cache at {directory} ({SPEC_FILE} missing). Create it with\n"
            f"  {cache_command(split, cache_dir)}"
        ) from None
    if spec.get("format") != FORMAT_NAME or spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} describes format {spec.get('format')!r} version "
            f"{spec.get('format_version')!r}; this reader knows {FORMAT_NAME!r} "
            f"version {FORMAT_VERSION}."
        )
    return spec


class LatentCacheRecords:
    """Random access to the examples of a complete latent-cache split.

    ``read(i, mirrored)`` returns ``{'moments', 'labels'}`` of example ``i`` (of its mirror image if
    ``mirrored``), reading only that record; ``describe(i, mirrored)`` names the shard file and the
    record index in that shard. Picklable, so Grain worker processes open their own readers.
    """

    def __init__(self, cache_dir: str, split: str):
        import grain

        self.directory = split_dir(cache_dir, split)
        self.spec = read_spec(self.directory, split=split, cache_dir=cache_dir)
        sizes = shard_sizes(self.spec["num_examples"], self.spec["shard_size"])
        names = [shard_name(i, len(sizes)) for i in range(len(sizes))]
        paths = [os.path.join(self.directory, name) for name in names]
        present = existing_names(self.directory)  # one listing, not a request per shard
        missing = [name for name in names if name not in present]
        if missing:
            raise FileNotFoundError(
                f"Latent cache {self.directory} is incomplete: {len(missing)} of {len(paths)} "
                f"shards missing (first: {missing[0]}). Resume the caching run (finished shards "
                "are kept):\n"
                f"  {cache_command(split, cache_dir)}"
            )
        self.paths = paths
        self.starts = np.cumsum([0] + sizes[:-1]).tolist()
        # Explicit record ranges: no file is opened until it is read (there may be thousands).
        self._records = grain.sources.ArrayRecordDataSource(
            [f"{path}[0:{2 * size}]" for path, size in zip(paths, sizes, strict=True)]
        )

    def __len__(self) -> int:
        return self.spec["num_examples"]

    def read(self, index: int, mirrored: bool = False) -> dict[str, np.ndarray]:
        return decode_record(self._records[2 * index + int(mirrored)], mirrored=mirrored)

    def describe(self, index: int, mirrored: bool = False) -> str:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        record = 2 * (index - self.starts[shard]) + int(mirrored)
        return f"shard {self.paths[shard]} record {record} (example {index}, mirrored={mirrored})"

    def __repr__(self) -> str:
        return f"LatentCacheRecords({self.directory!r}, {len(self)} examples)"
