"""The xAR network (encoder then decoder stacks of adaLN blocks) and its size table.

The entity kind only changes the layout: the token order, the block-causal mask, RoPE positions and
which conditioning row each token uses. Everything else is the release's network.

Entry points:
  ``model.apply({'params': p}, x_t, t, labels, train=False)`` -> velocity (B, N, C) for all tokens.
  ``model.apply(..., method=XAR.entity_forward)`` runs one entity's tokens against cached keys and
  values of finished entities (sampling), optionally returning the entity's own keys/values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from xar_jax import entities as ent
from xar_jax.attention import KVContext
from xar_jax.flash_attention import RESIDUAL_NAMES as FLASH_RESIDUALS
from xar_jax.layers import (
    MATMUL_OUTPUTS,
    Block,
    RMSNorm,
    TimestepEmbedder,
    broadcast_over_batch,
    param_dense,
)
from xar_jax.rope import rope_tables

# Compute dtypes by config name (params stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Size:
    width: int
    encoder_depth: int
    decoder_depth: int
    num_heads: int
    params_millions: float  # Published count, checked by the tests.


# The published sizes (one table: configs and tests read it).
PRESETS: dict[str, Size] = {
    "xar_b": Size(768, 8, 8, 12, 172.64),
    "xar_l": Size(1024, 16, 16, 16, 608.40),
    "xar_h": Size(1280, 20, 20, 16, 1186.02),
}


def mlp_hidden_width(width: int, mlp_ratio: float = 4.0) -> int:
    """The release's gated-MLP width ``int(D * ratio * 2/3)`` (768 -> 2048, 1024 -> 2730, 1280 -> 3413)."""
    return int(width * mlp_ratio * 2 / 3)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class KVCache(NamedTuple):
    """Per-layer keys/values of a whole sequence, stacked over layers: (L, B, N, H, d) each."""

    keys: jax.Array
    values: jax.Array


class _LayerBlock(Block):
    """A Block whose call-invariant switches are attributes, so nn.scan / nn.remat can wrap it.

    Call: ``(x, cond, token_entity, cos, sin, mask, cache, visible, layer) -> (x, kv or None)``,
    where ``cache`` is the stacked (keys, values) of every layer or None, and ``layer`` this
    block's index into it; the (carry, output) shape suits nn.scan.
    """

    deterministic: bool = True
    return_kv: bool = False
    prefix_len: int = 0  # With a cache and no `visible`: the cached positions attended.

    def __call__(self, x, cond, token_entity, cos, sin, mask, cache, visible, layer):
        context = None
        if cache is not None:
            context = KVContext(cache[0], cache[1], layer, visible, self.prefix_len)
        x, kv = super().__call__(x, cond, token_entity, cos, sin, mask, context, self.deterministic)
        return x, (kv if self.return_kv else None)


_POLICIES = jax.checkpoint_policies
# The Pallas attention's residuals (output, log-sum-exp) are kept by every policy but 'full': a
# custom call is no dot, so otherwise the backward pass would run the forward kernel again.
_KEEP_FLASH = _POLICIES.save_only_these_names(*FLASH_RESIDUALS)
_REMAT = {
    "full": None,
    "dots": _POLICIES.save_from_both_policies(_POLICIES.checkpoint_dots, _KEEP_FLASH),
    "dots_no_batch": _POLICIES.save_from_both_policies(
        _POLICIES.checkpoint_dots_with_no_batch_dims, _KEEP_FLASH
    ),
    # Keep the outputs of the matmuls and of the attention (all compute-dtype) and the Pallas
    # kernel's statistics; recompute the elementwise work (norms, modulation, RoPE, GELU, dropout
    # masks) in the backward pass. cuDNN's softmax statistics are not kept: its forward reruns.
    "matmuls": _POLICIES.save_only_these_names(*MATMUL_OUTPUTS, *FLASH_RESIDUALS),
}
REMAT_POLICIES = ("none", *_REMAT)  # 'none' or a rematerialisation policy of each block.

