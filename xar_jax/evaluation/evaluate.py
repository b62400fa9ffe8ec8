"""FID and Inception Score of an image set, streamed over all devices (and hosts).

Library::

    params = xar_jax.evaluation.evaluate.load_inception('inception_dir')
    metrics = evaluate_images(params, NpzImages('samples.npz'), 'adm_in256_stats.npz')
    # {'fid': ..., 'inception_score': ..., 'inception_score_std': ..., 'num_images': 50000}

Command line (prints the metrics as JSON, optionally writes them to ``--out``)::

    python -m xar_jax.evaluation.evaluate --images samples.npz \
        --reference adm_in256_stats.npz --inception INCEPTION_DIR

Each process reads a contiguous block of the images (`image_sources.iter_process_batches`); every
step, the processes' local batches form one global batch sharded over all devices, and the
features come back replicated, so every process accumulates the same float64 statistics (no
cross-host float64 reduction is needed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xar_jax import fileio, weights
from xar_jax.console import configure_logging, report_user_error
from xar_jax.convert import inception as inception_convert
from xar_jax.errors import CorruptInputError, MissingInputError, UserError, describe
from xar_jax.evaluation import fid as fid_lib
from xar_jax.evaluation import image_sources
from xar_jax.inception import NUM_LOGITS, POOL3_DIM, inception_features

DEFAULT_BATCH_SIZE = 200


def load_inception(path: str | os.PathLike) -> Any:
    """The FID Inception params: a converted directory (`weights.load_inception_params`), or
    torch-fidelity's ``.pth`` (or an ``.npz`` of it) read and converted on the fly.

    Raises:
      WeightsError: nothing at ``path``, or a directory that is not converted Inception weights.
    """
    path = os.fspath(path)
    if weights.is_converted(path):  # Local or gs://.
        return weights.load_inception_params(path)
    if os.path.isfile(path):
        try:
            return inception_convert.inception_from_torch(path)[1]
        except ImportError:
            raise
        except Exception as e:  # torch's and the converter's errors of a damaged file.
            raise CorruptInputError(
                f"{path} is not readable Inception weights ({describe(e, 160)}); download "
                f"{inception_convert.RELEASED_FILE_NAME} again (source: "
                f"{inception_convert.RELEASED_FILE_URL})."
            ) from None
    raise weights.WeightsError(
        f"Inception weights not found at {path}: pass a directory written by "
        f"`python -m xar_jax.convert inception` or torch-fidelity's "
        f"{inception_convert.RELEASED_FILE_NAME}."
    )


def default_mesh() -> Mesh:
    """A 1-D mesh over every device, axis ``'data'``."""
    return Mesh(np.asarray(jax.devices()), ("data",))


@functools.cache
def _replicated_features_step(mesh: Mesh) -> Callable[..., Any]:
    """The jitted step for ``mesh`` (cached, so every runner on a mesh shares one compilation)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        lambda params, images, valid: (*inception_features(params, images), valid),
        out_shardings=(replicated, replicated, replicated),
    )


