"""The attention kernels: their names, what each supports, the resolver of 'auto', one dispatcher.

Shapes: B batch, T tokens of this call, S attended tokens, L layers, N tokens of the whole
sequence, H heads, d head dim. Queries, keys and values are (B, T, H, d) after RoPE.

The kernels (`KERNELS`; `model.attention_impl` names one, or 'auto'):
* ``xla``: einsum, masked softmax and dropout on the probabilities (``nn.Dropout``, or with
  ``model.dropout_impl='hash'`` the ``pallas`` kernel's hashed mask); runs everywhere.
* ``dot_product``: ``jax.nn.dot_product_attention`` with the backend's choice of implementation
  (its XLA form on a CPU or TPU); no attention dropout.
* ``cudnn``: the same function forced onto cuDNN's fused kernel (GPU, half dtypes only).
* ``pallas``: our fused kernel with in-kernel attention dropout (`xar_jax.flash_attention`);
  Triton on a GPU, the Pallas interpreter elsewhere (slow: for tests).

`resolve` turns 'auto' into a kernel once, when the experiment is built; the config's validation
reads `supports_dropout`; `attend` is the only place that runs them. Cached sampling (keys and
values of finished entities, `KVContext`) takes the route of `cached_route`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from xar_jax.cached_attention import cached_attention
from xar_jax.flash_attention import flash_attention, head_streams, seed_words

Array = jax.Array
GPU_BACKENDS = ("gpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One attention kernel.

    Attributes:
      dropout: has dropout on the attention probabilities (the paper's recipe trains with 0.1).
      backends: where it runs compiled; ``pallas`` runs interpreted elsewhere, ``cudnn`` nowhere.
      cached: how cached sampling runs it (see `cached_route`).
    """

    dropout: bool
    backends: tuple[str, ...]
    cached: str


KERNELS: dict[str, Kernel] = {
    "xla": Kernel(dropout=True, backends=("cpu", "gpu", "tpu"),
                  cached="one softmax over the cache and the entity's own keys, no copy"),
    "dot_product": Kernel(dropout=False, backends=("cpu", "gpu", "tpu"),
                          cached="jax.nn.dot_product_attention over [cache, own keys]"),
    "cudnn": Kernel(dropout=False, backends=("gpu",),
                    cached="`cached_attention` over a static prefix (half dtype), else cuDNN over "
                           "[cache, own keys]"),
    "pallas": Kernel(dropout=True, backends=("gpu",),
                     cached="`cached_attention` over a static prefix, else cuDNN (GPU, half dtype) "
                            "or jax.nn.dot_product_attention over [cache, own keys]"),
}  # fmt: skip
ATTENTION_IMPLS = ("auto", *KERNELS)  # Valid `model.attention_impl` values.


def supports_dropout(impl: str) -> bool:
    """Whether ``impl`` trains with attention dropout ('auto' always picks such a kernel when
    the rate is positive)."""
    return impl == "auto" or KERNELS[impl].dropout


def _on_gpu(backend: str | None) -> bool:
    return (backend or jax.default_backend()) in GPU_BACKENDS


def _half(dtype: Any) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve(impl: str, attn_dropout: float, dtype: Any, backend: str | None = None) -> str:
    """The concrete kernel for ``impl`` ('auto' resolved; anything else unchanged).

    'auto' picks the fastest kernel that keeps the recipe exact on ``backend`` (default:
    ``jax.default_backend()``):
    * GPU with attention dropout: 'pallas', the fused Triton kernel with in-kernel dropout;
    * GPU without it: 'cudnn' for bf16/fp16 compute, else 'dot_product' (cuDNN needs half types);
    * TPU and CPU: 'xla' (the Pallas kernel is Triton-only, so GPU-only; 'xla' has the dropout).
    Cached sampling over a static prefix runs `cached_attention` for 'cudnn' and 'pallas' on a GPU
    (`uses_cached_kernel`), so an 'auto' model samples with a fused kernel either way.
    """
    if impl != "auto":
        return impl
    if not _on_gpu(backend):
        return "xla"
    if attn_dropout > 0:
        return "pallas"
    return "cudnn" if _half(dtype) else "dot_product"


