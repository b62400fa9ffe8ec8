"""The cached-attention kernel: an entity's attention over one layer of the stacked KV cache, read
in place, and its own keys equals attention over their concatenation; the sampler running it
equals the sampler on the concatenating path and the release's golden samples.

On CPU the kernel runs in the Pallas interpreter (attention impl 'pallas' selects it there); on a
GPU the same tests run the Triton kernel (the samplers in bfloat16 there, where it is selected).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_PATH_SETTINGS, golden_sample_error, perturbed_tiny_xar, run_json_script

from xar_jax import attention, sampling
from xar_jax import cached_attention as ca
from xar_jax import entities as ent

ON_GPU = jax.default_backend() == "gpu"
B, H, L = 2, 2, 3
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # Relative L2 against a float64 reference.


def _inputs(seed, n, d, tokens, dtype):
    """Random q, k, v (B, n, H, d) and stacked caches (L, B, tokens, H, d) in ``dtype``."""
    keys = jax.random.split(jax.random.key(seed), 5)
    own = [jax.random.normal(kk, (B, n, H, d), jnp.float32).astype(dtype) for kk in keys[:3]]
    cache = [jax.random.normal(kk, (L, B, tokens, H, d)).astype(dtype) for kk in keys[3:]]
    return (*own, *cache)


def _reference(q, k, v, cache_k, cache_v, layer, prefix_len):
    """float64 softmax attention over [cache[layer, :, :prefix_len], own] (NumPy)."""
    q, k, v, cache_k, cache_v = (np.asarray(x, np.float64) for x in (q, k, v, cache_k, cache_v))
    keys = np.concatenate([cache_k[layer, :, :prefix_len], k], axis=1)
    values = np.concatenate([cache_v[layer, :, :prefix_len], v], axis=1)
    logits = np.einsum("bthd,bshd->bhts", q, keys) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, values)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# n = 16 tokens per entity: 16-row tiles, so a prefix of 48 is three of them.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layer", [0, L - 1], ids=["first_layer", "last_layer"])
@pytest.mark.parametrize("prefix_len", [0, 16, 48], ids=["own_only", "one_tile", "three_tiles"])
def test_kernel_matches_attention_over_the_concatenation(prefix_len, layer, dtype):
    args = _inputs(100 * prefix_len + 10 * layer + (dtype == jnp.bfloat16), 16, 16, 64, dtype)
    got = ca.cached_attention(*args, layer, prefix_len)
    assert got.shape == (B, 16, H, 16) and got.dtype == dtype
    assert rel_l2(got, _reference(*args, layer, prefix_len)) < TOL[dtype]


@pytest.mark.parametrize(
    "n, d, tokens, prefix_len, blocks",
    [
        (12, 20, 40, 24, None),  # Padded tiles: 16 rows (12 real), 32 columns (20 real).
        (12, 20, 40, 40, None),  # The whole cache: its last tile runs past the cache's end.
        (40, 16, 128, 80, None),  # One 64-row tile: the prefix is 1 whole tile and 16 rows.
        (40, 16, 128, 80, ca.BlockSizes(16, 16)),  # 3 query blocks, the last ragged.
        (16, 80, 64, 32, None),  # xAR-H's head dim: 128-wide tiles, 80 columns real.
    ],
)
def test_kernel_masks_ragged_tiles(n, d, tokens, prefix_len, blocks):
    args = _inputs(n + d, n, d, tokens, jnp.float32)
    got = ca.cached_attention(*args, 1, prefix_len, block_sizes=blocks)
    assert rel_l2(got, _reference(*args, 1, prefix_len)) < TOL[jnp.float32]


def test_kernel_reads_a_traced_layer_in_place():
    # The layer index comes from a loop (as from the layer scan), one kernel call per layer.
    args = _inputs(7, 16, 16, 64, jnp.float32)
    run = jax.jit(lambda *a: jax.lax.map(lambda i: ca.cached_attention(*a, i, 32), jnp.arange(L)))
    got = run(*args)
    for i in range(L):
        assert rel_l2(got[i], _reference(*args, i, 32)) < TOL[jnp.float32], i


def test_the_concatenating_paths_slice_only_the_visible_prefix_of_a_layer():
    # What the XLA and cuDNN forms read when the kernel does not run: one slice of exactly
    # (layer, prefix), not the whole layer cut afterwards (a copy of all N positions per layer and
    # flow step on TPU).
    keys, values = (
        jax.random.normal(k, (3, 2, 16, 2, 8)) for k in jax.random.split(jax.random.key(0), 2)
    )
    ctx = lambda layer: attention.KVContext(keys, values, layer, None, prefix_len=5)
    got_k, got_v = ctx(1).layer_slice()
    np.testing.assert_array_equal(got_k, keys[1, :, :5])
    np.testing.assert_array_equal(got_v, values[1, :, :5])
    jaxpr = str(jax.make_jaxpr(lambda i: ctx(i).layer_slice())(jnp.int32(2)))
    assert jaxpr.count("dynamic_slice") == 2 and "slice_sizes=(1, 2, 5, 2, 8)" in jaxpr
    # With a visibility mask (a looped entity index) every position is read.
    visible = attention.KVContext(keys, values, 2, jnp.arange(16) < 5).layer_slice()[0]
    np.testing.assert_array_equal(visible, keys[2])


def test_kernel_rejects_a_prefix_longer_than_the_cache():
    args = _inputs(0, 16, 16, 32, jnp.float32)
    with pytest.raises(ValueError, match="prefix_len"):
        ca.cached_attention(*args, 0, 48)


@pytest.mark.parametrize(
    "backend, mode, dtype, want",
    [
        ("gpu", "cudnn", jnp.bfloat16, True),  # Replaces cuDNN over a concatenated copy.
        ("gpu", "pallas", jnp.float16, True),
        ("gpu", "pallas", jnp.float32, False),  # cuDNN takes half types; f32 keeps XLA's form.
        ("gpu", "dot_product", jnp.bfloat16, False),
        ("gpu", "xla", jnp.bfloat16, False),
        ("cpu", "pallas", jnp.float32, True),  # Interpreted: the tests' way to run it.
        ("cpu", "dot_product", jnp.float32, False),
        ("tpu", "cudnn", jnp.bfloat16, False),
    ],
)
def test_kernel_replaces_cudnn_on_gpu_and_runs_interpreted_for_pallas(backend, mode, dtype, want):
    assert attention.uses_cached_kernel(mode, dtype, backend) == want


# ----------------------------------------------------------------------------------------------
# The sampler: 4 cells of 16 tokens, an unrolled entity loop with static cache prefixes.
LAYOUT = ent.make_layout("cell", 8, cell_size=4)


SAMPLER_DTYPE = jnp.bfloat16 if ON_GPU else jnp.float32  # The kernel takes half types on GPUs.
# bfloat16 roundings differ between the two paths and compound over 12 evaluations per entity
# (7e-3 measured on CPU).
SAMPLER_TOL = 3e-2 if ON_GPU else 1e-5


def _tiny(attention_impl, scan_layers):
    """Two blocks per stack (layer indices 0 and 1), perturbed params so every path has signal."""
    return perturbed_tiny_xar(
        LAYOUT, depth=2, attention_impl=attention_impl, scan_layers=scan_layers, dtype=SAMPLER_DTYPE
    )


# Off a GPU the layer-scanned model is checked against the golden samples instead (below: the
# same interpreted kernel, the layer index traced), which saves two sampler compiles here.
SCAN_MODES = [False, True] if ON_GPU else [False]


@pytest.mark.parametrize("scan_layers", SCAN_MODES, ids=["unrolled", "scanned"][: len(SCAN_MODES)])
def test_sampler_through_the_kernel_matches_the_concatenating_sampler(scan_layers):
    # The concatenating ('dot_product') sampler matches the full forward (tests/test_sampling.py).
    labels, key = jnp.array([3, 7]), jax.random.key(5)
    out, programs = {}, {}
    for impl in ("pallas", "dot_product"):  # Same params: they do not depend on the kernel.
        model, params = _tiny(impl, scan_layers)
        traced = sampling.make_sampler(model, num_steps=3, cfg=2.0).trace(params, labels, key, None)
        programs[impl] = str(traced.jaxpr)
        out[impl] = traced.lower().compile()(params, labels, key, None)
    assert "name=cached_attention" in programs["pallas"]
    assert "name=cached_attention" not in programs["dot_product"]
    assert np.isfinite(np.asarray(out["pallas"])).all()
    assert rel_l2(out["pallas"], out["dot_product"]) < SAMPLER_TOL


@pytest.fixture(scope="module")
def pallas_golden_model(golden_model_with):
    """The golden model sampling through the kernel on the fast paths (float32: on a GPU this
    checks the concatenating path the kernel leaves float32 to)."""
    return golden_model_with(attention_impl="pallas", **FAST_PATH_SETTINGS)


def test_sampler_through_the_kernel_matches_the_reference(pallas_golden_model, xar_golden):
    # Full float32 products: a GPU's default float32 matmul precision is TF32 (a 10-bit
    # mantissa), which alone puts the sampler ~7e-4 from the reference there.
    with jax.default_matmul_precision("float32"):
        assert golden_sample_error(*pallas_golden_model, xar_golden) < 1e-4
    if not ON_GPU:  # Here the float32 model samples through the (interpreted) kernel.
        model, params = pallas_golden_model
        g = xar_golden
        steps, cfg = int(g["smp/num_steps"]), float(g["smp/cfg"])
        sampler = sampling.make_sampler(model, num_steps=steps, cfg=cfg)
        noise = {"init": g["smp/init_noise"], "steps": g["smp/eps"]}
        traced = sampler.trace(params, g["smp/labels"], jax.random.key(0), noise)
        assert "name=cached_attention" in str(traced.jaxpr)


SHARDED_SCRIPT = """
import json
import jax
jax.config.update("jax_num_cpu_devices", 4)
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from xar_jax import attention, layers, sharding as sh

