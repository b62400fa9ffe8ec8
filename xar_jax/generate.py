"""Sampling and evaluation at scale: class-balanced, resumable, on every device of every host.

``--mode=sample`` with ``sample.format='adm'`` and ``--mode=eval`` run here:

1. Checks every path the run needs (reference statistics, Inception, VAE, output directory)
   before any compilation, naming the config field and the command that creates the file.
2. Restores the newest checkpoint and takes its EMA params (``sample.use_ema``).
3. Generates class-balanced labels (50 per class for 50k ImageNet images) with
   `xar_jax.evaluation.sample_writer.write_samples`: process ``p`` of ``P`` generates batches
   ``p, p + P, ...``, each batch sharded over that process's devices; finished batches are shards
   on disk, so a killed run restarted with the same command continues where it stopped, and
   ``samples.npz`` (``arr_0`` uint8 ``(N, H, W, 3)`` + ``labels``, ADM's format) is complete or
   absent. The images depend only on the checkpoint, the settings and ``sample.seed``.
4. ``--mode=eval`` scores them: FID and Inception Score against ``eval.reference_stats`` for
   ImageNet, `digits_quality` (class accuracy, Fréchet distance) for the digits demo, and writes
   ``metrics.json`` next to the samples, ``workdir/eval.json`` (the latest evaluation) and
   TensorBoard scalars ``eval/<metric>`` at the checkpoint's step.

Outputs of one checkpoint and one set of settings live in one directory under
``sample.out_dir`` (default ``workdir/generated``), e.g. ``step_00001012-sde20-cfg2-seed0-n1000``,
with ``settings.json`` recording everything that determines the images; a rerun with other
settings goes to another directory, and a directory is never reused for different settings.

Why process-local generation: sampling needs no cross-host communication, so each host runs its
own batches at its own pace, with the params replicated on its devices (xAR-H: 4.7 GB float32,
well within a TPU v4/v5 or H200 chip). Digits keep their single channel (``(N, 8, 8, 1)``
uint8); ImageNet images are decoded by the KL-16 VAE to ``(N, 256, 256, 3)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from xar_jax import sampling
from xar_jax import sharding as sharding_lib

log = logging.getLogger("xar_jax.generate")

GENERATED_DIR = "generated"
SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.json"
LATEST_EVAL_FILE = "eval.json"

ImageGenerator = Callable[[np.ndarray, jax.Array], np.ndarray]


# ----------------------------------------------------------------------------------------------
# Checks before any work.
def _exists(path: str) -> bool:
    return epath.Path(path).exists()


def per_process_batch(config: ml_collections.ConfigDict, process_count: int,
                      local_devices: int) -> int:
    """Images per generator call on one process: ``sample.batch_size`` (global) / processes.

    Raises:
      ValueError naming ``config.sample.batch_size`` when it does not split evenly.
    """
    batch = config.sample.batch_size
    if batch % process_count or (batch // process_count) % local_devices:
        raise ValueError(
            f"config.sample.batch_size={batch} is not allowed; allowed: a multiple of "
            f"{process_count} processes x {local_devices} local devices."
        )
    return batch // process_count


def samples_root(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The directory holding one sub-directory per sampling run (a local or shared filesystem).

    Raises:
      ValueError for a gs:// location: the resumable writer needs a POSIX filesystem.
    """
    root = config.sample.out_dir or os.path.join(workdir, GENERATED_DIR)
    if "://" in root:
        field = "sample.out_dir" if config.sample.out_dir else "sample.out_dir (default: workdir)"
        raise ValueError(
            f"config.{field}={root!r} is not allowed; allowed: a local path, or with several "
            "hosts a filesystem they share (e.g. a gcsfuse mount such as /gcs/BUCKET/samples); "
            "the resumable sample writer renames files, which object stores do not do atomically."
        )
    return root


