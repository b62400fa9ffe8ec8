"""The embedded default dataset: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).

It ships inside the installed scikit-learn package, so the demo and the tests need no download. The
demo has no VAE: a digit's 8x8 pixels are its latent grid (one channel), scaled to [-1, 1].
"""

from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
SPLITS = ("train", "heldout", "all")
# Every fifth image (index % 5 == 0) is held out: 360 images, all ten classes represented.
HELDOUT_EVERY = 5


def split_indices(split: str, num_examples: int) -> np.ndarray:
    """Indices of ``split`` among ``num_examples`` digits (held out: index % 5 == 0)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; allowed: {', '.join(SPLITS)}.")
    index = np.arange(num_examples)
    if split == "all":
        return index
    heldout = index % HELDOUT_EVERY == 0
    return index[heldout] if split == "heldout" else index[~heldout]


@functools.cache
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are integers 0..16; map to [-1, 1] with 8 -> 0.
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return images, bunch.target.astype(np.int32)


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images (N, 8, 8, 1) float32 in [-1, 1], labels (N,) int32)`` of a split."""
    images, labels = _load_all()
    index = split_indices(split, len(labels))
    return images[index], labels[index]


class DigitsSource:
    """Random-access source of one digits split for Grain (picklable, in memory).

    ``source[i]`` is ``{'images': (8, 8, 1) float32 in [-1, 1], 'labels': int32}``.
    """

    def __init__(self, split: str):
        self.split = split
        self._images, self._labels = load_digits_split(split)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"images": self._images[index], "labels": self._labels[index]}

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, {len(self)} examples)"
