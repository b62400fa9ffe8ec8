"""Entities: the paper's prediction units X, and how a latent grid becomes a sequence of them.

An entity layout fixes, for a latent grid of ``H x W`` tokens:
  * the order of the model's token sequence (entity-major; tokens inside an entity in raster order),
  * which entity each sequence position belongs to (for the block-causal mask and per-entity
    conditioning),
  * each token's 2-D position on the grid (for RoPE).

Kinds (the paper's Section 3):
  ``token``      1x1 cells in raster order: next-token prediction, ``H*W`` entities.
  ``cell``       k x k cells of tokens, cells row-major, tokens row-major inside a cell. ``k=8`` on a
                 16x16 grid is the published model (4 entities of 64 tokens).
  ``subsample``  factor s: entity j holds the tokens at ``(r, c)`` with ``(r mod s, c mod s)`` equal to
                 the j-th offset (offsets row-major): ``s*s`` non-local entities.
  ``scale``      coarse to fine: entity j is the grid area-downsampled to ``sizes[j] x sizes[j]``.
                 The last size must be the grid size; that finest entity *is* the output grid.
  ``image``      the whole grid is one entity: xAR reduces to a flow-matching transformer.

Everything here is static (NumPy, computed once from the geometry) except `to_sequence` /
`from_sequence`, which are pure, jit-friendly JAX functions on ``(B, H, W, C)`` / ``(B, N, C)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import einops
import jax.numpy as jnp
import numpy as np

KINDS = ("token", "cell", "subsample", "scale", "image")


@dataclasses.dataclass(frozen=True)
class EntityLayout:
    """The static geometry of one entity kind on one grid. Hashable (usable as a static argument).

    Attributes:
      kind: one of `KINDS`.
      grid_size: ``(H, W)`` of the latent grid.
      cell_size: k for ``cell`` (1 for ``token``).
      subsample_factor: s for ``subsample``.
      scale_sizes: square sizes of the ``scale`` entities, coarse to fine (last == grid size).
    """

    kind: str
    grid_size: tuple[int, int]
    cell_size: int = 1
    subsample_factor: int = 1
    scale_sizes: tuple[int, ...] = ()

    # ----------------------------------------------------------------------------------------
    # Sizes.
    @functools.cached_property
    def entity_sizes(self) -> tuple[int, ...]:
        """Tokens in each entity, in generation order."""
        h, w = self.grid_size
        if self.kind == "scale":
            return tuple(s * s for s in self.scale_sizes)
        if self.kind == "image":
            return (h * w,)
        if self.kind == "subsample":
            s = self.subsample_factor
            return ((h // s) * (w // s),) * (s * s)
        k = self.cell_size
        return (k * k,) * ((h // k) * (w // k))

    @property
    def num_entities(self) -> int:
        return len(self.entity_sizes)

    @property
    def num_tokens(self) -> int:
        """Length N of the token sequence (``H*W``, or the sum of all scales' tokens)."""
        return sum(self.entity_sizes)

    @property
    def uniform(self) -> bool:
        """Whether all entities hold the same number of tokens (every kind but ``scale``)."""
        return len(set(self.entity_sizes)) == 1

    @functools.cached_property
    def entity_starts(self) -> np.ndarray:
        """(K,) index of each entity's first token in the sequence."""
        return np.concatenate([[0], np.cumsum(self.entity_sizes)[:-1]]).astype(np.int32)

    @functools.cached_property
    def entity_of_token(self) -> np.ndarray:
        """(N,) entity index of every sequence position."""
        return np.repeat(np.arange(self.num_entities), self.entity_sizes).astype(np.int32)

    # ----------------------------------------------------------------------------------------
    # Order and positions.
    @functools.cached_property
    def order(self) -> np.ndarray:
        """(H*W,) flat raster index of the grid token at each sequence position (not for ``scale``)."""
        if self.kind == "scale":
            raise ValueError(
                "The 'scale' layout has no permutation order; its tokens are resampled."
            )
        h, w = self.grid_size
        raster = np.arange(h * w).reshape(h, w)
        if self.kind == "image":
            return raster.reshape(-1)
        if self.kind == "subsample":
            s = self.subsample_factor
            # (r, c) = (i*s + a, j*s + b): entity (a, b), token (i, j) inside it.
            return einops.rearrange(raster, "(i a) (j b) -> (a b i j)", a=s, b=s)
        k = self.cell_size
        # (r, c) = (e*k + a, f*k + b): entity (e, f), token (a, b) inside it.
        return einops.rearrange(raster, "(e a) (f b) -> (e f a b)", a=k, b=k)

    @functools.cached_property
    def inverse_order(self) -> np.ndarray:
        return np.argsort(self.order)

    @functools.cached_property
    def positions(self) -> np.ndarray:
        """(N, 2) float32 (row, col) of every token in grid units, for RoPE.

        Tokens of a coarse ``scale`` entity sit at the centre of the grid area they average, so
        positions of all scales share one coordinate frame.
        """
        h, w = self.grid_size
        if self.kind != "scale":
            flat = self.order
            return np.stack([flat // w, flat % w], axis=-1).astype(np.float32)
        rows, cols = [], []
        for s in self.scale_sizes:
            step_r, step_c = h / s, w / s
            r, c = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
            rows.append(((r + 0.5) * step_r - 0.5).reshape(-1))
            cols.append(((c + 0.5) * step_c - 0.5).reshape(-1))
        return np.stack([np.concatenate(rows), np.concatenate(cols)], -1).astype(np.float32)

    # ----------------------------------------------------------------------------------------
    # Masks.
    @functools.cached_property
    def attention_mask(self) -> np.ndarray:
        """(N, N) bool, True where query token i may attend to key token j (entity(j) <= entity(i))."""
        e = self.entity_of_token
        return e[:, None] >= e[None, :]

    def additive_mask(self) -> np.ndarray:
        """(N, N) float32 0 / -inf form of `attention_mask` (as the reference stores it)."""
        return np.where(self.attention_mask, 0.0, -np.inf).astype(np.float32)

    # ----------------------------------------------------------------------------------------
    # Grid <-> sequence.
    def to_sequence(self, grid: jnp.ndarray) -> jnp.ndarray:
        """Latent grid ``(B, H, W, C)`` -> token sequence ``(B, N, C)`` in entity order."""
        b, h, w, c = grid.shape
        if (h, w) != tuple(self.grid_size):
            raise ValueError(
                f"Grid of shape {(h, w)} does not match the layout's {self.grid_size}."
            )
        if self.kind == "scale":
            return jnp.concatenate(
                [area_downsample(grid, s).reshape(b, s * s, c) for s in self.scale_sizes], axis=1
            )
        return jnp.take(grid.reshape(b, h * w, c), self.order, axis=1)

    def from_sequence(self, seq: jnp.ndarray) -> jnp.ndarray:
        """Token sequence ``(B, N, C)`` -> latent grid ``(B, H, W, C)`` (for ``scale``: the finest entity)."""
        b, n, c = seq.shape
        h, w = self.grid_size
        if n != self.num_tokens:
            raise ValueError(
                f"Sequence of length {n} does not match the layout's {self.num_tokens}."
            )
        if self.kind == "scale":
            return seq[:, n - h * w :].reshape(b, h, w, c)
        return jnp.take(seq, self.inverse_order, axis=1).reshape(b, h, w, c)

    def entity_tokens(self, seq: jnp.ndarray, index: int) -> jnp.ndarray:
        """The tokens ``(B, n_index, C)`` of entity ``index`` (a Python int)."""
        start = int(self.entity_starts[index])
        return seq[:, start : start + self.entity_sizes[index]]


def area_downsample(grid: jnp.ndarray, size: int) -> jnp.ndarray:
    """Averages non-overlapping blocks: ``(B, H, W, C)`` -> ``(B, size, size, C)`` (size divides H, W)."""
    b, h, w, c = grid.shape
    if size == h and size == w:
        return grid
    return einops.reduce(grid, "b (y p) (x q) c -> b y x c", "mean", y=size, x=size)


def make_layout(
    kind: str,
    grid_size: int | Sequence[int],
    *,
    cell_size: int = 8,
    subsample_factor: int = 2,
    scale_sizes: Sequence[int] = (1, 2, 4, 8, 16),
) -> EntityLayout:
    """Builds and validates a layout; raises ValueError naming the field for impossible geometry.

    Args:
      kind: one of ``token``, ``cell``, ``subsample``, ``scale``, ``image``.
      grid_size: ``H`` (square grid) or ``(H, W)``.
      cell_size: k of the ``cell`` kind (must divide H and W).
      subsample_factor: s of the ``subsample`` kind (must divide H and W).
      scale_sizes: increasing sizes of the ``scale`` kind, each dividing H; the last equals H (= W).
    """
    if kind not in KINDS:
        raise ValueError(f"entity.kind={kind!r} is not one of {', '.join(KINDS)}.")
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    h, w = (int(v) for v in grid_size)
    if h < 1 or w < 1:
        raise ValueError(f"grid_size must be positive, got {(h, w)}.")
    if kind == "token":
        return EntityLayout("token", (h, w), cell_size=1)
    if kind == "image":
        return EntityLayout("image", (h, w))
    if kind == "cell":
        return EntityLayout("cell", (h, w), cell_size=_grid_divisor("cell_size", cell_size, h, w))
    if kind == "subsample":
        s = _grid_divisor("subsample_factor", subsample_factor, h, w)
        return EntityLayout("subsample", (h, w), subsample_factor=s)
    sizes = tuple(int(s) for s in scale_sizes)
    if not sizes:
        raise ValueError(
            "entity.scale_sizes is empty; give increasing sizes ending at the grid size."
        )
    if h != w:
        raise ValueError(f"The 'scale' entity needs a square grid, got {h}x{w}.")
    if any(b <= a for a, b in zip(sizes[:-1], sizes[1:], strict=True)) or sizes[0] < 1:
        raise ValueError(f"entity.scale_sizes={sizes} must be positive and strictly increasing.")
    if sizes[-1] != h:
        raise ValueError(f"entity.scale_sizes={sizes} must end at the grid size {h}.")
    bad = [s for s in sizes if h % s]
    if bad:
        raise ValueError(f"entity.scale_sizes {bad} do not divide the grid size {h}.")
    return EntityLayout("scale", (h, w), scale_sizes=sizes)


def _grid_divisor(field: str, value: int, h: int, w: int) -> int:
    """``value`` as an int, or a ValueError naming ``entity.<field>`` and the allowed divisors."""
    value = int(value)
    if value < 1 or h % value or w % value:
        allowed = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
        raise ValueError(
            f"entity.{field}={value} must be a positive divisor of the grid {h}x{w} "
            f"(allowed: {', '.join(map(str, allowed))})."
        )
    return value


def layout_from_config(entity_cfg, grid_size: int | Sequence[int]) -> EntityLayout:
    """Builds the layout from a config's ``entity`` section (fields kind, cell_size, ...)."""
    return make_layout(
        entity_cfg.kind,
        grid_size,
        cell_size=entity_cfg.get("cell_size", 8),
        subsample_factor=entity_cfg.get("subsample_factor", 2),
        scale_sizes=tuple(entity_cfg.get("scale_sizes", (1, 2, 4, 8, 16))),
    )
