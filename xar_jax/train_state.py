"""The pure training step: TrainState, AdamW with a logical-rank weight-decay mask, LR schedule,
gradient accumulation, clipping, EMA and a non-finite guard.

This module imports only jax / flax / optax / numpy (and the core xAR modules), so benchmarks can
import the real train step on machines without ml_collections, clu or grain. Plain values in,
jittable functions out; the trainer (`xar_jax.train`) reads the config and passes them here.

Batches are dicts of arrays with a leading global batch axis B:
  ``labels`` (B,) int32 and one of ``latents`` (B, H, W, C) or ``moments`` (B, H, W, 2C) (cached
  VAE mean/logvar; the latent is sampled on device by `xar_jax.data.latents.sample_latents`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from xar_jax import flow
from xar_jax.data.latents import LATENT_SCALE, sample_latents
from xar_jax.entities import EntityLayout
from xar_jax.model import example_inputs

NAN_POLICIES = ("stop", "skip")
NO_NONFINITE = -1  # `TrainState.nonfinite_step` while every step so far was finite.


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly; a pytree (checkpointed as a whole).

    Attributes:
      step: () int32, number of optimizer steps taken (also counts skipped non-finite steps).
      params: model params (float32).
      ema_params: exponential moving average of params (used for sampling).
      opt_state: optax state.
      rng: (2,) uint32 raw key data; the step key is ``fold_in(rng, step)``.
      nonfinite_step: () int32, the first step whose loss or gradient was not finite, else -1.
      skipped_steps: () int32, steps dropped by the 'skip' non-finite policy.
      consecutive_skips: () int32, non-finite steps in a row up to now (0 after a finite one);
        the host stops a 'skip' run when it reaches ``train.max_consecutive_skips``.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_step: jax.Array
    skipped_steps: jax.Array
    consecutive_skips: jax.Array


# ----------------------------------------------------------------------------------------------
# Optimizer.
def steps_from_epochs(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps in ``epochs`` epochs (rounded to the nearest step)."""
    return int(round(epochs * steps_per_epoch))


def make_lr_schedule(
    *, base_lr: float, end_lr: float, warmup_steps: int, decay_start_step: int, total_steps: int
) -> optax.Schedule:
    """Linear warmup 0 -> base_lr, constant, then cosine base_lr -> end_lr (the paper's recipe).

    Args:
      base_lr: peak learning rate (paper: 4e-4 = 5e-5 * batch / 256 at batch 2048).
      end_lr: learning rate at ``total_steps`` (paper: 1e-5).
      warmup_steps: linear warmup length (paper: 100 epochs).
      decay_start_step: end of the constant phase (paper: epoch 600); equal to total_steps for a
        constant schedule after warmup.
      total_steps: last step of the run (paper: epoch 800).

    Returns:
      An optax schedule ``step -> lr``.
    """
    if not 0 <= warmup_steps <= decay_start_step <= total_steps:
        raise ValueError(
            f"LR schedule needs 0 <= warmup_steps ({warmup_steps}) <= decay_start_step "
            f"({decay_start_step}) <= total_steps ({total_steps})."
        )

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = base_lr * step / max(warmup_steps, 1)
        span = max(total_steps - decay_start_step, 1)
        frac = jnp.clip((step - decay_start_step) / span, 0.0, 1.0)
        cosine = end_lr + (base_lr - end_lr) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        after = jnp.where(step < decay_start_step, base_lr, cosine)
        return jnp.where(step < warmup_steps, warm, after)

    return schedule


def _path_key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask_fn(abstract_boxed_params: Any) -> Callable[[Any], Any]:
    """Returns ``mask(params) -> tree of bools``: decay only parameters of logical rank >= 2.

    The rank is that of the unstacked parameter: the ``layers`` axis added by scanned stacks does
    not count, so a scanned bias (L, D) is not decayed while a kernel (L, D, D) is. This is the
    release's rule (no decay on biases and norm weights). The returned function accepts the params
    tree boxed (`nn.Partitioned`) or plain, so it serves ``tx.init`` on boxed params too.
    """
    is_box = lambda x: isinstance(x, nn.Partitioned)
    decay: dict[str, bool] = {}
    leaves = jax.tree_util.tree_flatten_with_path(abstract_boxed_params, is_leaf=is_box)[0]
    for path, leaf in leaves:
        if is_box(leaf):
            rank = sum(1 for name in leaf.names if name != "layers")
        else:
            rank = len(leaf.shape)
        decay[_path_key(path)] = rank >= 2

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: decay[_path_key(path)], params, is_leaf=is_box
        )

    return mask


