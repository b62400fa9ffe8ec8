"""A latent cache in the trainer's format, of synthetic examples, to time the trainer on.

  python -m benchmarks.synthetic_latents --out_dir=DIR [--num_examples=2048]

writes ``DIR/train/`` through `xar_jax.data.latent_cache.cache_latents` (ArrayRecord shards of
KL-16-shaped moments, 16x16x32 float32, labels 0..999), which ``--config.data.cache_dir=DIR`` of
configs/xar_*.py reads like a real cache. The images and moments are pseudo-random (no dataset
and no VAE weights needed): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from xar_jax.data import config as config_lib
from xar_jax.data import latent_cache

GRID, CHANNELS, CLASSES = 16, 16, 1000  # KL-16 on 256x256 ImageNet: a 16x16 grid, 16 channels.


class SyntheticImages:
    """``[i] -> {'images': (8, 8, 1) float32 in [-1, 1], 'labels': i % 1000}``, as the digits."""

    def __init__(self, num_examples: int):
        self.num_examples = num_examples

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(index)
        image = rng.uniform(-1.0, 1.0, (8, 8, 1)).astype(np.float32)
        return {"images": image, "labels": np.int32(index % CLASSES)}


def encode(images: np.ndarray) -> np.ndarray:
    """``images (b, ...) -> moments (b, 16, 16, 32)``: mean ~ N(0, 1) seeded by the images,
    logvar -4."""
    images = np.asarray(images, np.float32)
    rng = np.random.default_rng(int(np.abs(images).sum() * 1000) % 2**32)
    b = images.shape[0]
    mean = rng.standard_normal((b, GRID, GRID, CHANNELS), dtype=np.float32)
    return np.concatenate([mean, np.full_like(mean, -4.0)], axis=-1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--num_examples", type=int, default=2048)
    parser.add_argument("--shard_size", type=int, default=1024)
    args = parser.parse_args(argv)
    data_cfg = config_lib.get_data_config("digits")  # Decoded as the digits: no image decoder.
    data_cfg.split = "train"
    summary = latent_cache.cache_latents(
        data_cfg,
        encode,
        args.out_dir,
        batch_size=256,
        shard_size=args.shard_size,
        records=SyntheticImages(args.num_examples),
    )
    print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in summary.items()}))
    return summary


if __name__ == "__main__":
    main()
