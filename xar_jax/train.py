"""The training loop and the sample / eval entry points, as library functions.

Sections follow the life of a run: config check, mesh, model, optimizer, shardings, input,
checkpoint restore (or sharded init), jitted step, loop (metrics, checkpoints, sample grids).
`xar_jax.main` is only flags around `train_and_evaluate`, `sample_to_workdir` and `evaluate`.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import linen as nn
from jax.experimental import multihost_utils

from xar_jax import metrics as metrics_lib
from xar_jax import sampling
from xar_jax import sharding as sharding_lib
from xar_jax import train_state as ts
from xar_jax.checkpointing import Checkpointer
from xar_jax.data import pipeline
from xar_jax.entities import EntityLayout, layout_from_config
from xar_jax.model import XAR, abstract_params, build_model, count_params
from xar_jax.train_config import validate_config

log = logging.getLogger("xar_jax.train")


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient (params were not updated with it)."""


# ----------------------------------------------------------------------------------------------
# Input.
def dataset_size(config) -> int:
    """Examples per epoch: ``train.dataset_size`` or the size of the configured split."""
    if config.train.dataset_size > 0:
        return config.train.dataset_size
    return pipeline.dataset_size(config.data)


def make_data_iterator(config, mesh: jax.sharding.Mesh):
    """This process's checkpointable Grain iterator of global, batch-sharded device arrays."""
    return pipeline.make_train_iterator(
        config.data,
        global_batch_size=config.train.global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=config.seed,
        sharding=sharding_lib.batch_sharding(mesh),
    )


def to_model_batch(batch: dict[str, Any], tokenizer: str) -> dict[str, Any]:
    """Pipeline batch -> train-step batch: ``labels`` and ``latents`` or ``moments``."""
    out = {"labels": batch["labels"]}
    if "latents" in batch:
        out["latents"] = batch["latents"]
    elif "moments" in batch:
        out["moments"] = batch["moments"]
    elif tokenizer == "identity" and "images" in batch:
        out["latents"] = batch["images"]
    else:
        raise KeyError(
            f"Batch keys {sorted(batch)} give no latents for latent.tokenizer={tokenizer!r}."
        )
    return out