def make_optimizer(
    *,
    learning_rate: float | optax.Schedule,
    b1: float,
    b2: float,
    weight_decay: float,
    clip_norm: float,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when ``clip_norm <= 0``) then AdamW with a decay mask."""
    adamw = optax.adamw(
        learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=weight_decay_mask
    )
    if clip_norm and clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    return adamw


# ----------------------------------------------------------------------------------------------
# State creation (directly into the sharded layout).
def _init_boxed(model, optimizer, rng_data):
    """The whole state with `nn.Partitioned` boxes still on params and optimizer moments."""
    key = jax.random.wrap_key_data(rng_data)
    params = model.init({"params": jax.random.fold_in(key, 0)}, *example_inputs(model))["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.fold_in(key, 1)),
        nonfinite_step=jnp.full((), NO_NONFINITE, jnp.int32),
        skipped_steps=jnp.zeros((), jnp.int32),
        consecutive_skips=jnp.zeros((), jnp.int32),
    )


def state_partition_specs(model, optimizer, rng_data) -> Any:
    """Logical PartitionSpecs of every TrainState leaf (shapes only; nothing is allocated)."""
    abstract = jax.eval_shape(lambda r: _init_boxed(model, optimizer, r), rng_data)
    return nn.get_partition_spec(abstract)


def abstract_train_state(model, optimizer, rng_data, shardings=None) -> TrainState:
    """ShapeDtypeStructs of the (unboxed) TrainState, with ``shardings`` attached if given."""
    abstract = jax.eval_shape(lambda r: nn.meta.unbox(_init_boxed(model, optimizer, r)), rng_data)
    if shardings is None:
        return abstract
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def create_train_state(model, optimizer, seed: int, shardings=None) -> TrainState:
    """Initialises params, EMA, optimizer state and RNG, each directly in its sharded layout.

    Args:
      model: the `XAR` module.
      optimizer: from `make_optimizer` (its mask must accept boxed params: `weight_decay_mask_fn`).
      seed: integer seed of the run (params from ``fold_in(key(seed), 0)``).
      shardings: a TrainState-shaped tree of `jax.sharding.Sharding` (see
        `xar_jax.sharding.state_shardings`), or None for the default device.

    Returns:
      The TrainState; with shardings, no array was ever materialised unsharded.
    """
    rng_data = jax.random.key_data(jax.random.key(seed))
    init = jax.jit(
        lambda r: nn.meta.unbox(_init_boxed(model, optimizer, r)), out_shardings=shardings
    )
    return init(rng_data)


# ----------------------------------------------------------------------------------------------
# Latents.
def batch_latents(batch: dict[str, jax.Array], key: jax.Array, scale: float) -> jax.Array:
    """The (B, H, W, C) training latents of a batch holding ``latents`` or ``moments``."""
    if "latents" in batch:
        return batch["latents"].astype(jnp.float32)
    if "moments" in batch:
        return sample_latents(batch["moments"], key, scale)
    raise KeyError(f"A training batch needs 'latents' or 'moments'; got keys {sorted(batch)}.")


# ----------------------------------------------------------------------------------------------
# The step.
def _tree_all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _split_micro(x: jax.Array, num_micro: int) -> jax.Array:
    """(B, ...) -> (A, B/A, ...); microbatch i = examples i, i + A, ... (keeps batch sharding)."""
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // num_micro, num_micro, *x.shape[1:]), 0, 1)


def make_train_step(
    model: nn.Module,
    layout: EntityLayout,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float,
    label_drop_prob: float,
    objective: str = "ncl",
    grad_accum_steps: int = 1,
    nan_policy: str = "stop",
    latent_scale: float = LATENT_SCALE,
    learning_rate_fn: optax.Schedule | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds ``train_step(state, batch) -> (state, metrics)`` (pure; jit it with donated state).

    One step: key ``fold_in(rng, step)``; latents from the batch; flow times, noise and label
    dropout drawn for the whole global batch at once (so the result does not depend on the
    accumulation split); gradients averaged over ``grad_accum_steps`` microbatches (a `lax.scan`);
    clipping, AdamW, EMA. A non-finite loss or gradient never reaches params, EMA or optimizer
    state: with 'skip' the update is dropped and counted; with 'stop' the state freezes from that
    step on and records it in ``nonfinite_step`` (the host stops the run, naming the step).

    Args:
      model: the `XAR` module; layout: its entity layout.
      optimizer: from `make_optimizer`.
      ema_decay: EMA decay per step (paper: 0.9999).
      label_drop_prob: probability of the null class (paper: 0.1).
      objective: 'ncl' (Noisy Context Learning) or 'teacher_forcing'.
      grad_accum_steps: microbatches per step (must divide the global batch).
      nan_policy: 'stop' or 'skip'.
      latent_scale: scale of latents sampled from ``moments``.
      learning_rate_fn: optional schedule, only to report the step's learning rate.

    Returns:
      The step function. Metrics: loss, grad_norm (before clipping), finite, lr (if given),
      loss_per_entity (K,).
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"train.nan_policy={nan_policy!r}; allowed: {', '.join(NAN_POLICIES)}.")
    if objective not in flow.OBJECTIVES:
        raise ValueError(f"train.objective={objective!r}; allowed: {', '.join(flow.OBJECTIVES)}.")
    if grad_accum_steps < 1:
        raise ValueError(f"train.grad_accum_steps={grad_accum_steps} must be >= 1.")
    channels = model.in_channels

    def loss_fn(params, tokens, inputs, dropout_key):
        return flow.flow_loss(
            model.apply, params, tokens, inputs, layout, train=True, rngs={"dropout": dropout_key}
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        key_latent, key_flow, key_dropout = jax.random.split(key, 3)
        labels = batch["labels"].astype(jnp.int32)
        if labels.shape[0] % grad_accum_steps:
            raise ValueError(
                f"Global batch {labels.shape[0]} is not divisible by "
                f"train.grad_accum_steps={grad_accum_steps}."
            )
        tokens = layout.to_sequence(batch_latents(batch, key_latent, latent_scale))
        inputs = flow.draw_flow_inputs(
            key_flow,
            layout,
            labels,
            channels,
            objective=objective,
            label_drop_prob=label_drop_prob,
            null_class=model.num_classes,
        )
        if grad_accum_steps == 1:
            (loss, aux), grads = grad_fn(state.params, tokens, inputs, key_dropout)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, grad_accum_steps), (tokens, inputs))

            def accumulate(carry, xs):
                index, (tok, inp) = xs
                key_micro = jax.random.fold_in(key_dropout, index)
                (micro_loss, micro_aux), g = grad_fn(state.params, tok, inp, key_micro)
                return jax.tree.map(jnp.add, carry, (micro_loss, micro_aux, g)), None

            zeros = jax.tree.map(
                jnp.zeros_like,
                (
                    jnp.zeros((), jnp.float32),
                    {"loss_per_entity": jnp.zeros(layout.num_entities)},
                    state.params,
                ),
            )
            (loss, aux, grads), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(grad_accum_steps), micro)
            )
            loss, aux, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, aux, grads))

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _tree_all_finite(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_ema = jax.tree.map(
            lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, new_params
        )
        if nan_policy == "stop":
            apply = finite & (state.nonfinite_step == NO_NONFINITE)
        else:
            apply = finite
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
        first_bad = (~finite) & (state.nonfinite_step == NO_NONFINITE)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            ema_params=keep(new_ema, state.ema_params),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
            consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "finite": finite,
            "loss_per_entity": aux["loss_per_entity"],
        }
        if learning_rate_fn is not None:
            metrics["lr"] = learning_rate_fn(state.step)
        return new_state, metrics

    return train_step
