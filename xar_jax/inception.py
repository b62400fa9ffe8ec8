"""InceptionV3 as used for FID / Inception Score: torch-fidelity's ``inception-v3-compat`` in Flax.

This is the network behind the authors' evaluation (torch-fidelity, which reproduces the TensorFlow
graph of the original FID code, ``pool_3`` and the 1008-way ``logits``). It differs from a stock
InceptionV3 in four places, all reproduced here:

* input: uint8 images are resized to 299x299 with TensorFlow 1.x ``resize_bilinear`` semantics
  (``align_corners=False``, *no* half-pixel centres: source coordinate = ``dst_index * in / out``),
  then mapped ``x -> (x - 128) / 128``;
* the average pools inside the A, C and first E blocks exclude the zero padding from the mean;
* the last E block (``Mixed_7c``) pools with a 3x3 *max* pool;
* the classifier has 1008 outputs; the Inception Score uses the logits without the bias
  (``logits_unbiased``).

Everything is NHWC inside. Convolutions and the classifier run at ``Precision.HIGHEST`` by default:
TPUs (bf16 passes) and recent GPUs (TF32) would otherwise compute a visibly different FID.

Parameter tree (mirrors the PyTorch names, see ``xar_jax.convert.inception``):
``params[block][...]['conv']['kernel']`` (HWIO); ``params[block][...]['bn']`` with ``scale``,
``bias``, ``mean``, ``var`` (frozen batch norm, eps 1e-3); ``params['fc']`` with ``kernel``
(2048, 1008) and ``bias``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3
DATA_FORMATS = ("NHWC", "NCHW")

Padding = tuple[tuple[int, int], tuple[int, int]]


def _pad(ph: int, pw: int) -> Padding:
    return ((ph, ph), (pw, pw))


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics: ``(x - mean) / sqrt(var + eps) * scale + bias``."""

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class BasicConv(nn.Module):
    """Convolution without bias, frozen batch norm, ReLU (torch-fidelity's ``BasicConv2d``)."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: Padding = ((0, 0), (0, 0))
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.stride,
            padding=self.padding,
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3_excluding_padding(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool divides by the number of real (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(
            _avg_pool_3x3_excluding_padding(x)
        )
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction block."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        row, col = _pad(0, 3), _pad(3, 0)  # padding of a (1, 7) and of a (7, 1) kernel
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=row, name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=col, name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=col, name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=row, name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=col, name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=row, name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_excluding_padding(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction block."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches; ``max_pool``: the FID graph's last-block quirk."""

    max_pool: bool
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        row, col = _pad(0, 1), _pad(1, 0)  # padding of a (1, 3) and of a (3, 1) kernel
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=row, name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=col, name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=row, name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=col, name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))
        else:
            pooled = _avg_pool_3x3_excluding_padding(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class UnbiasedClassifier(nn.Module):
    """The 1008-way classifier; holds ``kernel`` and ``bias`` but returns ``x @ kernel`` only.

    torch-fidelity's Inception Score uses the logits without the bias; the bias is kept as a
    parameter so that a converted checkpoint is the complete released network.
    """

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
        self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
        return jnp.dot(x, kernel, precision=self.precision)


class InceptionV3(nn.Module):
    """torch-fidelity's ``inception-v3-compat`` on already resized and normalised inputs.

    Call: ``(B, 299, 299, 3)`` float32 in [-1, 1) (see `preprocess`) ->
    ``(pool3 (B, 2048), logits_unbiased (B, 1008))``.
    """

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        conv = functools.partial(BasicConv, precision=self.precision)
        block = dict(precision=self.precision)
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)  # 149x149
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147x147
        x = conv(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)  # 73x73
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71x71
        x = _max_pool_3x3_stride2(x)  # 35x35
        x = InceptionA(32, name="Mixed_5b", **block)(x)
        x = InceptionA(64, name="Mixed_5c", **block)(x)
        x = InceptionA(64, name="Mixed_5d", **block)(x)
        x = InceptionB(name="Mixed_6a", **block)(x)  # 17x17
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(c7, name=name, **block)(x)
        x = InceptionD(name="Mixed_7a", **block)(x)  # 8x8
        x = InceptionE(max_pool=False, name="Mixed_7b", **block)(x)
        x = InceptionE(max_pool=True, name="Mixed_7c", **block)(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        return pool3, UnbiasedClassifier(precision=self.precision, name="fc")(pool3)


# ----------------------------------------------------------------------------------------------
# Input: TensorFlow-1 bilinear resize and normalisation.


def _tf1_resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (low, high) and the fraction for TF1 ``resize_bilinear(align_corners=False)``.

    TF1 maps output index i to source coordinate ``i * (in / out)`` (no half-pixel offset), computed
    in float32 as torch-fidelity does, truncates it for the low neighbour and clamps the high one.
    """
    scale = np.float32(in_size / out_size)
    coord = np.arange(out_size, dtype=np.float32) * scale
    low = coord.astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    frac = coord - low.astype(np.float32)
    return low, high, frac


def tf1_resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes ``(B, H, W, C)`` float images like TF1 ``tf.image.resize_bilinear``.

    ``align_corners=False`` and ``half_pixel_centers=False`` (the TF1 default): an output pixel
    (i, j) samples the input at ``(i * H / out_h, j * W / out_w)``. This is not ``jax.image.resize``
    (half-pixel centres, and antialiasing when shrinking).

    Args:
      images: ``(B, H, W, C)`` floating point.
      size: ``(out_h, out_w)``.

    Returns:
      ``(B, out_h, out_w, C)`` in the input dtype.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}.")
    _, h, w, _ = images.shape
    y0, y1, fy = _tf1_resize_weights(h, size[0])
    x0, x1, fx = _tf1_resize_weights(w, size[1])
    fx = jnp.asarray(fx, images.dtype)[None, None, :, None]
    fy = jnp.asarray(fy, images.dtype)[None, :, None, None]
    top, bottom = images[:, y0], images[:, y1]
    top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * fx
    bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * fx
    return top + (bottom - top) * fy


def check_images(images: Any, data_format: str) -> None:
    """Raises a ValueError unless ``images`` is a uint8 batch of RGB images in ``data_format``."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}.")
    shape = tuple(images.shape)
    channel_axis = 3 if data_format == "NHWC" else 1
    if len(shape) != 4 or shape[channel_axis] != 3:
        expected = "(B, H, W, 3)" if data_format == "NHWC" else "(B, 3, H, W)"
        raise ValueError(
            f"images must be an {data_format} batch of RGB images {expected}, got shape {shape}."
        )
    if images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 in [0, 255] (the FID reference statistics were computed from "
            f"uint8), got dtype {images.dtype}. Convert floats in [-1, 1] with "
            "xar_jax.evaluation.sample_writer.to_uint8."
        )