# The layer settings ('auto' of model.scan_layers and model.remat), per preset, that train fastest
# with the paper's recipe on one GPU (docs/benchmarks.md): unrolled B needs no remat; L and H
# scan (compile time) and keep only what the backward pass cannot cheaply recompute.
GPU_LAYERS: dict[str, tuple[bool, str]] = {
    "xar_b": (False, "none"),
    "xar_l": (True, "dots"),
    "xar_h": (True, "matmuls"),
}
# Elsewhere (TPU, CPU, a GPU with a custom size): the layer scan, compile time flat in depth.
DEFAULT_LAYERS: tuple[bool, str] = (True, "dots_no_batch")


def resolve_layers(
    preset: str,
    scan_layers: Any,
    remat: str,
    backend: str,
    recorded_scan: bool | None = None,
    training: bool = True,
) -> tuple[bool, str]:
    """Concrete ``(scan_layers, remat)``: each 'auto' resolved for ``preset`` on ``backend``.

    Args:
      preset: 'xar_b' | 'xar_l' | 'xar_h' or '' (a custom size).
      scan_layers: True | False | 'auto'.
      remat: a name of REMAT_POLICIES or 'auto'.
      backend: the platform the model runs on ('gpu', 'tpu', 'cpu').
      recorded_scan: the layer layout of a run already started from this config (its checkpoints
        hold the params in that layout), which 'auto' keeps.
      training: False for sampling and evaluation, which take the scan (unrolled layers sample no
        faster and compile the sampler five times slower) unless a recorded run fixes the layout.
    """
    gpu = backend in ("gpu", "cuda", "rocm")
    fast = GPU_LAYERS.get(preset) if gpu and training else None
    auto_scan, auto_remat = fast or DEFAULT_LAYERS
    if scan_layers == "auto":
        scan_layers = auto_scan if recorded_scan is None else bool(recorded_scan)
    if remat == "auto":
        # A preset's fast remat belongs to its fast layout; a kept layout gets the default's.
        remat = auto_remat if scan_layers == auto_scan else DEFAULT_LAYERS[1]
    return bool(scan_layers), remat


class BlockStack(nn.Module):
    """``depth`` blocks, unrolled (params ``block_{i}``) or scanned (params ``blocks``, stacked)."""

    depth: int
    block_kwargs: tuple[tuple[str, Any], ...]
    scan_layers: bool = False
    scan_unroll: int = 1
    remat: str = "none"

    @nn.compact
    def __call__(
        self,
        x,
        cond,
        token_entity,
        cos,
        sin,
        mask,
        cache,
        visible,
        *,
        deterministic,
        return_kv,
        prefix_len=0,
    ):
        """Returns x and, with ``return_kv``, the stacked (keys, values) of shape (L, B, T, H, d).

        ``cache``: the stacked (keys, values) (L, B, N, H, d) or None, with each block's index
        into it: the cached-attention kernel reads its layer in place; the XLA and concatenating
        forms take one (layer, prefix) slice (`attention.KVContext.layer_slice`). ``prefix_len``:
        static count of cached positions attended when ``visible`` is None.
        """
        block_cls = _LayerBlock
        if self.remat != "none":
            block_cls = nn.remat(
                block_cls, policy=_REMAT[self.remat], prevent_cse=not self.scan_layers
            )
        make = lambda name: block_cls(
            **dict(self.block_kwargs),
            deterministic=deterministic,
            return_kv=return_kv,
            prefix_len=prefix_len,
            name=name,
        )
        args = (cond, token_entity, cos, sin, mask)
        if self.scan_layers:
            scanned = nn.scan(
                lambda module, carry, *xs: module(carry, *xs),
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                metadata_params={nn.PARTITION_NAME: "layers"},
                # The cache is broadcast whole and the layer index scanned: a scanned cache would
                # be sliced per layer (a copy of its layer every call).
                in_axes=(nn.broadcast,) * (len(args) + 2) + (0,),
                length=self.depth,
                unroll=self.scan_unroll,
                # With a cache (sampling: given params, no RNG), no partial-evaluation pass over
                # the body to prove the broadcast inputs loop-invariant: under jax 0.11 it rejects
                # the broadcast cache ("broadcasted variable has a data dependency on the scan
                # body"). Without one (init, training) the pass stays: skipping it changes how
                # flax splits the scanned blocks' RNGs, so the same seed would give other params.
                check_constancy_invariants=cache is None,
            )
            layers = jnp.arange(self.depth, dtype=jnp.int32)
            return scanned(make("blocks"), x, *args, cache, visible, layers)
        kvs = []
        for i in range(self.depth):
            x, kv = make(f"block_{i}")(x, *args, cache, visible, i)
            kvs.append(kv)
        if not return_kv:
            return x, None
        return x, (jnp.stack([k for k, _ in kvs]), jnp.stack([v for _, v in kvs]))


