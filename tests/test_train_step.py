"""The pure train step: decay mask, LR schedule, gradient accumulation, EMA, non-finite guard."""

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from xar_jax import train_state as ts
from xar_jax.entities import make_layout
from xar_jax.model import XAR, abstract_params

LAYOUT = make_layout("cell", 8, cell_size=4)
LR = 1e-2
EMA = 0.5


@pytest.fixture(scope="module")
def setup():
    model = XAR(
        LAYOUT,
        32,
        1,
        1,
        2,
        2,
        in_channels=1,
        num_classes=10,
        dropout=0.0,
        attn_dropout=0.0,
        scan_layers=True,
    )
    mask = ts.weight_decay_mask_fn(abstract_params(model))
    tx = ts.make_optimizer(
        learning_rate=LR, b1=0.9, b2=0.96, weight_decay=0.02, clip_norm=1.0, weight_decay_mask=mask
    )
    state = ts.create_train_state(model, tx, seed=0)
    rng = np.random.default_rng(0)
    batch = {
        "labels": rng.integers(0, 10, 8).astype(np.int32),
        "latents": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
    }
    steps = {}
    for accum in (1, 2):
        for policy in ("stop", "skip"):
            fn = ts.make_train_step(
                model,
                LAYOUT,
                tx,
                ema_decay=EMA,
                label_drop_prob=0.1,
                grad_accum_steps=accum,
                nan_policy=policy,
            )
            steps[accum, policy] = jax.jit(fn)
    return model, tx, mask, state, batch, steps


def _max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def test_weight_decay_mask_uses_unstacked_rank(setup):
    _, _, mask, state, _, _ = setup
    m = mask(state.params)
    # Scanned stacks: a bias is (layers, D) = 2-D but not decayed; a kernel (layers, D, D) is.
    assert m["encoder_blocks"]["blocks"]["attn"]["qkv"]["bias"] is False
    assert m["encoder_blocks"]["blocks"]["attn"]["qkv"]["kernel"] is True
    assert m["encoder_norm"]["weight"] is False
    assert m["class_emb"]["embedding"] is True
    assert m["encoder_pos_embed_learned"] is True


def test_lr_schedule_warmup_constant_cosine():
    f = ts.make_lr_schedule(
        base_lr=4e-4, end_lr=1e-5, warmup_steps=100, decay_start_step=600, total_steps=800
    )
    np.testing.assert_allclose(
        [f(0), f(50), f(100), f(599), f(700), f(800), f(900)],
        [0.0, 2e-4, 4e-4, 4e-4, 1e-5 + (4e-4 - 1e-5) * 0.5, 1e-5, 1e-5],
        rtol=1e-5,
        atol=1e-9,
    )
    with pytest.raises(ValueError, match="warmup_steps"):
        ts.make_lr_schedule(
            base_lr=1.0, end_lr=0.0, warmup_steps=10, decay_start_step=5, total_steps=20
        )


