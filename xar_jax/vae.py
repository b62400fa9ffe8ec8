"""MAR's KL-16 VAE (the LDM ``AutoencoderKL``) in Flax linen: the tokenizer xAR works on.

Images are NHWC floats in [-1, 1]; a 256x256 image becomes a 16x16 grid of 16 latent channels.

- ``VAE``: the linen module (encoder, ``quant_conv``, ``post_quant_conv``, decoder). Its parameter
  tree mirrors the PyTorch state dict (``xar_jax.convert.vae`` maps one onto the other).
- ``encode(params, images, model=...)``: raw moments ``[mean, logvar]`` as the encoder computes
  them, *before* the logvar clamp (the clamp belongs to the posterior, as in LDM).
- ``DiagonalGaussian`` / ``sample_latents`` / ``latents_mode``: the posterior, with logvar
  clamped to [-30, 20] and the latent scale 0.2325 applied, giving the latents xAR is trained on.
- ``decode(params, latents, model=...)``: divides by the scale, decodes, clips to [-1, 1].

``encode`` and ``decode`` are jitted with the module as a static argument (one compilation per
model configuration and input shape). Nothing mixes examples of a batch, so inputs sharded along
the batch axis stay sharded (params replicated): ``jax.device_put(images, NamedSharding(mesh,
P('data')))`` before calling is all data parallelism needs.

The module computes in ``dtype`` (float32 or bfloat16) with float32 params, GroupNorm statistics
and attention softmax; its outputs are always float32.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

# MAR's scale factor: makes the latents roughly unit-variance on ImageNet.
LATENT_SCALE = 0.2325
# LDM's DiagonalGaussianDistribution clamps logvar to this range before using it.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
NORM_GROUPS = 32
NORM_EPS = 1e-6
IMAGE_CHANNELS = 3

_KL16 = dict(
    ch=128,
    ch_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    attn_resolutions=(16,),
    resolution=256,
    z_channels=16,
    embed_dim=16,
)
# Architectures by name. 'kl16' is MAR's released tokenizer (kl16.ckpt, 66,456,019 params);
# 'kl16_ch32' is the same network at a quarter of the width (golden test vectors).
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "kl16": _KL16,
    "kl16_ch32": {**_KL16, "ch": 32},
}
_ARCH_FIELDS = tuple(_KL16)


def vae_config(name: str) -> dict[str, Any]:
    """Returns the architecture fields of a named VAE as a fresh dict.

    Usage: ``VAE(**vae_config('kl16'), dtype=jnp.bfloat16)``.
    """
    if name not in VAE_CONFIGS:
        raise ValueError(f"Unknown VAE config {name!r}; allowed: {sorted(VAE_CONFIGS)}.")
    return dict(VAE_CONFIGS[name])


def _group_norm(dtype: Any, name: str) -> nn.GroupNorm:
    # Two-pass variance, as torch computes it (the fast E[x^2]-E[x]^2 form loses digits).
    return nn.GroupNorm(
        num_groups=NORM_GROUPS, epsilon=NORM_EPS, use_fast_variance=False, dtype=dtype, name=name
    )


def _conv(
    features: int,
    kernel: int,
    dtype: Any,
    precision: Any,
    name: str,
    *,
    stride: int = 1,
    padding: Any = None,
) -> nn.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2  # torch's padding=k//2 for odd kernels
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        precision=precision,
        name=name,
    )


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv3x3 twice, plus a 1x1 ``nin_shortcut`` when the width changes."""

    features: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.swish(_group_norm(self.dtype, "norm1")(x))
        h = _conv(self.features, 3, self.dtype, self.precision, "conv1")(h)
        h = nn.swish(_group_norm(self.dtype, "norm2")(h))
        h = _conv(self.features, 3, self.dtype, self.precision, "conv2")(h)
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.dtype, self.precision, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of one image (1x1-conv q, k, v, proj_out)."""

    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = _group_norm(self.dtype, "norm")(x)
        q, k, v = (
            _conv(c, 1, self.dtype, self.precision, n)(h).reshape(b, hgt * wid, c)
            for n in ("q", "k", "v")
        )
        logits = jnp.einsum(
            "bqc,bkc->bqk", q, k, precision=self.precision, preferred_element_type=jnp.float32
        ) * (c**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v, precision=self.precision)
        out = _conv(c, 1, self.dtype, self.precision, "proj_out")(out.reshape(b, hgt, wid, c))
        return x + out


class Downsample(nn.Module):
    """Halves H and W: zero-pad right/bottom by one, then a VALID 3x3 stride-2 conv (LDM)."""

    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, self.dtype, self.precision, "conv", stride=2, padding="VALID")(
            x
        )


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour repeat, then a 3x3 conv."""

    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, self.dtype, self.precision, "conv")(x)


