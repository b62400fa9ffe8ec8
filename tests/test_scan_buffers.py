"""`xar_jax.scan_buffers`: layer-scan outputs allocated without a zero fill.

The swap is only safe because a scan writes every slot of its stacked outputs before anything
reads them; the NaN-fill test checks that for the real train step (a read of an unwritten slot
would turn the loss or a parameter into NaN, or at least change it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xar_jax import flow, scan_buffers
from xar_jax.entities import make_layout
from xar_jax.model import XAR

pytestmark = pytest.mark.skipif(
    not scan_buffers.swap_supported(), reason="this jax's scan is not the one the swap targets"
)


def _scan_grad():
    def loss(w, x):
        def body(c, wi):
            c = jnp.tanh(c @ wi)
            return c, c  # The ys: a stacked output of the scan.

        c, ys = jax.lax.scan(body, x, w)
        return jnp.sum(ys) + jnp.sum(c)

    return jax.jit(jax.grad(loss))  # A fresh jit per lowering: no cached lowering is reused.


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_scan_outputs_lower_to_uninitialised_buffers_only_inside_the_block(platform):
    w, x = jnp.full((3, 8, 8), 0.1), jnp.ones((4, 8))
    lower = lambda: _scan_grad().trace(w, x).lower(lowering_platforms=(platform,)).as_text()
    before = lower()
    with scan_buffers.uninitialised_scan_outputs() as active:
        inside = lower()
    after = lower()
    assert active
    assert "AllocateBuffer" not in before and "AllocateBuffer" not in after
    # The forward's stacked ys and residuals, and the backward's stacked gradients.
    assert inside.count("AllocateBuffer") >= 3


def test_swap_applies_under_the_trainers_mesh():
    """The trainer lowers its step inside `jax.set_mesh` (all axes Auto): still no zero fill."""
    from xar_jax import sharding as sharding_lib

    with jax.set_mesh(sharding_lib.make_mesh(1, 1, 1)):
        with scan_buffers.uninitialised_scan_outputs():
            text = (
                _scan_grad()
                .trace(jnp.ones((3, 8, 8)), jnp.ones((4, 8)))
                .lower(lowering_platforms=("cuda",))
                .as_text()
            )
    assert text.count("AllocateBuffer") >= 3


def test_disabled_swap_changes_nothing():
    with scan_buffers.uninitialised_scan_outputs(enabled=False) as active:
        text = (
            _scan_grad()
            .trace(jnp.ones((3, 8, 8)), jnp.ones((4, 8)))
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
    assert not active and "AllocateBuffer" not in text


def test_no_slot_of_a_scanned_models_outputs_is_read_before_written():
    """Stacked outputs filled with NaN instead of zeros: the same loss and gradients, bit for bit
    (the training gradient of a scanned, rematerialised model: stacked residuals forward,
    stacked parameter gradients backward)."""
    layout = make_layout("cell", 8, cell_size=4)
    model = XAR(
        layout,
        32,
        2,
        1,
        2,
        2,
        in_channels=1,
        num_classes=10,
        dropout=0.0,
        attn_dropout=0.0,
        scan_layers=True,
        remat="dots_no_batch",
    )
    rng = np.random.default_rng(0)
    labels = jnp.asarray(rng.integers(0, 10, 4), jnp.int32)
    tokens = jnp.asarray(rng.uniform(-1, 1, (4, layout.num_tokens, 1)), jnp.float32)
    inputs = flow.draw_flow_inputs(jax.random.key(1), layout, labels, 1, null_class=10)
    params = model.init(jax.random.key(0), tokens, inputs.t, labels)["params"]

    def loss(p):  # A fresh function per lowering: jax caches lowerings by jaxpr.
        return flow.flow_loss(model.apply, p, tokens, inputs, layout)[0]

    results, nan_constants = [], []
    for fill in (0.0, float("nan")):
        with scan_buffers.uninitialised_scan_outputs(fill_value=fill) as active:
            lowered = jax.jit(jax.value_and_grad(lambda p: loss(p))).lower(params)
        assert active
        nan_constants.append(lowered.as_text().count("0x7FC00000"))
        # LLVM at -O0: the question is the program's semantics, not its speed (half the time).
        results.append(lowered.compile({"xla_backend_optimization_level": 0})(params))
    assert nan_constants[1] > nan_constants[0]  # The NaN fill reached the program.
    (zero_loss, zero_grads), (nan_loss, nan_grads) = results
    assert np.isfinite(float(nan_loss))
    np.testing.assert_array_equal(zero_loss, nan_loss)
    for a, b in zip(jax.tree.leaves(zero_grads), jax.tree.leaves(nan_grads), strict=True):
        np.testing.assert_array_equal(a, b)
