"""Flow matching with Noisy Context Learning (and the teacher-forcing baseline).

Linear interpolant ``x_t = (1 - t) x + t eps`` (t = 1 is noise), velocity target ``v = eps - x``.
Noisy Context Learning (NCL, the paper's training): every entity of every image gets its own
``t = sigmoid(u), u ~ N(0, 1)``, and one pass under the block-causal mask predicts all entities'
velocities from noisy context. Teacher forcing (the paper's baseline): one entity per image is noised
and predicted, every other entity is clean context (``t = 0``, as in sampling).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from xar_jax.entities import EntityLayout

OBJECTIVES = ("ncl", "teacher_forcing")


class FlowInputs(NamedTuple):
    """Everything random about one training example batch (explicit, so tests can inject it)."""

    t: jax.Array  # (B, K) flow time per entity.
    noise: jax.Array  # (B, N, C) eps in entity order.
    labels: jax.Array  # (B,) labels, some dropped to the null class.
    loss_weight: jax.Array  # (B, N) per-token weight of the loss (sums to 1 per example).


def logit_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``sigmoid(u)``, ``u ~ N(0, 1)``: the release's time distribution."""
    return jax.nn.sigmoid(jax.random.normal(key, shape, jnp.float32))


def drop_labels(key: jax.Array, labels: jax.Array, prob: float, null_class: int) -> jax.Array:
    """Replaces each label by ``null_class`` with probability ``prob`` (classifier-free guidance)."""
    drop = jax.random.bernoulli(key, prob, labels.shape)
    return jnp.where(drop, null_class, labels).astype(jnp.int32)


def interpolate(x: jax.Array, noise: jax.Array, t_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x_t, v)`` for tokens x, noise (B, N, C) and per-token times (B, N)."""
    t = t_tokens[..., None]
    return (1.0 - t) * x + t * noise, noise - x


def draw_flow_inputs(
    key: jax.Array,
    layout: EntityLayout,
    labels: jax.Array,
    channels: int,
    *,
    objective: str = "ncl",
    label_drop_prob: float = 0.1,
    null_class: int = 1000,
) -> FlowInputs:
    """Draws times, noise, dropped labels and loss weights for one batch.

    ``null_class`` is the model's ``num_classes`` (the extra embedding row; 1000 on ImageNet).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"train.objective={objective!r}; allowed: {', '.join(OBJECTIVES)}.")
    b, k, n = labels.shape[0], layout.num_entities, layout.num_tokens
    key_t, key_n, key_l, key_e = jax.random.split(key, 4)
    t = logit_normal(key_t, (b, k))
    noise = jax.random.normal(key_n, (b, n, channels), jnp.float32)
    dropped = drop_labels(key_l, labels, label_drop_prob, null_class)
    entity_of_token = jnp.asarray(layout.entity_of_token)
    if objective == "ncl":
        weight = jnp.full((b, n), 1.0 / n, jnp.float32)
        return FlowInputs(t, noise, dropped, weight)
    # Teacher forcing: one target entity per image; the others are clean context at t = 0.
    target = jax.random.randint(key_e, (b,), 0, k)
    is_target = jnp.arange(k)[None, :] == target[:, None]
    t = jnp.where(is_target, t, 0.0)
    on_target = entity_of_token[None, :] == target[:, None]
    sizes = jnp.asarray(layout.entity_sizes, jnp.float32)[target]
    weight = on_target.astype(jnp.float32) / sizes[:, None]
    return FlowInputs(t, noise, dropped, weight)


def flow_loss(
    apply_fn: Any,
    params: Any,
    tokens: jax.Array,
    inputs: FlowInputs,
    layout: EntityLayout,
    *,
    train: bool = True,
    rngs: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared velocity error.

    Args:
      apply_fn: ``model.apply``.
      params: model params.
      tokens: (B, N, C) clean latents in entity order.
      inputs: the batch's randomness (`draw_flow_inputs`).
      layout: the entity layout.
      train: dropout on (needs ``rngs['dropout']``).

    Returns:
      ``(loss, aux)``: loss is the per-example weighted mean over tokens and channels, averaged
      over the batch (for NCL: the plain mean, as the release); aux holds the per-entity losses.
    """
    t_tokens = jnp.take(inputs.t, jnp.asarray(layout.entity_of_token), axis=1)
    x_t, target = interpolate(tokens, inputs.noise, t_tokens)
    pred = apply_fn({"params": params}, x_t, inputs.t, inputs.labels, train=train, rngs=rngs)
    per_token = jnp.mean(jnp.square(pred - target), axis=-1)  # (B, N)
    loss = jnp.mean(jnp.sum(per_token * inputs.loss_weight, axis=-1))
    per_entity = jax.ops.segment_sum(
        per_token.mean(0), jnp.asarray(layout.entity_of_token), num_segments=layout.num_entities
    ) / jnp.asarray(layout.entity_sizes, jnp.float32)
    return loss, {"loss_per_entity": per_entity}
