"""Random-access readers of decoded examples, one per ``data.source``; the corrupt-record policy.

A reader has ``len(reader)``, ``reader.read(index, mirrored)`` and
``reader.describe(index, mirrored)``. ``read`` returns a dict of NumPy arrays: ``'labels'`` int32
and either ``'images'`` float32 in [-1, 1] ``(S, S, C)`` (digits, ImageNet) or ``'moments'``
float32 ``(h, w, 2*C)`` (latent cache); ``mirrored`` asks for the horizontally flipped example
(the cache stores the mirror's moments, so only that record is read). Reading is deterministic;
the Grain pipeline draws ``mirrored`` and the latent noise.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol

import ml_collections
import numpy as np

from xar_jax.data import digits, imagenet, latent_format
from xar_jax.errors import CorruptInputError, describe

# With allow_corrupt_records, this many corrupt records in a row is a broken dataset, not bad luck.
MAX_CONSECUTIVE_CORRUPT = 16


class CorruptRecordError(CorruptInputError):
    """A record that cannot be read or decoded; the message names its shard/file and index."""


SKIP_HINT = (
    "Set --config.data.allow_corrupt_records=True to skip such records (each is logged), "
    "or rebuild the file (docs/data.md)."
)


class ExampleReader(Protocol):
    def __len__(self) -> int: ...
    def read(self, index: int, mirrored: bool = False) -> dict[str, np.ndarray]: ...
    def describe(self, index: int, mirrored: bool = False) -> str: ...


def _identity(record):
    return record


class ImageReader:
    """Decodes raw image records (``records[i]``) and mirrors the decoded image on request.

    Args:
      records: random-access raw records (``len`` and ``[i]``), e.g. a TFDS data source.
      decode: record -> ``{'images': (S, S, C) float32, 'labels': int32}``.
      describe: index -> location of the record, for error messages.
    """

    def __init__(
        self,
        records,
        decode: Callable[[Any], dict[str, np.ndarray]] = _identity,
        describe: Callable[[int], str] | None = None,
    ):
        self.records, self._decode, self._describe = records, decode, describe

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int, mirrored: bool = False) -> dict[str, np.ndarray]:
        example = dict(self._decode(self.records[index]))
        if mirrored:
            example["images"] = np.ascontiguousarray(example["images"][:, ::-1])
        return example

    def describe(self, index: int, mirrored: bool = False) -> str:
        return self._describe(index) if self._describe else f"example {index}"

    def __repr__(self) -> str:
        return f"ImageReader({self.records!r})"


class CheckedReader:
    """Applies the corrupt-record policy to a reader.

    ``allow_corrupt=False``: a record that fails to read or decode raises
    :class:`CorruptRecordError` naming its location. ``True``: it is logged and replaced by the
    next readable example; every example then carries ``'skipped_records'`` (int32), the number
    of records skipped to produce it.
    """

    def __init__(self, reader: ExampleReader, *, allow_corrupt: bool = False):
        self.reader, self.allow_corrupt = reader, allow_corrupt

    def __len__(self) -> int:
        return len(self.reader)

    def read(self, index: int, mirrored: bool = False) -> dict[str, np.ndarray]:
        index = int(index)
        for skipped in range(MAX_CONSECUTIVE_CORRUPT + 1):
            position = (index + skipped) % len(self.reader)
            try:
                example = self.reader.read(position, mirrored)
            except Exception as e:  # noqa: BLE001 - any read/decode failure is a corrupt record.
                error = CorruptRecordError(
                    f"Corrupt record at {self.reader.describe(position, mirrored)}: "
                    f"{describe(e, 240)}"
                )
                if not self.allow_corrupt:
                    raise CorruptRecordError(f"{str(error).rstrip('.')}. {SKIP_HINT}") from e
                logging.warning("%s; skipped (allow_corrupt_records=True).", error)
                continue
            if self.allow_corrupt:
                example["skipped_records"] = np.int32(skipped)
            return example
        raise CorruptRecordError(
            f"{MAX_CONSECUTIVE_CORRUPT + 1} consecutive corrupt records from "
            f"{self.reader.describe(index, mirrored)}; the dataset looks broken."
        )

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.read(index)

    def __repr__(self) -> str:
        return f"CheckedReader({self.reader!r})"


def image_decoder(data_cfg: ml_collections.ConfigDict) -> Callable[[Any], dict[str, np.ndarray]]:
    """How raw records of an image source are decoded (identity for the in-memory digits)."""
    if data_cfg.source == "imagenet":
        return functools.partial(imagenet.decode_imagenet_example, image_size=data_cfg.image_size)
    return _identity


def open_reader(data_cfg: ml_collections.ConfigDict, split: str) -> ExampleReader:
    """Opens ``split`` of ``data_cfg.source``; errors name missing paths and how to make them."""
    if data_cfg.source == "digits":
        return ImageReader(digits.DigitsSource(split))
    if data_cfg.source == "imagenet":
        records = imagenet.open_tfds_source(
            data_cfg.data_dir, data_cfg.tfds_name, split, image_decoder=data_cfg.image_decoder
        )
        return ImageReader(
            records,
            image_decoder(data_cfg),
            functools.partial(imagenet.describe_tfds_index, records),
        )
    if data_cfg.source == "latents":
        return latent_format.LatentCacheRecords(data_cfg.cache_dir, split)
    raise ValueError(f"data config field 'source'={data_cfg.source!r} is not allowed.")


def build_reader(
    data_cfg: ml_collections.ConfigDict, split: str, *, records: Any = None
) -> CheckedReader:
    """The checked reader of ``split``.

    Args:
      data_cfg: validated data config.
      split: split name.
      records: optional data replacing what ``data_cfg.source`` would open: raw image records
        (indexable, e.g. TFDS-like dicts with JPEG bytes; decoded as ``data_cfg.source`` decodes) or
        any object with ``read``/``describe``/``len`` (an :class:`ExampleReader`).
    """
    if records is None:
        reader = open_reader(data_cfg, split)
    elif hasattr(records, "read") and hasattr(records, "describe"):
        reader = records
    else:
        reader = ImageReader(records, image_decoder(data_cfg), getattr(records, "describe", None))
    return CheckedReader(reader, allow_corrupt=data_cfg.allow_corrupt_records)
