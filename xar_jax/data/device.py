"""From per-process NumPy batches to global, sharded ``jax.Array``s, prefetched to device.

Each process holds ``global_batch / process_count`` examples; ``to_global_batch`` assembles the
global array without moving data between hosts. ``prefetch_to_device`` does this in a background
thread a few batches ahead, as a Grain transformation, so the iterator remains checkpointable (its
saved state is that of the last batch handed to the trainer, not of the prefetched ones).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def to_global_batch(
    batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
    """Makes global arrays from this process's batch.

    Args:
      batch: dict of per-process arrays with a leading batch axis (b_local, ...).
      sharding: sharding of the global batch that splits only the leading axis, e.g.
        ``NamedSharding(mesh, PartitionSpec('data'))`` (applied to every field, whatever its rank).

    Returns:
      dict of ``jax.Array`` with leading axis ``b_local * process_count``.
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def prefetch_to_device(
    ds: grain.IterDataset, sharding: jax.sharding.Sharding, *, buffer_size: int = 2
) -> grain.IterDataset:
    """Maps batches to global arrays and keeps ``buffer_size`` of them ready (0 = no prefetch)."""
    ds = ds.map(functools.partial(to_global_batch, sharding=sharding))
    if buffer_size > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=buffer_size)
    return ds


def local_data_parallel(
    fn: Callable[[jax.Array], Any], devices: Sequence[jax.Device] | None = None
):
    """Runs ``fn`` data-parallel over this process's devices; returns NumPy.

    For per-process work such as latent caching: every process handles its own shards, so the
    computation must not span hosts. ``fn`` maps a batch ``(B, ...)`` to outputs with leading
    axis B; B must be divisible by the number of local devices.
    """
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("batch",))
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    jitted = jax.jit(fn, in_shardings=sharding, out_shardings=sharding)

    def run(batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] % len(devices):
            raise ValueError(
                f"batch of {batch.shape[0]} does not split over {len(devices)} local devices."
            )
        return jax.tree.map(np.asarray, jitted(jax.device_put(batch, sharding)))

    return run
