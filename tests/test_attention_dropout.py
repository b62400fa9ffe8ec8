"""The fused Pallas attention with dropout: equal to the XLA form given the same keep mask.

On CPU the kernels run in the Pallas interpreter; on a GPU the same tests run the Triton kernels
(bf16 inputs there, float32 here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_json_script
from flax import linen as nn
from jax._src.ad_checkpoint import saved_residuals  # The public module exports only the printer.

from xar_jax import attention, dropout, layers, rope
from xar_jax import flash_attention as fa
from xar_jax import train_state as ts
from xar_jax.entities import make_layout
from xar_jax.model import DTYPES, ResolvedSettings, abstract_params, build_model, example_inputs

ON_GPU = jax.default_backend() == "gpu"
DTYPE = jnp.bfloat16 if ON_GPU else jnp.float32
TOL = 2e-2 if ON_GPU else 1e-5  # Relative to the largest reference value.
LAYOUT = make_layout("cell", 8, cell_size=4)  # 64 tokens, 4 entities of 16: block-causal mask.
MASK = jnp.asarray(LAYOUT.attention_mask)
B, T, H, D = 2, 64, 2, 16
BLOCKS = fa.BlockSizes(16, 32, 32, 16)  # Mixed tiles: the bounds of both passes are exercised.
RATE = 0.1


def _qkv(seed=0, shape=(B, T, H, D)):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(DTYPE) for k in keys)


def _assert_close(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(float(np.max(np.abs(want))), 1e-6)
    np.testing.assert_allclose(got / scale, want / scale, atol=TOL, rtol=0)


def _fused(q, k, v, key=None, rate=0.0, mask=MASK):
    return fa.flash_attention(q, k, v, mask, key=key, rate=rate, block_sizes=BLOCKS)


def _mask(key, shape=(B, H, T, T), rate=RATE):
    return np.asarray(fa.attention_dropout_mask(key, shape, rate))


def test_without_dropout_equals_xla_attention():
    q, k, v = _qkv()
    _assert_close(_fused(q, k, v), fa.reference_attention(q, k, v, MASK, None, 0.0))
    # No mask, and lengths/head dim that need padding to the kernel's tiles.
    q, k, v = _qkv(1, (B, 40, H, 12))
    _assert_close(fa.flash_attention(q, k, v), fa.reference_attention(q, k, v, None, None, 0.0))


def test_with_dropout_equals_xla_attention_given_the_same_mask():
    q, k, v = _qkv()
    key = jax.random.key(7)
    keep = fa.attention_dropout_mask(key, (B, H, T, T), RATE)
    want = fa.reference_attention(q, k, v, MASK, keep, RATE)
    _assert_close(_fused(q, k, v, key, RATE), want)
    # And it is not the output without dropout.
    assert not np.allclose(want, fa.reference_attention(q, k, v, MASK, None, 0.0), atol=1e-3)


def test_kept_fraction_is_one_minus_rate():
    shape = (4, 3, 256, 256)
    for rate in (0.1, 0.5):
        kept = _mask(jax.random.key(1), shape, rate).mean()
        sigma = np.sqrt(rate * (1 - rate) / np.prod(shape))
        assert abs(kept - (1 - rate)) < 5 * sigma, (rate, kept)
    # Rows and columns are not degenerate either: per-row kept fractions spread binomially.
    rows = _mask(jax.random.key(2), shape, 0.5).mean(-1).ravel()
    assert abs(rows.std() - np.sqrt(0.25 / 256)) < 0.01


def test_kept_probabilities_are_scaled_by_one_over_keep_probability():
    # With v = identity rows, out[q, :] is the dropped-out probability row itself.
    q, k, _ = _qkv(3, (1, 16, 1, 16))
    v = jnp.eye(16, dtype=jnp.float32)[None, :, None, :].astype(DTYPE)
    key = jax.random.key(4)
    rate = 0.5
    got = np.asarray(
        fa.flash_attention(q, k, v, key=key, rate=rate, block_sizes=BLOCKS), np.float32
    )
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) / 4.0
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    keep = _mask(key, (1, 1, 16, 16), rate)
    np.testing.assert_array_equal(got[0, :, 0] == 0, ~keep[0, 0])
    ratio = got[0, :, 0][keep[0, 0]] / probs[0, 0][keep[0, 0]]
    np.testing.assert_allclose(ratio, 1 / (1 - rate), rtol=TOL * 2)


def test_same_key_same_mask_and_every_coordinate_draws_its_own():
    key = jax.random.key(5)
    a, b = _mask(key), _mask(key)
    np.testing.assert_array_equal(a, b)
    q, k, v = _qkv()
    np.testing.assert_array_equal(_fused(q, k, v, key, RATE), _fused(q, k, v, key, RATE))
    assert not np.array_equal(a, _mask(jax.random.key(6)))  # Another step's key.
    assert not np.array_equal(a, _mask(jax.random.fold_in(key, 1)))  # Another flax rng fold.
    assert not np.array_equal(a[0], a[1])  # Another example.
    assert not np.array_equal(a[:, 0], a[:, 1])  # Another head.
    # Positions within one row and one column are not copies of each other either.
    assert not np.array_equal(a[0, 0, 1:], a[0, 0, :-1])
    assert not np.array_equal(a[0, 0, :, 1:], a[0, 0, :, :-1])


def test_gradients_equal_xla_attention_given_the_same_mask():
    q, k, v = _qkv(8)
    key = jax.random.key(9)
    keep = fa.attention_dropout_mask(key, (B, H, T, T), RATE)
    weights = jax.random.normal(jax.random.key(10), (B, T, H, D))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    got = jax.grad(loss(lambda q, k, v: _fused(q, k, v, key, RATE)), (0, 1, 2))(q, k, v)
    want = jax.grad(
        loss(lambda q, k, v: fa.reference_attention(q, k, v, MASK, keep, RATE)), (0, 1, 2)
    )(q, k, v)
    for g, w in zip(got, want, strict=True):
        _assert_close(g, w)


def _attention_layer(impl, rate):
    return layers.Attention(num_heads=H, dtype=DTYPE, attn_dropout=rate, impl=impl)


def _layer_inputs():
    x = jax.random.normal(jax.random.key(11), (B, T, H * D), jnp.float32).astype(DTYPE)
    cos, sin = (jnp.asarray(a) for a in rope.rope_tables(LAYOUT.positions, D))
    return x, cos, sin


def test_attention_layer_deterministic_equals_the_xla_layer():
    x, cos, sin = _layer_inputs()
    ref = _attention_layer("xla", RATE)
    params = ref.init(jax.random.key(0), x, cos, sin, MASK, None, True)
    want, _ = ref.apply(params, x, cos, sin, MASK, None, True)
    got, _ = _attention_layer("pallas", RATE).apply(params, x, cos, sin, MASK, None, True)
    _assert_close(got, want)


def test_attention_layer_draws_a_new_mask_per_layer_and_step():
    x, cos, sin = _layer_inputs()
    layer = _attention_layer("pallas", 0.5)
    params = layer.init(jax.random.key(0), x, cos, sin, MASK, None, True)
    run = lambda rng: layer.apply(params, x, cos, sin, MASK, None, False, rngs={"dropout": rng})[0]
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)

    class TwoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            return [
                _attention_layer("pallas", 0.5)(x, cos, sin, MASK, None, False)[0] for _ in "ab"
            ]

    two = TwoLayers()
    p2 = two.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    # Same params in both layers: only their dropout masks can make the outputs differ.
    layer_params = p2["params"]["Attention_0"]
    p2 = {"params": {"Attention_0": layer_params, "Attention_1": layer_params}}
    first, second = two.apply(p2, x, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(first, second)


def _xla_with_hash_dropout(q, k, v, key, rate=RATE):
    drop = lambda p: dropout.hash_attention_dropout(p, rate, key)
    return attention.masked_softmax_attention(q, k, v, MASK, 1.0 / np.sqrt(D), drop)


def test_xla_kernel_with_hash_dropout_equals_the_pallas_kernel_and_its_gradients():
    q, k, v = _qkv(12)
    key = jax.random.key(13)
    _assert_close(_xla_with_hash_dropout(q, k, v, key), _fused(q, k, v, key, RATE))
    weights = jax.random.normal(jax.random.key(14), (B, T, H, D))

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    got = grads(lambda q, k, v: _xla_with_hash_dropout(q, k, v, key))
    want = grads(lambda q, k, v: _fused(q, k, v, key, RATE))
    for g, w in zip(got, want, strict=True):
        _assert_close(g, w)
    # Another key drops other probabilities.
    other = _xla_with_hash_dropout(q, k, v, jax.random.key(15))
    assert not np.allclose(other, _xla_with_hash_dropout(q, k, v, key), atol=1e-3)


def test_hash_attention_dropout_at_rate_zero_is_the_identity_and_rehashes_backward():
    p = jax.random.uniform(jax.random.key(16), (B, H, T, T))
    key = jax.random.key(17)
    assert dropout.hash_attention_dropout(p, 0.0, key) is p
    out = np.asarray(dropout.hash_attention_dropout(p, RATE, key))
    keep = _mask(key)
    np.testing.assert_array_equal(out != 0, keep)
    np.testing.assert_allclose(out[keep], np.asarray(p)[keep] / (1 - RATE), rtol=1e-6)
    # No (B, H, T, S) mask is kept for the backward pass: only the two seed words.
    residuals = saved_residuals(lambda p: dropout.hash_attention_dropout(p, RATE, key).sum(), p)
    assert [r[0].shape for r in residuals] == [(2,)]


def test_xla_layer_with_hash_dropout_trains_as_the_pallas_layer():
    x, cos, sin = _layer_inputs()
    layer = lambda impl: layers.Attention(
        num_heads=H, dtype=DTYPE, attn_dropout=RATE, impl=impl, dropout_impl="hash"
    )
    params = layer("xla").init(jax.random.key(0), x, cos, sin, MASK, None, True)

    def loss(impl):
        def f(params, x):
            rngs = {"dropout": jax.random.key(18)}
            out = layer(impl).apply(params, x, cos, sin, MASK, None, False, rngs=rngs)[0]
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return f

    want = jax.value_and_grad(loss("pallas"), (0, 1))(params, x)
    got = jax.value_and_grad(loss("xla"), (0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _assert_close(g, w)
    # And 'rng' (threefry bits) draws another mask.
    rng_layer = layers.Attention(num_heads=H, dtype=DTYPE, attn_dropout=RATE, impl="xla")
    rngs = {"dropout": jax.random.key(18)}
    other = rng_layer.apply(params, x, cos, sin, MASK, None, False, rngs=rngs)[0]
    hashed = layer("xla").apply(params, x, cos, sin, MASK, None, False, rngs=rngs)[0]
    assert not np.allclose(other, hashed, atol=1e-3)


class _ModelConfig(dict):
    """The attribute access of a config's ``model`` section, without ml_collections (GPU image)."""

    __getattr__ = dict.__getitem__


