"""Building blocks of the xAR network: RMSNorm, 2-D RoPE, attention, gated MLP, adaLN block.

Shapes: B batch, T tokens of this call, N tokens of the whole sequence, D width, H heads, d head dim,
K entities. Parameters are float32; ``dtype`` is the compute dtype of matrix products.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from xar_jax.cached_attention import cached_attention
from xar_jax.flash_attention import flash_attention, fmix32, head_streams, seed_words

Array = jax.Array
# 'xla': einsum + mask (+ nn.Dropout); 'dot_product' / 'cudnn': jax.nn.dot_product_attention (no
# attention dropout); 'pallas': our fused kernel (xar_jax.flash_attention) with attention dropout;
# 'auto': one of those, chosen for the backend by `resolve_attention_impl` when the model is built.
ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn", "pallas")


def resolve_attention_impl(
    impl: str, attn_dropout: float, dtype: Any, backend: str | None = None
) -> str:
    """The concrete attention kernel for ``impl`` ('auto' resolved; anything else unchanged).

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
    backend = backend or jax.default_backend()
    if backend not in ("gpu", "cuda", "rocm"):
        return "xla"
    if attn_dropout > 0:
        return "pallas"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half else "dot_product"


# Dropout after the projection and in the MLP: 'rng' = nn.Dropout (Bernoulli bits from the
# 'dropout' PRNG, a materialised bits array); 'hash' = a counter hash of each element's index
# under a seed from that PRNG, computed inside the consumer's fusion (no bits array).
DROPOUT_IMPLS = ("rng", "hash")

dense_init = nn.initializers.xavier_uniform()


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masked_scale(x: Array, seeds: Array, rate: float) -> Array:
    keep = _hash_keep_mask(x.shape, seeds, rate)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def _masked_scale_fwd(x, seeds, rate):
    return _masked_scale(x, seeds, rate), seeds


def _masked_scale_bwd(rate, seeds, d_out):
    return _masked_scale(d_out, seeds, rate), None


_masked_scale.defvjp(_masked_scale_fwd, _masked_scale_bwd)


def _dropout(module: nn.Module, x, rate, name, deterministic, impl):
    """``nn.Dropout(rate, name=name)`` ('rng') or `hash_dropout` under module's 'dropout' rng."""
    if impl == "hash":
        if deterministic or rate == 0.0:
            return x
        return hash_dropout(x, rate, module.make_rng("dropout"))
    return nn.Dropout(rate, name=name)(x, deterministic=deterministic)


def param_dense(features: int, name: str, dtype: Any, axes: tuple[str, str]) -> nn.Dense:
    """A Linear layer with the reference's init (xavier uniform, zero bias) and logical axes."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(dense_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_over_batch(shared: Array, batch: int) -> Array:
    """``shared`` (1, ...) repeated to (batch, ...); its gradient sums over the batch by a matmul.

    The plain broadcast's gradient is a reduce over the batch axis. XLA's GPU layout assignment
    turns every large reduce into a row reduction by making the reduced axis the operand's
    minor-most one, so this single gradient (of the learned position embeddings) made the whole
    residual stream batch-minor, with a transpose around every matmul: about 14% of the xAR-B
    train step in its profile. A matmul with a ones matrix sums the same
    float32 values (exact products, HIGHEST precision) and asks for no layout.
    """
    return jnp.broadcast_to(shared, (batch, *shared.shape[1:]))


def _broadcast_over_batch_fwd(shared, batch):
    return broadcast_over_batch(shared, batch), None


def _broadcast_over_batch_bwd(batch, _, d_out):
    # Two rows of ones: XLA rewrites a one-row (vector) product back into a reduce.
    ones = jnp.ones((2, batch), d_out.dtype)
    total = jnp.matmul(ones, d_out.reshape(batch, -1), precision=jax.lax.Precision.HIGHEST)[0]
    return (total.reshape(1, *d_out.shape[1:]),)


broadcast_over_batch.defvjp(_broadcast_over_batch_fwd, _broadcast_over_batch_bwd)


def rms_normalize(x: Array) -> Array:
    """``x * rsqrt(mean(x^2) + 1e-6)`` computed in float32, returned in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight (``z_proj_ln``, ``encoder_norm``, ``decoder_norm``)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param(
            "weight", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],)
        )
        return rms_normalize(x) * weight