class XAR(nn.Module):
    """The xAR transformer over one entity layout.

    Attributes:
      layout: the entity layout (token order, mask, positions).
      width: model width D (encoder and decoder share it, as in the release).
      encoder_depth / decoder_depth: number of blocks.
      encoder_heads / decoder_heads: attention heads of each stack.
      in_channels: latent channels C (16 for KL-16).
      num_classes: class labels; the embedding has one extra row, the null class.
      mlp_ratio: MLP hidden width is ``int(D * mlp_ratio * 2/3)``.
      mlp_multiple: pad the MLP hidden width up to this multiple (1 = no padding; exact either way).
      dropout / attn_dropout: training dropout after proj/MLP and on attention probabilities.
      dtype: compute dtype (params stay float32).
      attention_impl: a resolved kernel of `xar_jax.attention.KERNELS` ('xla', 'dot_product',
        'cudnn', 'pallas'; a config's 'auto' is resolved by the experiment, `build_model`'s
        ``resolved``), including how cached sampling runs it.
      scan_layers: scan over blocks (compile time flat in depth; params stacked on a leading axis).
      scan_unroll: blocks per iteration of the layer scan (1 = a loop over single blocks; larger
        values trade compile time for fewer loop iterations; the params are the same).
      dropout_impl: 'rng' (nn.Dropout) or 'hash' (`dropout.hash_dropout`, fused; other masks)
        for the dropout after the projection and in the MLP, and on the attention probabilities
        of the 'xla' kernel ('hash': `dropout.hash_attention_dropout`, the 'pallas' kernel's mask).
      remat: rematerialisation policy of each block: 'none', 'full', 'dots', 'dots_no_batch',
        'matmuls' (keep the named matmul and attention outputs, ``layers.MATMUL_OUTPUTS``).
    """

    layout: ent.EntityLayout
    width: int
    encoder_depth: int
    decoder_depth: int
    encoder_heads: int
    decoder_heads: int
    in_channels: int = 16
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    mlp_multiple: int = 1
    dropout: float = 0.1
    attn_dropout: float = 0.1
    dtype: Any = jnp.float32
    attention_impl: str = "xla"
    scan_layers: bool = False
    scan_unroll: int = 1
    remat: str = "none"
    dropout_impl: str = "rng"

    def setup(self):
        d = self.width
        n = self.layout.num_tokens
        pos_init = nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "length", "embed")
        )
        self.class_emb = nn.Embed(
            self.num_classes + 1,
            d,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="class_emb",
        )
        self.time_embed = TimestepEmbedder(d, self.dtype, name="time_embed")
        self.z_proj = param_dense(d, "z_proj", self.dtype, ("latent", "embed"))
        self.z_proj_ln = RMSNorm(name="z_proj_ln")
        self.encoder_pos_embed_learned = self.param(
            "encoder_pos_embed_learned", pos_init, (1, n, d)
        )
        self.decoder_pos_embed_learned = self.param(
            "decoder_pos_embed_learned", pos_init, (1, n, d)
        )
        self.encoder_blocks = self._stack(self.encoder_depth, self.encoder_heads, "encoder_blocks")
        self.encoder_norm = RMSNorm(name="encoder_norm")
        self.decoder_embed = param_dense(d, "decoder_embed", self.dtype, ("embed", "embed_out"))
        self.decoder_blocks = self._stack(self.decoder_depth, self.decoder_heads, "decoder_blocks")
        self.decoder_norm = RMSNorm(name="decoder_norm")
        self.pred = param_dense(self.in_channels, "pred", self.dtype, ("embed", "latent"))

    @property
    def mlp_hidden(self) -> int:
        return mlp_hidden_width(self.width, self.mlp_ratio)

    def _stack(self, depth, heads, name):
        kwargs = (
            ("num_heads", heads),
            ("mlp_hidden", self.mlp_hidden),
            ("mlp_hidden_padded", round_up(self.mlp_hidden, self.mlp_multiple)),
            ("dtype", self.dtype),
            ("dropout", self.dropout),
            ("attn_dropout", self.attn_dropout),
            ("attention_impl", self.attention_impl),
            ("dropout_impl", self.dropout_impl),
        )
        return BlockStack(depth, kwargs, self.scan_layers, self.scan_unroll, self.remat, name=name)

    # ------------------------------------------------------------------------------------------
    def conditioning(self, t: jax.Array, labels: jax.Array) -> jax.Array:
        """Per-entity conditioning ``class_emb[label] + time_embed(t)``: t (B, K), labels (B,) -> (B, K, D)."""
        c = self.class_emb(labels)[:, None, :].astype(jnp.float32)
        return c + self.time_embed(t).astype(jnp.float32)

    def _rope(self, heads):
        return rope_tables(self.layout.positions, self.width // heads)

    def __call__(self, x_t: jax.Array, t: jax.Array, labels: jax.Array, train: bool = False):
        """Velocity of every token.

        Args:
          x_t: (B, N, C) noisy tokens in entity order.
          t: (B, K) flow time of every entity (1 = noise).
          labels: (B,) int class labels (``num_classes`` = the null class, unconditional).
          train: enables dropout (needs a 'dropout' rng).

        Returns:
          (B, N, C) float32 predicted velocity ``eps - x``.
        """
        n = self.layout.num_tokens
        if x_t.shape[1] != n or t.shape[1] != self.layout.num_entities:
            raise ValueError(
                f"x_t {x_t.shape} / t {t.shape} do not match the layout "
                f"(N={n}, K={self.layout.num_entities})."
            )
        cond = self.conditioning(t, labels)
        mask = jnp.asarray(self.layout.attention_mask)
        # Equal entities broadcast their conditioning through a reshape; 'scale' gathers it.
        token_entity = None if self.layout.uniform else jnp.asarray(self.layout.entity_of_token)
        out, _ = self._run(x_t, cond, 0, token_entity, mask, None, None, not train, False)
        return out

    def entity_forward(
        self,
        x_t: jax.Array,
        t: jax.Array,
        labels: jax.Array,
        start: jax.Array | int,
        caches: dict[str, KVCache] | None,
        visible: jax.Array | None,
        return_kv: bool = False,
    ):
        """One entity's tokens against cached keys/values (inference only).

        Args:
          x_t: (B, n, C) the entity's tokens; t: (B,) its time; labels: (B,).
          start: sequence index of the entity's first token (may be traced).
          caches: {'encoder': KVCache, 'decoder': KVCache} of shapes (L, B, N, H, d), or None.
          visible: (N,) bool, which cached positions are finished entities; None when they are
            the first ``start`` (then a static int): the attention reads that prefix in place.
          return_kv: also return the entity's own {'encoder'|'decoder': KVCache (L, B, n, H, d)}.

        Returns:
          velocity (B, n, C), and the own keys/values if ``return_kv``.
        """
        if caches is not None and visible is None and not isinstance(start, int):
            raise ValueError("entity_forward without `visible` needs a static (int) `start`.")
        cond = self.conditioning(t[:, None], labels)
        token_entity = None  # One entity: its conditioning row covers every token.
        out, kvs = self._run(x_t, cond, start, token_entity, None, caches, visible, True, return_kv)
        return (out, kvs) if return_kv else out

    def _run(self, x, cond, start, token_entity, mask, caches, visible, deterministic, return_kv):
        n = x.shape[1]
        rope_e = [jnp.asarray(a) for a in self._rope(self.encoder_heads)]
        rope_d = [jnp.asarray(a) for a in self._rope(self.decoder_heads)]
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, n, axis=a.ndim - 2)
        pos = lambda table: broadcast_over_batch(take(table), x.shape[0])
        h = self.z_proj(x) + pos(self.encoder_pos_embed_learned)
        h = self.z_proj_ln(h)
        cache_e = None if caches is None else tuple(caches["encoder"])
        cache_d = None if caches is None else tuple(caches["decoder"])
        prefix_len = start if caches is not None and visible is None else 0
        flags = dict(deterministic=deterministic, return_kv=return_kv, prefix_len=prefix_len)
        h, kv_e = self.encoder_blocks(
            h, cond, token_entity, *map(take, rope_e), mask, cache_e, visible, **flags
        )
        h = self.encoder_norm(h)
        h = self.decoder_embed(h) + pos(self.decoder_pos_embed_learned)
        h, kv_d = self.decoder_blocks(
            h, cond, token_entity, *map(take, rope_d), mask, cache_d, visible, **flags
        )
        h = self.decoder_norm(h)
        out = self.pred(h).astype(jnp.float32)
        kvs = {"encoder": KVCache(*kv_e), "decoder": KVCache(*kv_d)} if return_kv else None
        return out, kvs


# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ResolvedSettings:
    """The model fields whose config value depends on the devices ('auto'), as the experiment
    resolved them (`experiment.resolve_model_settings`).

    Attributes:
      attention_impl: the attention kernel (`xar_jax.attention.KERNELS`).
    """

    attention_impl: str


def build_model(
    model_cfg,
    layout: ent.EntityLayout,
    resolved: ResolvedSettings,
    *,
    in_channels: int,
    num_classes: int,
) -> XAR:
    """Builds `XAR` from a validated config's ``model`` section (see configs/*.py for every
    field) and the settings the experiment resolved for its devices."""
    if model_cfg.get("preset"):
        size = PRESETS[model_cfg.preset]
        width, enc, dec, heads = size.width, size.encoder_depth, size.decoder_depth, size.num_heads
        enc_heads = dec_heads = heads
    else:
        width, enc, dec = model_cfg.width, model_cfg.encoder_depth, model_cfg.decoder_depth
        enc_heads = dec_heads = model_cfg.num_heads
    return XAR(
        layout=layout,
        width=width,
        encoder_depth=enc,
        decoder_depth=dec,
        encoder_heads=enc_heads,
        decoder_heads=dec_heads,
        in_channels=in_channels,
        num_classes=num_classes,
        mlp_multiple=model_cfg.get("mlp_multiple", 1),
        dropout=model_cfg.dropout,
        attn_dropout=model_cfg.attn_dropout,
        dtype=DTYPES[model_cfg.dtype],
        attention_impl=resolved.attention_impl,
        scan_layers=model_cfg.scan_layers,
        scan_unroll=model_cfg.get("scan_unroll", 1),
        remat=model_cfg.remat,
        dropout_impl=model_cfg.get("dropout_impl", "rng"),
    )


