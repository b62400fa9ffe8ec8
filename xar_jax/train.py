"""``--mode=train``: the training loop, as a library function.

Sections follow the life of a run: experiment (validated config, mesh, model), the workdir's
record and lock, schedule and optimizer, input, checkpoint restore (or sharded init), the jitted
step, the loop (metrics, checkpoints, sample grids). Sampling and evaluation live in
`xar_jax.generate` and `xar_jax.score`; this module imports the first for its periodic grids.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import parameter_overview
from jax.experimental import multihost_utils

from xar_jax import experiment as experiment_lib
from xar_jax import fileio, generate, scan_buffers
from xar_jax import metrics as metrics_lib
from xar_jax import sharding as sharding_lib
from xar_jax import train_state as ts
from xar_jax import workdir as workdir_lib
from xar_jax.data import pipeline
from xar_jax.stop_signal import StopSignals, signal_name

log = logging.getLogger("xar_jax.train")

PARAMETERS_FILE = (
    "parameters.txt"  # The parameter table (name, shape, dtype, size), in the workdir.
)


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient (params were not updated with it)."""


# ----------------------------------------------------------------------------------------------
# Input.
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


def train_batch_spec(config, mesh) -> dict[str, Any]:
    """The train step's batch as ShapeDtypeStructs, sharded as `make_data_iterator` gives it.

    Cached latents with on-device sampling give ``moments`` (B, g, g, 2C) float32; host sampling
    ``latents`` (B, g, g, C); the digits' images are the latents (B, 8, 8, 1). Labels (B,) int32.
    """
    b, g, c = config.train.global_batch_size, config.latent.grid_size, config.latent.channels
    s = sharding_lib.batch_sharding(mesh)
    batch = {"labels": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=s)}
    if config.data.source == "latents" and config.data.latent_sampling == "device":
        batch["moments"] = jax.ShapeDtypeStruct((b, g, g, 2 * c), jnp.float32, sharding=s)
    else:
        batch["latents"] = jax.ShapeDtypeStruct((b, g, g, c), jnp.float32, sharding=s)
    return batch


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
# The step.
def jit_train_step(exp: experiment_lib.Experiment, setup: experiment_lib.Training):
    """The jitted ``step(state, batch) -> (state, metrics)`` exactly as the trainer runs it:
    state sharded and donated, the batch split over the data axes, metrics replicated."""
    config = exp.config
    t = config.train
    step_fn = ts.make_train_step(
        exp.model,
        exp.layout,
        setup.optimizer,
        ema_decay=config.optim.ema_decay,
        label_drop_prob=t.label_drop_prob,
        objective=t.objective,
        grad_accum_steps=t.grad_accum_steps,
        nan_policy=t.nan_policy,
        latent_scale=config.latent.scale,
        learning_rate_fn=setup.lr_schedule,
    )
    return jax.jit(
        step_fn,
        in_shardings=(setup.state_shardings, sharding_lib.batch_sharding(exp.mesh)),
        out_shardings=(setup.state_shardings, sharding_lib.replicated(exp.mesh)),
        donate_argnums=(0,),
    )


def check_finite(state: ts.TrainState, train_config: ml_collections.ConfigDict) -> None:
    """Raises NonFiniteError when the run must stop: under 'stop' at the first non-finite step,
    under 'skip' after ``train.max_consecutive_skips`` non-finite steps in a row."""
    nan_policy = train_config.nan_policy
    bad = int(jax.device_get(state.nonfinite_step))
    if bad != ts.NO_NONFINITE and nan_policy == "stop":
        raise NonFiniteError(
            f"Step {bad} produced a non-finite loss or gradient; the run stopped (params are "
            f"those before step {bad}; nothing non-finite was checkpointed). Set "
            "--config.train.nan_policy=skip to drop such steps instead."
        )
    limit = train_config.max_consecutive_skips
    in_a_row = int(jax.device_get(state.consecutive_skips))
    if nan_policy == "skip" and in_a_row >= limit:
        raise NonFiniteError(
            f"{in_a_row} non-finite steps in a row up to step {int(jax.device_get(state.step))} "
            f"(train.max_consecutive_skips={limit}): the run has diverged and stopped without "
            "saving, so the checkpoints before the divergence are kept. Resume from them with a "
            "lower learning rate, or raise the limit."
        )


