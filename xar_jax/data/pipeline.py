"""The Grain input pipeline shared by every source: shuffle, shard, augment, batch, prefetch.

Train pipeline (identical for digits, ImageNet and cached latents; only the reader differs)::

    range(N) -> seed (data.shuffle_seed, or the run's seed when it is -1)
             -> global shuffle of example indices -> repeat forever (reshuffled each epoch)
             -> draw the flip (and host noise) from the position in the global stream, then read
                that example in that orientation (cached latents: only that record)
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
import numbers
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from xar_jax.data import config as config_lib
from xar_jax.data import device, sources
from xar_jax.data import latents as latents_lib


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """``(process_index, process_count)``, defaulting to JAX's; checks that they are consistent."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not (
        isinstance(count, numbers.Integral)
        and isinstance(index, numbers.Integral)
        and 0 <= index < count
    ):
        raise ValueError(f"process_index={index!r} must lie in [0, process_count={count!r}).")
    return int(index), int(count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if not isinstance(global_batch_size, numbers.Integral) or global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size!r} must be a positive integer.")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by "
            f"process_count={process_count}."
        )
    return int(global_batch_size) // process_count


def _sample_on_host(example: dict[str, Any], rng: np.random.Generator, latent_sampling: str):
    if latent_sampling == "host" and "moments" in example:
        example["latents"] = latents_lib.sample_latents_host(example.pop("moments"), rng)
    return example


def _load_train_example(
    index: int,
    rng: np.random.Generator,
    *,
    reader: sources.CheckedReader,
    random_flip: bool,
    latent_sampling: str,
) -> dict[str, Any]:
    """Draws the flip, reads example ``index`` that way round, samples z on the host if asked."""
    mirrored = random_flip and rng.random() < 0.5
    return _sample_on_host(reader.read(index, mirrored), rng, latent_sampling)


def _ensure_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) nothing has
    # parsed them, which fails inside the workers. Parsing no arguments keeps every default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def parallel_read(ds: grain.MapDataset, data_cfg: ml_collections.ConfigDict) -> grain.IterDataset:
    """Reads elements of ``ds`` with ``read_threads`` threads, then in ``num_workers`` processes."""
    ids = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=data_cfg.read_threads, prefetch_buffer_size=data_cfg.prefetch_buffer
        )
    )
    if data_cfg.num_workers > 0:
        _ensure_absl_flags_parsed()
        ids = ids.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_cfg.num_workers, per_worker_buffer_size=data_cfg.worker_buffer_size
            )
        )
    return ids


def pipeline_seed(data_cfg: ml_collections.ConfigDict, run_seed: int | None) -> int:
    """The seed of the shuffle, flips and host noise: ``data_cfg.shuffle_seed`` when set (>= 0),
    else (-1) the run's seed, 0 when there is none."""
    if data_cfg.shuffle_seed != config_lib.FOLLOW_RUN_SEED:
        return int(data_cfg.shuffle_seed)
    return 0 if run_seed is None else int(run_seed)


