"""Reference statistics (``mu``, ``sigma`` of Inception pool3) of an image set, for FID.

Command line::

    # from ADM-style samples or a reference batch (.npz with arr_0), or a directory of images
    python -m xar_jax.evaluation.reference_stats --images DIR_or_NPZ --inception DIR --out stats.npz
    # from a TFDS split (ArrayRecord, read without TensorFlow), ADM-center-cropped to 256
    python -m xar_jax.evaluation.reference_stats --tfds_name imagenet2012 --split train \
        --data_dir ~/tensorflow_datasets --inception DIR --out imagenet256_train_stats.npz

For ImageNet 256 the published numbers use ADM's statistics (the authors ship them as
``fid_stats/adm_in256_stats.npz``); computing your own is for other datasets or for checking.
The output holds ``mu`` (2048,), ``sigma`` (2048, 2048) float64 and ``num_images``; it is written
atomically and never overwrites an existing file.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import numpy as np

from xar_jax.evaluation import evaluate, fid, image_sources


def compute_reference_stats(
    params: Any, source: image_sources.ImageSource, out: str, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Computes pool3 ``(mu, sigma)`` of ``source`` and writes them to ``out`` (process 0).

    ``kwargs`` go to `evaluate.inception_statistics` (batch_size, mesh, progress).
    """
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; remove it first or choose another --out.")
    stats, _ = evaluate.inception_statistics(params, source, keep_logits=False, **kwargs)
    mu, sigma = stats.mu, stats.sigma
    if jax.process_index() == 0:
        fid.save_reference_stats(out, mu, sigma, num_images=np.int64(stats.count))
    return mu, sigma


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="directory of images or .npz with arr_0 (N, H, W, 3)")
    parser.add_argument("--tfds_name", help="TFDS dataset name, e.g. imagenet2012")
    parser.add_argument("--split", help="TFDS split, e.g. train or validation")
    parser.add_argument("--data_dir", help="TFDS data_dir")
    parser.add_argument(
        "--center_crop", type=int, help="ADM center crop size (default 256 for TFDS, none for dirs)"
    )
    parser.add_argument("--inception", required=True, help="converted Inception dir or its .pth")
    parser.add_argument("--out", required=True, help="output statistics .npz")
    parser.add_argument("--batch_size", type=int, default=evaluate.DEFAULT_BATCH_SIZE)
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    args = parser.parse_args(argv)
    if (args.images is None) == (args.tfds_name is None):
        parser.error("give exactly one of --images or --tfds_name")
    if args.tfds_name is not None and args.split is None:
        parser.error("--tfds_name needs --split")
    if os.path.exists(args.out):
        parser.error(f"--out {args.out} already exists; it is never overwritten")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.distributed:
        jax.distributed.initialize()
    if args.tfds_name is not None:
        crop = 256 if args.center_crop is None else args.center_crop
        source = image_sources.TfdsImages(args.tfds_name, args.split, args.data_dir, crop)
    else:
        source = image_sources.open_images(args.images, args.center_crop)
    params = evaluate.load_inception(args.inception)
    compute_reference_stats(params, source, args.out, batch_size=args.batch_size)
    if jax.process_index() == 0:
        print(f"wrote {args.out} ({len(source)} images)")


if __name__ == "__main__":
    main(sys.argv[1:])
