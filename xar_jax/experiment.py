"""The experiment layer: what training, sampling and evaluation all stand on.

`build` turns a config into an `Experiment` once per process: it validates the config for the mode
at hand (the only place that does), resolves what depends on the devices (the mesh shape, the
attention kernel of 'auto'), then makes the mesh, the entity layout, the model and the params'
shardings. Nothing below the experiment resolves or validates these again. Training adds its optimizer, schedule and state layout with `training_setup`
(the only step that needs the size of the training set). Sampling and evaluation get their params
from `inference_params`: the EMA params of the workdir's newest checkpoint (an Orbax partial
restore, no optimizer state), or converted released weights (``config.weights``).

Nothing here reads data, compiles a step or writes a file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from xar_jax import attention
from xar_jax import sharding as sharding_lib
from xar_jax import train_state as ts
from xar_jax import weights as weights_lib
from xar_jax import workdir as workdir_lib
from xar_jax.checkpointing import Checkpointer
from xar_jax.data import pipeline
from xar_jax.entities import EntityLayout
from xar_jax.errors import ConfigError, MissingInputError
from xar_jax.model import (
    DTYPES,
    XAR,
    ResolvedSettings,
    abstract_params,
    build_model,
    count_params,
    resolve_layers,
)
from xar_jax.train_config import validate_config

log = logging.getLogger("xar_jax.experiment")

MODES = ("train", "sample", "eval")
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Mesh, layout, model and param shardings of one config on one set of devices."""

    config: ml_collections.ConfigDict
    mode: str
    mesh: jax.sharding.Mesh
    layout: EntityLayout
    settings: ResolvedSettings  # The model fields resolved for the devices ('auto' replaced).
    model: XAR
    param_shardings: Any  # Params-shaped tree of NamedSharding.
    abstract_params: Any  # Params-shaped tree of ShapeDtypeStruct with shardings.
    num_params: int  # The published count (MLP padding not counted).

    def rules_context(self):
        """Logical axis rules for linen's constraints inside jitted code."""
        return nn.logical_axis_rules(list(sharding_lib.LOGICAL_AXIS_RULES))

    @property
    def mesh_shape(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.mesh.shape.items()}