def _build(model_cfg):
    """`build_model` with 'auto' resolved for this backend, as the experiment does."""
    impl = attention.resolve(model_cfg.attention_impl, model_cfg.attn_dropout,
                             DTYPES[model_cfg.dtype])  # fmt: skip
    return build_model(model_cfg, LAYOUT, ResolvedSettings(attention_impl=impl), in_channels=1,
                       num_classes=10)  # fmt: skip


def test_xar_trains_a_step_with_pallas_attention_dropout():
    model_cfg = _ModelConfig(
        preset="", width=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_multiple=1,
        dropout=0.0, attn_dropout=0.1, dtype="float32", attention_impl="pallas",
        scan_layers=True, remat="none",
    )  # fmt: skip
    model = _build(model_cfg)
    mask = ts.weight_decay_mask_fn(abstract_params(model))
    tx = ts.make_optimizer(learning_rate=1e-2, b1=0.9, b2=0.96, weight_decay=0.02, clip_norm=1.0,
                           weight_decay_mask=mask)  # fmt: skip
    state = ts.create_train_state(model, tx, seed=0)
    rng = np.random.default_rng(0)
    batch = {
        "labels": rng.integers(0, 10, 4).astype(np.int32),
        "latents": rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32),
    }
    step = jax.jit(ts.make_train_step(model, LAYOUT, tx, ema_decay=0.5, label_drop_prob=0.1))
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert int(new_state.step) == 1
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params, state.params
    )
    assert max(jax.tree.leaves(moved)) > 0
    # The same model with the XLA attention form gives the same loss without attention dropout:
    # the kernel is only a faster route to the same function.
    deterministic = [
        _build(_ModelConfig(model_cfg, attn_dropout=0.0, attention_impl=impl))
        for impl in ("pallas", "xla")
    ]
    x, t, y = (jnp.ones_like(a) * 0.3 for a in example_inputs(model, 2))
    outs = [m.apply({"params": state.params}, x, t, y.astype(jnp.int32)) for m in deterministic]
    _assert_close(outs[0], outs[1])


