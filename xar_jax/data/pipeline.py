"""The Grain input pipeline shared by every source: shuffle, shard by process, augment, batch, prefetch.

Train pipeline (identical for digits, ImageNet and cached latents; only the source differs)::

    source -> seed -> global shuffle -> repeat forever (reshuffled each epoch)
           -> augment (flip; latents: choose flip, optionally sample z)  [seeded by global position]
           -> [process_index::process_count] -> batch(global // process_count, drop remainder)
           -> threads (read_threads, prefetch_buffer) -> worker processes (num_workers)
           -> optionally: global jax.Arrays prefetched to device

Every step is a ``grain.MapDataset`` transformation, so the iterator state is just a position: it
is saved in the Orbax checkpoint (``grain.checkpoint.CheckpointSave(it)``) and a restored iterator
yields exactly the next batch. Augmentation is seeded by the example's position in the global
stream (before sharding by process), so no two hosts draw the same flips or noise. Batches are
formed before the worker split, so the batches do not depend on ``num_workers``.

Batch dicts (NumPy): ``'labels'`` (b,) int32 and, by source, ``'images'`` (b, S, S, C) float32 in
[-1, 1], or ``'moments'`` (b, h, w, 2*C) float32 (``latent_sampling='device'``), or ``'latents'``
(b, h, w, C) float32 (``'host'``). ``'skipped_records'`` (b,) int32 is added when
``allow_corrupt_records`` is on; eval batches add ``'mask'`` (b,) bool (False on padding).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from xar_jax.data import config as config_lib
from xar_jax.data import latents as latents_lib
from xar_jax.data import sources

Batch = dict[str, np.ndarray]


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
        raise ValueError(f"process_index={index} must lie in [0, process_count={count}).")
    return index, count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size!r} must be a positive integer.")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by "
                         f"process_count={process_count}.")
    return global_batch_size // process_count


def _finish_example(example: dict[str, Any], rng: np.random.Generator, *, random_flip: bool,
                    latent_sampling: str) -> dict[str, Any]:
    """Applies the random flip and, for cached latents, picks moments or samples the latent."""
    example = dict(example)
    flip = random_flip and rng.random() < 0.5
    if "moments" in example:
        moments, moments_flipped = example.pop("moments"), example.pop("moments_flipped")
        moments = moments_flipped if flip else moments
        if latent_sampling == "host":
            example["latents"] = latents_lib.sample_latents_host(moments, rng)
        else:
            example["moments"] = moments
    elif flip:
        example["images"] = np.ascontiguousarray(example["images"][:, ::-1])
    return example


def _finisher(data_cfg: ml_collections.ConfigDict, *, random_flip: bool):
    return functools.partial(_finish_example, random_flip=random_flip,
                             latent_sampling=data_cfg.latent_sampling)


def _ensure_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) nothing has
    # parsed them, which fails inside the workers. Parsing no arguments keeps every default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def parallel_read(ds: grain.MapDataset, data_cfg: ml_collections.ConfigDict) -> grain.IterDataset:
    """Reads the elements of ``ds`` with ``read_threads`` threads, then in ``num_workers`` processes."""
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                               prefetch_buffer_size=data_cfg.prefetch_buffer))
    if data_cfg.num_workers > 0:
        _ensure_absl_flags_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.num_workers, per_worker_buffer_size=data_cfg.worker_buffer_size))
    return ids


def make_train_dataset(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       seed: int | None = None,
                       records: sources.RecordSource | None = None) -> grain.IterDataset:
    """The endless, shuffled training dataset of this process (see the module docstring).

    Args:
      data_cfg: data config (validated here).
      global_batch_size: examples per step over all processes; this process yields
        ``global_batch_size // process_count`` of them.
      process_index, process_count: default to ``jax.process_index()`` / ``jax.process_count()``.
      seed: pipeline seed (shuffle, flips, host noise); default ``data_cfg.shuffle_seed``. Must be
        the same on every process.
      records: optional raw records replacing those ``data_cfg.source`` would open (same decoding).

    Returns:
      A ``grain.IterDataset`` of batch dicts.
    """
    config_lib.validate_data_config(data_cfg)
    index, count = resolve_process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, count)
    source = sources.build_source(data_cfg, data_cfg.split, records=records)
    if len(source) < global_batch_size:
        raise ValueError(f"split {data_cfg.split!r} has {len(source)} examples, fewer than "
                         f"global_batch_size={global_batch_size}.")
    ds = grain.MapDataset.source(source).seed(data_cfg.shuffle_seed if seed is None else seed)
    ds = ds.shuffle().repeat()
    ds = ds.random_map(_finisher(data_cfg, random_flip=data_cfg.random_flip))
    ds = ds[index::count].batch(local_batch, drop_remainder=True)
    return parallel_read(ds, data_cfg)


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                        process_index: int | None = None, process_count: int | None = None,
                        seed: int | None = None, sharding: jax.sharding.Sharding | None = None,
                        records: sources.RecordSource | None = None) -> grain.DatasetIterator:
    """Iterator over :func:`make_train_dataset`; checkpoint it with ``grain.checkpoint.CheckpointSave``.

    With ``sharding`` (e.g. ``NamedSharding(mesh, P('data'))``), batches are global ``jax.Array``s
    assembled from every process's share and ``data_cfg.device_prefetch`` of them are placed on
    device ahead of use; the iterator stays checkpointable.
    """
    ds = make_train_dataset(data_cfg, global_batch_size=global_batch_size, process_index=process_index,
                            process_count=process_count, seed=seed, records=records)
    if sharding is not None:
        from xar_jax.data import device

        ds = device.prefetch_to_device(ds, sharding, buffer_size=data_cfg.device_prefetch)
    return iter(ds)


class _PaddedProcessShard:
    """This process's share ``[index::count]`` of a source, padded to ``length`` with masked copies.

    Every process gets the same ``length`` so that multi-host eval loops run the same number of
    steps; padding repeats example 0 with ``mask=False``.
    """

    def __init__(self, source, index: int, count: int, length: int):
        self.source, self.index, self.count, self.length = source, index, count, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> dict[str, Any]:
        global_index = self.index + int(position) * self.count
        real = global_index < len(self.source)
        example = dict(self.source[global_index if real else 0])
        example["mask"] = np.bool_(real)
        return example

    def __repr__(self) -> str:
        return f"_PaddedProcessShard({self.source!r}, {self.index} of {self.count})"


def make_eval_dataset(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                      process_index: int | None = None, process_count: int | None = None,
                      seed: int | None = None,
                      records: sources.RecordSource | None = None) -> grain.IterDataset:
    """One pass over ``data_cfg.eval_split`` in order, no flip; batches carry ``'mask'`` (b,) bool.

    Process ``i`` of ``n`` reads examples ``i, i + n, ...``; all processes yield
    ``ceil(ceil(N / n) / b)`` batches, the last ones padded (mask False). Host-sampled latents use
    ``seed`` (default ``data_cfg.shuffle_seed``), so evaluation is repeatable.
    """
    config_lib.validate_data_config(data_cfg)
    index, count = resolve_process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, count)
    source = sources.build_source(data_cfg, data_cfg.eval_split, records=records)
    per_process = math.ceil(len(source) / count)
    length = math.ceil(per_process / local_batch) * local_batch
    ds = grain.MapDataset.source(_PaddedProcessShard(source, index, count, length))
    ds = ds.seed(data_cfg.shuffle_seed if seed is None else seed)
    ds = ds.random_map(_finisher(data_cfg, random_flip=False))
    ds = ds.batch(local_batch, drop_remainder=True)
    return parallel_read(ds, data_cfg)


def make_eval_iterator(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       seed: int | None = None,
                       records: sources.RecordSource | None = None) -> grain.DatasetIterator:
    """Iterator over :func:`make_eval_dataset` (finite: a single pass)."""
    return iter(make_eval_dataset(data_cfg, global_batch_size=global_batch_size,
                                  process_index=process_index, process_count=process_count,
                                  seed=seed, records=records))


def dataset_size(data_cfg: ml_collections.ConfigDict, split: str | None = None) -> int:
    """Number of examples in ``split`` (default ``data_cfg.split``), e.g. to convert epochs to steps."""
    config_lib.validate_data_config(data_cfg)
    return len(sources.build_source(data_cfg, split or data_cfg.split))
