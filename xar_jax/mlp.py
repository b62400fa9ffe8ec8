"""The gated MLP of each block: ``fc2(GELU(fc1_g(x)) * fc1_x(x))`` with exact GELU.

Parameter names follow the release (``mlp.fc1_g``, ``mlp.fc1_x``, ``mlp.fc2``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from xar_jax.dropout import apply_dropout

Array = jax.Array
dense_init = nn.initializers.xavier_uniform()  # The release's Linear init (as `layers`).


_SQRT_HALF = np.float32(np.sqrt(0.5))
_INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))


def gelu_exact(x: Array) -> Array:
    """Exact GELU ``x/2 (1 + erf(x/sqrt 2))`` in float32, returned in x's dtype (PyTorch's form).

    ``jax.nn.gelu(approximate=False)`` uses ``erfc``, whose float32 expansion on GPU evaluates
    both of its branches and an exp per element: a compute-bound kernel as slow as a matmul here.
    The erf form is the one the release's PyTorch kernel computes.
    """
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + jax.lax.erf(xf * _SQRT_HALF))).astype(x.dtype)


@jax.custom_vjp
def gated_gelu(g: Array, u: Array) -> Array:
    """``gelu_exact(g) * u``, differentiated by hand so that backward keeps only g and u.

    Autodiff would keep the float32 intermediates of the GELU for the backward pass; under a layer
    scan they are stacked per layer (gigabytes of copies per step). The hand-written backward
    recomputes them from the compute-dtype inputs instead, as PyTorch's GELU backward does.
    """
    return gelu_exact(g) * u


def _gated_gelu_fwd(g, u):
    return gated_gelu(g, u), (g, u)


def _gated_gelu_bwd(res, d_out):
    g, u = res
    gf, uf, df = g.astype(jnp.float32), u.astype(jnp.float32), d_out.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(gf * _SQRT_HALF))
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * gf * gf)
    return ((df * uf * (cdf + gf * pdf)).astype(g.dtype), (df * gf * cdf).astype(u.dtype))


gated_gelu.defvjp(_gated_gelu_fwd, _gated_gelu_bwd)


class GatedMLP(nn.Module):
    """``fc2(GELU(fc1_g(x)) * fc1_x(x))`` with exact GELU.

    ``hidden_padded`` >= ``hidden`` zero-pads the hidden width (to suit matrix units): padded
    units start at zero and receive zero gradient, so the function and its training are unchanged.
    """

    hidden: int
    hidden_padded: int
    dtype: Any = jnp.float32
    dropout: float = 0.0
    dropout_impl: str = "rng"

    @nn.compact
    def __call__(self, x, deterministic: bool):
        d_model = x.shape[-1]
        width = self.hidden_padded
        g = checkpoint_name(self._fc1("fc1_g", width)(x), "fc1_g")
        u = checkpoint_name(self._fc1("fc1_x", width)(x), "fc1_x")
        hidden = gated_gelu(g, u)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = apply_dropout(
            self, hidden, self.dropout, "drop1", deterministic, self.dropout_impl
        )
        fc2_init = dense_init
        if width != self.hidden:
            fc2_init = _zero_padded(dense_init, self.hidden, axis=0)
        out = nn.Dense(
            d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(fc2_init, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="fc2",
        )(hidden)
        out = checkpoint_name(out, "fc2")
        return apply_dropout(self, out, self.dropout, "drop2", deterministic, self.dropout_impl)

    def _fc1(self, name, width):
        init = dense_init if width == self.hidden else _zero_padded(dense_init, self.hidden, axis=1)
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name=name,
        )


def _zero_padded(init, true_width: int, axis: int):
    """Initialiser drawing the unpadded block with ``init`` (same fan) and zeros elsewhere."""

    def padded_init(key, shape, dtype=jnp.float32):
        true_shape = list(shape)
        true_shape[axis] = true_width
        w = init(key, tuple(true_shape), dtype)
        pad = [(0, 0)] * len(shape)
        pad[axis] = (0, shape[axis] - true_width)
        return jnp.pad(w, pad)

    return padded_init
