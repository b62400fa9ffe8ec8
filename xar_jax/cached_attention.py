"""Attention of one entity over the KV cache, read in place, in Pallas (forward only: sampling).

During cached sampling an entity's queries attend to [the finished prefix of one layer of the
stacked cache, the entity's own keys]. Handing that to a fused attention kernel such as cuDNN
needs one key array: the layer's prefix sliced out of the (L, B, N, H, d) cache and concatenated
with the entity's keys, a copy of the whole visible prefix per layer per flow step. This kernel
reads the prefix tiles straight from the stacked cache at a (traced) layer index, then the
entity's own tile, with one online softmax over both: nothing is copied.

The kernel runs on GPU through Pallas' Triton backend, and on CPU in interpret mode (tests).
Every prefix position is visible and an entity sees all of its own tokens (the block-causal mask
is full within an entity), so no mask is read. Triton tiles are powers of two: a head dim or an
entity size that is not (xAR-H's d = 80), or a prefix that ends inside a tile, is read through
masked loads of a padded tile, which touch no memory outside the array.

Shapes: q, k, v (B, n, H, d) the entity's (post-RoPE); cache_k, cache_v (L, B, N, H, d);
out (B, n, H, d).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

Array = jax.Array

# A finite "minus infinity" for padded key rows (exp2 of it underflows to 0, never NaN).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
_MIN_TILE = 16  # Triton's smallest dot operand.
# float32 operands multiply in float32, not TF32 (bf16/fp16 ones are unaffected).
_PRECISION = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (powers of two): query rows per program, key rows per step; Triton launch settings.

    Both tiles are capped at the entity's size rounded up to a power of two (>= 16). Every program
    reads the whole prefix, so a ``block_q`` below the entity's size reads it more than once.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class _Static:
    prefix_len: int  # Visible cache positions, [0, prefix_len).
    own_len: int  # n, the entity's tokens.
    head_dim: int  # d.
    d_pad: int  # d rounded up to a power of two (>= 16): the tile width.
    scale: float
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    interpret: bool


def _tile(ref, lead, start, rows, limit, st: _Static):
    """Rows [start, start + rows) of ``ref[*lead]`` as a (rows, d_pad) tile.

    ``limit`` (None when every row is in range): rows from it on read as zeros, as do columns
    from ``head_dim`` on, through a masked load (masked lanes touch no memory).
    """
    from jax.experimental.pallas import triton as plgpu

    index = (*lead, pl.ds(start, rows), pl.ds(0, st.d_pad))
    if limit is None and st.d_pad == st.head_dim:
        return ref[index]
    mask = jnp.broadcast_to(jnp.arange(st.d_pad, dtype=jnp.int32) < st.head_dim, (rows, st.d_pad))
    if limit is not None:
        mask = mask & (start + jnp.arange(rows, dtype=jnp.int32) < limit)[:, None]
    return plgpu.load(ref.at[index], mask=mask, other=0)


def _kernel(layer_ref, q_ref, k_ref, v_ref, ck_ref, cv_ref, o_ref, *, st: _Static):
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.block_q, st.block_k
    row0 = pl.program_id(0) * bq
    layer = layer_ref[0]
    q = _tile(q_ref, (), row0, bq, st.own_len if st.own_len % bq else None, st)

    def attend(carry, k, v, key_ok):
        """One online-softmax step over a (bk, d_pad) key/value tile (log2 domain)."""
        o, m, denom = carry
        s = plgpu.dot(q, k.astype(q.dtype).T, precision=_PRECISION) * (st.scale * _LOG2E)
        if key_ok is not None:
            s = jnp.where(key_ok[None, :], s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        denom = denom * correction + jnp.sum(p, axis=-1)
        pv = plgpu.dot(p.astype(q.dtype), v.astype(q.dtype), precision=_PRECISION)
        o = o * correction[:, None] + pv
        return o, m_new, denom

    def span(carry, load, length):
        """Every key tile of a span of ``length`` rows: whole tiles in a loop, then a masked rest."""
        whole, rest = divmod(length, bk)

        def body(j, carry):
            k, v = load(pl.multiple_of(j * bk, bk), None)
            return attend(carry, k, v, None)

        if whole:
            carry = lax.fori_loop(0, whole, body, carry)
        if rest:
            k, v = load(whole * bk, length)
            carry = attend(carry, k, v, whole * bk + jnp.arange(bk, dtype=jnp.int32) < length)
        return carry

    carry = (
        jnp.zeros((bq, st.d_pad), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )

    def cached(start, limit):  # This layer's cache, read in place.
        return tuple(_tile(r, (layer,), start, bk, limit, st) for r in (ck_ref, cv_ref))

    def own(start, limit):
        return tuple(_tile(r, (), start, bk, limit, st) for r in (k_ref, v_ref))

    carry = span(carry, cached, st.prefix_len)
    o, _, denom = span(carry, own, st.own_len)
    o = (o / denom[:, None]).astype(o_ref.dtype)
    index = (pl.ds(row0, bq), pl.ds(0, st.d_pad))
    if st.own_len % bq == 0 and st.d_pad == st.head_dim:
        o_ref[index] = o
    else:
        row_ok = row0 + jnp.arange(bq, dtype=jnp.int32) < st.own_len
        col_ok = jnp.arange(st.d_pad, dtype=jnp.int32) < st.head_dim
        plgpu.store(o_ref.at[index], o, mask=row_ok[:, None] & col_ok[None, :])


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _call(q, k, v, cache_k, cache_v, layer, st: _Static):
    from jax.experimental.pallas import triton as plgpu

    batch, n, heads, _ = q.shape
    depth, _, tokens, _, _ = cache_k.shape
    # Programs own (row block, example, head). The entity's arrays come whole per (b, h); the
    # cache keeps every layer and position of (b, h) in its block, indexed at `layer` inside.
    # Blocks are padded to whole tiles (edge blocks): the padding is only ever masked, never read.
    n_block = _round_up(n, max(st.block_q, st.block_k))
    entity = pl.BlockSpec((None, n_block, None, st.d_pad), lambda i, b, h: (b, 0, h, 0))
    cache = pl.BlockSpec(
        (depth, None, _round_up(tokens, st.block_k), None, st.d_pad),
        lambda i, b, h: (0, b, 0, h, 0),
    )
    params = None
    if not st.interpret:
        params = plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)
    return pl.pallas_call(
        functools.partial(_kernel, st=st),
        grid=(pl.cdiv(n, st.block_q), batch, heads),
        in_specs=[pl.BlockSpec((1,), lambda *_: (0,)), entity, entity, entity, cache, cache],
        out_specs=entity,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=st.interpret,
        name="cached_attention",
    )(layer, q, k, v, cache_k, cache_v)


def cached_attention(
    q: Array,
    k: Array,
    v: Array,
    cache_k: Array,
    cache_v: Array,
    layer: Array | int,
    prefix_len: int,
    *,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> Array:
    """Softmax attention of an entity over [``cache[layer, :, :prefix_len]``, its own keys].

    Args:
      q, k, v: (B, n, H, d) the entity's queries, keys and values (compute dtype, post-RoPE).
      cache_k, cache_v: (L, B, N, H, d) stacked keys/values of every layer, read in place.
      layer: which layer of the cache (an int32 scalar; may be traced, e.g. by a layer scan).
      prefix_len: static number of leading cache positions attended (0 = only the own keys).
      scale: logit scale, default ``1/sqrt(d)``.
      block_sizes: tiles and launch settings (tiles shrink to the entity's padded size).
      interpret: run in the Pallas interpreter; default: unless on GPU.

    Returns:
      (B, n, H, d) in q's dtype (float32 accumulation).
    """
    batch, n, heads, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape; got {q.shape}, {k.shape}, {v.shape}.")
    _, cache_batch, _, cache_heads, cache_d = cache_k.shape
    if cache_v.shape != cache_k.shape or (cache_batch, cache_heads, cache_d) != (batch, heads, d):
        raise ValueError(f"caches {cache_k.shape} / {cache_v.shape} do not fit q {q.shape}.")
    if not 0 <= prefix_len <= cache_k.shape[2]:
        raise ValueError(
            f"prefix_len={prefix_len} is outside the cache's {cache_k.shape[2]} tokens."
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    blocks = block_sizes or BlockSizes()
    tile = max(_MIN_TILE, pl.next_power_of_2(n))
    st = _Static(
        prefix_len=int(prefix_len),
        own_len=n,
        head_dim=d,
        d_pad=max(_MIN_TILE, pl.next_power_of_2(d)),
        scale=1.0 / math.sqrt(d) if scale is None else float(scale),
        block_q=min(blocks.block_q, tile),
        block_k=min(blocks.block_k, tile),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        interpret=bool(interpret),
    )
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    return _call(q, k, v, cache_k, cache_v, layer, st)


def reference(q, k, v, cache_k, cache_v, layer: int, prefix_len: int, scale=None):
    """The same attention in plain jnp (concatenation, float32 softmax): what the kernel matches."""
    keys = jnp.concatenate([cache_k[layer, :, :prefix_len].astype(k.dtype), k], axis=1)
    values = jnp.concatenate([cache_v[layer, :, :prefix_len].astype(v.dtype), v], axis=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bthd,bshd->bhts", q, keys, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, values.astype(jnp.float32)).astype(q.dtype)
