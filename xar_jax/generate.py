"""``--mode=sample``: the one sampling front end, for grids and ADM ``.npz`` files alike.

Every image this package samples goes through `make_image_generator` (labels -> uint8 images on
a mesh of this process's devices, params replicated there, the KL-16 decoder when configured):

* ``sample.format='grid'`` (the demo) and the trainer's periodic grids: `sample_grid` writes
  ``samples.png`` (one column per class) and ``samples.npz`` (latents, labels, images in [-1, 1]);
* ``sample.format='adm'`` (at scale) and ``--mode=eval``: `generate_samples` writes
  ``sample.num_images`` class-balanced images, resumable, as ADM's ``samples.npz``.

The ADM run, step by step:
1. Checks every path the run needs (VAE, output directory) before any compilation, naming the
   config field and the command that creates the file.
2. Takes the params from `xar_jax.experiment.inference_params`: the EMA params of the newest
   checkpoint (a partial restore) or converted released weights (``config.weights``).
3. Generates class-balanced labels (50 per class for 50k ImageNet images) with
   `xar_jax.evaluation.sample_writer.write_samples`: process ``p`` of ``P`` generates batches
   ``p, p + P, ...``, each batch sharded over that process's devices; finished batches are shards
   in the run's directory (local, or ``gs://`` written by every host directly: no shared mount),
   so a killed run restarted with the same command continues where it stopped, and
   ``samples.npz`` (``arr_0`` uint8 ``(N, H, W, 3)`` + ``labels``, ADM's format) is complete or
   absent. The images depend only on the params, the settings and ``sample.seed``.

Outputs of one params source and one set of settings live in one directory under
``sample.out_dir`` (default ``workdir/generated``), e.g. ``step_00001012-sde20-cfg2-seed0-n1000``
or ``weights_xar_h-sde50-cfg2.2-seed0-n50000``, with ``settings.json`` recording everything that
determines the images; a rerun with other settings goes to another directory, and a directory is
never reused for different settings.

Why process-local generation: sampling needs no cross-host communication, so each host runs its
own batches at its own pace, with the params replicated on its devices (xAR-H: 4.7 GB float32,
well within a TPU v4/v5 or H200 chip). Digits keep their single channel (``(N, 8, 8, 1)``
uint8); ImageNet images are decoded by the KL-16 VAE to ``(N, 256, 256, 3)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from xar_jax import experiment as experiment_lib
from xar_jax import fileio, sampling, weights
from xar_jax import metrics as metrics_lib
from xar_jax import sharding as sharding_lib
from xar_jax import vae as vae_lib
from xar_jax.errors import ConfigError, MissingInputError
from xar_jax.evaluation import sample_writer
from xar_jax.stop_signal import StopSignals, signal_name

log = logging.getLogger("xar_jax.generate")

GENERATED_DIR = "generated"
SETTINGS_FILE = "settings.json"
GRID_PNG = "samples.png"
GRID_NPZ = "samples.npz"
GRID_MIN_SIZE = 64  # Grid images smaller than this (8x8 digits) are enlarged: pixels repeated.

ImageGenerator = Callable[[np.ndarray, jax.Array], np.ndarray]


# ----------------------------------------------------------------------------------------------
# Checks before any work.
def per_process_batch(
    config: ml_collections.ConfigDict, process_count: int, local_devices: int
) -> int:
    """Images per generator call on one process: ``sample.batch_size`` (global) / processes.

    Raises:
      ValueError naming ``config.sample.batch_size`` when it does not split evenly.
    """
    batch = config.sample.batch_size
    if batch % process_count or (batch // process_count) % local_devices:
        raise ConfigError(
            f"config.sample.batch_size={batch} is not allowed; allowed: a multiple of "
            f"{process_count} processes x {local_devices} local devices."
        )
    return batch // process_count


def samples_root(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The directory holding one sub-directory per sampling run.

    Local (with several processes: a filesystem they all share) or ``gs://``, where every
    process writes its own shards and process 0 publishes ``samples.npz``.
    """
    return config.sample.out_dir or os.path.join(workdir, GENERATED_DIR)