class InceptionRunner:
    """Inception features of process-local uint8 batches, computed with the batch sharded on a mesh.

    Args:
      params: Inception parameters (host or device arrays).
      local_batch_size: images per process per step; a multiple of this process's device count.
      image_shape: ``(H, W, 3)`` of every image.
      mesh: the device mesh (default: all devices); the batch is split over all its axes.
    """

    def __init__(
        self,
        params: Any,
        local_batch_size: int,
        image_shape: tuple[int, int, int],
        mesh: Mesh | None = None,
    ):
        mesh = default_mesh() if mesh is None else mesh
        local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        if local_batch_size <= 0 or local_batch_size % local_devices:
            raise ValueError(
                f"batch_size (per process) must be a positive multiple of the {local_devices} "
                f"local devices, got {local_batch_size}."
            )
        self.local_batch_size = local_batch_size
        self.image_shape = tuple(image_shape)
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self._params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self._step = _replicated_features_step(mesh)

    def __call__(self, images: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Features of one step; every process must call it the same number of times.

        Args:
          images: this process's ``(n, H, W, 3)`` uint8 images, ``n <= local_batch_size``, or None
            when it has none left.

        Returns:
          ``pool3 (M, 2048)`` and ``logits_unbiased (M, 1008)`` of the real images of *all*
          processes in this step (process-major order), as NumPy float32.
        """
        padded = np.zeros((self.local_batch_size, *self.image_shape), np.uint8)
        valid = np.zeros((self.local_batch_size,), bool)
        if images is not None:
            if images.shape[1:] != self.image_shape or len(images) > self.local_batch_size:
                raise ValueError(
                    f"Expected at most {self.local_batch_size} images of shape {self.image_shape},"
                    f" got {images.shape}."
                )
            padded[: len(images)] = images
            valid[: len(images)] = True
        to_global = jax.make_array_from_process_local_data
        pool3, logits, valid_all = self._step(
            self._params,
            to_global(self._batch_sharding, padded),
            to_global(self._batch_sharding, valid),
        )
        valid_all = np.asarray(valid_all)
        return np.asarray(pool3)[valid_all], np.asarray(logits)[valid_all]


def _progress(iterable: Iterable[Any], total: int, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="inception", unit="batch")


def inception_statistics(
    params: Any,
    source: image_sources.ImageSource,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mesh: Mesh | None = None,
    keep_logits: bool = True,
    progress: bool = True,
) -> tuple[fid_lib.FeatureStatistics, np.ndarray | None]:
    """Streams ``source`` through Inception: pool3 statistics and (optionally) all logits.

    Args:
      params: Inception parameters.
      source: the images (every process opens the same source and reads its own block).
      batch_size: images per process per step (a multiple of the local device count).
      mesh: device mesh (default: all devices).
      keep_logits: also return ``logits_unbiased`` for the Inception Score (N x 1008 float32;
        200 MB for 50k images, unlike the images themselves, which are never all in memory).
      progress: progress bar on process 0.

    Returns:
      ``(statistics of pool3 over all N images, logits (N, 1008) or None)``; identical on every
      process.
    """
    if len(source) < 2:
        raise ValueError(f"Need at least 2 images for statistics, the source has {len(source)}.")
    image_shape = source.read(0, 1).shape[1:]
    runner = InceptionRunner(params, batch_size, image_shape, mesh)
    p, count = jax.process_index(), jax.process_count()
    batches = image_sources.iter_process_batches(source, batch_size, p, count)
    total = image_sources.num_process_batches(len(source), batch_size, count)
    stats = fid_lib.FeatureStatistics(POOL3_DIM)
    logits = []
    for images in _progress(batches, total, progress and p == 0):
        pool3, batch_logits = runner(images)
        stats.add(pool3)
        if keep_logits:
            logits.append(batch_logits)
    if stats.count != len(source):
        raise RuntimeError(f"Processed {stats.count} images, the source has {len(source)}.")
    all_logits = np.concatenate(logits) if keep_logits else None
    if all_logits is not None and all_logits.shape != (len(source), NUM_LOGITS):
        raise RuntimeError(f"Collected logits of shape {all_logits.shape}.")
    return stats, all_logits


def evaluate_images(
    params: Any,
    source: image_sources.ImageSource,
    reference: str | tuple[np.ndarray, np.ndarray],
    **kwargs: Any,
) -> dict[str, float]:
    """FID against ``reference`` (a stats ``.npz`` path or ``(mu, sigma)``) and Inception Score.

    ``kwargs`` go to `inception_statistics` (batch_size, mesh, progress).

    Returns:
      ``{'fid', 'inception_score', 'inception_score_std', 'num_images'}``.
    """
    if len(source) < fid_lib.ISC_SPLITS:
        raise ValueError(
            f"The Inception Score uses {fid_lib.ISC_SPLITS} splits; the source has only "
            f"{len(source)} images."
        )
    if isinstance(reference, (str, os.PathLike)):
        reference = fid_lib.load_reference_stats(reference)  # fail early, before the long pass
    mu_ref, sigma_ref = reference
    stats, logits = inception_statistics(params, source, keep_logits=True, **kwargs)
    isc_mean, isc_std = fid_lib.inception_score(logits)
    return {
        "fid": fid_lib.frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref),
        "inception_score": isc_mean,
        "inception_score_std": isc_std,
        "num_images": stats.count,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="samples .npz (arr_0) or image directory")
    parser.add_argument("--reference", required=True, help="reference statistics .npz (mu, sigma)")
    parser.add_argument("--inception", required=True, help="converted Inception dir or its .pth")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="per process")
    parser.add_argument("--out", help="also write the metrics to this JSON file")
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    args = parser.parse_args(argv)
    configure_logging()
    if args.distributed:
        jax.distributed.initialize()
    try:
        # Every input is opened and checked before the Inception pass.
        if not os.path.exists(args.images) and "://" not in args.images:
            raise MissingInputError(f"--images={args.images}: no such file or directory.")
        reference = fid_lib.load_reference_stats(args.reference)
        try:
            source = image_sources.open_images(args.images)
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise CorruptInputError(f"--images={args.images} is damaged ({describe(e)}).") from None
        params = load_inception(args.inception)
    except (UserError, ValueError) as e:
        report_user_error(str(e))
        sys.exit(2)
    metrics = evaluate_images(params, source, reference, batch_size=args.batch_size)
    if jax.process_index() == 0:
        print(json.dumps(metrics, indent=2))
        if args.out:
            fileio.write_json(args.out, metrics)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