def test_training_config_accepts_pallas_with_attention_dropout():
    pytest.importorskip("ml_collections")
    import os

    from xar_jax import train_config

    assert train_config.ATTENTION_IMPLS is attention.ATTENTION_IMPLS
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    config = train_config.load_config_file(os.path.join(configs, "xar_b.py"))
    config.data.cache_dir = "/data/latent_cache"
    config.model.attention_impl = "pallas"
    assert config.model.attn_dropout == 0.1
    train_config.validate_config(config, num_devices=256)


SHARDED_SCRIPT = """
import json
import jax
jax.config.update("jax_num_cpu_devices", 4)
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from xar_jax import layers, rope, sharding as sh
from xar_jax.entities import make_layout

mask = jnp.asarray(make_layout("cell", 8, cell_size=4).attention_mask)
x = jax.random.normal(jax.random.key(0), (4, 64, 32))
cos, sin = (jnp.asarray(a) for a in rope.rope_tables(make_layout("cell", 8, cell_size=4).positions, 16))
layer = layers.Attention(num_heads=2, attn_dropout=0.5, impl="pallas")
params = layer.init(jax.random.key(1), x, cos, sin, mask, None, True)
run = jax.jit(lambda p, x: layer.apply(p, x, cos, sin, mask, None, False,
                                       rngs={"dropout": jax.random.key(2)})[0])
single = np.asarray(run(params, x))
mesh = sh.make_mesh(2, 1, 2)  # Batch over 'data', the two heads over 'tensor'.
with jax.set_mesh(mesh), nn.logical_axis_rules(list(sh.LOGICAL_AXIS_RULES)):
    hlo = run.lower(params, x).as_text()
    sharded = np.asarray(run(params, x))
print(json.dumps({"max_diff": float(np.max(np.abs(single - sharded))),
                  "shard_map": "shard_map" in hlo or "sdy.manual_computation" in hlo,
                  "scale": float(np.max(np.abs(single)))}))
"""


