"""Resumable, class-balanced, multi-process sample generation to an ADM ``.npz``.

The run is a fixed plan: ``balanced_labels`` gives every class the same number of images (in a
seeded random order), the labels are cut into global batches of ``batch_size``, and batch ``b``
draws its randomness from ``fold_in(key, b)``. The output therefore depends only on the plan
(``num_images``, ``num_classes``, ``batch_size``, ``seed``), not on how many processes ran it or
where a run was interrupted.

Layout of ``out_dir``::

    plan.json                 the plan; a restart with a different plan is refused
    shards/batch_000123.npz   one finished batch (images, labels), written atomically
    samples.npz               the result: arr_0 (N, H, W, 3) uint8 and labels (N,) int32

Process ``p`` of ``P`` generates batches ``p, p + P, ...`` and skips those whose shard exists, so a
killed run restarted with the same arguments continues where it stopped (a batch interrupted
mid-way is generated again from the same key). When every shard exists, process 0 streams them
into ``samples.npz`` through a temporary file and a rename: the file is complete or absent.

``out_dir`` is a local directory (with several hosts, one they share) or a ``gs://`` location,
which every host reaches without a mount: each shard is written through `fileio.write_npz` (a
temporary object, then a server-side move), so a shard object is whole or absent, and process 0
assembles ``samples.npz`` on its local disk and publishes it with `fileio.upload_file`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import operator
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from xar_jax import fileio
from xar_jax.evaluation import npz_io

log = logging.getLogger("xar_jax.sample_writer")

Generator = Callable[[np.ndarray, jax.Array], Any]
PLAN_FILE = "plan.json"
SHARD_DIR = "shards"
SAMPLES_FILE = "samples.npz"


def to_uint8(images: Any) -> np.ndarray:
    """Images in [-1, 1] -> uint8 in [0, 255], rounded to nearest (out-of-range values clipped)."""
    x = np.asarray(images, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def balanced_labels(
    num_images: int,
    num_classes: int,
    seed: int,
    *,
    allow_uneven: bool = False,
    shuffle: bool = True,
) -> np.ndarray:
    """Class labels with equal counts per class (50 per class for 50k ImageNet samples).

    Args:
      num_images: total number of labels N.
      num_classes: number of classes K.
      seed: seed of the order (``np.random.default_rng(seed).permutation``).
      allow_uneven: when N is not a multiple of K, give the first ``N % K`` classes one more
        image instead of raising.
      shuffle: random order (mixes classes within each batch); otherwise sorted by class.

    Returns:
      ``(N,)`` int32.
    """
    if num_images <= 0 or num_classes <= 0:
        raise ValueError(
            f"num_images and num_classes must be positive, got {num_images} and {num_classes}."
        )
    if num_images % num_classes and not allow_uneven:
        raise ValueError(
            f"num_images={num_images} is not a multiple of num_classes={num_classes}, so classes "
            "cannot be exactly balanced; choose a multiple or pass allow_uneven=True."
        )
    counts = np.full(num_classes, num_images // num_classes)
    counts[: num_images % num_classes] += 1
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), counts)
    if shuffle:
        labels = labels[np.random.default_rng(seed).permutation(num_images)]
    return labels


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """What a sampling run produces; two runs with equal plans write identical files."""

    num_images: int
    num_classes: int
    batch_size: int
    seed: int
    allow_uneven: bool = False
    key_data: tuple[int, ...] = ()  # the base PRNG key's data when not derived from ``seed``

    def __post_init__(self):
        for field in ("num_images", "num_classes", "batch_size", "seed"):
            value = getattr(self, field)
            try:
                object.__setattr__(self, field, operator.index(value))
            except TypeError:
                raise ValueError(f"{field} must be an integer, got {value!r}.") from None
            if field != "seed" and getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {value!r}.")

    @property
    def num_batches(self) -> int:
        return -(-self.num_images // self.batch_size)

    def labels(self) -> np.ndarray:
        return balanced_labels(
            self.num_images, self.num_classes, self.seed, allow_uneven=self.allow_uneven
        )

    def batch_labels(self, labels: np.ndarray, batch: int) -> tuple[np.ndarray, int]:
        """Labels fed to the generator for ``batch`` (always ``batch_size`` of them) and how many
        of its images are kept. The last batch is padded by repeating its labels so the generator
        sees one shape (no recompilation); the padding's images are dropped."""
        real = labels[batch * self.batch_size : (batch + 1) * self.batch_size]
        padded = np.resize(real, self.batch_size).astype(np.int32)
        return padded, len(real)


def _shard_path(out_dir: str, batch: int) -> str:
    return os.path.join(out_dir, SHARD_DIR, f"batch_{batch:06d}.npz")