def make_train_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int | None = None,
    records: Any = None,
) -> grain.IterDataset:
    """The endless, shuffled training dataset of this process (see the module docstring).

    Args:
      data_cfg: data config (validated here).
      global_batch_size: examples per step over all processes; this process yields
        ``global_batch_size // process_count`` of them.
      process_index, process_count: default to ``jax.process_index()`` / ``jax.process_count()``.
      seed: the run's seed (train.py passes ``config.seed``); seeds the shuffle, flips and host
        noise when ``data_cfg.shuffle_seed`` is -1, else ``shuffle_seed`` does (see
        `pipeline_seed`). Must be the same on every process.
      records: optional data replacing what ``data_cfg.source`` would open: raw image records
        (decoded as the source decodes them) or an ``ExampleReader`` (see ``sources.build_reader``).

    Returns:
      A ``grain.IterDataset`` of batch dicts.
    """
    config_lib.validate_data_config(data_cfg)
    index, count = resolve_process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, count)
    reader = sources.build_reader(data_cfg, data_cfg.split, records=records)
    if len(reader) < global_batch_size:
        raise ValueError(
            f"split {data_cfg.split!r} has {len(reader)} examples, fewer than "
            f"global_batch_size={global_batch_size}."
        )
    # The elements are example indices: shuffled globally, reshuffled every epoch; the flip and the
    # noise are drawn from the position in the global stream, then only that record is read.
    ds = grain.MapDataset.range(len(reader)).seed(pipeline_seed(data_cfg, seed))
    ds = ds.shuffle().repeat()
    ds = ds.random_map(
        functools.partial(
            _load_train_example,
            reader=reader,
            random_flip=data_cfg.random_flip,
            latent_sampling=data_cfg.latent_sampling,
        )
    )
    ds = ds[index::count].batch(local_batch, drop_remainder=True)
    return parallel_read(ds, data_cfg)


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
    records: Any = None,
) -> grain.DatasetIterator:
    """Iterator over :func:`make_train_dataset`; checkpoint with grain.checkpoint.CheckpointSave.

    With ``sharding`` (e.g. ``NamedSharding(mesh, P('data'))``), batches are global ``jax.Array``s
    assembled from every process's share and ``data_cfg.device_prefetch`` of them are placed on
    device ahead of use; the iterator stays checkpointable.
    """
    ds = make_train_dataset(
        data_cfg,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        records=records,
    )
    if sharding is not None:
        ds = device.prefetch_to_device(ds, sharding, buffer_size=data_cfg.device_prefetch)
    return iter(ds)


def _load_eval_example(
    position: int, rng: np.random.Generator, *, reader: sources.CheckedReader, latent_sampling: str
) -> dict[str, Any]:
    """Example ``position`` unflipped, or past the end (padding) a copy of example 0, mask False."""
    real = position < len(reader)
    example = reader.read(position if real else 0, False)
    example["mask"] = np.bool_(real)
    return _sample_on_host(example, rng, latent_sampling)


def make_eval_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int | None = None,
    records: Any = None,
) -> grain.IterDataset:
    """One pass over ``data_cfg.eval_split`` in order, no flip; batches carry ``'mask'`` (b,) bool.

    Process ``i`` of ``n`` reads examples ``i, i + n, ...``; all processes yield
    ``ceil(ceil(N / n) / b)`` batches, the last ones padded (copies of example 0, mask False), so
    multi-host eval loops stay in step. Host-sampled latents use `pipeline_seed` (``shuffle_seed``,
    or the run's ``seed`` when it is -1) and the example's index, so evaluation is repeatable.
    """
    config_lib.validate_data_config(data_cfg)
    index, count = resolve_process(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, count)
    reader = sources.build_reader(data_cfg, data_cfg.eval_split, records=records)
    per_process = math.ceil(len(reader) / count)
    padded = math.ceil(per_process / local_batch) * local_batch * count
    ds = grain.MapDataset.range(padded).seed(pipeline_seed(data_cfg, seed))
    ds = ds.random_map(
        functools.partial(
            _load_eval_example, reader=reader, latent_sampling=data_cfg.latent_sampling
        )
    )
    ds = ds[index::count].batch(local_batch, drop_remainder=True)
    return parallel_read(ds, data_cfg)


def make_eval_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int | None = None,
    records: Any = None,
) -> grain.DatasetIterator:
    """Iterator over :func:`make_eval_dataset` (finite: a single pass)."""
    return iter(
        make_eval_dataset(
            data_cfg,
            global_batch_size=global_batch_size,
            process_index=process_index,
            process_count=process_count,
            seed=seed,
            records=records,
        )
    )


def dataset_size(data_cfg: ml_collections.ConfigDict, split: str | None = None) -> int:
    """Number of examples in ``split`` (default ``data_cfg.split``), e.g. for epochs -> steps."""
    config_lib.validate_data_config(data_cfg)
    return len(sources.build_reader(data_cfg, split or data_cfg.split))
