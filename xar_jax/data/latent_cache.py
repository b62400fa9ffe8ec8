"""Latent caching: run the VAE encoder over a dataset once and store ArrayRecord shards of moments.

Each example is stored as the moments of the ADM-cropped image and the moments of its mirror image,
with the label (two consecutive records; format: :mod:`xar_jax.data.latent_format`). Training then
reads them with
``data.source='latents'`` and draws a fresh latent every time (the paper's recipe).

Guarantees:
- Idempotent and restartable: shards that exist under their final name are complete and are never
  redone; a shard being written lives under ``<name>.incomplete`` and is renamed (after fsync) only
  when complete, so an interrupted run leaves nothing a reader accepts, and rerunning the same
  command finishes the job.
- Local disk or GCS: ArrayRecord cannot write ``gs://``, so for a ``gs://`` out_dir each shard is
  written on local disk (a temporary directory), uploaded under a temporary object name and moved
  to its final name once complete (`xar_jax.fileio.upload_file`); the same guarantees hold.
- Multi-host: shard ``s`` belongs to process ``s % process_count``; each process encodes its own
  shards with its local devices (the encoder must not span hosts: ``device.local_data_parallel``).
- Deterministic: the same images in the same order, decoded by the same Grain pipeline as training
  (no flip), so a resumed cache equals an uninterrupted one record for record.

Command line (see docs/data.md)::

    python -m xar_jax.data.latent_cache --source=imagenet --data_dir=DIR --split=train \
        --image_size=256 --out_dir=CACHE --encoder=MODULE:FACTORY --encoder_arg=VAE_CKPT

For the released KL-16 VAE, converted with ``python -m xar_jax.convert vae``:
``--encoder=xar_jax.data.latent_cache:converted_vae_encoder --encoder_arg=CONVERTED_VAE_DIR``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import grain
import ml_collections
import numpy as np
from etils import epath

from xar_jax import fileio
from xar_jax.data import config as config_lib
from xar_jax.data import latent_format, pipeline, sources
from xar_jax.data.latent_format import LatentCacheRecords  # noqa: F401  (the reader, re-exported)

EncodeFn = Callable[[np.ndarray], Any]
INCOMPLETE_SUFFIX = ".incomplete"


class _ShardBatches:
    """Grain source whose element ``j`` is batch ``j`` of the caching plan, padded to batch_size.

    Padding (repeats of the batch's last image) keeps the encoder's input shape fixed; ``count``
    says how many rows are real.
    """

    def __init__(
        self, reader: sources.CheckedReader, plan: list[tuple[int, int, int]], batch_size: int
    ):
        self.reader, self.plan, self.batch_size = reader, plan, batch_size

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, j: int) -> dict[str, Any]:
        shard, start, stop = self.plan[int(j)]
        examples = [self.reader.read(i) for i in range(start, stop)]
        examples += [examples[-1]] * (self.batch_size - len(examples))
        return {
            "images": np.stack([e["images"] for e in examples]),
            "labels": np.stack([e["labels"] for e in examples]),
            "skipped": np.int64(
                sum(int(e.get("skipped_records", 0)) for e in examples[: stop - start])
            ),
            "shard": np.int64(shard),
            "count": np.int64(stop - start),
        }


def _spec(
    data_cfg: ml_collections.ConfigDict, num_examples: int, shard_size: int
) -> dict[str, Any]:
    dataset = {"source": data_cfg.source, "split": data_cfg.split}
    if data_cfg.source == "imagenet":
        dataset.update(
            tfds_name=data_cfg.tfds_name,
            image_size=data_cfg.image_size,
            image_decoder=data_cfg.image_decoder,
        )
    return {
        "format": latent_format.FORMAT_NAME,
        "format_version": latent_format.FORMAT_VERSION,
        "dataset": dataset,
        "num_examples": num_examples,
        "shard_size": shard_size,
        "num_shards": len(latent_format.shard_sizes(num_examples, shard_size)),
        "dtype": data_cfg.cache_dtype,
    }


def _write_or_check_spec(directory: str, spec: dict[str, Any]) -> None:
    """Writes the spec atomically, or checks that an existing cache used the same settings."""
    path = os.path.join(directory, latent_format.SPEC_FILE)
    if fileio.exists(path):
        existing = json.loads(epath.Path(path).read_text())
        if existing != spec:
            diff = {
                k: (existing.get(k), spec.get(k))
                for k in set(existing) | set(spec)
                if existing.get(k) != spec.get(k)
            }
            raise ValueError(
                f"{directory} holds a cache made with other settings "
                f"(field: (existing, requested)): {diff}. Use another out_dir, or "
                "the original settings to resume."
            )
        return
    fileio.write_text(path, json.dumps(spec, indent=2, sort_keys=True))


def _commit(tmp: str, final: str) -> None:
    """Makes a finished shard durable, then gives it its final name."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dir_fd = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_finished_shard(path: str, expected: int) -> None:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        found = reader.num_records()
    finally:
        reader.close()
    if found != expected:
        raise ValueError(
            f"{path} holds {found} records, expected {expected}: it was not written by "
            "this tool or was modified. Delete it and rerun to rewrite it."
        )


def _encode(encode_fn: EncodeFn, images: np.ndarray) -> np.ndarray:
    moments = np.asarray(encode_fn(images))
    if moments.ndim != 4 or moments.shape[0] != images.shape[0] or moments.shape[-1] % 2:
        raise ValueError(
            f"encode_fn must map images {images.shape} to moments (b, h, w, 2*C); "
            f"got {moments.shape}."
        )
    return moments


def cache_latents(
    data_cfg: ml_collections.ConfigDict,
    encode_fn: EncodeFn,
    out_dir: str,
    *,
    batch_size: int,
    shard_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    records: Any = None,
) -> dict[str, Any]:
    """Encodes ``data_cfg.split`` and writes this process's shards under ``<out_dir>/<split>/``.

    Args:
      data_cfg: data config of the images ('imagenet' or 'digits'); ``image_size``, ``split``,
        ``cache_dtype``, ``num_workers``/``read_threads`` (decoding) are used; flips are not.
      encode_fn: ``images (b, S, S, C) float32 in [-1, 1] -> moments (b, h, w, 2*C)`` (NumPy or
        jax arrays); called twice per batch (image and mirror), always with ``b = batch_size``.
      out_dir: cache root (``data.cache_dir`` when training): local disk, ``gs://bucket/dir`` or
        a gcsfuse mount.
      batch_size: images per encoder call on this process.
      shard_size: examples per shard (2 records of 32 KiB each at 16x16x32 float32).
      process_index, process_count: default to JAX's.
      records: optional raw records replacing those of ``data_cfg.source`` (same decoding).

    Returns:
      ``{'directory', 'num_shards', 'written': [shard ids], 'kept': [shard ids],
      'skipped_records'}``.
    """
    config_lib.validate_data_config(data_cfg)
    if data_cfg.source not in ("imagenet", "digits"):
        raise ValueError(
            f"cache_latents needs an image source ('imagenet' | 'digits'); "
            f"data config field 'source' is {data_cfg.source!r}."
        )
    if not (
        isinstance(batch_size, int)
        and batch_size >= 1
        and isinstance(shard_size, int)
        and shard_size >= 1
    ):
        raise ValueError(
            f"batch_size={batch_size!r} and shard_size={shard_size!r} must be positive integers."
        )
    index, count = pipeline.resolve_process(process_index, process_count)
    reader = sources.build_reader(data_cfg, data_cfg.split, records=records)
    sizes = latent_format.shard_sizes(len(reader), shard_size)
    directory = latent_format.split_dir(out_dir, data_cfg.split)
    fileio.makedirs(directory)
    _write_or_check_spec(directory, _spec(data_cfg, len(reader), shard_size))

    finals = [
        os.path.join(directory, latent_format.shard_name(s, len(sizes))) for s in range(len(sizes))
    ]
    mine = list(range(index, len(sizes), count))
    present = latent_format.existing_names(directory)  # one listing, not a request per shard
    kept = [s for s in mine if os.path.basename(finals[s]) in present]
    for s in kept:
        _check_finished_shard(finals[s], 2 * sizes[s])
    todo = [s for s in mine if s not in kept]
    for s in todo:  # uploads of this process's shards cut short by an earlier run (gs://)
        stale = os.path.basename(finals[s]) + ".tmp-"
        for name in (n for n in present if n.startswith(stale)):
            epath.Path(directory, name).unlink(missing_ok=True)
    plan = [
        (s, start, min(start + batch_size, s * shard_size + sizes[s]))
        for s in todo
        for start in range(s * shard_size, s * shard_size + sizes[s], batch_size)
    ]
    summary = {
        "directory": directory,
        "num_shards": len(sizes),
        "written": [],
        "kept": kept,
        "skipped_records": 0,
    }
    if not plan:
        return summary

    batches = iter(
        pipeline.parallel_read(
            grain.MapDataset.source(_ShardBatches(reader, plan, batch_size)), data_cfg
        )
    )
    # ArrayRecord writes local files only: shards bound for gs:// are staged on local disk.
    staging = tempfile.mkdtemp(prefix="xar-latent-cache-") if fileio.is_remote(out_dir) else None
    try:
        _write_shards(batches, encode_fn, finals, sizes, data_cfg.cache_dtype, summary, staging)
    finally:
        batches.close()  # stops Grain's worker processes and threads
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return summary


def _write_shards(batches, encode_fn, finals, sizes, dtype, summary, staging) -> None:
    """Encodes the planned batches (grouped by shard, in order) and commits each finished shard.

    ``staging``: a local directory where shards are written before their upload to a remote
    ``finals`` path, or None to write them next to their final name.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    writer, shard, written = None, None, 0
    try:
        for batch in batches:
            if int(batch["shard"]) != shard:
                shard, written = int(batch["shard"]), 0
                local = finals[shard]
                if staging is not None:
                    local = os.path.join(staging, os.path.basename(local))
                tmp = local + INCOMPLETE_SUFFIX
                if os.path.exists(tmp):  # left by an interrupted run
                    os.remove(tmp)
                writer = ArrayRecordWriter(tmp, latent_format.WRITER_OPTIONS)
            images = batch["images"]
            moments = _encode(encode_fn, images)
            moments_flipped = _encode(encode_fn, np.ascontiguousarray(images[:, :, ::-1]))
            for k in range(int(batch["count"])):
                for mirrored, m in ((False, moments), (True, moments_flipped)):
                    record = latent_format.encode_record(
                        m[k], batch["labels"][k], mirrored=mirrored, dtype=dtype
                    )
                    writer.write(record)
            written += int(batch["count"])
            summary["skipped_records"] += int(batch["skipped"])
            if written == sizes[shard]:
                writer.close()
                writer = None
                if staging is None:
                    _commit(tmp, finals[shard])
                else:  # upload under a temporary name, then move: complete or absent
                    fileio.upload_file(tmp, finals[shard])
                    os.remove(tmp)
                summary["written"].append(shard)
                logging.info("latent cache: wrote %s", finals[shard])
    finally:
        if writer is not None:  # interrupted mid-shard: the .incomplete file is never renamed
            writer.close()


def converted_vae_encoder(path: str) -> EncodeFn:
    """The KL-16 encoder of a ``python -m xar_jax.convert vae`` directory, on this process's chips.

    For ``--encoder=xar_jax.data.latent_cache:converted_vae_encoder --encoder_arg=DIR`` (what
    ``launch/prepare_data.sh cache`` runs on every TPU worker). Params are replicated over the
    local devices and each batch is split over them (its size must divide by their count); no
    computation spans hosts, since every process encodes its own shards.

    Returns:
      ``encode_fn(images (b, S, S, 3) float32 in [-1, 1]) -> moments (b, S/16, S/16, 32)`` NumPy.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from xar_jax import vae as vae_lib
    from xar_jax import weights

    model, params = weights.load_vae(path)
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("batch",))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))

    def encode_fn(images: np.ndarray) -> np.ndarray:
        if images.shape[0] % len(devices):
            raise ValueError(
                f"--batch_size={images.shape[0]} does not split over {len(devices)} local devices."
            )
        images = jax.device_put(np.asarray(images, np.float32), batch_sharding)
        return np.asarray(vae_lib.encode(params, images, model=model))

    return encode_fn