# ----------------------------------------------------------------------------------------------
# "Is this the same model?": one answer for workdirs (run.json) and converted weights.
_ENTITY_FIELD = {"cell": "entity.cell_size", "subsample": "entity.subsample_factor",
                 "scale": "entity.scale_sizes"}  # fmt: skip


def _signature(width, encoder_depth, decoder_depth, heads, channels, num_classes, grid_size,
               kind, entity_value, storage) -> dict[str, Any]:  # fmt: skip
    sig = {
        "model.width": int(width),
        "model.encoder_depth": int(encoder_depth),
        "model.decoder_depth": int(decoder_depth),
        "model.num_heads": heads,
        "latent.grid_size": grid_size,
        "latent.channels": int(channels),
        "latent.num_classes": int(num_classes),
        "entity.kind": kind,
    }
    if kind in _ENTITY_FIELD:
        sig[_ENTITY_FIELD[kind]] = entity_value
    if storage is not None:
        sig["model.mlp_multiple"], sig["model.scan_layers"] = int(storage[0]), bool(storage[1])
    return sig


def model_signature(model: XAR, *, storage: bool = True) -> dict[str, Any]:
    """What makes two models the same network, keyed by the config fields that set it.

    The sizes, the latent grid and classes, the entity layout; with ``storage`` also how the
    params are laid out (``model.mlp_multiple``, ``model.scan_layers``), which checkpoints depend
    on and converted weights (stored unrolled, unpadded) do not.
    """
    lay = model.layout
    h, w = lay.grid_size
    heads = model.encoder_heads
    if model.decoder_heads != heads:
        heads = [model.encoder_heads, model.decoder_heads]
    value = {"cell": lay.cell_size, "subsample": lay.subsample_factor,
             "scale": list(lay.scale_sizes)}.get(lay.kind)  # fmt: skip
    return _signature(
        model.width,
        model.encoder_depth,
        model.decoder_depth,
        heads,
        model.in_channels,
        model.num_classes,
        h if h == w else [h, w],
        lay.kind,
        value,
        (model.mlp_multiple, model.scan_layers) if storage else None,
    )


