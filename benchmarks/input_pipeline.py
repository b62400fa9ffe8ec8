"""Input-pipeline throughput: cached VAE latents vs raw ImageNet-like JPEGs, real pipeline.

Prints a table of examples/s for one host. Both paths run ``make_train_iterator`` exactly as
training does (global shuffle, flip, per-process sharding, batching, threads / worker processes):

- cached latents: a cache of synthetic moments at the ImageNet-256 latent shape (16 x 16 x 32
  float32, 64 KiB per record with its mirror) written by ``cache_latents``; read with
  ``latent_sampling='device'`` (what training uses) and ``'host'``;
- raw images: synthetic 500 x 375 JPEGs (ImageNet's typical size, quality 90) decoded with PIL and
  ADM-cropped to 256 x 256 -- the same code as the TFDS path, minus TFDS's ArrayRecord read.

Usage: python -m benchmarks.input_pipeline [--latent_records 4096] [--batches 30]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image


def _fake_encoder(images: np.ndarray) -> np.ndarray:
    # Moments of the real latent shape; content varies per image so records differ.
    rng = np.random.default_rng(int(images[:, 0, 0, 0].sum() * 1e3) % 2**32)
    return rng.standard_normal((images.shape[0], 16, 16, 32), dtype=np.float32)


class _TinyImages:
    """Cheap stand-in images for the caching run (the benchmark measures reading, not encoding)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {
            "images": np.full((8, 8, 1), (i % 997) / 997, np.float32),
            "labels": np.int32(i % 1000),
        }


def _jpeg_records(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:375, :500]
    records = []
    for i in range(min(n, 64)):  # 64 distinct files, repeated: decoding cost is what matters
        pixels = np.stack([(x + 3 * i) % 256, (y * 2 + i) % 256, (x * y // 97) % 256], -1)
        pixels = np.clip(pixels + rng.integers(-30, 30, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        records.append({"image": buffer.getvalue(), "label": i})
    return [records[i % len(records)] for i in range(n)]


def _throughput(make_iterator, batch_size: int, batches: int, warmup: int = 3) -> float:
    it = make_iterator()
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batch_size * batches / (time.perf_counter() - start)
    if hasattr(it, "close"):
        it.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latent_records", type=int, default=4096)
    parser.add_argument("--jpeg_records", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()

    from xar_jax.data import config as config_lib
    from xar_jax.data import latent_cache, pipeline

    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        image_cfg = config_lib.get_data_config("digits")
        start = time.perf_counter()
        latent_cache.cache_latents(
            image_cfg,
            _fake_encoder,
            cache_dir,
            batch_size=256,
            shard_size=1024,
            process_index=0,
            process_count=1,
            records=_TinyImages(args.latent_records),
        )
        write_rate = args.latent_records / (time.perf_counter() - start)
        rows.append(("latents: write cache (fake encoder)", "-", "-", write_rate))
        batch = 256
        for sampling, workers, threads in [
            ("device", 0, 1),
            ("device", 0, 2),
            ("device", 0, 4),
            ("device", 2, 1),
            ("host", 0, 1),
            ("host", 2, 1),
        ]:
            cfg = config_lib.get_data_config("latents")
            cfg.update(
                dict(
                    cache_dir=cache_dir,
                    latent_sampling=sampling,
                    num_workers=workers,
                    read_threads=threads,
                    prefetch_buffer=max(4, threads),
                )
            )
            rate = _throughput(
                lambda cfg=cfg: pipeline.make_train_iterator(
                    cfg, global_batch_size=batch, process_index=0, process_count=1
                ),
                batch,
                args.batches,
            )
            rows.append((f"latents: read, latent_sampling={sampling}", workers, threads, rate))

    records = _jpeg_records(args.jpeg_records)
    batch = 32
    for workers, threads in [(0, 1), (0, 2), (2, 1)]:
        cfg = config_lib.get_data_config("imagenet")
        cfg.update(dict(num_workers=workers, read_threads=threads, prefetch_buffer=max(2, threads)))
        rate = _throughput(
            lambda cfg=cfg: pipeline.make_train_iterator(
                cfg, global_batch_size=batch, process_index=0, process_count=1, records=records
            ),
            batch,
            max(4, args.batches // 4),
            warmup=1,
        )
        rows.append(("raw JPEG 500x375 -> ADM crop 256", workers, threads, rate))

    cores = os.cpu_count()
    print(
        f"\nInput pipeline throughput on {platform.node()} ({cores} CPU cores, "
        f"{platform.processor() or platform.machine()}), {time.strftime('%Y-%m-%d')}\n"
    )
    print(f"| {'path':44s} | {'num_workers':>11s} | {'read_threads':>12s} | {'examples/s':>10s} |")
    print(f"|{'-' * 46}|{'-' * 13}|{'-' * 14}|{'-' * 12}|")
    for name, workers, threads, rate in rows:
        print(f"| {name:44s} | {workers!s:>11s} | {threads!s:>12s} | {rate:10,.0f} |")
    need = 8 * 1800
    best = max(rate for name, *_, rate in rows if "sampling=device" in name)
    print(
        f"\nNeed per 8-chip host: 8 x 1,800 img/s (xAR-B training on one H200; a v5p chip is "
        "in the "
        f"same range) = {need:,} examples/s.\nBest cached-latent rate here: {best:,.0f} examples/s "
        f"({best / need:.2f}x the need)."
    )


if __name__ == "__main__":
    main()