def _load_encoder(spec: str, arg: str | None) -> EncodeFn:
    module_name, _, factory_name = spec.partition(":")
    if not factory_name:
        raise ValueError(f"--encoder={spec!r} must be MODULE:FACTORY (FACTORY(arg) -> encode_fn).")
    factory = getattr(importlib.import_module(module_name), factory_name)
    return factory(arg) if arg is not None else factory()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description="Cache VAE moments of a dataset as ArrayRecord shards."
    )
    parser.add_argument("--source", default="imagenet", choices=("imagenet", "digits"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--tfds_name", default="imagenet2012")
    parser.add_argument("--image_decoder", default="pil", choices=config_lib.IMAGE_DECODERS)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--cache_dtype", default="float32", choices=config_lib.CACHE_DTYPES)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument(
        "--encoder", required=True, help="MODULE:FACTORY; FACTORY(encoder_arg) -> encode_fn"
    )
    parser.add_argument(
        "--encoder_arg", default=None, help="passed to the factory, e.g. a VAE checkpoint"
    )
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--shard_size", type=int, default=1000)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--read_threads", type=int, default=8)
    parser.add_argument(
        "--multihost", action="store_true", help="call jax.distributed.initialize()"
    )
    args = parser.parse_args(argv)

    data_cfg = config_lib.get_data_config(args.source)
    for field in (
        "split",
        "data_dir",
        "tfds_name",
        "image_decoder",
        "image_size",
        "cache_dtype",
        "num_workers",
        "read_threads",
    ):
        data_cfg[field] = getattr(args, field)
    config_lib.validate_data_config(data_cfg)  # before loading the encoder or any data
    if args.multihost:
        import jax

        jax.distributed.initialize()
    encode_fn = _load_encoder(args.encoder, args.encoder_arg)
    summary = cache_latents(
        data_cfg, encode_fn, args.out_dir, batch_size=args.batch_size, shard_size=args.shard_size
    )
    print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in summary.items()}))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