class Level(nn.Module):
    """One resolution of the encoder (``down.i``) or decoder (``up.i``): res blocks, each
    followed by attention when ``attention``, then an optional resampling layer."""

    features: int
    num_blocks: int
    attention: bool
    resample: str | None  # None, 'down' or 'up'
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, precision=self.precision)
        for j in range(self.num_blocks):
            x = ResnetBlock(self.features, name=f"block_{j}", **kw)(x)
            if self.attention:
                x = AttnBlock(name=f"attn_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample(name="downsample", **kw)(x)
        elif self.resample == "up":
            x = Upsample(name="upsample", **kw)(x)
        return x


class MidBlock(nn.Module):
    """Res block, attention, res block at the lowest resolution (``mid``)."""

    features: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, precision=self.precision)
        x = ResnetBlock(self.features, name="block_1", **kw)(x)
        x = AttnBlock(name="attn_1", **kw)(x)
        return ResnetBlock(self.features, name="block_2", **kw)(x)


class Encoder(nn.Module):
    """(B, H, W, 3) images -> (B, H/f, W/f, 2 * z_channels), f = 2 ** (len(ch_mult) - 1)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    z_channels: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, precision=self.precision)
        x = _conv(self.ch, 3, self.dtype, self.precision, "conv_in")(x)
        last = len(self.ch_mult) - 1
        for i, mult in enumerate(self.ch_mult):
            # Attention placement follows the nominal resolution, as in LDM, not the input size.
            nominal = self.resolution // 2**i
            x = Level(
                self.ch * mult,
                self.num_res_blocks,
                nominal in self.attn_resolutions,
                None if i == last else "down",
                name=f"down_{i}",
                **kw,
            )(x)
        x = MidBlock(x.shape[-1], name="mid", **kw)(x)
        x = nn.swish(_group_norm(self.dtype, "norm_out")(x))
        return _conv(2 * self.z_channels, 3, self.dtype, self.precision, "conv_out")(x)


class Decoder(nn.Module):
    """(B, h, w, z_channels) -> (B, h*f, w*f, 3) images (unclipped). MAR's decoder has no
    attention outside its mid block, and each level has ``num_res_blocks + 1`` res blocks."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, precision=self.precision)
        x = _conv(self.ch * self.ch_mult[-1], 3, self.dtype, self.precision, "conv_in")(z)
        x = MidBlock(x.shape[-1], name="mid", **kw)(x)
        for i in reversed(range(len(self.ch_mult))):
            x = Level(
                self.ch * self.ch_mult[i],
                self.num_res_blocks + 1,
                False,
                None if i == 0 else "up",
                name=f"up_{i}",
                **kw,
            )(x)
        x = nn.swish(_group_norm(self.dtype, "norm_out")(x))
        return _conv(IMAGE_CHANNELS, 3, self.dtype, self.precision, "conv_out")(x)