def uses_cached_kernel(kernel: str, dtype: Any, backend: str | None = None) -> bool:
    """Whether cached attention over a static prefix runs `cached_attention.cached_attention`.

    On a GPU, where it would otherwise run cuDNN over a concatenated copy of the cache (kernel
    'cudnn' or 'pallas', half dtype). Elsewhere for 'pallas' only, in the Pallas interpreter
    (as the training kernel): tests check the kernel's math there. A traced visibility (many
    entities, looped) keeps the concatenation with a mask.
    """
    if not _on_gpu(backend):
        return kernel == "pallas"
    return kernel in ("cudnn", "pallas") and _half(dtype)


def cached_route(kernel: str, dtype: Any, static_prefix: bool, backend: str | None = None):
    """How cached sampling attends for ``kernel``: ``('cached_kernel', None)``,
    ``('two_part', None)`` or ``('concatenated', implementation)``, the implementation being
    the one given to ``jax.nn.dot_product_attention`` (None: the backend's choice)."""
    if static_prefix and uses_cached_kernel(kernel, dtype, backend):
        return "cached_kernel", None
    if kernel == "xla":
        return "two_part", None
    if kernel == "pallas":  # No dropout when sampling: cuDNN's fused kernel where it runs.
        return "concatenated", ("cudnn" if _on_gpu(backend) and _half(dtype) else None)
    return "concatenated", (None if kernel == "dot_product" else kernel)


@dataclasses.dataclass(frozen=True)
class KVContext:
    """Keys/values of finished entities for cached sampling: one layer of the stacked cache.

    keys/values: (L, B, N, H, d) post-RoPE, every layer's (read at ``layer``, not sliced out);
    layer: this layer's index (an int, or an int32 scalar traced by a layer scan);
    visible: (N,) bool, which cached positions may be attended (traced), or None when exactly the
    first ``prefix_len`` (static) may: the finished entities before the current one.
    """

    keys: Array
    values: Array
    layer: Array | int
    visible: Array | None = None
    prefix_len: int = 0

    def layer_slice(self) -> tuple[Array, Array]:
        """This layer's attended keys and values (B, Nc, H, d): the prefix, or all N if visible.

        One slice of exactly that block: indexing the layer first and then cutting the prefix
        makes XLA copy the whole layer (all N positions) per layer and flow step on TPU.
        """
        _, b, n, h, d = self.keys.shape
        length = n if self.visible is not None else self.prefix_len
        take = lambda a: jax.lax.dynamic_slice(a, (self.layer, 0, 0, 0, 0), (1, b, length, h, d))[0]
        return take(self.keys), take(self.values)


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    kernel: str,
    mask: Array | None,
    context: KVContext | None,
    scale: float,
    dtype: Any,
    rate: float,
    probs_dropout: Callable[[Array], Array],
    dropout_key: Callable[[], Array],
) -> Array:
    """Attention output (B, T, H, d) of ``kernel`` (a resolved `KERNELS` name).

    Args:
      q, k, v: (B, T, H, d) queries, keys and values.
      kernel: the kernel.
      mask: (T, T) bool block mask of the training path, or None.
      context: the cache for sampling (then ``mask`` is unused and there is no dropout).
      scale: the logits' scale.
      dtype: the compute dtype (decides whether the fused cached routes run).
      rate: the attention dropout rate of this call (0 when deterministic).
      probs_dropout: dropout of the probabilities for 'xla' (the caller's ``nn.Dropout`` or
        `dropout.hash_attention_dropout`).
      dropout_key: draws the caller's 'dropout' key for 'pallas' (called only when rate > 0).
    """
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not resolved; one of {tuple(KERNELS)}.")
    if context is not None:
        route, implementation = cached_route(kernel, dtype, context.visible is None)
        if route == "cached_kernel":
            return sharded_cached_attention(q, k, v, context, scale)
        if route == "two_part":
            return two_part_attention(q, k, v, context, scale)
        return fused_cached_attention(q, k, v, context, implementation)
    if kernel == "xla":
        return masked_softmax_attention(q, k, v, mask, scale, probs_dropout)
    if kernel == "pallas":
        # The keep mask hashes (key, b, h, q, k); the key folds in the caller's module path, so
        # every layer, step and microbatch draws its own mask.
        key = dropout_key() if rate > 0 else None
        return sharded_flash_attention(q, k, v, mask, key, rate, scale)
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[None, None],
        implementation=None if kernel == "dot_product" else kernel,
    )  # fmt: skip