def test_sharded_pallas_attention_runs_per_shard_with_the_same_masks():
    result = run_json_script(SHARDED_SCRIPT)
    assert result["shard_map"]
    assert result["max_diff"] <= 1e-5 * result["scale"]


# ----------------------------------------------------------------------------------------------
# 'auto': the backend's fast exact kernel, resolved once when the experiment is built.
@pytest.mark.parametrize(
    "backend, rate, dtype, want",
    [
        ("gpu", 0.1, jnp.bfloat16, "pallas"),  # The paper's recipe: in-kernel attention dropout.
        ("gpu", 0.1, jnp.float32, "pallas"),
        ("gpu", 0.0, jnp.bfloat16, "cudnn"),
        ("gpu", 0.0, jnp.float32, "dot_product"),  # cuDNN takes half types only.
        ("tpu", 0.1, jnp.bfloat16, "xla"),  # The Pallas kernel is Triton (GPU) only.
        ("tpu", 0.0, jnp.bfloat16, "xla"),
        ("cpu", 0.1, jnp.float32, "xla"),
    ],
)
def test_auto_attention_picks_the_fast_exact_kernel_of_the_backend(backend, rate, dtype, want):
    assert attention.resolve("auto", rate, dtype, backend) == want
    assert attention.resolve("cudnn", rate, dtype, backend) == "cudnn"  # Unchanged.
    assert attention.KERNELS[want].dropout or rate == 0  # 'auto' keeps the recipe's dropout.


def _tiny_model_config(**overrides):
    return _ModelConfig(
        dict(
            preset="", width=32, encoder_depth=1, decoder_depth=1, num_heads=2, mlp_multiple=1,
            dropout=0.1, attn_dropout=0.1, dtype="float32", attention_impl="auto",
            scan_layers=True, remat="none",
        ),
        **overrides,
    )  # fmt: skip