def staging_dir(out_dir: str) -> str:
    """Where a process keeps its local copy of a gs:// run's ``samples.npz`` for scoring: stable
    per destination, so a repeated evaluation on the same machine downloads it once."""
    digest = hashlib.sha1(out_dir.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "xar_jax_staging", digest)


def local_copy(samples: Samples) -> str:
    """``samples.npz`` on this machine's disk, for scoring: the file itself when the run is
    local; for a gs:// run, a copy in `staging_dir` (downloaded once, atomically)."""
    if not fileio.is_remote(samples.published):
        return samples.published
    local = os.path.join(
        staging_dir(os.path.dirname(samples.published)), sample_writer.SAMPLES_FILE
    )
    if not os.path.exists(local):
        fileio.download_file(samples.published, local)
    return local


@dataclasses.dataclass(frozen=True)
class Samples:
    """A finished sampling run: its ``samples.npz`` (local or gs://; `local_copy` for a local
    path) and the settings that made it."""

    published: str
    settings: SampleRun


def check_inputs(config: ml_collections.ConfigDict, workdir: str, *, scoring: bool) -> None:
    """Fails before any compilation when a file the run needs is missing.

    Args:
      config: a training config.
      workdir: the run directory.
      scoring: also check what ``--mode=eval`` needs (reference statistics, Inception).

    Raises:
      FileNotFoundError / ValueError naming the config field and how to create the file.
    """
    if config.latent.tokenizer == "kl16":
        vae = config.latent.vae_checkpoint
        if not vae or not weights.is_converted(vae):
            raise MissingInputError(
                f"config.latent.vae_checkpoint={vae!r} is not a converted VAE directory; sampling images needs "
                "the KL-16 VAE converted with `python -m xar_jax.convert vae --src kl16.ckpt "
                "--out DIR` (a local path or gs://)."
            )
    if not scoring or config.data.source == "digits":
        return
    stats = config.eval.reference_stats
    if not stats or not fileio.as_path(stats).exists():
        raise MissingInputError(
            f"config.eval.reference_stats={stats!r} does not exist; it is the FID reference "
            "statistics .npz (mu, sigma): ADM's VIRTUAL_imagenet256_labeled.npz, or create one "
            "with `python -m xar_jax.evaluation.reference_stats --images DIR --inception DIR "
            "--out stats.npz`."
        )
    inception = config.eval.inception_checkpoint
    if not inception or not fileio.exists(inception):
        raise MissingInputError(
            f"config.eval.inception_checkpoint={inception!r} does not exist; convert the FID "
            f"Inception weights with `{weights.KINDS['inception_v3_compat']}` (a local path or "
            "gs://)."
        )


# ----------------------------------------------------------------------------------------------
# The generator: labels -> uint8 images on this process's devices.
def local_mesh() -> jax.sharding.Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh of this process's devices, all on ``data``."""
    return sharding_lib.make_mesh(-1, 1, 1, devices=jax.local_devices())


def replicate_on(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Copies a (possibly cross-host sharded) pytree onto every device of a local ``mesh``.

    Sharded global arrays are first gathered (one collective, every process must call this),
    then this process's copy is placed on its devices.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = sharding_lib.gather_to_host(x)
        return jax.device_put(x, replicated)

    return jax.tree.map(one, tree)


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8, rounded to nearest (as `sample_writer.to_uint8`, on device)."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def latent_sampler(
    model: Any, *, num_steps: int, cfg: float, sampler: str = "sde", cfg_schedule: str = "linear"
):
    """The jitted ``fn(params, labels (B,), key, None) -> latents (B, h, w, c)`` that sampling
    runs (`make_image_generator`; benchmarks/sample.py times it)."""
    return sampling.make_sampler(
        model, num_steps=num_steps, cfg=float(cfg), sampler=sampler, cfg_schedule=cfg_schedule
    )


