"""Random-access uint8 image sources for FID: an ``.npz`` (ADM samples), a directory, a TFDS split.

Every source has ``len(source)`` and ``source.read(start, stop) -> (n, H, W, 3) uint8`` (NHWC), so
statistics can be streamed over 50k+ images and split between processes by contiguous ranges.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Protocol

import numpy as np
from PIL import Image

from xar_jax.data.imagenet import adm_center_crop  # The one ADM crop (training and FID).
from xar_jax.evaluation import npz_io

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


def _check_rgb_uint8(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{where}: expected uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}."
        )
    return images


class NpzImages:
    """``arr_0`` (or ``key``) of an ``.npz`` read in row ranges (ADM samples, reference batches)."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self._reader = npz_io.NpzArrayReader(path, key)
        shape, dtype = self._reader.shape, self._reader.dtype
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            self._reader.close()
            raise ValueError(
                f"{path}:{key} must be uint8 (N, H, W, 3) images, got {dtype} {shape}."
            )

    def __len__(self) -> int:
        return len(self._reader)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._reader.read(start, stop)


class DirectoryImages:
    """Image files under a directory (recursively, sorted by path), optionally ADM-center-cropped.

    Without ``center_crop`` all images must have the same size.
    """

    def __init__(self, directory: str | os.PathLike, center_crop: int | None = None):
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"Image directory not found: {directory}")
        self.paths = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(directory)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
        )
        if not self.paths:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {directory}.")
        self.center_crop = center_crop
        self._size: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: str) -> np.ndarray:
        with Image.open(path) as image:
            if self.center_crop is not None:
                return adm_center_crop(image, self.center_crop)
            array = np.asarray(image.convert("RGB"))
        if self._size is None:
            self._size = array.shape
        if array.shape != self._size:
            raise ValueError(
                f"{path} is {array.shape[1]}x{array.shape[0]}, other images are "
                f"{self._size[1]}x{self._size[0]}; pass center_crop (--center_crop) to crop all "
                "images to one size."
            )
        return array

    def read(self, start: int, stop: int) -> np.ndarray:
        arrays = [self._load(p) for p in self.paths[max(0, start) : stop]]
        if not arrays:
            return np.empty((0, 0, 0, 3), np.uint8)
        return np.stack(arrays)


class TfdsImages:
    """The ``image`` feature of a TFDS split, ADM-center-cropped to ``center_crop``.

    Read with ``tfds.data_source``: no TensorFlow needed, but the split must have been prepared
    in ArrayRecord format.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, center_crop: int = 256):
        import tensorflow_datasets as tfds

        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        self.center_crop = center_crop

    def __len__(self) -> int:
        return len(self._source)

    def read(self, start: int, stop: int) -> np.ndarray:
        crops = []
        for i in range(max(0, start), min(stop, len(self))):
            image = np.asarray(self._source[i]["image"])
            if image.ndim == 3 and image.shape[-1] == 1:
                image = image[..., 0]
            crops.append(adm_center_crop(Image.fromarray(image), self.center_crop))
        if not crops:
            return np.empty((0, self.center_crop, self.center_crop, 3), np.uint8)
        return np.stack(crops)


def open_images(path: str, center_crop: int | None = None) -> ImageSource:
    """An ``.npz`` file (``arr_0``) or a directory of image files."""
    if os.path.isdir(path):
        return DirectoryImages(path, center_crop)
    if path.endswith(".npz"):
        if center_crop is not None:
            raise ValueError(
                "center_crop applies to image directories and TFDS, not to .npz files."
            )
        return NpzImages(path)
    raise ValueError(f"--images must be a directory of images or an .npz file, got {path!r}.")


def process_range(num_images: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous block ``[start, stop)`` of images that process ``process_index`` reads."""
    per_process = -(-num_images // process_count)
    start = min(process_index * per_process, num_images)
    return start, min(start + per_process, num_images)


def iter_process_batches(
    source: ImageSource, batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[np.ndarray | None]:
    """This process's images in batches of at most ``batch_size``.

    Every process yields the same number of batches (``ceil(ceil(N / P) / batch_size)``) so that
    processes stay in step in collective calls: the last ones may be short, and a process whose
    images are exhausted yields None.
    """
    per_process = -(-len(source) // process_count)
    start, stop = process_range(len(source), process_index, process_count)
    for offset in range(0, per_process, batch_size):
        lo, hi = min(start + offset, stop), min(start + offset + batch_size, stop)
        yield _check_rgb_uint8(source.read(lo, hi), "image source") if hi > lo else None


def num_process_batches(num_images: int, batch_size: int, process_count: int = 1) -> int:
    """How many batches `iter_process_batches` yields on every process."""
    return math.ceil(math.ceil(num_images / process_count) / batch_size)
