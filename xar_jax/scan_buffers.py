"""Layer-scan outputs without a zero fill.

``jax.lax.scan`` allocates each stacked output (its ``ys``) as an array of zeros, and the loop
then overwrites every slice of it. Under a layer scan the forward pass's stacked residuals and
the backward pass's stacked parameter gradients are such outputs. Filling them costs one memset
of all of them per train step: 32 GB per xAR-L step (batch 128) and 30 GB per xAR-H step
(batch 64) in the programs XLA compiles for an H200, about 3% of each step in its profile.

jax already has the primitive for an uninitialised buffer (`jax.lax.empty`, lowered to XLA's
``AllocateBuffer`` on GPU and TPU and to zeros elsewhere), and its scan carries a TODO to use it
for these outputs. `uninitialised_scan_outputs` makes that swap while a step is lowered: wrap
``jitted.lower(...)`` in it. Values are unchanged, since the loop writes every slice before
anything reads the stacked output.

The swap replaces a private jax function, so it is guarded: it applies only where that function
still has the signature written against (jax 0.10-0.11), and only to outputs in default memory
that carry no sharding of their own (no mesh, or the trainer's mesh of Auto axes). Anything else
takes jax's own path (a zero fill). Compiled for a v5p-8 (4 chips, the trainer's data/fsdp
sharding), the xAR-B step's collectives and per-chip memory are the same with and without it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import jax

try:  # Private; absent or changed in some jax version means no swap, never a failure.
    from jax._src import core as _core
    from jax._src.lax.control_flow import loops as _loops
except ImportError:  # pragma: no cover - depends on the installed jax.
    _loops = None

_EXPECTED_PARAMETERS = ("prefix", "length_spec", "aval")


def swap_supported() -> bool:
    """Whether this jax's scan allocates its outputs through the function the swap replaces."""
    original = getattr(_loops, "_empty_array", None)
    if original is None or not (hasattr(jax.lax, "empty") and hasattr(_core, "pvary")):
        return False
    return tuple(inspect.signature(original).parameters) == _EXPECTED_PARAMETERS


def _plain(aval) -> bool:
    """Default memory, and no sharding of its own to keep: no mesh, or one whose axes are all
    Auto (the trainer's `jax.set_mesh`; the partitioner then places the buffer like its users)."""
    if getattr(aval, "memory_space", None) not in (None, _core.MemorySpace.Device):
        return False
    sharding = getattr(aval, "sharding", None)
    if sharding is None:
        return True
    if any(p is not None for p in sharding.spec):
        return False
    mesh = sharding.mesh
    auto = getattr(jax.sharding.AxisType, "Auto", None)
    return mesh.empty or all(t == auto for t in getattr(mesh, "axis_types", ()))


@contextlib.contextmanager
def uninitialised_scan_outputs(
    enabled: bool = True, fill_value: float | None = None
) -> Iterator[bool]:
    """Within the block, scans lowered leave their stacked outputs uninitialised.

    Args:
      enabled: False leaves jax's zero fill (yields False).
      fill_value: None allocates without writing; a number fills with it instead, which is how
        the tests prove that no slot is read before the loop writes it (NaN changes nothing).

    Yields whether the swap is active (False when disabled or when this jax is not supported).
    Not thread-safe: it swaps a module attribute of jax for the duration of the block. A
    function whose lowering jax has already cached (same jaxpr, lowered before) keeps it.
    """
    if not (enabled and swap_supported()):
        yield False
        return
    original = _loops._empty_array

    def uninitialised_array(prefix, length_spec, aval):
        if not _plain(aval):
            return original(prefix, length_spec, aval)
        shape = (*prefix, *aval.shape)
        if fill_value is None:
            out = jax.lax.empty(shape, aval.dtype)
        else:
            out = jax.lax.full(shape, fill_value, aval.dtype)
        varying = getattr(getattr(aval, "mat", None), "varying", ())  # Axes of a shard_map.
        return _core.pvary(out, tuple(varying))

    _loops._empty_array = uninitialised_array
    try:
        yield True
    finally:
        _loops._empty_array = original
