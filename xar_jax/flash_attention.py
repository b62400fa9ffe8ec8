"""Fused (flash) attention with a boolean mask and attention-probability dropout, in Pallas.

The kernels run on GPU through Pallas' Triton backend, and on CPU in interpret mode (tests). The
dropout mask is a pure function of ``(key, b, h, q, k)``: a counter-based hash of the element's
coordinates under a per-(example, head) stream derived from a traced JAX key. The backward pass
regenerates the same mask from the same hash, so nothing of size (B, H, T, S) is ever stored.
`attention_dropout_mask` is that mask in plain jnp, for the XLA reference form.

Why not cuDNN: ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`` takes its dropout
seed as a static int written into the custom call's backend config (jax 0.11), so every call,
step and layer would draw the same mask.

Shapes: q (B, T, H, d), k/v (B, S, H, d), mask (T, S) bool (True = may attend), out (B, T, H, d).
Every query row must see at least one key (the block-causal entity mask always does).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

Array = jax.Array

# A finite "minus infinity": fully masked rows of padded queries stay NaN-free.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
# Queries and keys are numbered q * 2^16 + k in a stream, so T and S must stay below 2^16.
_KEY_STRIDE = 1 << 16
_RATE_BITS = 24  # The dropout decision compares the top 24 bits of the hash with rate * 2^24.
# checkpoint_name of the residuals the backward kernels need (output and log-sum-exp), for
# remat policies (xar_jax.model keeps them under 'matmuls' and 'dots').
RESIDUAL_NAMES = ("flash_out", "flash_lse")


def _i32(value: int) -> np.int32:
    """A uint32 constant as the int32 with the same bits (kernels compute in wrapping int32)."""
    return np.array(value, np.uint32).view(np.int32)[()]


def fmix32(x: Array) -> Array:
    """MurmurHash3's 32-bit finaliser on int32 bits (a bijection with full avalanche).

    Written with int32 multiplies (which wrap) and logical shifts so that XLA and Triton compute
    the same bits; used both inside the kernels and by `attention_dropout_mask`.
    """
    x = x ^ lax.shift_right_logical(x, np.int32(16))
    x = x * _i32(0x85EBCA6B)
    x = x ^ lax.shift_right_logical(x, np.int32(13))
    x = x * _i32(0xC2B2AE35)
    return x ^ lax.shift_right_logical(x, np.int32(16))


def seed_words(key: Array) -> Array:
    """Two int32 words of seed drawn from a JAX PRNG key (typed or raw)."""
    bits = jax.random.bits(key, (2,), jnp.uint32)
    return lax.bitcast_convert_type(bits, jnp.int32)


def head_streams(seeds: Array, batch: int, heads: int) -> Array:
    """(B, H) int32 stream of every (example, head): distinct for distinct (b, h) under one seed."""
    index = (jnp.arange(batch, dtype=jnp.int32)[:, None] * heads) + jnp.arange(
        heads, dtype=jnp.int32
    )
    return fmix32(fmix32(index ^ seeds[0]) + seeds[1])


def _keep(stream: Array, q_idx: Array, k_idx: Array, threshold: int) -> Array:
    """Keep decision of elements (q_idx[:, None], k_idx[None, :]) of one stream (or broadcast)."""
    counter = q_idx[..., :, None] * np.int32(_KEY_STRIDE) + k_idx[..., None, :]
    bits = fmix32(counter ^ stream)
    return lax.shift_right_logical(bits, np.int32(32 - _RATE_BITS)) >= np.int32(threshold)


def _threshold(rate: float) -> int:
    return int(round(rate * (1 << _RATE_BITS)))


def attention_dropout_mask(key: Array, shape: tuple[int, int, int, int], rate: float) -> Array:
    """The keep mask (B, H, T, S) bool that `flash_attention` draws for ``key`` and ``rate``.

    Kept probabilities are scaled by ``1 / (1 - rate)``; the kept fraction is ``1 - rate`` up to
    a quantisation of 2^-24.
    """
    return dropout_keep_mask(seed_words(key), shape, rate)


def dropout_keep_mask(seeds: Array, shape: tuple[int, int, int, int], rate: float) -> Array:
    """`attention_dropout_mask` from the key's two `seed_words` (traced or not)."""
    batch, heads, t, s = shape
    if max(t, s) >= _KEY_STRIDE:
        raise ValueError(f"attention dropout numbers tokens below {_KEY_STRIDE}; got T={t}, S={s}.")
    streams = head_streams(seeds, batch, heads)
    return _keep(
        streams[:, :, None, None],
        jnp.arange(t, dtype=jnp.int32),
        jnp.arange(s, dtype=jnp.int32),
        _threshold(rate),
    )