def config_signature(config) -> dict[str, Any]:
    """`model_signature` (with storage) of the model a validated config builds, read from the
    config alone (a preset's sizes from `PRESETS`)."""
    m = config.model
    if m.get("preset"):
        size = PRESETS[m.preset]
        sizes = (size.width, size.encoder_depth, size.decoder_depth, size.num_heads)
    else:
        sizes = (m.width, m.encoder_depth, m.decoder_depth, m.num_heads)
    grid = config.latent.grid_size
    grid = int(grid) if isinstance(grid, int) else [int(g) for g in grid]
    if isinstance(grid, list) and grid[0] == grid[1]:
        grid = grid[0]
    kind = config.entity.kind
    field = _ENTITY_FIELD.get(kind)
    value = config.entity[field.split(".")[1]] if field else None
    if kind == "scale":
        value = [int(v) for v in value]
    elif field:
        value = int(value)
    return _signature(
        *sizes,
        config.latent.channels,
        config.latent.num_classes,
        grid,
        kind,
        value,
        (m.get("mlp_multiple", 1), m.scan_layers),
    )


def preset_signature(preset: str) -> dict[str, Any]:
    """The size fields of `model_signature` for a preset (run records that named a preset)."""
    size = PRESETS[preset]
    return {
        "model.width": size.width,
        "model.encoder_depth": size.encoder_depth,
        "model.decoder_depth": size.decoder_depth,
        "model.num_heads": size.num_heads,
    }


def abstract_params(model: XAR, batch_size: int = 1) -> Any:
    """Parameter shapes (ShapeDtypeStructs, boxed with logical axes) without allocating them.

    Traced with the XLA attention: the params do not depend on the attention kernel, and a fused
    kernel may not trace on this host (cuDNN on a CPU-only machine preparing a GPU run). The key
    and the example inputs are made inside the trace too, so nothing is compiled: a run refused
    by its workdir has not written to the compilation cache.
    """
    portable = model.clone(attention_impl="xla")
    return jax.eval_shape(
        lambda: portable.init(jax.random.key(0), *example_inputs(model, batch_size))["params"]
    )


def example_inputs(model: XAR, batch_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zero ``(x_t (B, N, C), t (B, K), labels (B,))`` of the right shapes, for ``model.init``."""
    layout = model.layout
    x = jnp.zeros((batch_size, layout.num_tokens, model.in_channels), jnp.float32)
    t = jnp.zeros((batch_size, layout.num_entities), jnp.float32)
    y = jnp.zeros((batch_size,), jnp.int32)
    return x, t, y


def count_params(params: Any, *, model: XAR | None = None) -> int:
    """Number of parameters; with ``model``, MLP zero-padding is not counted (the published count)."""
    leaves = jax.tree.leaves(nn.meta.unbox(params))
    total = int(sum(np.prod(x.shape) for x in leaves))
    if model is not None and model.mlp_multiple > 1:
        pad = round_up(model.mlp_hidden, model.mlp_multiple) - model.mlp_hidden
        per_block = pad * (3 * model.width + 2)  # fc1_g, fc1_x kernels+biases, fc2 kernel rows.
        total -= pad and per_block * (model.encoder_depth + model.decoder_depth)
    return total