@pytest.mark.skipif(ON_GPU, reason="checks the CPU resolution")
def test_auto_attention_builds_the_xla_model_on_cpu_with_the_same_params():
    model = _build(_tiny_model_config())
    assert model.attention_impl == "xla"
    shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(abstract_params(m)))
    for impl in ("pallas", "cudnn", "dot_product"):
        assert shapes(model.clone(attention_impl=impl)) == shapes(model)
    # Below the experiment nothing resolves: a model given 'auto' refuses to run.
    unresolved = model.clone(attention_impl="auto")
    with pytest.raises(ValueError, match="'auto' is not resolved"):
        jax.eval_shape(lambda: unresolved.init(jax.random.key(0), *example_inputs(unresolved)))


def test_remat_policies_keep_the_pallas_kernel_residuals():
    """A rematerialised block keeps the kernel's output and log-sum-exp, so the backward pass does
    not run the forward kernel again (a custom call is no dot for 'dots')."""
    from xar_jax import model as xar_model

    w = jax.random.normal(jax.random.key(1), (H * D, H * D))

    def block(x):
        qkv = (x @ w).reshape(B, T, H, D)
        out = _fused(qkv, qkv, qkv, key=jax.random.key(3), rate=RATE)
        return jnp.sin(out.reshape(B, T, H * D)) @ w

    x = jax.random.normal(jax.random.key(0), (B, T, H * D))
    for policy in ("dots", "dots_no_batch", "matmuls"):
        f = jax.checkpoint(block, policy=xar_model._REMAT[policy])
        saved = " ".join(str(s) for _, s in saved_residuals(f, x))
        for name in fa.RESIDUAL_NAMES:
            assert f"named '{name}'" in saved, (policy, saved)


# ----------------------------------------------------------------------------------------------
# Hash dropout after the projection and in the MLP.
def test_hash_dropout_keeps_one_minus_rate_scaled_and_depends_on_the_key():
    x = jnp.ones((8, 64, 96), jnp.float32)
    a = np.asarray(dropout.hash_dropout(x, 0.25, jax.random.key(0)))
    kept = a != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(a[kept], 1 / 0.75, rtol=1e-6)
    again = np.asarray(dropout.hash_dropout(x, 0.25, jax.random.key(0)))
    other = np.asarray(dropout.hash_dropout(x, 0.25, jax.random.key(1)))
    np.testing.assert_array_equal(a, again)
    assert 0.5 < ((other != 0) == kept).mean() < 0.7  # Independent masks agree on ~62.5%.
    # Rows do not repeat one another's masks.
    assert not (kept[0] == kept[1]).all() and not (kept[:, 0] == kept[:, 1]).all()
    assert dropout.hash_dropout(x, 0.0, jax.random.key(0)) is x


def test_hash_dropout_model_is_the_rng_model_when_deterministic_and_trains():
    cfg = _tiny_model_config(attention_impl="xla")
    rng_model = _build(cfg)
    hash_model = _build(_ModelConfig(cfg, dropout_impl="hash"))
    assert rng_model.dropout_impl == "rng" and hash_model.dropout_impl == "hash"
    x, t, y = (jnp.ones_like(a) * 0.3 for a in example_inputs(rng_model, 2))
    y = y.astype(jnp.int32)
    params = rng_model.init(jax.random.key(0), x, t, y)
    np.testing.assert_array_equal(
        hash_model.apply(params, x, t, y), rng_model.apply(params, x, t, y)
    )
    train = lambda k: hash_model.apply(params, x, t, y, train=True, rngs={"dropout": k})
    a, b = train(jax.random.key(1)), train(jax.random.key(2))
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)


def test_hash_dropout_backward_rehashes_instead_of_keeping_the_mask():
    x = jax.random.normal(jax.random.key(3), (4, 8, 16))
    key = jax.random.key(7)
    weights = jnp.arange(16.0)
    out = np.asarray(dropout.hash_dropout(x, 0.25, key))
    grad = jax.grad(lambda x: (dropout.hash_dropout(x, 0.25, key) * weights).sum())(x)
    expected = np.where(out != 0, np.asarray(weights) / 0.75, 0.0) * np.ones(x.shape)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6)
    # The only residual of the backward pass is the two seed words: no (B, T, D) mask is stored.
    residuals = saved_residuals(lambda x: dropout.hash_dropout(x, 0.25, key).sum(), x)
    assert [r[0].shape for r in residuals] == [(2,)]