b, n, tokens, depth, heads, d = 4, 16, 64, 2, 2, 16
keys = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(keys[0], (b, n, heads * d))
cache_k, cache_v = (jax.random.normal(k, (depth, b, tokens, heads, d)) for k in keys[1:])
cos, sin = jnp.ones((n, d)), jnp.zeros((n, d))
layer = layers.Attention(num_heads=heads, impl="pallas")
ctx = lambda i: attention.KVContext(cache_k, cache_v, i, None, prefix_len=32)
params = layer.init(jax.random.key(1), x, cos, sin, None, ctx(0), True)
run = jax.jit(lambda p, x, i: layer.apply(p, x, cos, sin, None, ctx(i), True)[0])
single = np.asarray(run(params, x, 1))
mesh = sh.make_mesh(2, 1, 2)  # Batch over 'data', the two heads over 'tensor'.
with jax.set_mesh(mesh), nn.logical_axis_rules(list(sh.LOGICAL_AXIS_RULES)):
    hlo = run.lower(params, x, 1).as_text()
    sharded = np.asarray(run(params, x, 1))
print(json.dumps({"max_diff": float(np.max(np.abs(single - sharded))),
                  "shard_map": "shard_map" in hlo or "sdy.manual_computation" in hlo,
                  "scale": float(np.max(np.abs(single)))}))
"""


def test_sharded_sampling_runs_the_kernel_per_shard_of_batch_and_heads():
    result = run_json_script(SHARDED_SCRIPT)
    assert result["shard_map"]
    assert result["max_diff"] <= 1e-5 * result["scale"]