_SHARD_NAME = re.compile(r"batch_(\d{6,})\.npz")


def _finished_batches(out_dir: str) -> set[int]:
    """The batches whose shard exists: one listing (other processes' new shards included)."""
    shards = os.path.join(out_dir, SHARD_DIR)
    fileio.forget_listings(shards)
    return {
        int(m.group(1)) for name in fileio.list_names(shards) if (m := _SHARD_NAME.fullmatch(name))
    }


def _load_shard(out_dir: str, batch: int) -> dict[str, np.ndarray]:
    with fileio.as_path(_shard_path(out_dir, batch)).open("rb") as f, np.load(f) as shard:
        return {k: shard[k] for k in shard.files}


def check_or_write_json(path: str, wanted: dict[str, Any], *, holds: str, remedy: str) -> None:
    """Writes ``wanted`` to ``path`` (atomically) on the first run; later refuses any other content.

    The refusal names every differing field as ``field: (existing, requested)``. ``holds`` says
    what the directory holds and ``remedy`` what to do about it.
    """
    wanted = json.loads(json.dumps(wanted))  # Tuples compare as the lists JSON gives back.
    if fileio.exists(path):
        found = fileio.read_json(path)
        if found != wanted:
            diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
            raise ValueError(
                f"{os.path.dirname(path)} holds {holds} (field: (existing, requested)): {diff}. "
                f"{remedy}"
            )
        return
    fileio.write_json(path, wanted)


def _check_plan_file(out_dir: str, plan: SamplingPlan) -> None:
    """Writes ``plan.json`` on the first run; refuses to resume a run made with another plan."""
    check_or_write_json(
        os.path.join(out_dir, PLAN_FILE),
        dataclasses.asdict(plan),
        holds="a sampling run with a different plan",
        remedy="Use another out_dir or the original settings.",
    )


def _check_images(images: np.ndarray, batch_size: int, batch: int) -> None:
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[0] != batch_size
        or images.shape[-1] not in (1, 3)
    ):
        raise ValueError(
            f"generate() must return uint8 images of shape ({batch_size}, H, W, 3) (or 1 channel); "
            f"batch {batch} returned {images.dtype} {images.shape} (convert [-1, 1] floats with "
            "to_uint8)."
        )