def check_inputs(config: ml_collections.ConfigDict, workdir: str, *, scoring: bool) -> None:
    """Fails before any compilation when a file the run needs is missing.

    Args:
      config: a training config.
      workdir: the run directory.
      scoring: also check what ``--mode=eval`` needs (reference statistics, Inception).

    Raises:
      FileNotFoundError / ValueError naming the config field and how to create the file.
    """
    samples_root(config, workdir)
    if config.latent.tokenizer == "kl16":
        vae = config.latent.vae_checkpoint
        if not vae or not os.path.isdir(vae):
            raise FileNotFoundError(
                f"config.latent.vae_checkpoint={vae!r} is not a directory; sampling images needs "
                "the KL-16 VAE converted with `python -m xar_jax.convert vae --src kl16.ckpt "
                "--out DIR` (a local path)."
            )
    if not scoring or config.data.source == "digits":
        return
    stats = config.eval.reference_stats
    if not stats or not _exists(stats):
        raise FileNotFoundError(
            f"config.eval.reference_stats={stats!r} does not exist; it is the FID reference "
            "statistics .npz (mu, sigma): ADM's VIRTUAL_imagenet256_labeled.npz, or create one "
            "with `python -m xar_jax.evaluation.reference_stats --images DIR --inception DIR "
            "--out stats.npz`."
        )
    inception = config.eval.inception_checkpoint
    if not inception or not os.path.exists(inception):
        raise FileNotFoundError(
            f"config.eval.inception_checkpoint={inception!r} does not exist; convert the FID "
            "Inception weights with `python -m xar_jax.convert inception --src "
            "pt_inception-2015-12-05-6726825d.pth --out DIR` (a local path)."
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
            x = multihost_gather(x)
        return jax.device_put(x, replicated)

    return jax.tree.map(one, tree)


def multihost_gather(x: jax.Array) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8, rounded to nearest (as `sample_writer.to_uint8`, on device)."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(
        jnp.uint8
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
    fn = sampling.make_sampler(
        model, num_steps=num_steps, cfg=float(cfg), sampler=sampler, cfg_schedule=cfg_schedule
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
    from xar_jax import vae as vae_lib
    from xar_jax.convert.vae import load_converted

    model, params = load_converted(path)
    params = replicate_on(params, mesh)
    return lambda latents: vae_lib.decode(params, latents, model=model, scale=scale)


# ----------------------------------------------------------------------------------------------
# One sampling run: a directory per (checkpoint, settings).
@dataclasses.dataclass(frozen=True)
class SampleRun:
    """What determines a set of generated images."""

    checkpoint_step: int
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
        return (f"step_{self.checkpoint_step:08d}-{self.sampler}{self.num_steps}-cfg{self.cfg:g}"
                f"-seed{self.seed}-n{self.num_images}")


def sample_run(config: ml_collections.ConfigDict, step: int, num_images: int) -> SampleRun:
    s = config.sample
    return SampleRun(
        checkpoint_step=int(step), num_images=int(num_images), seed=s.seed,
        num_steps=s.num_steps, cfg=float(s.cfg), cfg_schedule=s.cfg_schedule, sampler=s.sampler,
        use_ema=s.use_ema, model_dtype=config.model.dtype, tokenizer=config.latent.tokenizer,
        vae_checkpoint=os.path.abspath(config.latent.vae_checkpoint)
        if config.latent.vae_checkpoint else "",
        batch_size=s.batch_size,
    )


def _check_settings_file(out_dir: str, run: SampleRun) -> None:
    """Writes ``settings.json`` on the first run; refuses a directory made with other settings."""
    from xar_jax.evaluation import sample_writer

    sample_writer.check_or_write_json(
        os.path.join(out_dir, SETTINGS_FILE),
        dataclasses.asdict(run),
        holds="samples made with other settings",
        remedy="Delete it or set config.sample.out_dir elsewhere.",
    )


def _write_text(path: str, text: str) -> None:
    """Writes via a temporary name then renames (local or gs://)."""
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{os.getpid()}-{target.name}"
    tmp.write_text(text)
    tmp.rename(target)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def generate_samples(
    config: ml_collections.ConfigDict, workdir: str, *, num_images: int | None = None
) -> tuple[str, SampleRun]:
    """``--mode=sample`` at scale: class-balanced samples of the newest checkpoint, resumable.

    Every process must call this (multi-host runs share ``sample.out_dir``).

    Args:
      config: a training config; ``sample.*`` set the sampler, ``latent.*`` the decoder.
      workdir: holds ``checkpoints/``.
      num_images: default ``sample.num_images``; must be a multiple of ``latent.num_classes``.

    Returns:
      ``(path of samples.npz, SampleRun)`` on every process (the file exists when it returns).
    """
    from xar_jax import train  # train imports this module lazily; no import cycle at load time.
    from xar_jax.evaluation import sample_writer

    num_images = config.sample.num_images if num_images is None else num_images
    classes = config.latent.num_classes
    if num_images % classes:
        raise ValueError(
            f"{num_images} images cannot be class-balanced over latent.num_classes={classes}; "
            f"allowed: a multiple of {classes}."
        )
    check_inputs(config, workdir, scoring=False)
    local_batch = per_process_batch(config, jax.process_count(), jax.local_device_count())
    root = samples_root(config, workdir)

    run = train.Run(config, workdir)
    with jax.set_mesh(run.mesh), run.rules_context():
        restored = run.checkpointer.restore_latest(run.abstract_state)
    run.checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"No checkpoint under {workdir}/checkpoints to sample from.")
    state, step = restored
    settings = sample_run(config, step, num_images)
    out_dir = os.path.join(root, settings.dir_name())
    final = os.path.join(out_dir, sample_writer.SAMPLES_FILE)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        _check_settings_file(out_dir, settings)
    _barrier("xar_jax.generate.settings")
    if os.path.exists(final):
        log.info("%s exists: nothing to sample.", final)
        return final, settings

    mesh = local_mesh()
    params = replicate_on(state.ema_params if config.sample.use_ema else state.params, mesh)
    del state
    decoder = None
    if config.latent.tokenizer == "kl16":
        decoder = vae_decoder(config.latent.vae_checkpoint, config.latent.scale, mesh)
    s = config.sample
    generate = make_image_generator(
        run.model, params, mesh=mesh, num_steps=s.num_steps, cfg=s.cfg, sampler=s.sampler,
        cfg_schedule=s.cfg_schedule, decoder=decoder,
    )
    log.info("Sampling %d images (checkpoint step %d) into %s.", num_images, step, out_dir)
    with jax.set_mesh(mesh), run.rules_context():
        sample_writer.write_samples(
            generate, out_dir, num_images=num_images, num_classes=classes,
            batch_size=local_batch, seed=s.seed,
            png_dir=os.path.join(out_dir, "png") if s.write_png else None,
        )
    _barrier("xar_jax.generate.assembled")  # process 0 assembles after the writer's barrier
    log.info("Wrote %s.", final)
    return final, settings


# ----------------------------------------------------------------------------------------------
# Scoring.
def read_npz(path: str, key: str) -> np.ndarray:
    with open(path, "rb") as f, np.load(f) as data:
        return data[key]


def score_digits(path: str) -> dict[str, float]:
    """Class accuracy and Fréchet distance of an ADM-format digits ``samples.npz``."""
    from xar_jax.evaluation.digits_score import digits_quality

    images = read_npz(path, "arr_0").astype(np.float32) / 127.5 - 1.0
    return {k: float(v) for k, v in digits_quality(images, read_npz(path, "labels")).items()}


def load_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a statistics ``.npz`` at a local path or gs:// URL."""
    from xar_jax.evaluation import fid

    if "://" not in path:
        return fid.load_reference_stats(path)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "reference.npz")
        with open(local, "wb") as f:
            f.write(epath.Path(path).read_bytes())
        return fid.load_reference_stats(local)


