"""Sampling: entities generated in order, each by an SDE/ODE solve with classifier-free guidance.

Finished entities are clean context (t = 0) held as keys/values in a KV cache, so every flow step
runs only the current entity's tokens. The whole generation is one jit-compiled function: flow
steps are a `lax.fori_loop`; entities are a `lax.fori_loop` too when they all have the same size
(every kind but ``scale``, whose few entities are unrolled).

Solvers are pure step functions in `SOLVERS`; each sees the guided velocity
``v = v_u + w (v_c - v_u)`` through a callable, so adding one is writing one function:

* ``sde``, Euler-Maruyama (the release): grid ``t_0 = 1 > ... > t_{S-1} = 0.04`` (S = num_steps
  points, linear, float64), then 0. Drift ``d = (2 - t) v + x`` (= ``v - t * score`` on the linear
  path), update ``x += d dt + sqrt(2 t) sqrt(|dt|) n``; the last step has no noise.
* ``ode``, Euler: ``t`` linear from 1 to 0 in num_steps steps, ``x += v dt``.
* ``heun``: the same grid, trapezoidal predictor-corrector (2nd order, two velocity evaluations
  per step).

The network sees ``float32(t_i)`` of the float64 grid (for 4 sde steps 0.68 must map to index 680).
The release guides the drift rather than the velocity; the drift being affine in v with the same
x in both halves, the two agree up to rounding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xar_jax.model import XAR, KVCache

CFG_SCHEDULES = ("linear", "constant")
SDE_T_END = 0.04
# Up to this many equal entities the entity loop is unrolled (static cache prefixes); beyond it,
# a fori_loop keeps compile time flat (e.g. the 256 entities of the token kind).
STATIC_ENTITY_LIMIT = 8

# velocity(x, t) -> guided velocity, x and the result (B, n, C) in the sampler's state dtype.
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def sde_noise_scale(t, t_next):
    """The release's noise scale ``sqrt(2 t) sqrt(|dt|)``; 0 on the final step to ``t = 0``.

    Plain arithmetic, so it serves NumPy grids and traced JAX scalars alike.
    """
    return (2.0 * t) ** 0.5 * abs(t_next - t) ** 0.5 * (t_next > 0)


def euler_maruyama_step(x, t, t_next, velocity: VelocityFn, eps):
    """The release's reverse-SDE step: drift ``(2 - t) v + x``, Brownian noise ``eps``."""
    drift = (2.0 - t) * velocity(x, t) + x
    return x + drift * (t_next - t) + sde_noise_scale(t, t_next) * eps


def euler_step(x, t, t_next, velocity: VelocityFn, eps=None):
    """Euler on the probability-flow ODE ``dx/dt = v`` (1st order)."""
    del eps
    return x + velocity(x, t) * (t_next - t)


def heun_step(x, t, t_next, velocity: VelocityFn, eps=None):
    """Heun (trapezoidal predictor-corrector) on ``dx/dt = v`` (2nd order, 2 evaluations)."""
    del eps
    dt = t_next - t
    v = velocity(x, t)
    v_next = velocity(x + v * dt, t_next)
    return x + (v + v_next) * (0.5 * dt)


@dataclasses.dataclass(frozen=True)
class Solver:
    """A step function ``step(x, t, t_next, velocity, eps) -> x_next`` and its time grid.

    Attributes:
      step: the pure step; ``eps`` is N(0, I) noise shaped like x for stochastic solvers, else None.
      t_end: the grid runs linearly from 1 to ``t_end`` in num_steps points, then to 0 (0.0: linear
        from 1 to 0 in num_steps steps).
      min_steps: the fewest num_steps the grid allows.
      stochastic: draws ``eps`` every step.
    """

    step: Callable[..., jax.Array]
    t_end: float = 0.0
    min_steps: int = 1
    stochastic: bool = False

    def grid(self, num_steps: int) -> np.ndarray:
        """The ``num_steps + 1`` float64 time points, from 1 down to 0."""
        if self.t_end > 0:
            return np.append(np.linspace(1.0, self.t_end, num_steps, dtype=np.float64), 0.0)
        return np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)


SOLVERS: dict[str, Solver] = {
    "sde": Solver(euler_maruyama_step, t_end=SDE_T_END, min_steps=2, stochastic=True),
    "ode": Solver(euler_step),
    "heun": Solver(heun_step),
}
SAMPLERS = tuple(SOLVERS)  # Valid `sample.sampler` values.