def test_gradient_accumulation_matches_full_batch(setup):
    _, _, _, state, batch, steps = setup
    full, m_full = steps[1, "stop"](state, batch)
    accum, m_accum = steps[2, "stop"](state, batch)
    np.testing.assert_allclose(m_full["loss"], m_accum["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_full["grad_norm"], m_accum["grad_norm"], rtol=1e-4)
    # Float summation order differs; the step itself moves params by ~LR.
    assert _max_diff(full.params, accum.params) < 1e-5
    assert _max_diff(full.params, state.params) > LR / 2


def test_ema_is_decayed_average_of_new_params(setup):
    _, _, _, state, batch, steps = setup
    new, _ = steps[1, "stop"](state, batch)
    expected = jax.tree.map(lambda e, p: EMA * e + (1 - EMA) * p, state.ema_params, new.params)
    assert _max_diff(new.ema_params, expected) < 1e-7
    assert int(new.step) == 1


def test_nonfinite_step_never_reaches_params_and_stop_freezes(setup):
    _, _, _, state, batch, steps = setup
    bad = dict(batch, latents=batch["latents"].copy())
    bad["latents"][0, 0, 0, 0] = np.nan
    frozen, metrics = steps[1, "stop"](state, bad)
    assert not bool(metrics["finite"])
    assert int(frozen.nonfinite_step) == 0
    assert _max_diff(frozen.params, state.params) == 0.0
    assert _max_diff(frozen.opt_state, state.opt_state) == 0.0
    # 'stop': later finite steps do not update either; the host stops the run naming step 0.
    after, _ = steps[1, "stop"](frozen, batch)
    assert _max_diff(after.params, state.params) == 0.0
    from xar_jax.train import NonFiniteError, check_finite

    with pytest.raises(NonFiniteError, match="Step 0 produced a non-finite"):
        check_finite(
            after, ml_collections.ConfigDict({"nan_policy": "stop", "max_consecutive_skips": 10})
        )


def test_nonfinite_step_is_skipped_under_skip_policy(setup):
    _, _, _, state, batch, steps = setup
    bad = dict(batch, latents=np.full_like(batch["latents"], np.inf))
    skipped, _ = steps[1, "skip"](state, bad)
    assert int(skipped.skipped_steps) == 1
    assert _max_diff(skipped.params, state.params) == 0.0
    resumed, metrics = steps[1, "skip"](skipped, batch)
    assert bool(metrics["finite"])
    assert _max_diff(resumed.params, state.params) > 1e-4
    assert int(resumed.consecutive_skips) == 0


def test_skip_policy_stops_after_max_consecutive_nonfinite_steps(setup):
    from xar_jax.train import NonFiniteError, check_finite

    _, _, _, state, batch, steps = setup
    bad = dict(batch, latents=np.full_like(batch["latents"], np.inf))
    limits = ml_collections.ConfigDict({"nan_policy": "skip", "max_consecutive_skips": 3})
    for _ in range(2):
        state, _ = steps[1, "skip"](state, bad)
    check_finite(state, limits)  # Two in a row: under the limit, the run goes on.
    interrupted, _ = steps[1, "skip"](steps[1, "skip"](state, batch)[0], bad)
    assert int(interrupted.consecutive_skips) == 1  # A finite step resets the count.
    check_finite(interrupted, limits)
    state, _ = steps[1, "skip"](state, bad)
    assert int(state.consecutive_skips) == 3 and int(state.skipped_steps) == 3
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        check_finite(state, limits)


def test_moments_batches_are_sampled_on_device():
    moments = np.concatenate([np.full((2, 2, 2, 3), 0.5), np.full((2, 2, 2, 3), -100.0)], -1)
    z = ts.batch_latents({"moments": moments.astype(np.float32)}, jax.random.key(0), 0.2325)
    np.testing.assert_allclose(z, 0.5 * 0.2325, rtol=1e-5)  # logvar clipped: std ~ 3e-7.
    with pytest.raises(KeyError, match="'latents' or 'moments'"):
        ts.batch_latents({"images": moments}, jax.random.key(0), 1.0)


def test_train_step_module_imports_without_trainer_only_packages():
    # The GPU benchmark machine has jax/flax/optax but no ml_collections, clu, grain or tfds.
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ml_collections', 'clu', 'grain',\n"
        "                                  'tensorflow_datasets', 'tensorboardX'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import xar_jax.train_state, xar_jax.sharding\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_position_embedding_gradient_is_the_batch_sum_by_matmul():
    """`broadcast_over_batch`: a plain broadcast forward; its gradient is the sum over the batch,
    computed as a matmul (no reduce over the batch axis, which XLA's GPU layout assignment would
    make minor-most and spread through the network)."""
    from xar_jax.layers import broadcast_over_batch

    rng = np.random.default_rng(0)
    shared = jnp.asarray(rng.normal(size=(1, 5, 3)), jnp.float32)
    d_out = jnp.asarray(rng.normal(size=(7, 5, 3)), jnp.float32)
    out, vjp = jax.vjp(lambda s: broadcast_over_batch(s, 7), shared)
    np.testing.assert_array_equal(out, jnp.broadcast_to(shared, (7, 5, 3)))
    (grad,) = vjp(d_out)
    assert grad.shape == shared.shape
    np.testing.assert_allclose(grad, d_out.sum(0, keepdims=True), rtol=1e-6, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(vjp)(d_out))
    assert "dot_general" in jaxpr and "reduce_sum" not in jaxpr


def _batch_axis_reductions(jaxpr, batch):
    """reduce_sum equations that sum only axis 0 of a (batch, ...) operand of rank >= 3."""
    found = []
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _batch_axis_reductions(sub, batch)
        if eqn.primitive.name == "reduce_sum" and tuple(eqn.params["axes"]) == (0,):
            shape = eqn.invars[0].aval.shape
            if len(shape) >= 3 and shape[0] == batch:
                found.append(shape)
    return found


def test_train_step_sums_no_activation_over_the_batch_axis_alone(setup):
    """Guards the layout fix of `broadcast_over_batch`: the only such reduce in the step was the
    position embeddings' gradient, and it made the whole xAR-B step batch-minor on GPUs."""
    _, _, _, state, batch, steps = setup
    jaxpr = jax.make_jaxpr(steps[1, "stop"])(state, batch).jaxpr
    assert _batch_axis_reductions(jaxpr, batch["labels"].shape[0]) == []
