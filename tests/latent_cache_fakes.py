"""Stand-ins for the latent cache's tests: a deterministic fake VAE encoder (also loadable by the
cache CLI as ``--encoder=latent_cache_fakes:fake_encoder_factory``) and the data configs of the
digits 'heldout' split cached with it."""

import os

import numpy as np

from xar_jax.data import config as config_lib

SHARD_SIZE, BATCH = 100, 32  # digits 'heldout' (360 images): shards of 100, 100, 100, 60


def fake_encode(images):
    """Deterministic stand-in for the VAE encoder: (b, 8, 8, 1) -> moments (b, 4, 4, 8)."""
    b, h, w, c = images.shape
    pooled = images.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))
    mean = np.concatenate([pooled, -pooled, 2 * pooled, pooled[:, ::-1]], -1)
    logvar = -1.0 - mean**2 + 0.5 * pooled  # varies with the image and with its mirror
    return np.concatenate([mean, logvar], -1).astype(np.float32)


def fake_encoder_factory(arg=None):
    """For the command line: 'exit_after=K' kills the process abruptly at the K-th encoder call."""
    exit_after = int(arg.split("=")[1]) if arg else None
    calls = [0]

    def encode(images):
        calls[0] += 1
        if exit_after is not None and calls[0] == exit_after:
            os._exit(17)  # like a preempted host: no cleanup, no flush, writer left open
        return fake_encode(images)

    return encode


def digits_cfg():
    cfg = config_lib.get_data_config("digits")
    cfg.split = "heldout"
    return cfg


def latents_cfg(cache_dir, **overrides):
    cfg = config_lib.get_data_config("latents")
    cfg.update(
        dict(dict(cache_dir=str(cache_dir), split="heldout", eval_split="heldout"), **overrides)
    )
    return cfg