def get_solver(sampler: str, num_steps: int) -> Solver:
    """The solver named ``sampler``, checked to allow ``num_steps``."""
    if sampler not in SOLVERS:
        raise ValueError(f"sample.sampler={sampler!r}; allowed: {', '.join(SAMPLERS)}.")
    solver = SOLVERS[sampler]
    if num_steps < solver.min_steps:
        minima = ", ".join(f"{s.min_steps} for {n!r}" for n, s in SOLVERS.items())
        raise ValueError(f"sample.num_steps={num_steps} is too few; at least {minima}.")
    return solver


def time_grid(num_steps: int, sampler: str = "sde") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step (t seen by the network float32, dt, noise scale), each of length ``num_steps``.

    Built in float64 then cast, as the release does: the network's time index comes from
    ``float32(t_i)`` (for 4 steps the grid point 0.68 must map to index 680).
    """
    solver = get_solver(sampler, num_steps)
    t = solver.grid(num_steps)
    dt = np.diff(t)
    scale = sde_noise_scale(t[:-1], t[1:]) if solver.stochastic else np.zeros(num_steps)
    return t[:-1].astype(np.float32), dt, scale


def guidance_scales(num_entities: int, cfg: float, schedule: str = "linear") -> np.ndarray:
    """Guidance scale of each entity: linear ``1 + (cfg - 1) s / (K - 1)`` or constant ``cfg``."""
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"sample.cfg_schedule={schedule!r}; allowed: {', '.join(CFG_SCHEDULES)}.")
    if schedule == "constant" or num_entities == 1:
        return np.full((num_entities,), cfg, np.float64)
    return 1.0 + (cfg - 1.0) * np.arange(num_entities) / (num_entities - 1)


def _time_table(model: XAR, num_steps, steps_per_entity, sampler):
    """(K, S_max + 1) float32 time points of each entity's grid, and (K,) step counts."""
    k = model.layout.num_entities
    steps = [int(num_steps)] * k if steps_per_entity is None else [int(s) for s in steps_per_entity]
    if len(steps) != k:
        raise ValueError(
            f"sample.steps_per_entity has {len(steps)} entries; the layout has {k} entities."
        )
    t_tab = np.zeros((k, max(steps) + 1), np.float32)
    for e, s in enumerate(steps):
        t_tab[e, : s + 1] = get_solver(sampler, s).grid(s)
    return t_tab, np.asarray(steps, np.int32)


def sample(
    model: XAR,
    params: Any,
    labels: jax.Array,
    *,
    num_steps: int,
    cfg: float,
    key: jax.Array | None = None,
    noise: dict[str, jax.Array] | None = None,
    sampler: str = "sde",
    cfg_schedule: str = "linear",
    steps_per_entity: tuple[int, ...] | None = None,
    use_cache: bool = True,
    state_dtype: Any = jnp.float32,
) -> jax.Array:
    """Generates latents for ``labels``.

    Args:
      model: the `XAR` module (its ``dtype`` is the network's compute dtype).
      params: its params.
      labels: (B,) int class labels.
      num_steps: flow steps per entity (grid points for 'sde'; 'heun' evaluates twice per step).
      cfg: guidance scale (1.0 disables guidance and the doubled batch).
      key: PRNG key for all noise (needed unless ``noise`` replaces every draw).
      noise: optional ``{'init': (K, B, n, C), 'steps': (K, S-1, B, n, C)}`` replacing the initial
        noise of each entity and the Euler-Maruyama noise of each step (uniform entities only).
      sampler: a `SOLVERS` key: 'sde' (Euler-Maruyama, the release), 'ode' (Euler) or 'heun'.
      cfg_schedule: 'linear' over entities (the release) or 'constant'.
      steps_per_entity: optional per-entity step counts (e.g. decreasing 50 -> 5).
      use_cache: KV cache for finished entities (False recomputes the whole prefix every step).
      state_dtype: dtype of the sampler state x (float64 needs ``jax_enable_x64``).

    Returns:
      (B, H, W, C) float32 latents.
    """
    if key is None and noise is None:
        raise ValueError("sample() needs a PRNG `key` or injected `noise`.")
    if noise is not None and not model.layout.uniform:
        raise ValueError("Injected noise is supported for layouts whose entities have equal sizes.")
    fn = make_sampler(
        model,
        num_steps=num_steps,
        cfg=float(cfg),
        sampler=sampler,
        cfg_schedule=cfg_schedule,
        steps_per_entity=None if steps_per_entity is None else tuple(steps_per_entity),
        use_cache=use_cache,
        state_dtype=jnp.dtype(state_dtype),
    )
    key = jax.random.key(0) if key is None else key
    return fn(params, jnp.asarray(labels, jnp.int32), key, noise)