def reference_attention(q, k, v, mask, keep, rate: float, scale: float | None = None):
    """Plain XLA attention with a given keep mask (B, H, T, S) or None: the form the kernel matches."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    if keep is not None and rate > 0:
        probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)


# ----------------------------------------------------------------------------------------------
# Kernels. Grids run over (row block, batch, head); `bounds` hold, per row block, the loop range
# over the other axis that can hold visible entries (fully masked blocks are skipped).
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, at least 16 on GPU): forward (q, k) and backward (q, k)."""

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    rate: float
    blocks: BlockSizes
    interpret: bool


def _scores(q, k, mask_ref, rows, cols, scale):
    """log2-domain logits of a (rows, cols) tile, masked entries at a finite minimum."""
    from jax.experimental.pallas import triton as plgpu

    qk = plgpu.dot(q, k.T) * (scale * _LOG2E)
    visible = mask_ref[rows, cols] != 0
    return jnp.where(visible, qk, _MASK_VALUE)


def _fwd_kernel(
    stream_ref, kv_hi_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, st: _Static
):
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.blocks.block_q, st.blocks.block_k
    qb, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    d = q.shape[-1]
    rows = pl.ds(qb * bq, bq)
    q_idx = qb * bq + jnp.arange(bq, dtype=jnp.int32)
    stream = stream_ref[b, h] if st.rate > 0 else None

    def body(kb, carry):
        o, m, denom = carry
        cols = pl.ds(kb * bk, bk)
        qk = _scores(q, k_ref[cols, :], mask_ref, rows, cols, st.scale)
        m_new = jnp.maximum(m, jnp.max(qk, axis=-1))
        correction = jnp.exp2(m - m_new)
        s = jnp.exp2(qk - m_new[:, None])
        denom = denom * correction + jnp.sum(s, axis=-1)
        if st.rate > 0:
            k_idx = kb * bk + jnp.arange(bk, dtype=jnp.int32)
            s = jnp.where(_keep(stream, q_idx, k_idx, _threshold(st.rate)), s, 0.0)
        v = v_ref[cols, :]
        o = o * correction[:, None] + plgpu.dot(s.astype(v.dtype), v)
        return o, m_new, denom

    init = (
        jnp.zeros((bq, d), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    o, m, denom = lax.fori_loop(0, kv_hi_ref[qb], body, init)
    o = o / (denom[:, None] * (1.0 - st.rate))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(denom)


def _bwd_tile(q, k, v, do, lse, delta, mask_ref, qb, kb, stream, st: _Static):
    """The backward pass through one (q block ``qb``, k block ``kb``) tile of both kernels.

    Rebuilds the tile's probabilities from the saved log-sum-exp ``lse`` (bq,) and its dropout
    mask from ``stream``; ``delta`` (bq,) is ``sum(do * out)`` per query row.

    Returns:
      p_dropped: (bq, bk) the dropped-out, rescaled probabilities (what dV accumulates).
      ds: (bq, bk) the gradient of the logits, without the ``scale`` factor (what dQ and dK
        accumulate).
    """
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    rows, cols = pl.ds(qb * bq, bq), pl.ds(kb * bk, bk)
    p = jnp.exp2(_scores(q, k, mask_ref, rows, cols, st.scale) - lse[:, None])
    dp = plgpu.dot(do, v.T)  # Gradient of the dropped-out probabilities.
    p_dropped = p
    if st.rate > 0:
        q_idx = qb * bq + jnp.arange(bq, dtype=jnp.int32)
        k_idx = kb * bk + jnp.arange(bk, dtype=jnp.int32)
        keep = _keep(stream, q_idx, k_idx, _threshold(st.rate))
        inv = 1.0 / (1.0 - st.rate)
        p_dropped = jnp.where(keep, p * inv, 0.0)
        dp = jnp.where(keep, dp * inv, 0.0)
    return p_dropped, p * (dp - delta[:, None])


def _dkdv_kernel(
    stream_ref, q_lo_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref,
    dk_ref, dv_ref, *, st: _Static,
):  # fmt: skip
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    kb, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    stream = stream_ref[b, h] if st.rate > 0 else None

    def body(qb, carry):
        dk, dv = carry
        rows = pl.ds(qb * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        p_dropped, ds = _bwd_tile(
            q, k, v, do, lse_ref[rows], delta_ref[rows], mask_ref, qb, kb, stream, st
        )
        dv = dv + plgpu.dot(p_dropped.astype(do.dtype).T, do)
        dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
        return dk, dv

    zeros = jnp.zeros((bk, k.shape[-1]), jnp.float32)
    dk, dv = lax.fori_loop(q_lo_ref[kb], q_ref.shape[0] // bq, body, (zeros, zeros))
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    stream_ref, kv_hi_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref,
    *, st: _Static,
):  # fmt: skip
    from jax.experimental.pallas import triton as plgpu

    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    qb, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    stream = stream_ref[b, h] if st.rate > 0 else None

    def body(kb, dq):
        cols = pl.ds(kb * bk, bk)
        k, v = k_ref[cols, :], v_ref[cols, :]
        _, ds = _bwd_tile(q, k, v, do, lse, delta, mask_ref, qb, kb, stream, st)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, kv_hi_ref[qb], body, jnp.zeros((bq, q.shape[-1]), jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _compiler_params(st: _Static):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=st.blocks.num_warps, num_stages=st.blocks.num_stages)


def _whole(shape):
    """A BlockSpec giving every program the whole (small) array."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _row_block(block, d):
    """(None, block, None, d) tiles of a (B, T, H, d) array, block index from grid axis 0."""
    return pl.BlockSpec((None, block, None, d), lambda i, b, h: (b, i, h, 0))


def _all_rows(n, d):
    return pl.BlockSpec((None, n, None, d), lambda i, b, h: (b, 0, h, 0))


def _fwd_call(q, k, v, mask8, kv_hi, streams, st: _Static):
    batch, t, heads, d = q.shape
    s = k.shape[1]
    bq = st.blocks.block_q
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(t // bq, batch, heads),
        in_specs=[
            _whole(streams.shape),
            _whole(kv_hi.shape),
            _row_block(bq, d),
            _all_rows(s, d),
            _all_rows(s, d),
            _whole(mask8.shape),
        ],
        out_specs=[
            _row_block(bq, d),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, t), jnp.float32),
        ],
        compiler_params=None if st.interpret else _compiler_params(st),
        interpret=st.interpret,
        name="flash_attention_dropout_fwd",
    )(streams, kv_hi, q, k, v, mask8)


def _bwd_call(q, k, v, mask8, kv_hi, q_lo, streams, out, lse, do, st: _Static):
    batch, t, heads, d = q.shape
    s = k.shape[1]
    bq, bk = st.blocks.block_q_bwd, st.blocks.block_k_bwd
    # delta_i = sum_j P_ij dP_ij = do_i . out_i, also with dropout (out is the dropped-out form).
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    common = dict(
        compiler_params=None if st.interpret else _compiler_params(st), interpret=st.interpret
    )
    stats_all = pl.BlockSpec((None, None, t), lambda i, b, h: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st),
        grid=(s // bk, batch, heads),
        in_specs=[
            _whole(streams.shape),
            _whole(q_lo.shape),
            _all_rows(t, d),
            _row_block(bk, d),
            _row_block(bk, d),
            _whole(mask8.shape),
            _all_rows(t, d),
            stats_all,
            stats_all,
        ],
        out_specs=[_row_block(bk, d), _row_block(bk, d)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="flash_attention_dropout_dkdv",
        **common,
    )(streams, q_lo, q, k, v, mask8, do, lse, delta)
    stats_row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(t // bq, batch, heads),
        in_specs=[
            _whole(streams.shape),
            _whole(kv_hi.shape),
            _row_block(bq, d),
            _all_rows(s, d),
            _all_rows(s, d),
            _whole(mask8.shape),
            _row_block(bq, d),
            stats_row,
            stats_row,
        ],
        out_specs=_row_block(bq, d),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dropout_dq",
        **common,
    )(streams, kv_hi, q, k, v, mask8, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q, k, v, mask8, kv_hi_fwd, kv_hi_bwd, q_lo_bwd, streams, st: _Static):
    return _fwd_call(q, k, v, mask8, kv_hi_fwd, streams, st)[0]


def _flash_fwd(q, k, v, mask8, kv_hi_fwd, kv_hi_bwd, q_lo_bwd, streams, st):
    out, lse = _fwd_call(q, k, v, mask8, kv_hi_fwd, streams, st)
    # Named, so that a remat policy can keep the kernel's residuals: without the names, the
    # backward of a rematerialised block runs the forward kernel again to rebuild them.
    out_saved = checkpoint_name(out, RESIDUAL_NAMES[0])
    lse = checkpoint_name(lse, RESIDUAL_NAMES[1])
    return out, (q, k, v, mask8, kv_hi_bwd, q_lo_bwd, streams, out_saved, lse)


def _flash_bwd(st, res, do):
    q, k, v, mask8, kv_hi, q_lo, streams, out, lse = res
    dq, dk, dv = _bwd_call(q, k, v, mask8, kv_hi, q_lo, streams, out, lse, do, st)
    return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block_bounds(mask: Array, bq: int, bk: int) -> tuple[Array, Array]:
    """Per q-block end of the k-block loop, and per k-block start of the q-block loop."""
    t, s = mask.shape
    nq, nk = t // bq, s // bk
    any_visible = mask.reshape(nq, bq, nk, bk).any(axis=(1, 3))
    kb = jnp.arange(nk, dtype=jnp.int32)
    qb = jnp.arange(nq, dtype=jnp.int32)
    kv_hi = jnp.max(jnp.where(any_visible, kb[None, :] + 1, 0), axis=1)
    q_lo = jnp.min(jnp.where(any_visible, qb[:, None], nq), axis=0)
    return jnp.maximum(kv_hi, 1).astype(jnp.int32), q_lo.astype(jnp.int32)


def computed_tile_fraction(mask: np.ndarray, blocks: BlockSizes | None = None) -> float:
    """The fraction of (query block, key block) tiles of a (T, S) mask that the forward kernel
    computes (it skips tiles with no visible entry), for the step-time estimate."""
    blocks = blocks or BlockSizes()
    t, s = mask.shape
    bq, bk = min(blocks.block_q, t), min(blocks.block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    padded = np.zeros((nq * bq, nk * bk), bool)
    padded[:t, :s] = mask
    any_visible = padded.reshape(nq, bq, nk, bk).any(axis=(1, 3))
    # The loop runs from key block 0 to the last visible one of each query block.
    last = np.where(any_visible.any(axis=1), nk - np.argmax(any_visible[:, ::-1], axis=1), 1)
    return float(last.sum() / (nq * nk))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    *,
    key: Array | None = None,
    streams: Array | None = None,
    rate: float = 0.0,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> Array:
    """Masked softmax attention with dropout on the probabilities, fused in Pallas kernels.

    Args:
      q: (B, T, H, d) queries; k, v: (B, S, H, d).
      mask: (T, S) bool, True where a query may attend a key; None = all.
      key: JAX PRNG key of the dropout draw (needed when ``rate > 0``); the keep mask is
        `attention_dropout_mask(key, (B, H, T, S), rate)`.
      streams: instead of ``key``, the (B, H) int32 `head_streams` of the draw (a shard of the
        global batch passes its rows of the global streams, so sharding leaves the masks unchanged).
      rate: dropout probability of each attention probability (0 = no dropout).
      scale: logit scale, default ``1/sqrt(d)``.
      block_sizes: kernel tiles (shrunk to the padded sequence lengths).
      interpret: run the kernels in the Pallas interpreter; default: unless on GPU.

    Returns:
      (B, T, H, d) in q's dtype.
    """
    batch, t, heads, d = q.shape
    s = k.shape[1]
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"attention dropout rate must be in [0, 1); got {rate}.")
    if rate > 0 and key is None and streams is None:
        raise ValueError("attention dropout needs a PRNG key (or its head streams).")
    if max(t, s) >= _KEY_STRIDE:
        raise ValueError(
            f"flash_attention supports at most {_KEY_STRIDE - 1} tokens; got {t}, {s}."
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    blocks = block_sizes or BlockSizes()
    # Triton tiles are powers of two: pad the head dim (zeros change nothing) and the sequences
    # (padded keys are masked; padded query rows are dropped from the output).
    d_pad = max(16, pl.next_power_of_2(d))
    tile = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    t_pad = _round_up(t, min(tile, pl.next_power_of_2(t)))
    s_pad = _round_up(s, min(tile, pl.next_power_of_2(s)))
    blocks = dataclasses.replace(
        blocks,
        block_q=min(blocks.block_q, t_pad),
        block_k=min(blocks.block_k, s_pad),
        block_q_bwd=min(blocks.block_q_bwd, t_pad),
        block_k_bwd=min(blocks.block_k_bwd, s_pad),
    )

    def pad(x, n):
        if x.shape[1] == n and x.shape[-1] == d_pad:
            return x
        return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, d_pad - d)))

    mask = jnp.ones((t, s), bool) if mask is None else jnp.asarray(mask, bool)
    mask = jnp.pad(mask, ((0, t_pad - t), (0, s_pad - s)))
    kv_hi_fwd, _ = _block_bounds(mask, blocks.block_q, blocks.block_k)
    kv_hi_bwd, q_lo_bwd = _block_bounds(mask, blocks.block_q_bwd, blocks.block_k_bwd)
    if rate > 0 and streams is None:
        streams = head_streams(seed_words(key), batch, heads)
    elif rate == 0:
        streams = jnp.zeros((batch, heads), jnp.int32)
    st = _Static(scale=scale, rate=float(rate), blocks=blocks, interpret=bool(interpret))
    out = _flash(
        pad(q, t_pad),
        pad(k, s_pad),
        pad(v, s_pad),
        mask.astype(jnp.int8),
        kv_hi_fwd,
        kv_hi_bwd,
        q_lo_bwd,
        streams,
        st,
    )
    return out[:, :t, :, :d]