def make_image_generator(
    model: Any,
    params: Any,
    *,
    mesh: jax.sharding.Mesh,
    num_steps: int,
    cfg: float,
    sampler: str = "sde",
    cfg_schedule: str = "linear",
    decoder: Callable[[jax.Array], jax.Array] | None = None,
) -> ImageGenerator:
    """``generate(labels (B,) int32, key) -> (B, H, W, C) uint8`` for the sample writer.

    Args:
      model: the `XAR` module.
      params: its params, replicated on ``mesh`` (see `replicate_on`).
      mesh: this process's devices; the batch is split over its ``data`` axis.
      num_steps, cfg, sampler, cfg_schedule: as `xar_jax.sampling.sample`.
      decoder: latents ``(B, h, w, c)`` -> images in [-1, 1] ``(B, H, W, 3)`` (the KL-16 VAE),
        or None when the latents are the images (digits: ``(B, 8, 8, 1)``).

    Returns:
      The generator; a NumPy uint8 array per call.
    """
    fn = latent_sampler(
        model, num_steps=num_steps, cfg=cfg, sampler=sampler, cfg_schedule=cfg_schedule
    )
    batch = sharding_lib.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    @jax.jit
    def finish(latents):
        return to_uint8(latents if decoder is None else decoder(latents))

    def generate(labels: np.ndarray, key: jax.Array) -> np.ndarray:
        labels = jax.device_put(np.asarray(labels, np.int32), batch)
        latents = fn(params, labels, jax.device_put(key, replicated), None)
        return np.asarray(finish(latents))

    return generate


def vae_decoder(path: str, scale: float, mesh: jax.sharding.Mesh) -> Callable[[jax.Array], Any]:
    """KL-16 decoding of scaled latents, params from a `python -m xar_jax.convert vae` dir."""
    model, params = weights.load_vae(path)
    params = replicate_on(params, mesh)
    return lambda latents: vae_lib.decode(params, latents, model=model, scale=scale)


# ----------------------------------------------------------------------------------------------
# One sampling run: a directory per (params source, settings).
@dataclasses.dataclass(frozen=True)
class SampleRun:
    """What determines a set of generated images."""

    checkpoint_step: int  # 0 for converted weights.
    weights: str  # The converted weights directory, or '' for a workdir checkpoint.
    num_images: int
    seed: int
    num_steps: int
    cfg: float
    cfg_schedule: str
    sampler: str
    use_ema: bool
    model_dtype: str
    tokenizer: str
    vae_checkpoint: str
    batch_size: int  # global images per step

    def dir_name(self) -> str:
        if self.weights:
            source = "weights_" + os.path.basename(os.path.normpath(self.weights))
        else:
            source = f"step_{self.checkpoint_step:08d}"
        return (
            f"{source}-{self.sampler}{self.num_steps}-cfg{self.cfg:g}"
            f"-seed{self.seed}-n{self.num_images}"
        )


def sample_run(
    config: ml_collections.ConfigDict, source: experiment_lib.ParamsSource, num_images: int
) -> SampleRun:
    s = config.sample
    return SampleRun(
        checkpoint_step=int(source.step),
        weights=_absolute(source.weights),
        num_images=int(num_images),
        seed=s.seed,
        num_steps=s.num_steps,
        cfg=float(s.cfg),
        cfg_schedule=s.cfg_schedule,
        sampler=s.sampler,
        use_ema=s.use_ema,
        model_dtype=config.model.dtype,
        tokenizer=config.latent.tokenizer,
        vae_checkpoint=_absolute(config.latent.vae_checkpoint),
        batch_size=s.batch_size,
    )


def _absolute(path: str) -> str:
    return os.fspath(fileio.as_path(path)) if path else ""