def resolve_config(
    config: ml_collections.ConfigDict,
    backend: str,
    workdir: str | None = None,
    mode: str = "train",
) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the 'auto' layer settings resolved for ``backend`` and ``mode``.

    ``model.scan_layers`` and ``model.remat`` go through `xar_jax.model.resolve_layers`; a run
    already recorded in ``workdir`` keeps its layer layout. ``config`` itself is not changed.
    """
    m = config.model
    if m.scan_layers != "auto" and m.remat != "auto":
        return config
    recorded = None
    if workdir:
        record = workdir_lib.read_record(workdir)
        scan = None if record is None else record.model.get("model.scan_layers")
        recorded = scan if isinstance(scan, bool) else None
    scan_layers, remat = resolve_layers(
        m.preset, m.scan_layers, m.remat, backend, recorded, training=mode == "train"
    )
    fields = config.to_dict()
    fields["model"].update(scan_layers=scan_layers, remat=remat)
    resolved = ml_collections.ConfigDict(fields)
    if config.is_locked:
        resolved.lock()
    return resolved


def build(
    config: ml_collections.ConfigDict,
    mode: str,
    *,
    devices: Sequence[Any] | None = None,
    workdir: str | None = None,
) -> Experiment:
    """Validates ``config`` for ``mode`` and builds the experiment on ``devices`` (default all).

    ``devices`` may be abstract (a TPU topology's, for ahead-of-time compilation). The
    experiment's config is ``config`` with its 'auto' layer settings resolved for the devices'
    platform (`resolve_config`; ``workdir``: a run recorded there keeps its layer layout), and
    ``config.prng_impl`` becomes JAX's default PRNG.

    Raises:
      ValueError naming the config field, before anything is built.
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not allowed; allowed: {' | '.join(MODES)}.")
    devices = list(jax.devices() if devices is None else devices)
    checked = validate_config(config, len(devices), training=mode == "train")
    config = resolve_config(config, devices[0].platform, workdir, mode)
    jax.config.update("jax_default_prng_impl", config.prng_impl)
    mesh = sharding_lib.make_mesh(
        *checked.mesh_shape, devices=devices, num_slices=config.mesh.num_slices
    )
    settings = resolve_model_settings(config.model, devices[0].platform)
    # The class embedding has num_classes + 1 rows; the last is the null class.
    model = build_model(
        config.model,
        checked.layout,
        settings,
        in_channels=config.latent.channels,
        num_classes=config.latent.num_classes,
    )
    boxed = abstract_params(model)
    shardings = sharding_lib.logical_shardings(nn.get_partition_spec(boxed), mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return Experiment(
        config=config,
        mode=mode,
        mesh=mesh,
        layout=checked.layout,
        settings=settings,
        model=model,
        param_shardings=shardings,
        abstract_params=abstract,
        num_params=count_params(boxed, model=model),
    )


def resolve_model_settings(model_cfg: ml_collections.ConfigDict, platform: str) -> ResolvedSettings:
    """The model fields that depend on the devices' ``platform`` ('cpu', 'gpu', 'tpu'), resolved
    from a validated config's ``model`` section: the attention kernel of 'auto'."""
    return ResolvedSettings(
        attention_impl=attention.resolve(
            model_cfg.attention_impl, model_cfg.attn_dropout, DTYPES[model_cfg.dtype], platform
        ),
    )


# ----------------------------------------------------------------------------------------------
# Training.
@dataclasses.dataclass(frozen=True)
class Training:
    """What only training needs: the schedule, optimizer and the train state's layout."""

    steps_per_epoch: int
    total_steps: int
    lr_schedule: Any
    optimizer: Any
    state_shardings: Any  # TrainState-shaped tree of NamedSharding.
    abstract_state: Any  # TrainState of ShapeDtypeStruct with shardings.


def dataset_size(config: ml_collections.ConfigDict) -> int:
    """Examples per epoch: ``train.dataset_size`` or the size of the configured split."""
    if config.train.dataset_size > 0:
        return config.train.dataset_size
    return pipeline.dataset_size(config.data)


def training_setup(exp: Experiment) -> Training:
    """Schedule, optimizer and state shardings of ``exp``'s config (reads the dataset's size)."""
    config = exp.config
    t, o = config.train, config.optim
    steps_per_epoch = max(dataset_size(config) // t.global_batch_size, 1)

    def epochs(e):
        return ts.steps_from_epochs(e, steps_per_epoch)

    lr_schedule = ts.make_lr_schedule(
        base_lr=o.lr,
        end_lr=o.end_lr,
        # The schedule follows the epochs; train.num_steps only ends the run elsewhere.
        warmup_steps=epochs(o.warmup_epochs),
        decay_start_step=epochs(o.decay_start_epoch),
        total_steps=epochs(t.num_epochs),
    )
    optimizer = ts.make_optimizer(
        learning_rate=lr_schedule,
        b1=o.b1,
        b2=o.b2,
        weight_decay=o.weight_decay,
        clip_norm=o.clip_norm,
        weight_decay_mask=ts.weight_decay_mask_fn(abstract_params(exp.model)),
    )
    rng_data = jax.random.key_data(jax.random.key(config.seed))
    specs = ts.state_partition_specs(exp.model, optimizer, rng_data)
    state_shardings = sharding_lib.logical_shardings(specs, exp.mesh)
    return Training(
        steps_per_epoch=steps_per_epoch,
        total_steps=t.num_steps if t.num_steps > 0 else epochs(t.num_epochs),
        lr_schedule=lr_schedule,
        optimizer=optimizer,
        state_shardings=state_shardings,
        abstract_state=ts.abstract_train_state(exp.model, optimizer, rng_data, state_shardings),
    )


def checkpointer(
    config: ml_collections.ConfigDict, workdir: str, *, read_only: bool = False
) -> Checkpointer:
    """The workdir's checkpoint manager (``read_only`` for sampling: creates and cleans nothing)."""
    c = config.checkpoint
    return Checkpointer(
        str(workdir_lib.fileio.as_path(workdir) / CHECKPOINT_DIR),
        every_steps=c.every_steps,
        max_to_keep=c.max_to_keep,
        keep_period=c.keep_period,
        async_save=c.async_save,
        read_only=read_only,
    )


# ----------------------------------------------------------------------------------------------
# Params for sampling and evaluation.
@dataclasses.dataclass(frozen=True)
class ParamsSource:
    """Where sampling params came from: a checkpoint step of the workdir, or converted weights."""

    step: int  # The checkpoint's step; 0 for converted weights.
    weights: str  # The converted weights directory, or '' for a checkpoint.

    def describe(self) -> str:
        return f"weights {self.weights}" if self.weights else f"checkpoint step {self.step}"


def check_weights(exp: Experiment, weights: str) -> dict[str, Any]:
    """Refuses converted weights whose model differs from the config's; returns their metadata.

    Raises:
      WeightsError: ``weights`` is not a converted xAR directory, or its network is not the
        config's (each differing field named).
    """
    try:
        meta = weights_lib.read_metadata(weights, "xar")
    except weights_lib.WeightsError as e:
        raise weights_lib.WeightsError(f"config.weights={weights!r}: {e}") from None
    weights_lib.check_xar_fits(weights, meta, exp.model)
    return meta


def _converted_params(exp: Experiment, weights: str) -> Any:
    """Converted weights placed with ``exp``'s param shardings: restored straight into place
    when the module keeps their layout, else laid out on the host and then placed."""
    params = weights_lib.load_xar_params(weights, exp.model, target=exp.abstract_params)
    return jax.device_put(params, exp.param_shardings)


def inference_params(exp: Experiment, workdir: str) -> tuple[Any, ParamsSource]:
    """Sampling params: ``config.weights`` if set, else the workdir's newest checkpoint.

    From a checkpoint only the EMA params (``sample.use_ema``; else the raw params) are read.

    Raises:
      WorkdirMismatchError / CheckpointMismatchError: the config's model is not the run's.
      FileNotFoundError: no weights and no checkpoint.
    """
    config = exp.config
    if config.weights:
        check_weights(exp, config.weights)
        return _converted_params(exp, config.weights), ParamsSource(0, config.weights)
    workdir_lib.check_model(workdir_lib.read_record(workdir), config, workdir, exp.mode)
    ckpt = checkpointer(config, workdir, read_only=True)
    if not ckpt.all_steps():
        raise MissingInputError(
            f"No checkpoint under {workdir}/{CHECKPOINT_DIR} to sample from; train first, or "
            "sample converted released weights with --config.weights=DIR (`python -m "
            "xar_jax.convert xar --src xAR-H.pth --out DIR`)."
        )
    try:
        restored = ckpt.restore_params(exp.abstract_params, use_ema=config.sample.use_ema)
    finally:
        ckpt.close()
    if restored is None:
        raise MissingInputError(f"No readable checkpoint under {workdir}/{CHECKPOINT_DIR}.")
    params, step = restored
    return params, ParamsSource(step, "")


def restore_train_state(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, int] | None:
    """``(TrainState, step)`` of the workdir's newest checkpoint, or None (notebooks, tests)."""
    exp = build(config, "train", workdir=workdir)
    setup = training_setup(exp)
    ckpt = checkpointer(config, workdir)
    try:
        return ckpt.restore_latest(setup.abstract_state)
    finally:
        ckpt.close()
