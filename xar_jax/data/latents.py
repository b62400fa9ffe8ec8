"""Drawing the training latent from cached VAE moments, on device (JAX) or on the host (NumPy).

Moments are the KL-16 VAE's posterior parameters, channels-last ``(..., h, w, 2*C)`` laid out as
``[mean (C), logvar (C)]``. The latent used for training is
``z = (mean + exp(0.5 * clip(logvar, -30, 20)) * n) * LATENT_SCALE`` with ``n ~ N(0, I)`` drawn anew
every time an example is used (XAR_REFERENCE.md, "Data and latents").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# MAR's KL-16 latent scale factor, applied to the sampled latent (decoding divides by it).
LATENT_SCALE = 0.2325
# The posterior clamps logvar to this range before use.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _split_moments(moments):
    channels = moments.shape[-1]
    if channels % 2:
        raise ValueError(
            f"moments must have an even channel count [mean, logvar]; got shape {moments.shape}."
        )
    return moments[..., : channels // 2], moments[..., channels // 2 :]


def sample_latents(moments: jax.Array, key: jax.Array, scale: float = LATENT_SCALE) -> jax.Array:
    """Samples scaled latents on device (jit-able).

    Args:
      moments: ``(B, h, w, 2*C)`` float ``[mean, logvar]``.
      key: PRNG key; one normal draw per latent element.
      scale: latent scale factor (0.2325 for MAR's KL-16).

    Returns:
      ``(B, h, w, C)`` float32 latents.
    """
    mean, logvar = _split_moments(moments.astype(jnp.float32))
    std = jnp.exp(0.5 * jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean + std * noise) * scale


def sample_latents_host(
    moments: np.ndarray, rng: np.random.Generator, scale: float = LATENT_SCALE
) -> np.ndarray:
    """NumPy twin of :func:`sample_latents` for input workers: ``(..., 2*C) -> (..., C)``."""
    mean, logvar = _split_moments(np.asarray(moments, np.float32))
    std = np.exp(np.float32(0.5) * np.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))
    noise = rng.standard_normal(mean.shape, dtype=np.float32)
    return ((mean + std * noise) * np.float32(scale)).astype(np.float32)
