"""Random-access sources of decoded examples, one per ``data.source``, and the corrupt-record policy.

Every source yields dicts of NumPy arrays: ``'labels'`` int32 and either ``'images'`` float32 in
[-1, 1] ``(S, S, C)`` (digits, ImageNet) or ``'moments'`` and ``'moments_flipped'`` float32
``(h, w, 2*C)`` (latent cache). Decoding is deterministic; randomness (flip, latent noise) is added by
the Grain pipeline so that a restored iterator reproduces it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Protocol

import ml_collections
import numpy as np

from xar_jax.data import digits, imagenet, latent_format

# With allow_corrupt_records, this many corrupt records in a row is a broken dataset, not bad luck.
MAX_CONSECUTIVE_CORRUPT = 16


class CorruptRecordError(RuntimeError):
    """A record that cannot be read or decoded; the message names its shard/file and index."""


class RecordSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


def _identity(record):
    return record


def _describe_index(index: int) -> str:
    return f"example {index}"


class DecodedSource:
    """Reads raw records and decodes them, applying the corrupt-record policy.

    Args:
      records: random-access raw records (``len`` and ``[i]``).
      decode: record -> example dict.
      describe: index -> location for error messages (shard file and record index).
      allow_corrupt: False: a corrupt record raises :class:`CorruptRecordError`. True: it is logged and
        replaced by the next readable record, and the example's ``'skipped_records'`` (int32) counts
        the records skipped to produce it (the key is present on every example in this mode).
    """

    def __init__(self, records: RecordSource, decode: Callable[[Any], dict[str, np.ndarray]], *,
                 describe: Callable[[int], str] | None = None, allow_corrupt: bool = False):
        self.records = records
        self._decode = decode
        self._describe = describe or _describe_index
        self.allow_corrupt = allow_corrupt

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        for skipped in range(MAX_CONSECUTIVE_CORRUPT + 1):
            position = (index + skipped) % len(self.records)
            try:
                example = dict(self._decode(self.records[position]))
            except Exception as e:  # noqa: BLE001 - any read/decode failure is a corrupt record.
                error = CorruptRecordError(
                    f"Corrupt record at {self._describe(position)}: {type(e).__name__}: {e}")
                if not self.allow_corrupt:
                    raise error from e
                logging.warning("%s; skipped (allow_corrupt_records=True).", error)
                continue
            if self.allow_corrupt:
                example["skipped_records"] = np.int32(skipped)
            return example
        raise CorruptRecordError(f"{MAX_CONSECUTIVE_CORRUPT + 1} consecutive corrupt records "
                                 f"starting at {self._describe(index)}; the dataset looks broken.")

    def __repr__(self) -> str:
        return f"DecodedSource({self.records!r})"


def open_records(data_cfg: ml_collections.ConfigDict, split: str) -> tuple[RecordSource, Callable, Callable]:
    """Opens the raw records of ``split`` for ``data_cfg.source``: ``(records, decode, describe)``."""
    if data_cfg.source == "digits":
        records = digits.DigitsSource(split)
        return records, _identity, _describe_index
    if data_cfg.source == "imagenet":
        records = imagenet.open_tfds_source(data_cfg.data_dir, data_cfg.tfds_name, split,
                                            image_decoder=data_cfg.image_decoder)
        decode = functools.partial(imagenet.decode_imagenet_example, image_size=data_cfg.image_size)
        return records, decode, functools.partial(imagenet.describe_tfds_index, records)
    if data_cfg.source == "latents":
        records = latent_format.LatentCacheRecords(data_cfg.cache_dir, split)
        return records, latent_format.decode_record, records.describe
    raise ValueError(f"data config field 'source'={data_cfg.source!r} is not allowed.")


def decoder_for(data_cfg: ml_collections.ConfigDict) -> Callable[[Any], dict[str, np.ndarray]]:
    """How raw records of ``data_cfg.source`` are decoded (for records supplied by the caller)."""
    if data_cfg.source == "imagenet":
        return functools.partial(imagenet.decode_imagenet_example, image_size=data_cfg.image_size)
    if data_cfg.source == "latents":
        return latent_format.decode_record
    return _identity


def build_source(data_cfg: ml_collections.ConfigDict, split: str, *,
                 records: RecordSource | None = None) -> DecodedSource:
    """The decoded source of ``split``.

    Args:
      data_cfg: validated data config.
      split: split name.
      records: optional raw records to use instead of opening ``data_cfg.source``'s files (a custom
        dataset in the same record format, e.g. TFDS-like dicts with JPEG bytes); decoded the same way.
    """
    if records is None:
        records, decode, describe = open_records(data_cfg, split)
    else:
        decode, describe = decoder_for(data_cfg), getattr(records, "describe", None)
    return DecodedSource(records, decode, describe=describe,
                         allow_corrupt=data_cfg.allow_corrupt_records)
