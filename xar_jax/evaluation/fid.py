"""Fréchet distance, Inception Score and reference statistics files (host-side NumPy, float64).

* `FeatureStatistics` accumulates the mean and covariance of features batch by batch in float64
  (count, mean and the centred scatter matrix, merged with Chan et al.'s pairwise rule), so 50k
  images never need to be held at once and partial statistics from several workers or files merge
  exactly.
* `frechet_distance` computes ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64.
  The trace of the matrix square root is taken from the eigenvalues of the symmetric matrix
  ``S1^(1/2) S2 S1^(1/2)`` (similar to ``S1 S2``), which avoids the non-symmetric ``sqrtm`` of the
  original FID code and its complex round-off; no SciPy needed.
* `inception_score` follows torch-fidelity: float64 softmax of the unbiased logits, a fixed
  permutation (seed 2020), 10 splits, mean and standard deviation of ``exp(E[KL(p(y|x) || p(y))])``.
* Reference statistics are ``.npz`` files with ``mu`` (D,) and ``sigma`` (D, D), as the authors and
  ADM ship them (ADM's reference batches hold ``mu``/``sigma`` next to the images and are accepted).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from xar_jax import fileio
from xar_jax.errors import CorruptInputError, MissingInputError, describe

ISC_SPLITS = 10
ISC_SEED = 2020  # torch-fidelity's default rng_seed for the Inception Score permutation.


class FeatureStatistics:
    """Streaming mean and covariance of feature vectors, in float64.

    Example::

        stats = FeatureStatistics(2048)
        for pool3 in batches:          # (B, 2048)
            stats.add(pool3)
        mu, sigma = stats.mu, stats.sigma
    """

    def __init__(self, dim: int):
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}.")
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, np.float64)
        self.scatter = np.zeros((dim, dim), np.float64)  # sum of (x - mean)(x - mean)^T

    def add(self, features: Any) -> None:
        """Adds a batch ``(B, dim)`` of features (any float dtype; computed in float64)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (B, {self.dim}), got {x.shape}.")
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or Inf; the images or the network are broken.")
        if len(x) == 0:
            return
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        self._combine(len(x), batch_mean, centred.T @ centred)

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """A new accumulator holding the statistics of both (exact, order-independent)."""
        if other.dim != self.dim:
            raise ValueError(f"Cannot merge statistics of dim {self.dim} and {other.dim}.")
        out = FeatureStatistics(self.dim)
        out._combine(self.count, self.mean, self.scatter)
        out._combine(other.count, other.mean, other.scatter)
        return out

    def _combine(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    @property
    def mu(self) -> np.ndarray:
        """Mean ``(dim,)`` float64."""
        self._require(1)
        return self.mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance ``(dim, dim)`` float64 (divides by count - 1, like ``np.cov``)."""
        self._require(2)
        return self.scatter / (self.count - 1)

    def _require(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"Need at least {n} feature vectors, have {self.count}.")


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{which}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}."
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{which}: mu or sigma contains NaN or Inf.")


def _nonnegative(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off noise removed.

    Eigenvalues below ``size * eps * max|eigenvalue|`` cannot be told apart from zero in float64
    (they come out of a rank-deficient covariance, e.g. fewer images than features, as +-1e-17);
    their square roots (~3e-9 each, thousands of them) would otherwise add a spurious positive
    amount to the trace.
    """
    tolerance = len(eigenvalues) * np.finfo(np.float64).eps * np.max(np.abs(eigenvalues))
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(_nonnegative(eigenvalues))) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((sigma1 sigma2)^(1/2))`` for covariance matrices, via a symmetric eigenproblem."""
    root1 = _psd_sqrt(np.asarray(sigma1, np.float64))
    middle = root1 @ np.asarray(sigma2, np.float64) @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sum(np.sqrt(_nonnegative(eigenvalues))))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Args:
      mu1, mu2: means ``(D,)``.
      sigma1, sigma2: covariances ``(D, D)`` (symmetric positive semi-definite).

    Returns:
      The distance (FID when the features are Inception pool3), a Python float >= 0 up to round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_gaussian(mu1, sigma1, "first statistics")
    _check_gaussian(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"Feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}.")
    diff = mu1 - mu2
    return float(
        diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(
    logits: Any, splits: int = ISC_SPLITS, *, shuffle: bool = True, seed: int = ISC_SEED
) -> tuple[float, float]:
    """Inception Score of classifier logits, as torch-fidelity computes it.

    Args:
      logits: ``(N, K)`` unbiased Inception logits (``logits_unbiased``), in image order.
      splits: number of equal chunks (``[i N // splits, (i + 1) N // splits)``).
      shuffle: permute the rows first with ``np.random.RandomState(seed)`` (torch-fidelity does).
      seed: the permutation seed.

    Returns:
      ``(mean, std)`` over the splits of ``exp(mean_x KL(p(y|x) || p(y)))``.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {logits.shape}.")
    if not 1 <= splits <= len(logits):
        raise ValueError(f"splits must be in [1, N={len(logits)}], got {splits}.")
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(len(logits))]
    log_p = _log_softmax(logits)
    p = np.exp(log_p)
    n = len(logits)
    scores = []
    for i in range(splits):
        chunk = slice(i * n // splits, (i + 1) * n // splits)
        log_marginal = np.log(p[chunk].mean(axis=0, keepdims=True))
        kl = np.sum(p[chunk] * (log_p[chunk] - log_marginal), axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def save_reference_stats(path: str | os.PathLike, mu: Any, sigma: Any, **extra: Any) -> None:
    """Writes ``mu``, ``sigma`` (float64) and ``extra`` arrays to ``path`` atomically.

    Raises:
      FileExistsError: ``path`` exists (statistics are never overwritten silently).
    """
    path = os.fspath(path)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_gaussian(mu, sigma, "statistics to save")
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; remove it first or choose another --out.")
    fileio.write_npz(path, mu=mu, sigma=sigma, **extra)


def load_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``(mu (D,), sigma (D, D))`` as float64 from a statistics ``.npz``.

    Accepts the authors' ``fid_stats`` files and ADM's reference batches (which also hold images
    in ``arr_0``; those are not loaded).
    """
    path = os.fspath(path)
    remedy = (
        "Reference statistics are ADM's VIRTUAL_imagenet256_labeled.npz or the output of "
        "`python -m xar_jax.evaluation.reference_stats`."
    )
    if not os.path.isfile(path):
        raise MissingInputError(f"Reference statistics file not found: {path}. {remedy}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise CorruptInputError(
                    f"{path} has no {sorted(missing)} (it holds {sorted(data.files)}); reference "
                    f"statistics need 'mu' and 'sigma'. {remedy}"
                )
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        _check_gaussian(mu, sigma, path)
    except CorruptInputError:
        raise
    except Exception as e:  # zipfile, zlib and numpy errors of a truncated or bit-flipped file.
        raise CorruptInputError(f"{path} is damaged ({describe(e, 120)}). {remedy}") from None
    return mu, sigma