def _entities_unrolled(layout) -> bool:
    """Whether the sampler unrolls its entity loop (few or non-uniform entities), so that each
    entity's index, cache prefix and guidance scale are static when tracing."""
    return not (layout.uniform and layout.num_entities > STATIC_ENTITY_LIMIT)


def skipped_unconditional_entities(layout, cfg: float, cfg_schedule: str = "linear"):
    """The entities whose unconditional half `make_sampler` does not run (``skip_unit_guidance``).

    Those guided with scale exactly 1 (the first under the linear schedule), in an unrolled
    entity loop, where the scale is known when tracing. Empty without guidance (cfg 1).
    """
    if cfg == 1.0 or not _entities_unrolled(layout):
        return ()
    scales = guidance_scales(layout.num_entities, cfg, cfg_schedule)
    return tuple(int(e) for e in np.flatnonzero(scales == 1.0))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a sampler fixes when it is built: static while tracing.

    Attributes:
      model: the `XAR` module.
      solver: the flow solver.
      t_tab: (K, S_max + 1) float32 time points of each entity's grid; ``steps`` (K,) their counts.
      w_tab: (K,) guidance scale of each entity.
      guided: whether the network runs a conditional and an unconditional half (cfg != 1).
      conditional_only: entities that run only their conditional half (scale exactly 1).
      use_cache: finished entities as cached keys/values (else a full forward per evaluation).
      state_dtype: dtype of the sampler state x.
    """

    model: XAR
    solver: Solver
    t_tab: np.ndarray
    steps: np.ndarray
    w_tab: np.ndarray
    guided: bool
    conditional_only: tuple[int, ...]
    use_cache: bool
    state_dtype: Any


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call's inputs, shared by every entity: the params, the (B,) labels and the labels of
    the network's rows (conditional then null labels when guided), the key, optional injected
    noise, and the plan's tables as arrays."""

    params: Any
    labels: jax.Array
    row_labels: jax.Array
    key: jax.Array
    noise: dict[str, jax.Array] | None
    t_points: jax.Array
    scales: jax.Array
    num_steps: jax.Array

    @property
    def batch(self) -> int:
        return self.labels.shape[0]


@functools.lru_cache(maxsize=32)
def make_sampler(
    model: XAR,
    *,
    num_steps: int,
    cfg: float,
    sampler: str = "sde",
    cfg_schedule: str = "linear",
    steps_per_entity: tuple[int, ...] | None = None,
    use_cache: bool = True,
    state_dtype: Any = jnp.float32,
    skip_unit_guidance: bool = True,
):
    """A jitted ``fn(params, labels, key, noise) -> latents`` for fixed settings (noise may be None).

    ``skip_unit_guidance``: an entity whose guidance scale is exactly 1 (the first one under the
    linear schedule) runs only the conditional half, since ``v_u + 1 (v_c - v_u) = v_c`` (equal up
    to float rounding). Its keys/values are still computed for both halves. Applies to unrolled
    entity loops (few entities), where the scale is known when tracing; False runs both halves.
    """
    layout = model.layout
    t_tab, steps = _time_table(model, num_steps, steps_per_entity, sampler)  # Checks sampler.
    plan = _Plan(
        model=model,
        solver=SOLVERS[sampler],
        t_tab=t_tab,
        steps=steps,
        w_tab=guidance_scales(layout.num_entities, cfg, cfg_schedule),
        guided=cfg != 1.0,
        conditional_only=(
            skipped_unconditional_entities(layout, cfg, cfg_schedule) if skip_unit_guidance else ()
        ),
        use_cache=use_cache,
        state_dtype=state_dtype,
    )

    def generate(params, labels, key, noise):
        call = _start_call(plan, params, labels, key, noise)
        seq = jnp.zeros((call.batch, layout.num_tokens, model.in_channels), jnp.float32)
        caches = _empty_caches(model, call.row_labels.shape[0]) if use_cache else {}
        seq, _ = _for_each_entity(
            layout,
            lambda e, n, start, carry: _solve_entity(plan, call, e, n, start, carry),
            (seq, caches),
        )
        return layout.from_sequence(seq)

    return jax.jit(generate)


