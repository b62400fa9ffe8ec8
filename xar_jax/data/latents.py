"""Drawing the training latent from cached VAE moments, on device (JAX) or on the host (NumPy).

Moments are the KL-16 VAE's posterior parameters, channels-last ``(..., h, w, 2*C)`` laid out as
``[mean (C), logvar (C)]``. The latent used for training is
``z = (mean + exp(0.5 * clip(logvar, -30, 20)) * n) * LATENT_SCALE`` with ``n ~ N(0, I)`` drawn anew
every time an example is used (as the authors' release does; arXiv 2502.20388).
"""

from __future__ import annotations

import numpy as np

# The on-device draw is the VAE posterior's own (one definition of the scale, the logvar clamp
# and the formula); this module adds the host (NumPy) twin used by the input pipeline.
from xar_jax.vae import LATENT_SCALE, LOGVAR_MAX, LOGVAR_MIN, sample_latents  # noqa: F401


def _split_moments(moments):
    channels = moments.shape[-1]
    if channels % 2:
        raise ValueError(
            f"moments must have an even channel count [mean, logvar]; got shape {moments.shape}."
        )
    return moments[..., : channels // 2], moments[..., channels // 2 :]


def sample_latents_host(
    moments: np.ndarray, rng: np.random.Generator, scale: float = LATENT_SCALE
) -> np.ndarray:
    """NumPy twin of :func:`sample_latents` for input workers: ``(..., 2*C) -> (..., C)``."""
    mean, logvar = _split_moments(np.asarray(moments, np.float32))
    std = np.exp(np.float32(0.5) * np.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))
    noise = rng.standard_normal(mean.shape, dtype=np.float32)
    return ((mean + std * noise) * np.float32(scale)).astype(np.float32)
