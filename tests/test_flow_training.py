"""Each entity kind trains: a tiny model on fixed digits lowers its flow-matching loss clearly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xar_jax import entities as ent
from xar_jax import flow
from xar_jax import model as xar_model
from xar_jax.data.digits import load_digits_split

STEPS = 100  # Enough for every kind to reach an after/before loss ratio of about 0.3.
BATCH = 32


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits_split("train")
    return jnp.asarray(images[:256]), jnp.asarray(labels[:256])


def _train(layout, images, labels, objective):
    model = xar_model.XAR(
        layout, 32, 1, 1, 2, 2, in_channels=1, num_classes=10, dropout=0.0, attn_dropout=0.0
    )
    n, k = layout.num_tokens, layout.num_entities
    params = model.init(
        jax.random.key(0), jnp.zeros((1, n, 1)), jnp.zeros((1, k)), jnp.zeros((1,), jnp.int32)
    )["params"]
    tx = optax.adam(3e-3)
    tokens_all = layout.to_sequence(images)

    def loss_fn(p, idx, key):
        x, y = tokens_all[idx], labels[idx]
        inputs = flow.draw_flow_inputs(
            key, layout, y, 1, objective=objective, label_drop_prob=0.1, null_class=10
        )
        return flow.flow_loss(model.apply, p, x, inputs, layout, train=False)[0]

    def step(carry, key):
        p, opt = carry
        idx = jax.random.randint(jax.random.fold_in(key, 1), (BATCH,), 0, images.shape[0])
        loss, g = jax.value_and_grad(loss_fn)(p, idx, key)
        upd, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, upd), opt), loss

    # Evaluation on a fixed batch with fixed randomness, before and after training.
    eval_idx = jnp.arange(64)
    eval_loss = jax.jit(functools.partial(loss_fn, idx=eval_idx, key=jax.random.key(42)))
    before = float(eval_loss(params))
    keys = jax.random.split(jax.random.key(1), STEPS)
    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, keys))((params, tx.init(params)))
    return before, float(eval_loss(params))


@pytest.mark.parametrize(
    "layout",
    [
        ent.make_layout("token", 8),
        ent.make_layout("cell", 8, cell_size=4),
        ent.make_layout("subsample", 8, subsample_factor=2),
        ent.make_layout("scale", 8, scale_sizes=(1, 2, 4, 8)),
        ent.make_layout("image", 8),
    ],
    ids=lambda lay: lay.kind,
)
def test_each_entity_kind_lowers_the_loss(layout, digits):
    before, after = _train(layout, *digits, "ncl")
    assert np.isfinite(after)
    assert after < 0.5 * before, (before, after)


def test_teacher_forcing_objective_trains_and_noises_one_entity(digits):
    layout = ent.make_layout("cell", 8, cell_size=4)
    inputs = flow.draw_flow_inputs(
        jax.random.key(0), layout, jnp.arange(6), 1, objective="teacher_forcing", null_class=10
    )
    assert ((np.asarray(inputs.t) > 0).sum(axis=1) == 1).all()  # One noised entity per image.
    np.testing.assert_allclose(np.asarray(inputs.loss_weight).sum(axis=1), 1.0, rtol=1e-6)
    before, after = _train(layout, *digits, "teacher_forcing")
    assert after < 0.5 * before, (before, after)


def test_label_dropout_rate_and_null_class():
    dropped = flow.drop_labels(jax.random.key(0), jnp.zeros((20000,), jnp.int32), 0.1, 1000)
    rate = float(jnp.mean(dropped == 1000))
    assert 0.09 < rate < 0.11
    assert set(np.unique(np.asarray(dropped))) == {0, 1000}