def _progress(batches: list[int], done: int, total: int, enabled: bool) -> Iterator[int]:
    if not enabled:
        yield from batches
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: print a line every ~5% instead.
        every = max(1, total // 20)
        start = time.time()
        for i, b in enumerate(batches, start=done + 1):
            yield b
            if i % every == 0 or i == total:
                print(f"sampling: {i}/{total} batches, {time.time() - start:.0f}s", flush=True)
        return
    yield from tqdm(batches, total=total, initial=done, desc="sampling", unit="batch")


def _default_barrier(process_count: int) -> None:
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("xar_jax.sample_writer.shards_done")


def _assemble(out_dir: str, plan: SamplingPlan, labels: np.ndarray, path: str) -> None:
    finished = _finished_batches(out_dir)
    missing = [b for b in range(plan.num_batches) if b not in finished]
    if missing:
        raise RuntimeError(
            f"Cannot assemble {path}: {len(missing)} batch shards are missing (first: "
            f"{missing[:10]}). Run the same command again (on every process) to finish them."
        )
    image_shape = _load_shard(out_dir, 0)["images"].shape[1:]

    def chunks() -> Iterator[np.ndarray]:
        for b in range(plan.num_batches):
            shard = _load_shard(out_dir, b)
            expected = labels[b * plan.batch_size : (b + 1) * plan.batch_size]
            if not np.array_equal(shard["labels"], expected):
                raise RuntimeError(f"Shard {b} does not belong to this plan; delete {out_dir}.")
            yield shard["images"]

    def write(local_path: str) -> None:
        npz_io.write_npz_streaming(
            local_path,
            "arr_0",
            (plan.num_images, *image_shape),
            np.uint8,
            chunks(),
            extra={"labels": labels},
        )

    if not fileio.is_remote(path):
        write(path)
        return
    with tempfile.TemporaryDirectory(prefix="xar-samples-") as tmp:  # On the local disk.
        local = os.path.join(tmp, os.path.basename(path))
        write(local)
        fileio.upload_file(local, path)


def write_samples(
    generate: Generator,
    out_dir: str,
    *,
    num_images: int,
    num_classes: int,
    batch_size: int,
    seed: int = 0,
    key: jax.Array | None = None,
    allow_uneven: bool = False,
    file_name: str = SAMPLES_FILE,
    png_dir: str | None = None,
    keep_shards: bool = False,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    barrier: Callable[[], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> str | None:
    """Generates class-balanced samples into ``out_dir/samples.npz``, resuming an interrupted run.

    Args:
      generate: ``generate(labels (batch_size,) int32, key) -> (batch_size, H, W, 3) uint8``
        (NumPy or JAX). It must be a deterministic function of its inputs for resumption to
        reproduce an uninterrupted run.
      out_dir: run directory, shared between processes: local (a filesystem they share) or
        ``gs://``.
      num_images, num_classes, batch_size, seed, allow_uneven: the plan (see `balanced_labels`).
        ``batch_size`` is the per-call batch of ``generate``.
      key: base PRNG key; default ``jax.random.key(seed)``. Batch b uses ``fold_in(key, b)``.
      file_name: name of the result inside ``out_dir``.
      png_dir: also write every image as ``png_dir/{index:06d}.png``.
      keep_shards: keep ``out_dir/shards`` after ``samples.npz`` is written (default: delete).
      progress: show a progress bar (tqdm if installed) on process 0.
      process_index, process_count: this process and the number of processes (default: JAX's).
      barrier: called once when this process's batches are done, to wait for the others before
        process 0 assembles (default: a JAX multihost barrier when process_count > 1).
      stop: asked after every shard; True returns None at once, the finished shards kept for a
        rerun (a stop signal: `xar_jax.stop_signal`).

    Returns:
      The path of the result (``out_dir/file_name``) on process 0, None on other processes.
    """
    key_data = () if key is None else tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())
    plan = SamplingPlan(num_images, num_classes, batch_size, seed, allow_uneven, key_data)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} not in [0, process_count={process_count})."
        )
    labels = plan.labels()  # validates divisibility before any work
    out_dir = os.fspath(fileio.as_path(out_dir))
    final_path = os.path.join(out_dir, file_name)
    fileio.makedirs(os.path.join(out_dir, SHARD_DIR))
    _check_plan_file(out_dir, plan)
    if png_dir is not None:
        fileio.makedirs(png_dir)
    fileio.forget_listings(out_dir)
    if fileio.exists(final_path):
        if process_index == 0:
            _clean_up(out_dir, png_dir, keep_shards)
            return final_path
        return None

    key = jax.random.key(seed) if key is None else key
    mine = list(range(process_index, plan.num_batches, process_count))
    finished = _finished_batches(out_dir)
    todo = [b for b in mine if b not in finished]
    log.info(
        "Process %d: %d of its %d batches finished earlier; %d to generate.",
        process_index,
        len(mine) - len(todo),
        len(mine),
        len(todo),
    )
    show = progress and process_index == 0
    for b in _progress(todo, len(mine) - len(todo), len(mine), show):
        batch_labels, keep = plan.batch_labels(labels, b)
        images = np.asarray(generate(batch_labels, jax.random.fold_in(key, b)))
        _check_images(images, plan.batch_size, b)
        images = images[:keep]
        if png_dir is not None:
            for i, image in enumerate(images):
                fileio.write_png(os.path.join(png_dir, f"{b * plan.batch_size + i:06d}.png"), image)
        # The shard is the batch's completion record: written last, atomically.
        fileio.write_npz(_shard_path(out_dir, b), images=images, labels=batch_labels[:keep])
        if stop is not None and stop():
            return None

    (barrier or (lambda: _default_barrier(process_count)))()
    if process_index != 0:
        return None
    _assemble(out_dir, plan, labels, final_path)
    _clean_up(out_dir, png_dir, keep_shards)
    return final_path


def _clean_up(out_dir: str, png_dir: str | None, keep_shards: bool) -> None:
    """Removes the shards (unless kept) and temporary files left by killed writers.

    Only called once every process has finished, so no temporary file is still being written.
    """
    shards = os.path.join(out_dir, SHARD_DIR)
    if not keep_shards:
        if fileio.is_remote(shards):
            fileio.forget_listings(shards)
            if fileio.exists(shards):
                fileio.as_path(shards).rmtree()
        else:
            shutil.rmtree(shards, ignore_errors=True)
    for directory in (out_dir, shards, png_dir):
        if directory is None:
            continue
        if fileio.is_remote(directory):  # fileio's temporaries only (name.tmp-host-pid-id).
            fileio.forget_listings(directory)
            for name in fileio.list_names(directory):
                if ".tmp-" in name:
                    (fileio.as_path(directory) / name).unlink(missing_ok=True)
            continue
        # fileio's temporaries (name.tmp-host-pid-id) and npz_io's streaming ones (.tmp-*).
        for pattern in ("*.tmp-*", ".tmp-*"):
            for tmp in glob.glob(os.path.join(directory, "**", pattern), recursive=True):
                os.remove(tmp)