# ----------------------------------------------------------------------------------------------
def _claim_workdir(exp, workdir: str, allow_change: tuple[str, ...]):
    """Checks the config against the workdir's record and takes the lock (process 0).

    Returns ``(record or None, accepted changes, lock or None)``; raises before anything is written.
    """
    record = workdir_lib.read_record(workdir)
    accepted: list[str] = []
    if record is not None:
        accepted = workdir_lib.check_resume(
            record, exp.config, exp.mesh_shape, jax.process_count(), workdir, allow_change
        )
    lock, refusal = None, None
    if jax.process_index() == 0:
        fileio_root = workdir_lib.fileio.as_path(workdir)
        fileio_root.mkdir(parents=True, exist_ok=True)
        try:
            lock = workdir_lib.TrainLock(workdir)
            lock.acquire()
        except workdir_lib.WorkdirLockedError as error:
            lock, refusal = None, error
    # Every process learns process 0's answer: a refused start stops all of them, instead of
    # leaving the others waiting at the first collective.
    refused = refusal is not None
    if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
    if refusal is not None:
        raise refusal
    if refused:
        raise workdir_lib.WorkdirLockedError(
            f"{workdir}: process 0 could not take the workdir's lock (its log says why); "
            f"process {jax.process_index()} stops too."
        )
    return record, accepted, lock


def _record_start(exp, workdir, record, accepted) -> None:
    if jax.process_index() != 0:
        return
    log.info(
        "Effective config written to %s.", workdir_lib.write_effective_config(workdir, exp.config)
    )
    if record is None:
        workdir_lib.write_record(
            workdir,
            workdir_lib.RunRecord.for_config(
                exp.config, exp.mesh_shape, jax.process_count(), "train"
            ),
        )
    else:
        workdir_lib.update_record(
            workdir, record, exp.config, exp.mesh_shape, jax.process_count(), accepted
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_change: tuple[str, ...] = (),
    exp: experiment_lib.Experiment | None = None,
) -> ts.TrainState:
    """Trains (resuming from ``workdir/checkpoints`` if present) until the configured step.

    Args:
      config: a training config (see xar_jax/train_config.py).
      workdir: holds ``run.json``, ``checkpoints/``, TensorBoard events and ``samples/``.
      allow_change: groups of recorded run fields a resume may change ('mesh', 'data').
      exp: the experiment of ``config`` if already built (`xar_jax.experiment.build`).

    Returns:
      The final TrainState.

    Raises:
      WorkdirMismatchError / WorkdirLockedError before anything is touched; NonFiniteError;
      `xar_jax.stop_signal.Stopped` after SIGTERM or SIGINT (or a preemption notice), once the
      step in flight is done and its checkpoint saved.
    """
    exp = exp or experiment_lib.build(config, "train", workdir=workdir)
    record, accepted, lock = _claim_workdir(exp, workdir, allow_change)
    try:
        with StopSignals("the step in flight", sync_steps=True) as stop:
            return _train(exp, workdir, record, accepted, lock, stop)
    finally:
        if lock is not None:
            lock.release()