class VAE(nn.Module):
    """The KL-16 autoencoder. Parameters are float32; ``dtype`` is the compute dtype.

    Attributes:
      ch: base width (128 released; must be a multiple of 32 for GroupNorm(32)).
      ch_mult: width multipliers per resolution; len - 1 halvings of H and W.
      num_res_blocks: res blocks per encoder level (the decoder uses one more).
      attn_resolutions: nominal resolutions (``resolution / 2**level``) of encoder levels with
        attention after each res block.
      resolution: nominal input size used only to place attention (LDM's convention).
      z_channels: latent channels out of the encoder (moments have twice as many).
      embed_dim: latent channels after ``quant_conv`` (the latents xAR models).
      dtype: compute dtype (float32 or bfloat16).
      precision: ``jax.lax.Precision`` for convs and attention matmuls (None: backend default;
        use 'highest' on TPU/GPU for float32 parity with PyTorch).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    z_channels: int = 16
    embed_dim: int = 16
    dtype: Any = jnp.float32
    precision: Any = None

    def __post_init__(self):
        # Lists (e.g. from JSON or a config file) would make the module unhashable for jit.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        widths = {self.ch * m for m in self.ch_mult}
        if any(w % NORM_GROUPS for w in widths) or self.z_channels <= 0 or self.embed_dim <= 0:
            raise ValueError(
                f"VAE widths ch * ch_mult = {sorted(widths)} must all be multiples of "
                f"{NORM_GROUPS} (GroupNorm groups), and z_channels/embed_dim positive; got "
                f"ch={self.ch}, ch_mult={self.ch_mult}, z_channels={self.z_channels}, "
                f"embed_dim={self.embed_dim}."
            )
        super().__post_init__()

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent position along H and W (16 for KL-16)."""
        return 2 ** (len(self.ch_mult) - 1)

    def setup(self):
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.encoder = Encoder(
            self.ch,
            self.ch_mult,
            self.num_res_blocks,
            self.attn_resolutions,
            self.resolution,
            self.z_channels,
            **kw,
        )
        self.decoder = Decoder(self.ch, self.ch_mult, self.num_res_blocks, **kw)
        self.quant_conv = _conv(2 * self.embed_dim, 1, self.dtype, self.precision, "quant_conv")
        self.post_quant_conv = _conv(
            self.z_channels, 1, self.dtype, self.precision, "post_quant_conv"
        )

    def encode(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) images in [-1, 1] -> (B, H/16, W/16, 2 * embed_dim) float32 moments
        ``[mean, logvar]`` (logvar not clamped)."""
        x = jnp.asarray(images, self.dtype)
        return self.quant_conv(self.encoder(x)).astype(jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, h, w, embed_dim) *unscaled* latents -> (B, 16h, 16w, 3) float32 images, unclipped."""
        z = self.post_quant_conv(jnp.asarray(latents, self.dtype))
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mode; touches every parameter (used by init)."""
        mean, _ = jnp.split(self.encode(images), 2, axis=-1)
        return self.decode(mean)

    def arch_config(self) -> dict[str, Any]:
        """The architecture fields as a JSON-friendly dict (no dtype/precision)."""
        config = {f: getattr(self, f) for f in _ARCH_FIELDS}
        return {f: list(v) if isinstance(v, tuple) else v for f, v in config.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> VAE:
        """Builds a VAE from ``arch_config()`` output (unknown keys fail)."""
        unknown = sorted(set(config) - set(_ARCH_FIELDS))
        if unknown:
            raise ValueError(f"Unknown VAE config keys {unknown}; allowed: {list(_ARCH_FIELDS)}.")
        return cls(**config, **overrides)


def abstract_params(model: VAE) -> Any:
    """The params pytree of ``model`` as ``jax.ShapeDtypeStruct`` leaves (no FLOPs, no memory)."""
    size = model.downsample_factor  # conv shapes do not depend on the spatial size
    images = jax.ShapeDtypeStruct((1, size, size, IMAGE_CHANNELS), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def init_params(model: VAE, key: jax.Array) -> Any:
    """Random params (PyTorch-free tests and training from scratch); real ones come from
    ``xar_jax.convert.vae``."""
    size = model.downsample_factor
    return model.init(key, jnp.zeros((1, size, size, IMAGE_CHANNELS), jnp.float32))["params"]


# ---------------------------------------------------------------------------------------------
# Posterior and latent scaling.


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, exp(logvar)), logvar already clamped.

    Both fields are (B, h, w, embed_dim) float32.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Splits (..., 2 * C) moments ``[mean, logvar]`` on the last axis and clamps logvar."""
        if moments.shape[-1] % 2:
            raise ValueError(
                f"moments must have an even last axis [mean, logvar]; got shape {moments.shape}."
            )
        mean, logvar = jnp.split(jnp.asarray(moments, jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * n`` with n ~ N(0, I) drawn from ``key`` (unscaled latents)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


def sample_latents(moments: jax.Array, key: jax.Array, scale: float = LATENT_SCALE) -> jax.Array:
    """Training latents: ``(mean + exp(0.5 * clamp(logvar)) * n) * scale``.

    Args:
      moments: (B, h, w, 2 * C) raw moments from ``encode`` (or a latent cache).
      key: PRNG key; draw a fresh one every time an example is used.
      scale: latent scale (MAR's 0.2325).

    Returns:
      (B, h, w, C) float32 scaled latents.
    """
    return DiagonalGaussian.from_moments(moments).sample(key) * scale


def latents_mode(moments: jax.Array, scale: float = LATENT_SCALE) -> jax.Array:
    """Deterministic latents ``mean * scale``: (B, h, w, 2 * C) -> (B, h, w, C) float32."""
    return DiagonalGaussian.from_moments(moments).mode() * scale


# ---------------------------------------------------------------------------------------------
# Jitted entry points. Shapes are checked eagerly so that mistakes (NCHW, uint8 pixels, wrong
# sizes) fail with a clear message before tracing or compiling anything.


def _check_model_and_params(model: Any, params: Any) -> None:
    if not isinstance(model, VAE):
        raise TypeError(f"model must be a xar_jax.vae.VAE, got {type(model).__name__}.")
    if isinstance(params, Mapping) and set(params) == {"params"}:
        raise ValueError("params must be the inner params tree: pass variables['params'].")


def _check_images(images: Any, model: VAE) -> None:
    f = model.downsample_factor
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[-1] != IMAGE_CHANNELS or shape[1] % f or shape[2] % f:
        raise ValueError(
            f"images must be NHWC (B, H, W, {IMAGE_CHANNELS}) with H and W multiples of {f}; "
            f"got shape {shape}."
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images must be floating point in [-1, 1]; got dtype {images.dtype} "
            "(for uint8 pixels use images / 127.5 - 1)."
        )


def _check_latents(latents: Any, model: VAE) -> None:
    shape = tuple(getattr(latents, "shape", ()))
    if len(shape) != 4 or shape[-1] != model.embed_dim:
        raise ValueError(f"latents must be NHWC (B, h, w, {model.embed_dim}); got shape {shape}.")


@functools.partial(jax.jit, static_argnames=("model",))
def _encode_jit(params: Any, images: jax.Array, model: VAE) -> jax.Array:
    return model.apply({"params": params}, images, method=VAE.encode)


# ``scale`` and ``clip`` are traced, so changing them never recompiles the decoder.
@functools.partial(jax.jit, static_argnames=("model",))
def _decode_jit(
    params: Any, latents: jax.Array, scale: jax.Array, clip: jax.Array, model: VAE
) -> jax.Array:
    images = model.apply(
        {"params": params}, jnp.asarray(latents, jnp.float32) / scale, method=VAE.decode
    )
    return jnp.where(clip, jnp.clip(images, -1.0, 1.0), images)


def encode(params: Any, images: jax.Array, *, model: VAE) -> jax.Array:
    """Encodes images to raw posterior moments (jitted; one compile per model and shape).

    Args:
      params: the VAE params pytree (without the outer ``{'params': ...}``).
      images: (B, H, W, 3) floats in [-1, 1], H and W multiples of 16.
      model: the ``VAE`` module (static; its ``dtype`` is the compute dtype).

    Returns:
      (B, H/16, W/16, 2 * embed_dim) float32 moments ``[mean, logvar]``, logvar *not* clamped
      (``sample_latents``/``latents_mode`` clamp it).
    """
    _check_model_and_params(model, params)
    _check_images(images, model)
    return _encode_jit(params, images, model)


def decode(
    params: Any, latents: jax.Array, *, model: VAE, scale: float = LATENT_SCALE, clip: bool = True
) -> jax.Array:
    """Decodes scaled latents to images (jitted; one compile per model and latent shape).

    Args:
      params: the VAE params pytree (without the outer ``{'params': ...}``).
      latents: (B, h, w, embed_dim) latents *times* ``scale`` (what xAR generates).
      model: the ``VAE`` module (static).
      scale: the latent scale to divide by (MAR's 0.2325; 1.0 for unscaled latents).
      clip: clip the images to [-1, 1] (turn off only to inspect the raw decoder output).

    Returns:
      (B, 16h, 16w, 3) float32 images.
    """
    _check_model_and_params(model, params)
    _check_latents(latents, model)
    if isinstance(scale, (int, float)) and not scale > 0:
        raise ValueError(
            f"scale must be positive (MAR's latent scale is {LATENT_SCALE}); got {scale}."
        )
    return _decode_jit(
        params, latents, jnp.asarray(scale, jnp.float32), jnp.asarray(clip, bool), model
    )
