"""The on-disk format of the latent cache, and its random-access reader.

Layout: ``<cache_dir>/<split>/cache_spec.json`` plus ArrayRecord shards
``latents-SSSSS-of-NNNNN.array_record`` (written with ``group_size:1,uncompressed``: moments are
incompressible floats and uncompressed records read about 5x faster than brotli ones). A shard
exists under its final name only once it is complete (written to a temporary name, fsynced, renamed).

Record format, version 1 (little-endian)::

    header  = magic b"XARL" | version u16 | dtype u8 (1 = float32, 2 = float16) | pad u8
              | height u16 | width u16 | channels u16 | label i32 | crc32 u32
    payload = moments (h, w, c) C-order | moments of the flipped image (h, w, c)

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

FORMAT_NAME = "xar-latent-cache"
FORMAT_VERSION = 1
SPEC_FILE = "cache_spec.json"
WRITER_OPTIONS = "group_size:1,uncompressed"

_MAGIC = b"XARL"
_HEADER = struct.Struct("<4sHBxHHHiI")
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_DTYPE_CODES = {"float32": 1, "float16": 2}


class RecordFormatError(ValueError):
    """A latent record that does not parse (bad magic, version, size or checksum)."""


def encode_record(moments: np.ndarray, moments_flipped: np.ndarray, label: int,
                  dtype: str = "float32") -> bytes:
    """Serializes one example: ``(h, w, c)`` moments of the image and of its mirror, and its label."""
    if moments.shape != moments_flipped.shape or moments.ndim != 3:
        raise ValueError(f"moments {moments.shape} and flipped moments {moments_flipped.shape} "
                         "must both be (h, w, c).")
    code = _DTYPE_CODES[dtype]
    payload = (np.ascontiguousarray(moments, _DTYPES[code]).tobytes()
               + np.ascontiguousarray(moments_flipped, _DTYPES[code]).tobytes())
    height, width, channels = moments.shape
    prefix = _HEADER.pack(_MAGIC, FORMAT_VERSION, code, height, width, channels, int(label), 0)[:-4]
    crc = zlib.crc32(payload, zlib.crc32(prefix))
    return prefix + struct.pack("<I", crc) + payload


def decode_record(record: bytes) -> dict[str, np.ndarray]:
    """Parses a record into float32 ``moments``, ``moments_flipped`` ``(h, w, c)`` and int32 ``labels``.

    Raises:
      RecordFormatError: the record is truncated, of another format or version, or fails its checksum.
    """
    if len(record) < _HEADER.size:
        raise RecordFormatError(f"record of {len(record)} bytes is shorter than the header")
    magic, version, code, height, width, channels, label, crc = _HEADER.unpack_from(record)
    if magic != _MAGIC:
        raise RecordFormatError(f"bad magic {magic!r} (expected {_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise RecordFormatError(f"record format version {version}; this reader knows {FORMAT_VERSION}")
    if code not in _DTYPES:
        raise RecordFormatError(f"unknown dtype code {code}")
    dtype = _DTYPES[code]
    size = height * width * channels * dtype.itemsize
    payload = memoryview(record)[_HEADER.size :]
    if len(payload) != 2 * size:
        raise RecordFormatError(f"payload of {len(payload)} bytes, header says {2 * size}")
    if zlib.crc32(payload, zlib.crc32(memoryview(record)[: _HEADER.size - 4])) != crc:
        raise RecordFormatError("checksum mismatch")
    both = np.frombuffer(payload, dtype).reshape(2, height, width, channels).astype(np.float32)
    return {"moments": both[0], "moments_flipped": both[1], "labels": np.int32(label)}


def shard_name(index: int, num_shards: int) -> str:
    return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


def shard_sizes(num_examples: int, shard_size: int) -> list[int]:
    """Examples per shard: ``shard_size`` each, the last one takes the rest."""
    return [min(shard_size, num_examples - start) for start in range(0, num_examples, shard_size)]


def split_dir(cache_dir: str, split: str) -> str:
    # Split names such as 'train[:10%]' become safe directory names.
    return os.path.join(cache_dir, re.sub(r"[^A-Za-z0-9_.-]", "_", split))


def cache_command(split: str, cache_dir: str) -> str:
    return (f"python -m xar_jax.data.latent_cache --split={split} --out_dir={cache_dir} "
            "--encoder=MODULE:FACTORY ...  (docs/data.md)")


def read_spec(directory: str, *, split: str, cache_dir: str) -> dict[str, Any]:
    """Reads ``cache_spec.json`` of a split directory, with a clear error when it is absent."""
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No latent cache at {directory} ({SPEC_FILE} missing). Create it with\n"
                                f"  {cache_command(split, cache_dir)}")
    with open(path) as f:
        spec = json.load(f)
    if spec.get("format") != FORMAT_NAME or spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} describes format {spec.get('format')!r} version "
                         f"{spec.get('format_version')!r}; this reader knows {FORMAT_NAME!r} "
                         f"version {FORMAT_VERSION}.")
    return spec


class LatentCacheRecords:
    """Random access to the raw records of a complete latent-cache split.

    ``records[i]`` returns the bytes of example ``i`` (shards concatenated in order);
    ``describe(i)`` names its shard file and index in that shard for error messages.
    Picklable, so Grain worker processes can open their own readers.
    """

    def __init__(self, cache_dir: str, split: str):
        import grain

        self.directory = split_dir(cache_dir, split)
        self.spec = read_spec(self.directory, split=split, cache_dir=cache_dir)
        sizes = shard_sizes(self.spec["num_examples"], self.spec["shard_size"])
        names = [shard_name(i, len(sizes)) for i in range(len(sizes))]
        paths = [os.path.join(self.directory, name) for name in names]
        missing = [name for name, path in zip(names, paths) if not os.path.exists(path)]
        if missing:
            raise FileNotFoundError(
                f"Latent cache {self.directory} is incomplete: {len(missing)} of {len(paths)} shards "
                f"missing (first: {missing[0]}). Resume the caching run (finished shards are kept):\n"
                f"  {cache_command(split, cache_dir)}")
        self.paths = paths
        self.starts = np.cumsum([0] + sizes[:-1]).tolist()
        # Explicit record ranges: no file is opened until it is read (thousands of shards).
        self._records = grain.sources.ArrayRecordDataSource(
            [f"{path}[0:{size}]" for path, size in zip(paths, sizes)])

    def __len__(self) -> int:
        return self.spec["num_examples"]

    def __getitem__(self, index: int) -> bytes:
        return self._records[index]

    def describe(self, index: int) -> str:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"shard {self.paths[shard]} record {index - self.starts[shard]} (example {index})"

    def __repr__(self) -> str:
        return f"LatentCacheRecords({self.directory!r}, {len(self)} examples)"