def _check_settings_file(out_dir: str, run: SampleRun) -> None:
    """Writes ``settings.json`` on the first run; refuses a directory made with other settings."""
    sample_writer.check_or_write_json(
        os.path.join(out_dir, SETTINGS_FILE),
        dataclasses.asdict(run),
        holds="samples made with other settings",
        remedy="Delete it or set config.sample.out_dir elsewhere.",
    )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _decoder(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """The KL-16 decoder when configured; None when the latents are the images (digits)."""
    if config.latent.tokenizer == "kl16":
        return vae_decoder(config.latent.vae_checkpoint, config.latent.scale, mesh)
    return None


def _generator(exp: experiment_lib.Experiment, params: Any, mesh) -> ImageGenerator:
    s = exp.config.sample
    return make_image_generator(
        exp.model,
        params,
        mesh=mesh,
        num_steps=s.num_steps,
        cfg=s.cfg,
        sampler=s.sampler,
        cfg_schedule=s.cfg_schedule,
        decoder=_decoder(exp.config, mesh),
    )


def generate_samples(
    exp: experiment_lib.Experiment, workdir: str, *, num_images: int | None = None
) -> Samples:
    """``--mode=sample`` at scale: class-balanced samples, resumable.

    Every process must call this (multi-host runs share ``sample.out_dir``).

    Args:
      exp: the experiment (`xar_jax.experiment.build`); ``sample.*`` set the sampler,
        ``latent.*`` the decoder, ``weights`` the params source.
      workdir: holds ``checkpoints/`` (unless ``config.weights`` is set).
      num_images: default ``sample.num_images``; any count: every class gets
        ``num_images // num_classes`` images and the first ``num_images % num_classes`` one more.

    Returns:
      The finished `Samples` on every process (the files exist when it returns).

    Raises:
      `xar_jax.stop_signal.Stopped` after SIGTERM or SIGINT, once the batch shard in flight is
      written (a rerun continues from the finished shards).
    """
    config = exp.config
    num_images = config.sample.num_images if num_images is None else num_images
    classes = config.latent.num_classes
    check_inputs(config, workdir, scoring=False)
    local_batch = per_process_batch(config, jax.process_count(), jax.local_device_count())
    root = samples_root(config, workdir)

    params, source = experiment_lib.inference_params(exp, workdir)
    settings = sample_run(config, source, num_images)
    out_dir = os.path.join(root, settings.dir_name())
    published = os.path.join(out_dir, sample_writer.SAMPLES_FILE)
    fileio.makedirs(out_dir)
    _check_settings_file(out_dir, settings)  # On every process: each refuses on its own.
    _barrier("xar_jax.generate.settings")
    fileio.forget_listings(out_dir)
    if not fileio.exists(published):
        mesh = local_mesh()
        generate = _generator(exp, replicate_on(params, mesh), mesh)
        log.info("Sampling %d images (%s) into %s.", num_images, source.describe(), out_dir)
        stopped = []  # Whether the writer stopped early on a signal (not after its last shard).

        def should_stop() -> bool:
            stopped.append(stop.requested())
            return stopped[-1]

        with (
            jax.set_mesh(mesh),
            exp.rules_context(),
            StopSignals("the batch shard in flight") as stop,
        ):
            sample_writer.write_samples(
                generate,
                out_dir,
                num_images=num_images,
                num_classes=classes,
                batch_size=local_batch,
                seed=config.sample.seed,
                # Balanced plans stay as they always were written (a resumed run's plan.json).
                allow_uneven=bool(num_images % classes),
                png_dir=os.path.join(out_dir, "png") if config.sample.write_png else None,
                stop=should_stop,
            )
        if stopped and stopped[-1]:
            shards = os.path.join(out_dir, sample_writer.SHARD_DIR)
            raise stop.stopped(
                f"Stopped by {signal_name(stop.received)}: {len(fileio.list_names(shards))} "
                f"finished batch shards are in {shards}. The same command resumes from them."
            )
        _barrier("xar_jax.generate.assembled")  # process 0 assembles after the writer's barrier
        log.info("Wrote %s.", published)
    else:
        log.info("%s exists: nothing to sample.", published)
    del params
    return Samples(published, settings)


# ----------------------------------------------------------------------------------------------
# Grids: the demo's --mode=sample and the trainer's periodic samples.
def class_labels(num_images: int, num_classes: int) -> np.ndarray:
    """Labels 0, 1, ..., num_classes-1, 0, 1, ... (a grid row per class when columns = classes)."""
    return (np.arange(num_images) % num_classes).astype(np.int32)


def sample_grid(
    exp: experiment_lib.Experiment, params: Any, num_images: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(labels, latents, images in [-1, 1] or None)`` of a class-ordered grid.

    Every process must call this (the params may be sharded over hosts); every process gets the
    same arrays. Images are None for KL-16 latents without ``latent.vae_checkpoint``.
    """
    config = exp.config
    mesh = local_mesh()
    params = replicate_on(params, mesh)
    labels = class_labels(num_images, config.latent.num_classes)
    # Batches split over the local devices: round up, and pad the last batch.
    devices = mesh.devices.size
    batch = -(-min(config.sample.batch_size, num_images) // devices) * devices
    s = config.sample
    sample_fn = sampling.make_sampler(
        exp.model,
        num_steps=s.num_steps,
        cfg=float(s.cfg),
        sampler=s.sampler,
        cfg_schedule=s.cfg_schedule,
    )
    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    chunks = []
    # Inside the local mesh alone: the trainer calls this within its own (global) mesh.
    with jax.set_mesh(mesh), exp.rules_context():
        key = jax.random.key(seed)
        for i, start in enumerate(range(0, num_images, batch)):
            real = labels[start : start + batch]
            padded = jax.device_put(np.resize(real, batch).astype(np.int32), batch_sharding)
            key_i = jax.device_put(jax.random.fold_in(key, i), replicated)
            chunks.append(np.asarray(sample_fn(params, padded, key_i, None))[: len(real)])
    latents = np.concatenate(chunks)
    if config.latent.tokenizer == "identity":
        return labels, latents, latents
    if not config.latent.vae_checkpoint:
        log.warning("latent.vae_checkpoint is empty: writing latents only (no images).")
        return labels, latents, None
    with jax.set_mesh(mesh):
        decode = jax.jit(_decoder(config, mesh))
        images = np.concatenate(
            [
                np.asarray(decode(jax.device_put(latents[i : i + batch], replicated)))
                for i in range(0, num_images, batch)
            ]
        )
    return labels, latents, images


def write_training_grid(exp, params, workdir: str, step: int, writer) -> None:
    """The trainer's EMA sample grid: ``workdir/samples/step_<S>.png`` and TensorBoard."""
    n = exp.config.log.num_samples
    _, _, images = sample_grid(exp, params, n, seed=step)
    if images is None or jax.process_index() != 0:
        return
    grid = metrics_lib.image_grid(
        images, columns=min(exp.config.latent.num_classes, n), min_size=GRID_MIN_SIZE
    )
    path = fileio.write_png(fileio.as_path(workdir) / "samples" / f"step_{step:08d}.png", grid)
    writer.write_images(step, {"samples_ema": grid[None]})
    log.info("Wrote %s.", path)


def sample_to_workdir(exp: experiment_lib.Experiment, workdir: str) -> dict[str, str]:
    """``--mode=sample``: samples as ``sample.format`` says, from `inference_params`.

    * ``'grid'`` (the demo): ``workdir/samples.png`` (one column per class) and
      ``workdir/samples.npz`` holding ``latents`` (N, H, W, C), ``labels`` (N,) and, when they
      can be decoded, ``images`` (N, H, W, C) in [-1, 1]. A second run replaces them.
    * ``'adm'`` (at scale): `generate_samples`.

    Returns:
      The written paths (``{'npz': ...}`` and for a grid ``'png'``; empty on processes > 0 of a
      grid run).
    """
    if exp.config.sample.format == "adm":
        return {"npz": generate_samples(exp, workdir).published}
    config = exp.config
    params, source = experiment_lib.inference_params(exp, workdir)
    labels, latents, images = sample_grid(
        exp, params, config.sample.num_images, seed=config.sample.seed
    )
    paths = {}
    if jax.process_index() != 0:
        return paths
    root = fileio.as_path(workdir)
    arrays = {"latents": latents, "labels": labels}
    if images is not None:
        arrays["images"] = images
        cols = min(config.latent.num_classes, len(labels))
        grid = metrics_lib.image_grid(images, columns=cols, min_size=GRID_MIN_SIZE)
        paths["png"] = os.fspath(fileio.write_png(root / GRID_PNG, grid))
    paths["npz"] = os.fspath(fileio.write_npz(root / GRID_NPZ, **arrays))
    log.info("Sampled %s; wrote %s.", source.describe(), ", ".join(paths.values()))
    return paths
