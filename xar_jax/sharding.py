"""Device mesh and the one table mapping logical axis names to mesh axes.

Mesh axes: ``dcn`` (data parallel across TPU slices, which talk over the data-centre network:
params replicated, only the gradient all-reduce crosses it; size ``mesh.num_slices``, 1 on one
slice), then the axes inside a slice (ICI): ``data`` (pure data parallel: params replicated),
``fsdp`` (data parallel whose params and optimizer state are sharded along the model width),
``tensor`` (Megatron-style: heads and MLP hidden units split). The batch is sharded over
``('dcn', 'data', 'fsdp')``. No rule maps a param axis to ``dcn``, so params never cross slices.

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
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("dcn", "data", "fsdp", "tensor")
BATCH_AXES = ("dcn", "data", "fsdp")

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

    ``num_devices`` is the devices of one slice (the axes are those inside a slice).

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
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    *,
    num_slices: int = 1,
) -> jax.sharding.Mesh:
    """A ``('dcn', 'data', 'fsdp', 'tensor')`` mesh with Auto axis types (linen constraints need
    Auto).

    Args:
      data, fsdp, tensor: the axes inside one slice (one may be -1: the slice's remaining devices).
      devices: all devices (default `jax.devices()`); may be a TPU topology's abstract devices.
      num_slices: size of the ``dcn`` axis. TPU devices are grouped by their ``slice_index``
        (`mesh_utils.create_hybrid_device_mesh`); devices without one (CPU tests) are taken as
        ``num_slices`` consecutive groups.

    Raises:
      ValueError naming ``mesh.<field>`` when the shape cannot cover the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_slices < 1 or len(devices) % num_slices:
        raise ValueError(
            f"mesh.num_slices={num_slices} must be a positive divisor of the {len(devices)} devices."
        )
    ici = resolve_mesh_shape(data, fsdp, tensor, len(devices) // num_slices)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    # jax.make_mesh lays out jax.devices(); other devices (a compile-only GPU's) go in as given.
    if devices[0].platform != "tpu" and num_slices == 1 and devices == list(jax.devices()):
        return jax.make_mesh((1, *ici), MESH_AXES, axis_types=auto)
    return jax.sharding.Mesh(_device_grid(devices, num_slices, ici), MESH_AXES, axis_types=auto)


def _device_grid(devices: list, num_slices: int, ici: tuple[int, int, int]) -> np.ndarray:
    """(num_slices, data, fsdp, tensor) array of devices; on TPU, ICI neighbours adjacent."""
    shape = (num_slices, *ici)
    if devices[0].platform != "tpu":
        return np.asarray(devices).reshape(shape)  # Slices = consecutive groups (CPU tests).
    found = len({getattr(d, "slice_index", None) or 0 for d in devices})
    if found != num_slices:
        raise ValueError(
            f"mesh.num_slices={num_slices}, but the TPU devices form {found} slice(s)."
        )

    def grid(split: bool) -> np.ndarray:
        if num_slices == 1:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
        return mesh_utils.create_hybrid_device_mesh(
            (1, *ici), (num_slices, 1, 1, 1), devices=devices, allow_split_physical_axes=split
        )

    try:
        return grid(False)
    except (ValueError, NotImplementedError):
        # A shape that cuts a physical torus axis (jax.make_mesh allows it on v5e): still valid.
        return grid(True)


def logical_shardings(specs: Any, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """Tree of logical PartitionSpecs -> tree of `NamedSharding` on ``mesh``."""
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis over the data axes, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def num_data_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split (dcn x data x fsdp)."""
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