# ----------------------------------------------------------------------------------------------
# Rotary position embedding.
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

    rotate_half maps each adjacent pair (x[2j], x[2j+1]) to (-x[2j+1], x[2j]). It is written as
    a reversal of each pair times a (-1, +1) sign folded into the sin table: an index remap that
    fuses into the surrounding elementwise kernel (a stack of the two halves lowers to a
    concatenation on GPU). Bit-identical to the stacked form.
    """
    swapped = jnp.flip(x.reshape(*x.shape[:-1], -1, 2), axis=-1).reshape(x.shape)
    sign = jnp.tile(jnp.asarray([-1.0, 1.0], sin.dtype), sin.shape[-1] // 2)
    signed_sin = sin * sign
    if cos.ndim == 2:
        cos, signed_sin = cos[None, :, None, :], signed_sin[None, :, None, :]
    else:
        cos, signed_sin = cos[:, :, None, :], signed_sin[:, :, None, :]
    return (x * cos + swapped * signed_sin).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention.
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


def uses_cached_kernel(mode: str, dtype: Any, backend: str | None = None) -> bool:
    """Whether cached attention over a static prefix runs `cached_attention.cached_attention`.

    On a GPU, where it would otherwise run cuDNN over a concatenated copy of the cache (attention
    impl 'cudnn' or 'pallas', half dtype). Elsewhere for 'pallas' only, in the Pallas interpreter
    (as the training kernel): tests check the kernel's math there. A traced visibility (many
    entities, looped) keeps the concatenation with a mask.
    """
    backend = backend or jax.default_backend()
    if backend not in ("gpu", "cuda", "rocm"):
        return mode == "pallas"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return mode in ("cudnn", "pallas") and half


def _masked_softmax_attention(q, k, v, mask, scale, dropout_fn):
    """Plain XLA attention. q (B,T,H,d), k/v (B,S,H,d), mask (T,S) bool or None."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout_fn(probs).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def _two_part_attention(q, k, v, ctx: KVContext, scale):
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


def _fused_cached_attention(q, k, v, ctx: KVContext, impl):
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


def _sharded_flash_attention(q, k, v, mask, key, rate, scale):
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


def _sharded_cached_attention(q, k, v, ctx: KVContext, scale):
    """`cached_attention` over ``ctx``'s static prefix, per shard of batch and heads under a mesh
    (as `_sharded_flash_attention`; the stacked caches split alike on their B and H axes)."""
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


# Names of the block's matmul (and attention) outputs, for rematerialisation policies.
MATMUL_OUTPUTS = ("qkv", "attention", "proj", "fc1_g", "fc1_x", "fc2")


class Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE and a block mask (``attn.qkv``, ``attn.proj``)."""

    num_heads: int
    dtype: Any = jnp.float32
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    impl: str = "xla"
    dropout_impl: str = "rng"

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv_context: KVContext | None, deterministic: bool):
        b, t, d_model = x.shape
        h = self.num_heads
        head_dim = d_model // h
        qkv = checkpoint_name(
            param_dense(3 * d_model, "qkv", self.dtype, ("embed", "qkv"))(x), "qkv"
        )
        qkv = qkv.reshape(b, t, 3, h, head_dim)  # Output features laid out as (3, H, head_dim).
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "heads", "head_dim"))
        scale = 1.0 / np.sqrt(head_dim)
        mode = resolve_attention_impl(self.impl, self.attn_dropout, self.dtype)
        impl = None if mode == "dot_product" else mode
        if mode == "pallas":
            # Cached sampling has no dropout: over a static prefix, `cached_attention`; over a
            # traced one, cuDNN's fused kernel where it runs (a GPU and a half dtype), elsewhere
            # jax.nn.dot_product_attention's XLA form.
            fused = resolve_attention_impl("auto", 0.0, self.dtype)
            impl = "cudnn" if fused == "cudnn" else None
        static_prefix = kv_context is not None and kv_context.visible is None
        if static_prefix and uses_cached_kernel(mode, self.dtype):
            out = _sharded_cached_attention(q, k, v, kv_context, scale)
        elif kv_context is not None and mode == "xla":
            out = _two_part_attention(q, k, v, kv_context, scale)
        elif kv_context is not None:
            out = _fused_cached_attention(q, k, v, kv_context, impl)
        elif mode == "xla":
            drop = nn.Dropout(self.attn_dropout, name="attn_drop")
            out = _masked_softmax_attention(
                q, k, v, mask, scale, lambda p: drop(p, deterministic=deterministic)
            )
        elif mode == "pallas":
            # The keep mask hashes (key, b, h, q, k); make_rng folds in this module's path, so
            # every layer, step and microbatch draws its own mask.
            rate = 0.0 if deterministic else self.attn_dropout
            key = self.make_rng("dropout") if rate > 0 else None
            out = _sharded_flash_attention(q, k, v, mask, key, rate, scale)
        else:
            if self.attn_dropout > 0 and not deterministic:
                raise ValueError(
                    f"model.attention_impl={mode!r} has no dropout on attention probabilities; "
                    "set model.attn_dropout=0.0 or model.attention_impl='pallas' (or 'xla')."
                )
            out = jax.nn.dot_product_attention(
                q, k, v, mask=None if mask is None else mask[None, None], implementation=impl
            )
        out = checkpoint_name(out.reshape(b, t, d_model), "attention")
        out = checkpoint_name(
            param_dense(d_model, "proj", self.dtype, ("qkv_out", "embed"))(out), "proj"
        )
        out = _dropout(self, out, self.proj_dropout, "proj_drop", deterministic, self.dropout_impl)
        return out, (k, v)


_SQRT_HALF = np.float32(np.sqrt(0.5))
_INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))


def gelu_exact(x: Array) -> Array:
    """Exact GELU ``x/2 (1 + erf(x/sqrt 2))`` in float32, returned in x's dtype (PyTorch's form).

    ``jax.nn.gelu(approximate=False)`` uses ``erfc``, whose float32 expansion on GPU evaluates
    both of its branches and an exp per element: a compute-bound kernel as slow as a matmul here.
    The erf form is the one the release's PyTorch kernel computes.
    """
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + jax.lax.erf(xf * _SQRT_HALF))).astype(x.dtype)


@jax.custom_vjp
def gated_gelu(g: Array, u: Array) -> Array:
    """``gelu_exact(g) * u``, differentiated by hand so that backward keeps only g and u.

    Autodiff would keep the float32 intermediates of the GELU for the backward pass; under a layer
    scan they are stacked per layer (gigabytes of copies per step). The hand-written backward
    recomputes them from the compute-dtype inputs instead, as PyTorch's GELU backward does.
    """
    return gelu_exact(g) * u


def _gated_gelu_fwd(g, u):
    return gated_gelu(g, u), (g, u)


def _gated_gelu_bwd(res, d_out):
    g, u = res
    gf, uf, df = g.astype(jnp.float32), u.astype(jnp.float32), d_out.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(gf * _SQRT_HALF))
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * gf * gf)
    return ((df * uf * (cdf + gf * pdf)).astype(g.dtype), (df * gf * cdf).astype(u.dtype))


gated_gelu.defvjp(_gated_gelu_fwd, _gated_gelu_bwd)


class GatedMLP(nn.Module):
    """``fc2(GELU(fc1_g(x)) * fc1_x(x))`` with exact GELU.

    ``hidden_padded`` >= ``hidden`` zero-pads the hidden width (to suit matrix units): padded
    units start at zero and receive zero gradient, so the function and its training are unchanged.
    """

    hidden: int
    hidden_padded: int
    dtype: Any = jnp.float32
    dropout: float = 0.0
    dropout_impl: str = "rng"

    @nn.compact
    def __call__(self, x, deterministic: bool):
        d_model = x.shape[-1]
        width = self.hidden_padded
        g = checkpoint_name(self._fc1("fc1_g", width)(x), "fc1_g")
        u = checkpoint_name(self._fc1("fc1_x", width)(x), "fc1_x")
        hidden = gated_gelu(g, u)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = _dropout(self, hidden, self.dropout, "drop1", deterministic, self.dropout_impl)
        fc2_init = dense_init
        if width != self.hidden:
            fc2_init = _zero_padded(dense_init, self.hidden, axis=0)
        out = nn.Dense(
            d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(fc2_init, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="fc2",
        )(hidden)
        out = checkpoint_name(out, "fc2")
        return _dropout(self, out, self.dropout, "drop2", deterministic, self.dropout_impl)

    def _fc1(self, name, width):
        init = dense_init if width == self.hidden else _zero_padded(dense_init, self.hidden, axis=1)
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name=name,
        )


def _zero_padded(init, true_width: int, axis: int):
    """Initialiser drawing the unpadded block with ``init`` (same fan) and zeros elsewhere."""

    def padded_init(key, shape, dtype=jnp.float32):
        true_shape = list(shape)
        true_shape[axis] = true_width
        w = init(key, tuple(true_shape), dtype)
        pad = [(0, 0)] * len(shape)
        pad[axis] = (0, shape[axis] - true_width)
        return jnp.pad(w, pad)

    return padded_init


class Block(nn.Module):
    """adaLN transformer block (the release's ``AdaLNSelfAttn``).

    ``ada = Linear(SiLU(c))`` per entity -> gamma1, gamma2, scale1, scale2, shift1, shift2;
    ``x += gamma1 * Attn(RMSNorm(x) * (1 + scale1) + shift1)``;
    ``x += gamma2 * MLP(RMSNorm(x) * (1 + scale2) + shift2)``.
    """

    num_heads: int
    mlp_hidden: int
    mlp_hidden_padded: int
    dtype: Any = jnp.float32
    dropout: float = 0.0
    attn_dropout: float = 0.0
    attention_impl: str = "xla"
    dropout_impl: str = "rng"

    @nn.compact
    def __call__(self, x, cond, token_entity, cos, sin, mask, kv_context, deterministic: bool):
        """x (B,T,D); cond (B,K',D) per-entity conditioning; token_entity (T,) row of cond per
        token, or None when the T tokens are K' equal consecutive runs (every kind but 'scale').

        The adaLN projection runs once per entity (not per token). With equal entities it is
        broadcast through a (B, K', T/K', D) view, which XLA fuses into the elementwise ops
        instead of materialising a (B, T, 6D) array per layer.
        """
        d_model = x.shape[-1]
        # One 2-D matmul over the (B*K', D) rows of every entity's conditioning.
        rows = nn.silu(cond).reshape(-1, cond.shape[-1])
        ada = param_dense(6 * d_model, "ada_lin", self.dtype, ("embed", "ada"))(rows)
        ada = ada.reshape(*cond.shape[:-1], 6 * d_model).astype(jnp.float32)
        if token_entity is None:
            ada = ada[:, :, None, :]
            x = x.reshape(x.shape[0], ada.shape[1], -1, d_model)
        else:
            ada = jnp.take(ada, token_entity, axis=1)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = jnp.split(ada, 6, axis=-1)
        grouped = x.shape  # (B, T, D) or (B, K', n, D).
        flat = lambda a: a.reshape(grouped[0], -1, d_model)
        h = (rms_normalize(x) * (1 + scale1) + shift1).astype(self.dtype)
        attn_out, kv = Attention(
            self.num_heads,
            dtype=self.dtype,
            attn_dropout=self.attn_dropout,
            proj_dropout=self.dropout,
            impl=self.attention_impl,
            dropout_impl=self.dropout_impl,
            name="attn",
        )(flat(h), cos, sin, mask, kv_context, deterministic)
        x = x + gamma1 * attn_out.reshape(grouped)
        h = (rms_normalize(x) * (1 + scale2) + shift2).astype(self.dtype)
        mlp_out = GatedMLP(
            self.mlp_hidden,
            self.mlp_hidden_padded,
            self.dtype,
            self.dropout,
            self.dropout_impl,
            name="mlp",
        )(h, deterministic)
        x = flat(x + gamma2 * mlp_out)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, kv


# ----------------------------------------------------------------------------------------------
# Conditioning.
def time_index(t: Array) -> Array:
    """``trunc(float32(t) * 1000)`` in float32 arithmetic (float64 would differ: 0.68 -> 679)."""
    return jnp.trunc(t.astype(jnp.float32) * jnp.float32(1000.0))


def timestep_features(tidx: Array, dim: int = 256) -> Array:
    """Sinusoid ``[cos(tidx * f), sin(tidx * f)]``, ``f_i = exp(-ln(10000) i / (dim/2))``."""
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = tidx.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """``Linear(256 -> D), SiLU, Linear(D -> D)`` of the time index (``time_embed.mlp.{0,2}``)."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        h = timestep_features(time_index(t.reshape(-1)))  # Rows, as for the adaLN projection.
        h = param_dense(self.width, "mlp_0", self.dtype, ("time_freq", "embed"))(h)
        h = param_dense(self.width, "mlp_2", self.dtype, ("embed", "embed_out"))(nn.silu(h))
        return h.reshape(*t.shape, self.width)
