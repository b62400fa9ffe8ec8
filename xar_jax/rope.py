"""2-D rotary position embedding (RoPE) over the latent grid, as the release lays it out.

Each token's position is its (row, col) on the grid; half of each head's features rotate with
the row, half with the column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def rope_frequencies(head_dim: int) -> np.ndarray:
    """The ``head_dim // 4`` frequencies ``10000^(-2k/half)`` of the 2-D RoPE (half = head_dim/2)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}.")
    half = head_dim // 2
    return (10000.0 ** (-np.arange(0, half, 2, dtype=np.float64) / half)).astype(np.float32)


def rope_tables(positions: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables ``(N, head_dim)`` for tokens at ``positions`` (N, 2) = (row, col).

    Angles are ``[r f0, r f0, r f1, r f1, ..., c f0, c f0, ...]``: the first half from the row, the
    second from the column, every frequency twice on adjacent features (the release's layout).
    """
    freqs = rope_frequencies(head_dim)
    pos = positions.astype(np.float32)
    rows = np.repeat(pos[:, :1] * freqs[None], 2, axis=-1)
    cols = np.repeat(pos[:, 1:] * freqs[None], 2, axis=-1)
    angles = np.concatenate([rows, cols], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """``x * cos + rotate_half(x) * sin`` on ``x`` (B, T, H, d) with tables (T, d) or (B, T, d).

    rotate_half maps each adjacent pair (x[2j], x[2j+1]) to (-x[2j+1], x[2j]). Off TPU it is a
    reversal of each pair times a (-1, +1) sign: an index remap that fuses into the surrounding
    elementwise kernel (a stack of the two halves lowers to a concatenation on GPU). On TPU that
    reshape to (..., d/2, 2) (or two lane rotations) gave layouts a minor dimension of 2 and XLA
    copied q and k several times per layer around it (about 6% of xAR-H's estimated step); there
    it is a product with a signed permutation matrix, which reads x once and lets the rest fuse
    into the attention's logits. Both are exact: bit-identical to the stacked form.
    """
    if cos.ndim == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    # Chosen when lowering for the platform (also ahead of time for a TPU on another host).
    return jax.lax.platform_dependent(x, cos, sin, tpu=_rope_by_product, default=_rope_by_reversal)


def _rope_by_reversal(x: Array, cos: Array, sin: Array) -> Array:
    """`apply_rope` with the pairs reversed and the sign folded into the sin table."""
    swapped = jnp.flip(x.reshape(*x.shape[:-1], -1, 2), axis=-1).reshape(x.shape)
    signed_sin = sin * jnp.tile(jnp.asarray([-1.0, 1.0], sin.dtype), sin.shape[-1] // 2)
    return (x * cos + swapped * signed_sin).astype(x.dtype)


def _rope_by_product(x: Array, cos: Array, sin: Array) -> Array:
    """`apply_rope` with the signed pair swap as a product with a signed permutation matrix
    (one +-1 term per output: exact)."""
    d = x.shape[-1]
    perm = np.zeros((d, d), np.float32)
    perm[np.arange(1, d, 2), np.arange(0, d, 2)] = -1.0
    perm[np.arange(0, d, 2), np.arange(1, d, 2)] = 1.0
    swapped = jnp.einsum(
        "...d,de->...e", x, jnp.asarray(perm, x.dtype), precision=jax.lax.Precision.HIGHEST
    )
    return (x * cos + swapped * sin).astype(x.dtype)
