"""The xAR block and its parts: Linear layers with the release's init, RMSNorm, the attention
layer (qkv, RoPE, a kernel of `xar_jax.attention`, proj), the adaLN block, time conditioning.

Shapes: B batch, T tokens of this call, N tokens of the whole sequence, D width, H heads, d head dim,
K entities. Parameters are float32; ``dtype`` is the compute dtype of matrix products. The MLP is
`xar_jax.mlp`, RoPE `xar_jax.rope`, the dropout after proj and in the MLP `xar_jax.dropout`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from xar_jax import attention
from xar_jax.attention import KVContext
from xar_jax.dropout import apply_dropout, hash_attention_dropout
from xar_jax.mlp import GatedMLP
from xar_jax.rope import apply_rope

Array = jax.Array
dense_init = nn.initializers.xavier_uniform()  # The release's Linear init (zero biases).


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


# Names of the block's matmul (and attention) outputs, for rematerialisation policies.
MATMUL_OUTPUTS = ("qkv", "attention", "proj", "fc1_g", "fc1_x", "fc2")


class Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE and a block mask (``attn.qkv``, ``attn.proj``).

    ``impl`` is a resolved kernel name (`attention.KERNELS`); `attention.attend` runs it.
    """

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
        out = attention.attend(
            q, k, v, kernel=self.impl, mask=mask, context=kv_context,
            scale=1.0 / np.sqrt(head_dim), dtype=self.dtype,
            rate=0.0 if deterministic else self.attn_dropout,
            probs_dropout=self._probs_dropout(deterministic),
            dropout_key=lambda: self.make_rng("dropout"),
        )  # fmt: skip
        out = checkpoint_name(out.reshape(b, t, d_model), "attention")
        out = checkpoint_name(
            param_dense(d_model, "proj", self.dtype, ("qkv_out", "embed"))(out), "proj"
        )
        out = apply_dropout(
            self, out, self.proj_dropout, "proj_drop", deterministic, self.dropout_impl
        )
        return out, (k, v)

    def _probs_dropout(self, deterministic: bool):
        """Dropout of the 'xla' kernel's probabilities: ``nn.Dropout`` ('rng'), or ('hash') the
        'pallas' kernel's hashed mask under the key it would draw here (the next 'dropout' key
        of this module), so both kernels drop the same probabilities."""
        if self.dropout_impl != "hash":
            return lambda p: nn.Dropout(self.attn_dropout, name="attn_drop")(
                p, deterministic=deterministic
            )
        if deterministic or self.attn_dropout == 0.0:
            return lambda p: p
        return lambda p: hash_attention_dropout(p, self.attn_dropout, self.make_rng("dropout"))


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