def masked_softmax_attention(q, k, v, mask, scale, dropout_fn):
    """Plain XLA attention. q (B,T,H,d), k/v (B,S,H,d), mask (T,S) bool or None."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout_fn(probs).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def two_part_attention(q, k, v, ctx: KVContext, scale):
    """Attention of T new tokens over [visible cached keys, their own keys] with one softmax.

    The cache is not concatenated with the new keys (that would copy it every flow step): the two
    logit blocks are normalised jointly instead.
    """
    keys, values = ctx.layer_slice()
    l_cache = jnp.einsum("bthd,bshd->bhts", q, keys, preferred_element_type=jnp.float32) * scale
    if ctx.visible is not None:
        l_cache = jnp.where(ctx.visible[None, None, None, :], l_cache, -jnp.inf)
    l_own = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    m = jnp.maximum(l_cache.max(-1, keepdims=True), l_own.max(-1, keepdims=True))
    p_cache, p_own = jnp.exp(l_cache - m), jnp.exp(l_own - m)
    denom = p_cache.sum(-1, keepdims=True) + p_own.sum(-1, keepdims=True)
    out = jnp.einsum("bhts,bshd->bthd", (p_cache / denom).astype(v.dtype), values)
    return out + jnp.einsum("bhts,bshd->bthd", (p_own / denom).astype(v.dtype), v)


def fused_cached_attention(q, k, v, ctx: KVContext, impl):
    """Cached attention through ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU).

    The kernel needs one key array, so the entity's keys/values are appended to the layer's cache
    (a copy of the visible prefix per call; `cached_attention` avoids it where it runs). A traced
    visibility (many entities, looped) becomes a boolean mask; a static prefix needs none.
    """
    cache_k, cache_v = ctx.layer_slice()
    keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
    mask = None
    if ctx.visible is not None:
        own = jnp.ones((k.shape[1],), bool)
        mask = jnp.broadcast_to(
            jnp.concatenate([ctx.visible, own])[None, None, None, :],
            (1, 1, q.shape[1], keys.shape[1]),
        )
    return jax.nn.dot_product_attention(q, keys, values, mask=mask, implementation=impl)


def _qkv_mesh_spec() -> jax.sharding.PartitionSpec | None:
    """The mesh split of (B, T, H, d) activations under the logical rules; None when unsplit."""
    mesh = jax.sharding.get_abstract_mesh()
    spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
    if mesh.empty or spec is None or all(a is None for a in spec):
        return None
    return jax.sharding.PartitionSpec(*spec)


def sharded_flash_attention(q, k, v, mask, key, rate, scale):
    """`flash_attention` per shard of batch and heads when a mesh is set (else directly).

    XLA cannot partition a Pallas kernel (it would gather the whole batch onto every device), so
    under a mesh the kernel runs inside shard_map, split as the logical rules split
    (batch, heads). The dropout streams are drawn for the global (B, H) and sharded alike, so the
    masks do not depend on the mesh.
    """
    b, _, h, _ = q.shape
    streams = None if rate == 0 else head_streams(seed_words(key), b, h)
    call = lambda q, k, v, mask, streams: flash_attention(
        q, k, v, mask, streams=streams, rate=rate, scale=scale
    )
    spec = _qkv_mesh_spec()
    if spec is None:
        return call(q, k, v, mask, streams)
    P = jax.sharding.PartitionSpec
    stream_spec = None if streams is None else P(spec[0], spec[2])
    mask_spec = None if mask is None else P()
    return jax.shard_map(
        call,
        in_specs=(spec, spec, spec, mask_spec, stream_spec),
        out_specs=spec,
        check_vma=False,
    )(q, k, v, mask, streams)


def sharded_cached_attention(q, k, v, ctx: KVContext, scale):
    """`cached_attention` over ``ctx``'s static prefix, per shard of batch and heads under a mesh
    (as `sharded_flash_attention`; the stacked caches split alike on their B and H axes)."""
    call = lambda q, k, v, cache_k, cache_v, layer: cached_attention(
        q, k, v, cache_k, cache_v, layer, ctx.prefix_len, scale=scale
    )
    args = (q, k, v, ctx.keys, ctx.values, jnp.asarray(ctx.layer, jnp.int32))
    spec = _qkv_mesh_spec()
    if spec is None:
        return call(*args)
    P = jax.sharding.PartitionSpec
    cache_spec = P(None, *spec)
    return jax.shard_map(
        call,
        in_specs=(spec, spec, spec, cache_spec, cache_spec, P()),
        out_specs=spec,
        check_vma=False,
    )(*args)