def _start_call(plan: _Plan, params, labels, key, noise) -> _Call:
    null = jnp.full_like(labels, plan.model.num_classes)  # The null class is the extra last row.
    t_points, scales, num_steps = jax.tree.map(
        jnp.asarray, (plan.t_tab, plan.w_tab.astype(np.float32), plan.steps)
    )
    return _Call(
        params=params,
        labels=labels,
        row_labels=jnp.concatenate([labels, null]) if plan.guided else labels,
        key=key,
        noise=noise,
        t_points=t_points,
        scales=scales,
        num_steps=num_steps,
    )


def _for_each_entity(layout, solve_entity, carry):
    """Runs ``solve_entity(e, n, start, carry)`` over the entities in order: unrolled for few or
    unequal entities (static index and cache prefix), else a ``fori_loop``."""
    if not _entities_unrolled(layout):
        n = layout.entity_sizes[0]
        return jax.lax.fori_loop(
            0, layout.num_entities, lambda e, cr: solve_entity(e, n, e * n, cr), carry
        )
    for e in range(layout.num_entities):
        carry = solve_entity(e, layout.entity_sizes[e], int(layout.entity_starts[e]), carry)
    return carry


def _solve_entity(plan: _Plan, call: _Call, e, n, start, carry):
    """Entity ``e`` (``n`` tokens from ``start``) from noise to clean, written into the sequence
    and, with the cache, its keys/values into the caches. ``carry`` is ``(seq, caches)``."""
    seq, caches = carry
    key_init, key_steps = jax.random.split(jax.random.fold_in(call.key, e))
    x = _initial_state(plan, call, e, n, key_init)
    # What this entity attends to, fixed for all its flow steps: taken here, outside the step
    # loop (XLA does not hoist a slice of the caches out of it).
    context, visible = (None, None)
    entity_of_token = jnp.asarray(plan.model.layout.entity_of_token)
    if plan.use_cache:
        context, visible = _cache_context(caches, e, start, entity_of_token)
    skip = isinstance(e, int) and e in plan.conditional_only
    if skip and context is not None:
        context = _conditional_half(context, call.batch)
    # Both halves run unless unguided, or guided with scale 1 (v_u + 1 (v_c - v_u) = v_c).
    halves = plan.guided and not skip

    def network(rows, t_scalar, row_labels):
        return _network_velocity(plan, call, rows, t_scalar, row_labels, context, visible,
                                 e, start, n, seq)  # fmt: skip

    velocity = _guided_velocity(plan, call, e, network, halves)
    x = _integrate(plan, call, e, x, velocity, key_steps)
    seq = jax.lax.dynamic_update_slice_in_dim(seq, x.astype(jnp.float32), start, axis=1)
    if plan.use_cache:
        caches = _cache_entity(plan, call, caches, x, e, start, entity_of_token)
    return seq, caches


def _initial_state(plan: _Plan, call: _Call, e, n, key_init):
    """Entity ``e``'s starting noise (B, n, C): injected, or drawn from ``key_init``."""
    if call.noise is not None:
        return jnp.asarray(call.noise["init"])[e].astype(plan.state_dtype)
    shape = (call.batch, n, plan.model.in_channels)
    return jax.random.normal(key_init, shape, plan.state_dtype)


def _doubled(plan: _Plan, x):
    """The guided batch: conditional and unconditional halves share x."""
    return jnp.concatenate([x, x]) if plan.guided else x


def _network_velocity(plan, call, rows, t_scalar, row_labels, context, visible, e, start, n, seq):
    """The network's velocity for the ``row_labels`` rows (both halves, or the conditional one):
    through the cache, or by a full forward over the sequence so far."""
    model = plan.model
    rows = rows.astype(jnp.float32)
    t_b = jnp.full((row_labels.shape[0],), t_scalar, jnp.float32)
    if plan.use_cache:
        return model.apply({"params": call.params}, rows, t_b, row_labels, start, context,
                           visible, method=XAR.entity_forward)  # fmt: skip
    both = row_labels.shape[0] == call.row_labels.shape[0] and plan.guided
    return _uncached_velocity(model, call.params, rows, t_b, row_labels, e, start, n, seq, both)


