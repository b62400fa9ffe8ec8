"""Samplers: the release's Euler-Maruyama with guidance, the KV cache, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import golden_sample_error, perturbed_tiny_xar

from xar_jax import entities as ent
from xar_jax import sampling


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_sampler_matches_reference_given_recorded_noise(golden_model, xar_golden):
    assert golden_sample_error(*golden_model, xar_golden) < 1e-4


def test_fused_cached_attention_sampler_matches_reference(optimized_golden_model, xar_golden):
    # The fast sampler: attention over [cache prefix, entity] as one fused-attention call.
    assert golden_sample_error(*optimized_golden_model, xar_golden) < 1e-4


def test_time_grid_follows_the_release():
    t, dt, scale = sampling.time_grid(4, "sde")
    np.testing.assert_allclose(t, [1.0, 0.68, 0.36, 0.04], rtol=1e-6)
    assert [int(np.float32(x) * np.float32(1000)) for x in t] == [1000, 680, 360, 40]
    np.testing.assert_allclose(dt, [-0.32, -0.32, -0.32, -0.04])
    np.testing.assert_allclose(scale[:3], np.sqrt(2 * np.array([1.0, 0.68, 0.36]) * 0.32))
    assert scale[3] == 0.0
    t, dt, scale = sampling.time_grid(5, "ode")
    np.testing.assert_allclose(t, [1.0, 0.8, 0.6, 0.4, 0.2], rtol=1e-6)
    assert np.allclose(dt, -0.2) and not scale.any()


def test_guidance_schedules():
    np.testing.assert_allclose(sampling.guidance_scales(4, 3.0, "linear"), [1.0, 5 / 3, 7 / 3, 3.0])
    np.testing.assert_allclose(sampling.guidance_scales(4, 3.0, "constant"), [3.0] * 4)
    np.testing.assert_allclose(sampling.guidance_scales(1, 2.0, "linear"), [2.0])
    with pytest.raises(ValueError, match="cfg_schedule"):
        sampling.guidance_scales(4, 3.0, "cosine")


KIND_LAYOUTS = [
    ent.make_layout("token", 4),
    ent.make_layout("cell", 8, cell_size=4),
    ent.make_layout("subsample", 8, subsample_factor=2),
    ent.make_layout("scale", 8, scale_sizes=(2, 4, 8)),
    ent.make_layout("image", 8),
]


@pytest.mark.parametrize("layout", KIND_LAYOUTS, ids=lambda lay: lay.kind)
def test_cached_sampling_matches_full_forward(layout):
    _check_cached_matches_full(layout)


@pytest.mark.parametrize("layout", [KIND_LAYOUTS[0], KIND_LAYOUTS[1]], ids=["looped", "unrolled"])
def test_fused_cached_attention_matches_full_forward(layout):
    # 16 token entities: a loop over entities, the cache visibility a traced mask; 4 cells: the
    # unrolled loop with static cache prefixes and no mask.
    assert (layout.num_entities > sampling.STATIC_ENTITY_LIMIT) == (layout.kind == "token")
    _check_cached_matches_full(layout, attention_impl="dot_product")


def _check_cached_matches_full(layout, **model_kw):
    model, params = perturbed_tiny_xar(layout, **model_kw)
    labels = jnp.array([3, 7])
    kw = dict(num_steps=3, cfg=2.0, key=jax.random.key(5))
    cached = sampling.sample(model, params, labels, **kw)
    full = sampling.sample(model, params, labels, use_cache=False, **kw)
    assert cached.shape == (2, *layout.grid_size, 2)
    assert np.isfinite(np.asarray(cached)).all()
    assert rel_l2(cached, full) < 1e-5


def test_per_entity_step_counts_and_ode_sampler_run_and_differ():
    layout = ent.make_layout("cell", 8, cell_size=4)
    model, params = perturbed_tiny_xar(layout)
    labels = jnp.array([1, 2])
    key = jax.random.key(0)
    base = sampling.sample(model, params, labels, num_steps=4, cfg=1.5, key=key, sampler="ode")
    again = sampling.sample(model, params, labels, num_steps=4, cfg=1.5, key=key, sampler="ode")
    np.testing.assert_array_equal(base, again)  # Deterministic given the key.
    fewer = sampling.sample(
        model,
        params,
        labels,
        num_steps=4,
        cfg=1.5,
        key=key,
        sampler="ode",
        steps_per_entity=(4, 3, 2, 2),
    )
    # The first entity is solved identically; later ones with fewer steps differ.
    first = np.asarray(layout.to_sequence(base))[:, :16]
    np.testing.assert_allclose(np.asarray(layout.to_sequence(fewer))[:, :16], first, rtol=1e-5)
    assert rel_l2(fewer, base) > 1e-3
    with pytest.raises(ValueError, match="steps_per_entity"):
        sampling.sample(
            model, params, labels, num_steps=4, cfg=1.5, key=key, steps_per_entity=(4, 3)
        )


def test_no_guidance_uses_a_single_batch_and_differs_from_guided():
    layout = ent.make_layout("cell", 8, cell_size=4)
    model, params = perturbed_tiny_xar(layout)
    labels = jnp.array([1, 2])
    plain = sampling.sample(model, params, labels, num_steps=3, cfg=1.0, key=jax.random.key(3))
    guided = sampling.sample(model, params, labels, num_steps=3, cfg=4.0, key=jax.random.key(3))
    assert rel_l2(plain, guided) > 1e-3


def test_sampler_rejects_bad_settings():
    layout = ent.make_layout("cell", 8, cell_size=4)
    model, params = perturbed_tiny_xar(layout)
    with pytest.raises(ValueError, match="sampler"):
        sampling.sample(
            model,
            params,
            jnp.array([1]),
            num_steps=3,
            cfg=1.0,
            key=jax.random.key(0),
            sampler="rk4",  # Not in sampling.SOLVERS.
        )
    with pytest.raises(ValueError, match="num_steps"):
        sampling.sample(model, params, jnp.array([1]), num_steps=1, cfg=1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        sampling.sample(model, params, jnp.array([1]), num_steps=3, cfg=1.0)


# ---------------------------------------------------------------------------------------------
# Solvers: step functions on a known ODE, and Heun through the real sampler.


def _solve(step, num_steps, x1=1.5, rate=1.3):
    """Integrates dx/dt = rate * x from t = 1 to 0 with ``step``; returns |x(0) - exact|."""
    grid = np.linspace(1.0, 0.0, num_steps + 1)
    x = np.float64(x1)
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        x = step(x, t, t_next, lambda x, t: rate * x, None)
    return abs(x - x1 * np.exp(-rate))


def test_heun_is_second_order_and_euler_first_order_on_a_linear_ode():
    for name, order in (("heun", 2), ("ode", 1)):
        step = sampling.SOLVERS[name].step
        errors = [_solve(step, n) for n in (8, 16, 32, 64)]
        ratios = np.array(errors[:-1]) / np.array(errors[1:])
        # Halving the step divides the error by about 2**order.
        np.testing.assert_allclose(ratios, 2.0**order, rtol=0.15, err_msg=name)
    assert _solve(sampling.heun_step, 16) < _solve(sampling.euler_step, 16) / 20


def test_samplers_are_the_solver_table_keys_and_grids_end_at_zero():
    assert sampling.SAMPLERS == tuple(sampling.SOLVERS) == ("sde", "ode", "heun")
    for name, solver in sampling.SOLVERS.items():
        grid = solver.grid(max(solver.min_steps, 5))
        assert grid[0] == 1.0 and grid[-1] == 0.0 and (np.diff(grid) < 0).all(), name
    t, dt, scale = sampling.time_grid(5, "heun")
    np.testing.assert_allclose(t, [1.0, 0.8, 0.6, 0.4, 0.2], rtol=1e-6)
    assert np.allclose(dt, -0.2) and not scale.any()


@pytest.mark.parametrize("layout", [KIND_LAYOUTS[0], KIND_LAYOUTS[1]], ids=["looped", "unrolled"])
def test_heun_cached_sampling_matches_full_forward(layout):
    model, params = perturbed_tiny_xar(layout)
    labels = jnp.array([3, 7])
    kw = dict(num_steps=3, cfg=2.0, key=jax.random.key(5), sampler="heun")
    cached = sampling.sample(model, params, labels, **kw)
    full = sampling.sample(model, params, labels, use_cache=False, **kw)
    assert np.isfinite(np.asarray(cached)).all()
    assert rel_l2(cached, full) < 1e-5


def test_heun_with_guidance_runs_and_differs_from_euler_and_unguided():
    layout = ent.make_layout("cell", 8, cell_size=4)
    model, params = perturbed_tiny_xar(layout)
    labels = jnp.array([1, 2])
    kw = dict(num_steps=4, key=jax.random.key(0))
    heun = sampling.sample(model, params, labels, cfg=3.0, sampler="heun", **kw)
    euler = sampling.sample(model, params, labels, cfg=3.0, sampler="ode", **kw)
    plain = sampling.sample(model, params, labels, cfg=1.0, sampler="heun", **kw)
    assert heun.shape == (2, 8, 8, 2) and np.isfinite(np.asarray(heun)).all()
    assert rel_l2(heun, euler) > 1e-3 and rel_l2(heun, plain) > 1e-3


def test_which_entities_skip_their_unconditional_half():
    # The one rule the sampler and benchmarks/sample.py's FLOP count share.
    cells = ent.make_layout("cell", 8, cell_size=4)  # 4 entities: an unrolled entity loop.
    tokens = ent.make_layout("token", 8)  # 64 uniform entities: a traced (looped) entity index.
    skipped = sampling.skipped_unconditional_entities
    assert skipped(cells, 2.5) == (0,)  # Linear schedule: scales 1, 1.5, 2, 2.5.
    assert skipped(cells, 2.5, "constant") == ()
    assert skipped(cells, 1.0) == ()  # Unguided: there is no unconditional half.
    assert skipped(tokens, 2.5) == ()  # Scale unknown when tracing a looped entity.
    with pytest.raises(ValueError, match="cfg_schedule"):
        skipped(cells, 2.5, "cosine")


def test_unit_guidance_entity_runs_only_the_conditional_half():
    # Under the linear schedule the first entity's scale is exactly 1, so v = v_c: the sampler
    # skips its unconditional half. Same samples as running both halves; fewer FLOPs compiled.
    layout = ent.make_layout("cell", 8, cell_size=4)
    model, params = perturbed_tiny_xar(layout)
    labels = jnp.array([3, 7])
    fns = {
        skip: sampling.make_sampler(model, num_steps=3, cfg=2.5, skip_unit_guidance=skip)
        for skip in (True, False)
    }
    key = jax.random.key(11)
    skipped, both = (fns[s](params, labels, key, None) for s in (True, False))
    assert rel_l2(skipped, both) < 1e-5
    flops = {
        s: fn.lower(params, labels, key, None).compile().cost_analysis()["flops"]
        for s, fn in fns.items()
    }
    assert flops[True] < flops[False]
    # With a constant schedule no entity has scale 1: nothing is skipped.
    constant = sampling.make_sampler(model, num_steps=3, cfg=2.5, cfg_schedule="constant")
    c_flops = constant.lower(params, labels, key, None).compile().cost_analysis()["flops"]
    assert c_flops == pytest.approx(flops[False], rel=1e-4)
