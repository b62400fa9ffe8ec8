"""Device mesh and the one table mapping logical axis names to mesh axes.

Mesh axes: ``data`` (pure data parallel: params replicated), ``fsdp`` (data parallel whose params
and optimizer state are sharded along the model width), ``tensor`` (Megatron-style: heads and MLP
hidden units split). The batch is sharded over ``('data', 'fsdp')``.

Rules are applied in order by flax (`nn.logical_to_mesh_sharding`): a logical name takes the first
rule whose mesh axes are still free in that array. Activations carry ``batch`` first, so their
``embed`` axis stays unsharded while params' ``embed`` goes to ``fsdp``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes (None = replicated). The only place this mapping lives.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    # Tensor parallel: attention heads and MLP / adaLN hidden units.
    ("heads", "tensor"),
    ("qkv", "tensor"),
    ("qkv_out", "tensor"),
    ("mlp", "tensor"),
    ("ada", "tensor"),
    # Fully sharded data parallel: the model width of params and optimizer moments.
    ("embed", "fsdp"),
    ("embed_out", "fsdp"),
    ("embed_out", "tensor"),  # (embed, embed_out) kernels: embed took fsdp.
    ("vocab", None),
    ("latent", None),
    ("time_freq", None),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Mesh shape with one ``-1`` entry filled so the product equals ``num_devices``.

    Raises ValueError naming ``mesh.<axis>`` when the shape cannot cover the devices.
    """
    shape = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in shape.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size}; allowed: a positive integer or -1 (fill).")
    free = [n for n, s in shape.items() if s == -1]
    if len(free) > 1:
        names = ", ".join("mesh." + n for n in free)
        raise ValueError(f"At most one mesh axis may be -1; got {names}.")
    fixed = math.prod(s for s in shape.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh.{free[0]}=-1 cannot fill {num_devices} devices: the other axes use {fixed}."
            )
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ValueError(
            f"mesh data={shape['data']} x fsdp={shape['fsdp']} x tensor={shape['tensor']} must "
            f"equal the {num_devices} devices."
        )
    return shape["data"], shape["fsdp"], shape["tensor"]


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh with Auto axis types (linen constraints need Auto)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_shardings(specs: Any, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """Tree of logical PartitionSpecs -> tree of `NamedSharding` on ``mesh``."""
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis over the data axes, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def num_data_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split (data x fsdp)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(
    local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays sharded over the data axes.

    Each process feeds its own shard (rows ``process_index::process_count`` of the global batch
    in the pipeline); with one process this is a plain sharded `device_put`.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def gather_to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) array on every host, as NumPy.

    The package's one all-gather: every process must call it for arrays that span hosts.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
