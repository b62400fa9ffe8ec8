"""Dropout (after the attention projection, in the MLP, on the attention probabilities): Bernoulli
bits or a counter hash.

'rng' is ``nn.Dropout`` (Bernoulli bits from the 'dropout' PRNG's threefry); 'hash' hashes each
element's index under a seed from that PRNG (`hash_dropout`; on the attention probabilities of
the 'xla' kernel, `hash_attention_dropout`: the (key, b, h, q, k) mask of the fused 'pallas'
kernel), integer work that XLA fuses into the neighbouring ops, and the backward pass hashes
again instead of keeping a mask. Both are dropout with the same rate; only the masks differ.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from xar_jax.flash_attention import dropout_keep_mask, fmix32, seed_words

Array = jax.Array

DROPOUT_IMPLS = ("rng", "hash")  # Valid `model.dropout_impl` values.


def hash_dropout(x: Array, rate: float, key: Array) -> Array:
    """Inverted dropout of ``x`` whose keep mask hashes each element's index under ``key``.

    The mask is MurmurHash3's finaliser (twice, keyed by two seed words) of the element's
    row-major index, compared with ``rate * 2^24`` on the top 24 bits: elementwise integer work
    that XLA fuses into the producer and consumer of ``x`` instead of reading a bits array.
    Indices wrap at 2^32 elements (masks repeat only beyond that). The backward pass hashes
    again instead of keeping the mask: the only residual is the two seed words.
    """
    if rate == 0.0:
        return x
    return _masked_scale(x, seed_words(key), rate)


def _hash_keep_mask(shape: tuple[int, ...], seeds: Array, rate: float) -> Array:
    """The keep mask of `hash_dropout` for an array of ``shape`` under two seed words."""
    index = jnp.zeros(shape, jnp.int32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.int32, shape, dim) * np.int32(stride)
        stride = (stride * shape[dim]) % (1 << 32)
        stride = stride - (1 << 32) if stride >= (1 << 31) else stride
    bits = fmix32(fmix32(index ^ seeds[0]) + seeds[1])
    threshold = int(round(rate * (1 << 24)))
    return jax.lax.shift_right_logical(bits, np.int32(8)) >= np.int32(threshold)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _masked_scale(x: Array, seeds: Array, rate: float, keep_mask=_hash_keep_mask) -> Array:
    """``x`` scaled by 1 / (1 - rate) where ``keep_mask(shape, seeds, rate)`` keeps it, else 0."""
    keep = keep_mask(x.shape, seeds, rate)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def _masked_scale_fwd(x, seeds, rate, keep_mask):
    return _masked_scale(x, seeds, rate, keep_mask), seeds


def _masked_scale_bwd(rate, keep_mask, seeds, d_out):
    return _masked_scale(d_out, seeds, rate, keep_mask), None


_masked_scale.defvjp(_masked_scale_fwd, _masked_scale_bwd)


def hash_attention_dropout(probs: Array, rate: float, key: Array) -> Array:
    """Inverted dropout of attention probabilities ``probs`` (B, H, T, S) with the keep mask of
    `flash_attention.attention_dropout_mask` for ``key``: the mask the 'pallas' kernel draws for
    the same key, so the 'xla' and 'pallas' kernels train alike. The backward pass hashes again
    (the only residual is the two seed words)."""
    if rate == 0.0:
        return probs
    return _masked_scale(probs, seed_words(key), rate, _attention_keep_mask)


def _attention_keep_mask(shape: tuple[int, ...], seeds: Array, rate: float) -> Array:
    return dropout_keep_mask(seeds, shape, rate)


def apply_dropout(module: nn.Module, x, rate, name, deterministic, impl):
    """``nn.Dropout(rate, name=name)`` ('rng') or `hash_dropout` under module's 'dropout' rng."""
    if impl == "hash":
        if deterministic or rate == 0.0:
            return x
        return hash_dropout(x, rate, module.make_rng("dropout"))
    return nn.Dropout(rate, name=name)(x, deterministic=deterministic)