def preprocess(images_uint8: jax.Array, data_format: str = "NHWC") -> jax.Array:
    """uint8 images of any size -> ``(B, 299, 299, 3)`` float32 network input in [-1, 1).

    Args:
      images_uint8: ``(B, H, W, 3)`` (NHWC) or ``(B, 3, H, W)`` (NCHW) uint8.
      data_format: 'NHWC' or 'NCHW'.
    """
    check_images(images_uint8, data_format)
    x = images_uint8.astype(jnp.float32)
    if data_format == "NCHW":
        x = jnp.transpose(x, (0, 2, 3, 1))
    x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) / 128.0


@functools.partial(jax.jit, static_argnames=("data_format", "precision"))
def inception_features(
    params: Any,
    images_uint8: jax.Array,
    data_format: str = "NHWC",
    precision: Any = jax.lax.Precision.HIGHEST,
) -> tuple[jax.Array, jax.Array]:
    """FID and IS features of a batch of uint8 images (jitted).

    The batch may be sharded over devices along its first axis; the computation is per image, so
    the outputs come out sharded the same way.

    Args:
      params: the Inception parameter tree (`xar_jax.convert.inception`).
      images_uint8: ``(B, H, W, 3)`` or ``(B, 3, H, W)`` uint8, any H and W (resized to 299).
      data_format: 'NHWC' (default) or 'NCHW'.
      precision: matmul/conv precision; keep HIGHEST to reproduce published numbers.

    Returns:
      ``pool3`` ``(B, 2048)`` float32 (FID features) and ``logits_unbiased`` ``(B, 1008)`` float32
      (Inception Score features).
    """
    x = preprocess(images_uint8, data_format)
    return InceptionV3(precision=precision).apply({"params": params}, x)


def init_params(key: jax.Array | None = None) -> Any:
    """Randomly initialised parameters with the right tree structure (for shapes and tests)."""
    key = jax.random.key(0) if key is None else key
    dummy = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return InceptionV3().init(key, dummy)["params"]


def abstract_params() -> Any:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return jax.eval_shape(init_params)


def param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path: shape}`` of every parameter, path as a tuple of tree keys."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params())[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