# ----------------------------------------------------------------------------------------------
# Setup shared by training, sampling and evaluation.
class Run:
    """Everything derived from the config once: mesh, layout, model, optimizer, shardings."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        validate_config(config, jax.device_count())
        self.config = config
        self.workdir = workdir
        m = config.mesh
        self.mesh = sharding_lib.make_mesh(m.data, m.fsdp, m.tensor)
        self.layout: EntityLayout = layout_from_config(config.entity, config.latent.grid_size)
        # The class embedding has num_classes + 1 rows; the last is the null class.
        self.model: XAR = build_model(
            config.model,
            self.layout,
            in_channels=config.latent.channels,
            num_classes=config.latent.num_classes,
        )
        t, o = config.train, config.optim
        self.steps_per_epoch = max(dataset_size(config) // t.global_batch_size, 1)
        epochs = lambda e: ts.steps_from_epochs(e, self.steps_per_epoch)
        self.total_steps = t.num_steps if t.num_steps > 0 else epochs(t.num_epochs)
        self.lr_schedule = ts.make_lr_schedule(
            base_lr=o.lr,
            end_lr=o.end_lr,
            # The schedule follows the epochs; train.num_steps only ends the run elsewhere.
            warmup_steps=epochs(o.warmup_epochs),
            decay_start_step=epochs(o.decay_start_epoch),
            total_steps=epochs(t.num_epochs),
        )
        boxed = abstract_params(self.model)
        self.num_params = count_params(boxed, model=self.model)
        self.optimizer = ts.make_optimizer(
            learning_rate=self.lr_schedule,
            b1=o.b1,
            b2=o.b2,
            weight_decay=o.weight_decay,
            clip_norm=o.clip_norm,
            weight_decay_mask=ts.weight_decay_mask_fn(boxed),
        )
        rng_data = jax.random.key_data(jax.random.key(config.seed))
        specs = ts.state_partition_specs(self.model, self.optimizer, rng_data)
        self.state_shardings = sharding_lib.logical_shardings(specs, self.mesh)
        self.abstract_state = ts.abstract_train_state(
            self.model, self.optimizer, rng_data, self.state_shardings
        )
        self.checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            every_steps=config.checkpoint.every_steps,
            max_to_keep=config.checkpoint.max_to_keep,
            keep_period=config.checkpoint.keep_period,
            async_save=config.checkpoint.async_save,
        )

    def rules_context(self):
        return nn.logical_axis_rules(list(sharding_lib.LOGICAL_AXIS_RULES))

    def init_or_restore(self, data_iterator=None) -> ts.TrainState:
        restored = self.checkpointer.restore_latest(self.abstract_state, data_iterator)
        if restored is not None:
            log.info("Resumed from checkpoint step %d in %s.", restored[1], self.workdir)
            return restored[0]
        log.info("No checkpoint in %s: initialising (seed %d).", self.workdir, self.config.seed)
        return ts.create_train_state(
            self.model, self.optimizer, self.config.seed, self.state_shardings
        )


def check_finite(state: ts.TrainState, nan_policy: str) -> None:
    """Raises NonFiniteError under the 'stop' policy if any step was non-finite."""
    bad = int(jax.device_get(state.nonfinite_step))
    if bad != ts.NO_NONFINITE and nan_policy == "stop":
        raise NonFiniteError(
            f"Step {bad} produced a non-finite loss or gradient; the run stopped (params are "
            f"those before step {bad}; nothing non-finite was checkpointed). Set "
            "--config.train.nan_policy=skip to drop such steps instead."
        )


# ----------------------------------------------------------------------------------------------
# Training.
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> ts.TrainState:
    """Trains (resuming from ``workdir/checkpoints`` if present) until the configured step.

    Args:
      config: a training config (see xar_jax/train_config.py).
      workdir: holds ``checkpoints/``, TensorBoard events and ``samples/``.

    Returns:
      The final TrainState.
    """
    run = Run(config, workdir)
    is_main = jax.process_index() == 0
    writer = metrics_lib.create_writer(workdir, is_main_process=is_main)
    log.info(
        "Model %d params; mesh %s; %d steps (%d per epoch); global batch %d.",
        run.num_params, dict(run.mesh.shape), run.total_steps, run.steps_per_epoch,
        config.train.global_batch_size,
    )
    data_iterator = make_data_iterator(config, run.mesh)
    state = run.init_or_restore(data_iterator)
    step = int(jax.device_get(state.step))
    check_finite(state, config.train.nan_policy)

    t = config.train
    step_fn = ts.make_train_step(
        run.model,
        run.layout,
        run.optimizer,
        ema_decay=config.optim.ema_decay,
        label_drop_prob=t.label_drop_prob,
        objective=t.objective,
        grad_accum_steps=t.grad_accum_steps,
        nan_policy=t.nan_policy,
        latent_scale=config.latent.scale,
        learning_rate_fn=run.lr_schedule,
    )
    batch_sharding = sharding_lib.batch_sharding(run.mesh)
    jit_step = jax.jit(
        step_fn,
        in_shardings=(run.state_shardings, batch_sharding),
        out_shardings=(run.state_shardings, sharding_lib.replicated(run.mesh)),
        donate_argnums=(0,),
    )
    throughput = metrics_lib.Throughput(
        start_step=step,
        total_steps=run.total_steps,
        global_batch_size=t.global_batch_size,
        num_devices=jax.device_count(),
    )
    if step == 0:
        writer.write_texts(0, {"config": str(config)})

    with jax.set_mesh(run.mesh), run.rules_context():
        pending = None
        while step < run.total_steps:
            batch = to_model_batch(next(data_iterator), config.latent.tokenizer)
            state, pending = jit_step(state, batch)
            step += 1
            last = step == run.total_steps
            if step % config.log.every_steps == 0 or last:
                _log_step(writer, step, jax.device_get(pending), throughput, state, t.nan_policy)
            preempted = run.checkpointer.reached_preemption(step)
            if run.checkpointer.should_save(step) or last or preempted:
                check_finite(state, t.nan_policy)
                run.checkpointer.save(step, state, data_iterator)
            if preempted:
                log.warning("Preemption notice at step %d: checkpoint saved, stopping.", step)
                break
            every = config.log.sample_every_steps
            if every and (step % every == 0 or last):
                _write_sample_grid(run, state, writer, step)
        run.checkpointer.wait_until_finished()
    writer.flush()
    run.checkpointer.close()
    return state


def _log_step(writer, step, step_metrics, throughput, state, nan_policy):
    check_finite(state, nan_policy)
    rates = throughput.report(step)
    scalars = {
        "loss": step_metrics["loss"],
        "grad_norm": step_metrics["grad_norm"],
        "lr": step_metrics["lr"],
        "steps_per_sec": rates["steps_per_sec"],
        "images_per_sec_per_device": rates["images_per_sec_per_device"],
    }
    for i, value in enumerate(np.asarray(step_metrics["loss_per_entity"])):
        scalars[f"loss_entity_{i}"] = value
    skipped = int(jax.device_get(state.skipped_steps))
    if skipped:
        scalars["skipped_nonfinite_steps"] = skipped
    writer.write_scalars(step, scalars)
    metrics_lib.log.info("step %d | ETA %s", step, metrics_lib.format_eta(rates["eta_seconds"]))


# ----------------------------------------------------------------------------------------------
# Sampling.
def class_labels(num_images: int, num_classes: int) -> np.ndarray:
    """Labels 0, 1, ..., num_classes-1, 0, 1, ... (a grid row per class when columns = classes)."""
    return (np.arange(num_images) % num_classes).astype(np.int32)


def generate(run: Run, params: Any, labels: np.ndarray, *, seed: int) -> np.ndarray:
    """Latents (N, H, W, C) for ``labels``, in batches of ``sample.batch_size``."""
    s = run.config.sample
    key = jax.random.key(seed)
    out = []
    for i, start in enumerate(range(0, len(labels), s.batch_size)):
        chunk = jnp.asarray(labels[start: start + s.batch_size])
        latents = sampling.sample(
            run.model,
            params,
            chunk,
            num_steps=s.num_steps,
            cfg=s.cfg,
            key=jax.random.fold_in(key, i),
            sampler=s.sampler,
            cfg_schedule=s.cfg_schedule,
        )
        # The latents may span several processes' devices: gather them on every host.
        out.append(np.asarray(multihost_utils.process_allgather(latents, tiled=True)))
    return np.concatenate(out)


def latents_to_images(run: Run, latents: np.ndarray) -> np.ndarray | None:
    """Images in [-1, 1] (N, H, W, C), or None when no decoder is configured."""
    if run.config.latent.tokenizer == "identity":
        return latents
    path = run.config.latent.vae_checkpoint
    if not path:
        log.warning("latent.vae_checkpoint is empty: writing latents only (no images).")
        return None
    from xar_jax import vae as vae_lib

    model, params = _load_vae(path)
    batch = run.config.sample.batch_size
    images = [
        np.asarray(vae_lib.decode(params, jnp.asarray(latents[i: i + batch]), model=model,
                                  scale=run.config.latent.scale))
        for i in range(0, len(latents), batch)
    ]
    return np.concatenate(images)


@functools.lru_cache(maxsize=2)
def _load_vae(path: str):
    """The KL-16 VAE module and its params from a `python -m xar_jax.convert vae` directory."""
    from xar_jax import vae as vae_lib
    from xar_jax.convert.params_io import load_params

    return vae_lib.VAE(**vae_lib.vae_config("kl16")), load_params(path)


def _write_sample_grid(run: Run, state: ts.TrainState, writer, step: int) -> None:
    n = run.config.log.num_samples
    labels = class_labels(n, run.config.latent.num_classes)
    images = latents_to_images(run, generate(run, state.ema_params, labels, seed=step))
    if images is None or jax.process_index() != 0:
        return
    grid = metrics_lib.image_grid(images, columns=min(run.config.latent.num_classes, n))
    path = os.path.join(run.workdir, "samples", f"step_{step:08d}.png")
    _write_png(path, grid)
    writer.write_images(step, {"samples_ema": grid[None]})


def _write_png(path: str, grid: np.ndarray) -> None:
    """Writes via a temporary name then renames (local or gs://)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    _write_bytes(path, buffer.getvalue())


def _write_npz(path: str, **arrays) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _write_bytes(path, buffer.getvalue())


def _write_bytes(path: str, data: bytes) -> None:
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(target)


def restore_for_inference(run: Run) -> ts.TrainState:
    restored = run.checkpointer.restore_latest(run.abstract_state)
    if restored is None:
        raise FileNotFoundError(f"No checkpoint under {run.workdir}/checkpoints to sample from.")
    return restored[0]


def sample_to_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """``--mode=sample``: the newest checkpoint's samples, as ``sample.format`` says.

    * ``'grid'`` (the demo): ``workdir/samples.png`` (one column per class) and
      ``workdir/samples.npz`` holding ``latents`` (N, H, W, C), ``labels`` (N,) and, when they
      can be decoded, ``images`` (N, H, W, C) in [-1, 1].
    * ``'adm'`` (at scale): ``sample.num_images`` class-balanced images, resumable, sharded over
      every device of every host (`xar_jax.generate.generate_samples`), written as ADM's
      ``samples.npz`` (``arr_0`` uint8, ``labels``) and optional PNGs.

    Returns:
      The written paths (``{'npz': ...}`` and for a grid ``'png'``; empty on processes > 0 of a
      grid run).
    """
    if config.sample.format == "adm":
        from xar_jax import generate as generate_lib

        path, _ = generate_lib.generate_samples(config, workdir)
        return {"npz": path}
    return _sample_grid_to_workdir(config, workdir)


def _sample_grid_to_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    run = Run(config, workdir)
    with jax.set_mesh(run.mesh), run.rules_context():
        state = restore_for_inference(run)
        params = state.ema_params if config.sample.use_ema else state.params
        labels = class_labels(config.sample.num_images, config.latent.num_classes)
        latents = generate(run, params, labels, seed=config.sample.seed)
    images = latents_to_images(run, latents)
    run.checkpointer.close()
    paths = {}
    if jax.process_index() != 0:
        return paths
    arrays = {"latents": latents, "labels": labels}
    if images is not None:
        arrays["images"] = images
        paths["png"] = os.path.join(workdir, "samples.png")
        cols = min(config.latent.num_classes, len(labels))
        _write_png(paths["png"], metrics_lib.image_grid(images, columns=cols))
    paths["npz"] = os.path.join(workdir, "samples.npz")
    _write_npz(paths["npz"], **arrays)
    log.info("Wrote %s.", ", ".join(paths.values()))
    return paths


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """``--mode=eval``: samples ``eval.num_images`` (resumable), decodes and scores them.

    Digits: class accuracy and Fréchet distance (`digits_quality`); ImageNet: FID and Inception
    Score against ``eval.reference_stats``. Writes ``metrics.json`` next to the samples,
    ``workdir/eval.json`` and TensorBoard scalars; see `xar_jax.generate.evaluate`.

    Returns:
      The metrics.
    """
    from xar_jax import generate as generate_lib

    return generate_lib.evaluate(config, workdir)