def _train(exp, workdir, record, accepted, lock, stop: StopSignals) -> ts.TrainState:
    config = exp.config
    setup = experiment_lib.training_setup(exp)
    is_main = jax.process_index() == 0
    writer = metrics_lib.create_writer(workdir, is_main_process=is_main)
    log.info(
        "Model %s params; mesh %s; %d steps (%d per epoch); global batch %d.",
        f"{exp.num_params:,}",
        exp.mesh_shape,
        setup.total_steps,
        setup.steps_per_epoch,
        config.train.global_batch_size,
    )
    if is_main:
        table = fileio.write_text(
            fileio.as_path(workdir) / PARAMETERS_FILE,
            parameter_overview.get_parameter_overview(exp.abstract_params, include_stats=False),
        )
        log.info(
            "Parameters by module: %s (every array: %s).",
            metrics_lib.module_totals(exp.abstract_params),
            table,
        )
    checkpointer = experiment_lib.checkpointer(config, workdir)
    data_iterator = make_data_iterator(config, exp.mesh)
    # With an accepted data change the saved iterator position belongs to the old pipeline.
    restore_iterator = None if "data" in accepted else data_iterator
    restored = checkpointer.restore_latest(setup.abstract_state, restore_iterator)
    if restored is not None:
        state, step = restored
        log.info("Resumed from checkpoint step %d in %s.", step, workdir)
    else:
        log.info("No checkpoint in %s: initialising (seed %d).", workdir, config.seed)
        state = ts.create_train_state(
            exp.model, setup.optimizer, config.seed, setup.state_shardings
        )
    _record_start(exp, workdir, record, accepted)
    log.info(
        "Writing checkpoints to %s and TensorBoard events to %s.", checkpointer.directory, workdir
    )
    step = int(jax.device_get(state.step))
    t = config.train
    check_finite(state, t)
    if step == 0:
        writer.write_texts(0, {"config": str(config)})
    if step >= setup.total_steps:
        log.info("Step %d reached train.num_steps / num_epochs: nothing to train.", step)
        checkpointer.close()
        return state

    with jax.set_mesh(exp.mesh), exp.rules_context():
        batch = to_model_batch(next(data_iterator), config.latent.tokenizer)
        compiled = _compile(jit_train_step(exp, setup), state, batch)
        means = metrics_lib.IntervalMeans(exp.layout.num_entities)
        profiler = metrics_lib.ProfilerWindow(
            workdir, config.log.profile_start_step, config.log.profile_num_steps
        )
        throughput = None
        stopping = not stop.synchronised and stop.requested()  # Before any step: nothing to save.
        while step < setup.total_steps and not stopping:
            profiler.before_step(step + 1)
            state, step_metrics = compiled(state, batch)
            step += 1
            means.add(step_metrics)
            profiler.after_step(step, state)
            if throughput is None:
                # Rates and ETA from the steady state: the first step (warm-up) is not counted.
                jax.block_until_ready(state.step)
                throughput = metrics_lib.Throughput(
                    start_step=step,
                    total_steps=setup.total_steps,
                    global_batch_size=t.global_batch_size,
                    num_devices=jax.device_count(),
                )
            last = step == setup.total_steps
            if step % config.log.every_steps == 0 or last:
                _log_step(writer, step, means.result(), step_metrics, throughput, state, t)
            stopping = stop.reached(step)  # Every process stops after the same step.
            if checkpointer.should_save(step) or last or stopping:
                check_finite(state, t)
                checkpointer.save(step, state, data_iterator)
            if lock is not None:
                lock.heartbeat()
            if stopping:
                break
            every = config.log.sample_every_steps
            if every and (step % every == 0 or last):
                generate.write_training_grid(exp, state.ema_params, workdir, step, writer)
            if not last:
                batch = to_model_batch(next(data_iterator), config.latent.tokenizer)
        profiler.close()
        checkpointer.wait_until_finished()
    writer.flush()
    saved = checkpointer.latest_step()
    checkpointer.close()
    if stopping and step < setup.total_steps:  # A stop after the last step is just the end.
        name = signal_name(stop.received)
        if saved is None or saved < step:  # Stopped before this start's first step.
            raise stop.stopped(
                f"Stopped by {name} before the first step: nothing new to save "
                f"(newest checkpoint: {saved})."
            )
        raise stop.stopped(
            f"Stopped by {name} after step {step}: checkpoint {saved} (with the "
            f"data iterator) is in {checkpointer.directory}. The same command "
            "resumes from it."
        )
    log.info("Training done at step %d; checkpoints in %s.", step, checkpointer.directory)
    return state


def lower_train_step(jitted, state, batch):
    """Lowers the jitted train step for ``state`` and ``batch`` (arrays or their specs), with the
    layer scans' stacked residuals and gradients left unfilled (`xar_jax.scan_buffers`): every
    place that compiles the trainer's step lowers it here."""
    with scan_buffers.uninitialised_scan_outputs():
        return jitted.lower(state, batch)


def _compile(jitted, state, batch):
    """Compiles the step ahead of the loop, saying so, and logs its memory per device."""
    cache = jax.config.jax_compilation_cache_dir
    log.info(
        "Compiling the train step (compilation cache: %s; a first compile can take minutes)...",
        cache or "off",
    )
    start = time.perf_counter()
    compiled = lower_train_step(jitted, state, batch).compile()
    log.info("Compiled the train step in %.1f s.", time.perf_counter() - start)
    log.info("Train step memory per device: %s.", metrics_lib.memory_summary(compiled))
    return compiled


def _log_step(writer, step, interval_means, step_metrics, throughput, state, train_config):
    """Interval means of the losses and gradient norm, the step's learning rate, the rates."""
    check_finite(state, train_config)
    # Loss, gradient norm and learning rate lead the console line; per-entity losses follow.
    scalars = {
        "loss": interval_means.pop("loss"),
        "grad_norm": interval_means.pop("grad_norm"),
        "lr": jax.device_get(step_metrics["lr"]),
        **interval_means,
    }
    rates = throughput.report(step) if throughput.measurable(step) else None
    if rates is not None:
        scalars["steps_per_sec"] = rates["steps_per_sec"]
        scalars["images_per_sec_per_device"] = rates["images_per_sec_per_device"]
    skipped = int(jax.device_get(state.skipped_steps))
    if skipped:
        scalars["skipped_nonfinite_steps"] = skipped
    if rates is not None:
        scalars["eta_seconds"] = rates["eta_seconds"]  # The console line ends "| ETA 1h02m03s".
    writer.write_scalars(step, scalars)
