"""A stand-in encoder for latent caches made to time the trainer (no VAE weights needed).

  python -m xar_jax.data.latent_cache --source=digits --split=train --out_dir=DIR \\
      --encoder=benchmarks.synthetic_latents:encoder --image_size=16

writes a cache in the trainer's format (ArrayRecord shards of KL-16-shaped moments, 16x16x32,
with the digits' labels) that ``--config.data.cache_dir=DIR`` of configs/xar_*.py reads like a
real one. The moments are pseudo-random (seeded by the images): speed does not depend on them.
"""

from __future__ import annotations

import numpy as np

GRID, CHANNELS = 16, 16  # KL-16 on 256x256 images: a 16x16 grid of 16 channels.


def encoder(arg: str | None = None):
    """``images (b, S, S, C) -> moments (b, 16, 16, 32)`` float32: mean ~ N(0, 1), logvar -4."""
    del arg

    def encode(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        seed = int(np.abs(images).sum() * 1000) % 2**32
        rng = np.random.default_rng(seed)
        b = images.shape[0]
        mean = rng.standard_normal((b, GRID, GRID, CHANNELS), dtype=np.float32)
        logvar = np.full((b, GRID, GRID, CHANNELS), -4.0, np.float32)
        return np.concatenate([mean, logvar], axis=-1)

    return encode