def score_imagenet(config: ml_collections.ConfigDict, path: str) -> dict[str, float]:
    """FID and Inception Score of ``samples.npz`` (all processes take part)."""
    from xar_jax.convert.inception import load_inception
    from xar_jax.evaluation.evaluate import evaluate_images
    from xar_jax.evaluation.image_sources import NpzImages

    reference = load_reference(config.eval.reference_stats)
    metrics = evaluate_images(
        load_inception(config.eval.inception_checkpoint), NpzImages(path), reference,
        batch_size=config.eval.batch_size,
    )
    return {k: float(v) for k, v in metrics.items()}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """``--mode=eval``: sample ``eval.num_images`` (resumable), decode, score, record.

    Writes ``metrics.json`` next to the samples, ``workdir/eval.json`` (the latest evaluation)
    and TensorBoard scalars ``eval/<metric>`` at the checkpoint's step.

    Returns:
      The metrics: ``class_accuracy``, ``frechet_distance`` (digits) or ``fid``,
      ``inception_score``, ``inception_score_std``, ``num_images`` (ImageNet).
    """
    from xar_jax import metrics as metrics_lib

    check_inputs(config, workdir, scoring=True)
    path, settings = generate_samples(config, workdir, num_images=config.eval.num_images)
    if config.data.source == "digits":
        metrics = score_digits(path)
    else:
        metrics = score_imagenet(config, path)
    if jax.process_index() == 0:
        record = json.dumps(
            {**metrics, "samples": path, "settings": dataclasses.asdict(settings)}, indent=2
        )
        _write_text(os.path.join(os.path.dirname(path), METRICS_FILE), record)
        _write_text(os.path.join(workdir, LATEST_EVAL_FILE), record)
        writer = metrics_lib.create_writer(workdir, is_main_process=True)
        writer.write_scalars(settings.checkpoint_step, {f"eval/{k}": v for k, v in metrics.items()})
        writer.close()
    log.info("Eval at step %d: %s", settings.checkpoint_step, metrics)
    return metrics


def read_latest_metrics(workdir: str) -> dict[str, Any]:
    """The record of the latest ``--mode=eval`` in ``workdir`` (metrics, samples, settings)."""
    return json.loads((epath.Path(workdir) / LATEST_EVAL_FILE).read_text())