def _guided_velocity(plan: _Plan, call: _Call, e, network, halves: bool) -> VelocityFn:
    """The solvers' ``velocity(x, t)``: ``v_u + w_e (v_c - v_u)`` when both halves run, else the
    one half's velocity, in the state dtype."""

    def velocity(x, t):
        rows, row_labels = (_doubled(plan, x), call.row_labels) if halves else (x, call.labels)
        v = network(rows, t, row_labels).astype(plan.state_dtype)
        if halves:
            b = call.batch
            v_c, v_u = v[:b], v[b:]
            v = v_u + call.scales[e] * (v_c - v_u)
        return v

    return velocity


def _integrate(plan: _Plan, call: _Call, e, x, velocity: VelocityFn, key_steps):
    """Entity ``e``'s flow steps from its noise ``x`` to clean latents, with the plan's solver."""

    def step_noise(i, shape):
        if not plan.solver.stochastic:
            return None
        if call.noise is not None:
            steps_noise = jnp.asarray(call.noise["steps"])
            last = steps_noise.shape[1] - 1
            return steps_noise[e, jnp.minimum(i, last)].astype(plan.state_dtype)
        return jax.random.normal(jax.random.fold_in(key_steps, i), shape, plan.state_dtype)

    def flow_step(i, x):
        t_points = call.t_points
        return plan.solver.step(x, t_points[e, i], t_points[e, i + 1], velocity,
                                step_noise(i, x.shape))  # fmt: skip

    return jax.lax.fori_loop(0, call.num_steps[e], flow_step, x)


def _cache_entity(plan: _Plan, call: _Call, caches, x, e, start, entity_of_token):
    """The caches with finished entity ``e``'s keys/values (both halves, at t = 0) written at
    ``start``."""
    rows = _doubled(plan, x)
    zeros = jnp.zeros((call.row_labels.shape[0],), jnp.float32)
    context, visible = _cache_context(caches, e, start, entity_of_token)
    _, kv = plan.model.apply({"params": call.params}, rows.astype(jnp.float32), zeros,
                             call.row_labels, start, context, visible, True,
                             method=XAR.entity_forward)  # fmt: skip
    return {
        name: KVCache(
            *(
                jax.lax.dynamic_update_slice_in_dim(full, new.astype(full.dtype), start, axis=2)
                for full, new in zip(caches[name], kv[name], strict=True)
            )
        )
        for name in caches
    }


def _cache_context(caches, e, start, entity_of_token):
    """The cached keys/values the current entity attends to, and which of them are visible.

    With a static ``start`` (unrolled entity loop) the finished entities are the first ``start``
    positions: the whole caches go with no mask, and the attention reads that static prefix in
    place (no slice copied per flow step; no context at all for the first entity). With a
    traced ``start`` (loop over many entities) the visibility is a mask.
    """
    if isinstance(start, int):
        return (caches if start else None), None
    return caches, entity_of_token < e


def _conditional_half(context, batch):
    """The first ``batch`` rows (the conditional half) of every cached keys/values array."""
    return {name: KVCache(c.keys[:, :batch], c.values[:, :batch]) for name, c in context.items()}


def _empty_caches(model: XAR, batch: int) -> dict[str, KVCache]:
    n = model.layout.num_tokens
    cache_dtype = jnp.dtype(model.dtype)
    out = {}
    for name, depth, heads in (
        ("encoder", model.encoder_depth, model.encoder_heads),
        ("decoder", model.decoder_depth, model.decoder_heads),
    ):
        shape = (depth, batch, n, heads, model.width // heads)
        out[name] = KVCache(jnp.zeros(shape, cache_dtype), jnp.zeros(shape, cache_dtype))
    return out


def _uncached_velocity(model, params, xin, t_b, lab, e, start, n, seq, guided):
    """The current entity's velocity from a full forward over [clean context, current entity].

    Future entities' tokens are zeros; the block-causal mask keeps them from mattering.
    """
    full = jnp.concatenate([seq, seq]) if guided else seq
    full = jax.lax.dynamic_update_slice_in_dim(full, xin, start, axis=1)
    k = model.layout.num_entities
    t_all = jnp.where(jnp.arange(k)[None, :] == e, t_b[:, None], 0.0)
    v = model.apply({"params": params}, full, t_all, lab)
    return jax.lax.dynamic_slice_in_dim(v, start, n, axis=1)
