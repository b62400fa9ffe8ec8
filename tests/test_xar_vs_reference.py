"""The network, loss and converter against the authors' code (xar_tiny_golden.npz)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xar_jax import flow, weights
from xar_jax import model as xar_model
from xar_jax.convert import xar as xar_convert

B = 3  # Images in the golden forward batch.


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _golden_inputs(g):
    t = g["fwd/t"].reshape(4, B).T  # Row i*B + b is cell i of image b.
    return g["fwd/x_t_seq"], t, g["fwd/labels"].astype(np.int32)


@pytest.fixture(scope="module")
def scanned_padded_model(golden_model_with):
    return golden_model_with(scan_layers=True, mlp_multiple=64)


def test_forward_velocity_matches_reference(golden_model, xar_golden):
    model, params = golden_model
    v = model.apply({"params": params}, *_golden_inputs(xar_golden))
    assert rel_l2(v, xar_golden["fwd/v_seq"]) < 1e-5


def test_scanned_and_padded_layouts_compute_the_same_function(scanned_padded_model, xar_golden):
    model, params = scanned_padded_model
    assert "blocks" in params["encoder_blocks"]
    assert params["encoder_blocks"]["blocks"]["mlp"]["fc1_g"]["kernel"].shape == (2, 64, 192)
    v = model.apply({"params": params}, *_golden_inputs(xar_golden))
    assert rel_l2(v, xar_golden["fwd/v_seq"]) < 1e-5


def test_noisy_context_loss_matches_reference(golden_model, xar_golden):
    model, params = golden_model
    g = xar_golden
    tokens = np.concatenate(list(g["fwd/cells"]), axis=1)  # (B, 256, 16), cell-major.
    noise = np.concatenate(list(g["fwd/noise"]), axis=1)
    _, t, labels = _golden_inputs(g)
    inputs = flow.FlowInputs(
        jnp.asarray(t), jnp.asarray(noise), jnp.asarray(labels), jnp.full((B, 256), 1 / 256)
    )
    loss, _ = flow.flow_loss(model.apply, params, tokens, inputs, model.layout, train=False)
    assert rel_l2(loss, g["fwd/loss"]) < 1e-5
    # The interpolant and target themselves.
    t_tok = np.repeat(t, 64, axis=1)
    x_t, target = flow.interpolate(tokens, noise, t_tok)
    assert rel_l2(x_t, g["fwd/x_t_seq"]) < 1e-6
    assert rel_l2(target, g["fwd/target_seq"]) < 1e-6


def test_bfloat16_compute_stays_close_to_float32(xar_golden_state_dict, xar_golden):
    # Measured 6.7e-3 relative L2 on this input (params float32, matmuls and attention in bf16;
    # residual stream, norms and softmax statistics in float32). Bound: 2e-2.
    model, params = xar_convert.xar_from_torch(xar_golden_state_dict, dtype=jnp.bfloat16)
    v = model.apply({"params": params}, *_golden_inputs(xar_golden))
    assert v.dtype == jnp.float32
    assert rel_l2(v, xar_golden["fwd/v_seq"]) < 2e-2


def test_exact_gelu_matches_the_erf_definition():
    from math import erf

    from xar_jax.mlp import gelu_exact

    x = np.linspace(-8.0, 8.0, 4001)
    ref = np.array([0.5 * v * (1.0 + erf(v / np.sqrt(2.0))) for v in x])
    out = np.asarray(gelu_exact(jnp.asarray(x, jnp.float32)), np.float64)
    assert np.abs(out - ref).max() < 2e-6
    assert gelu_exact(jnp.ones((2,), jnp.bfloat16)).dtype == jnp.bfloat16


def test_gated_gelu_backward_equals_autodiff():
    from xar_jax.mlp import gated_gelu, gelu_exact

    g = 3.0 * jax.random.normal(jax.random.key(0), (4096,))
    u, w = jax.random.normal(jax.random.key(1), (2, 4096))
    by_hand = jax.grad(lambda g, u: jnp.sum(gated_gelu(g, u) * w), (0, 1))(g, u)
    autodiff = jax.grad(lambda g, u: jnp.sum(gelu_exact(g) * u * w), (0, 1))(g, u)
    for a, b in zip(by_hand, autodiff, strict=True):
        assert rel_l2(a, b) < 1e-6


def _param_grads(state_dict, golden, remat):
    model, params = xar_convert.xar_from_torch(state_dict, scan_layers=True, remat=remat)
    inputs = _golden_inputs(golden)
    loss = lambda p: jnp.sum(model.apply({"params": p}, *inputs) ** 2)
    return jax.tree.leaves(jax.grad(loss)(params))


@pytest.fixture(scope="module")
def grads_without_remat(xar_golden_state_dict, xar_golden):
    return _param_grads(xar_golden_state_dict, xar_golden, "none")


@pytest.mark.parametrize("remat", ["matmuls", "dots"])
def test_remat_policies_keep_the_gradient(
    xar_golden_state_dict, xar_golden, grads_without_remat, remat
):
    grads = _param_grads(xar_golden_state_dict, xar_golden, remat)
    for a, b in zip(grads, grads_without_remat, strict=True):
        assert rel_l2(a, b) < 1e-5


def test_time_index_uses_float32_arithmetic():
    from xar_jax.layers import time_index

    # In float64, 0.68 * 1000 truncates to 679; the release computes in float32: 680.
    assert float(time_index(jnp.asarray(0.68, jnp.float32))) == 680.0


def test_converter_round_trip_is_identity(
    golden_model, xar_golden_state_dict, scanned_padded_model
):
    derived = [k for k in xar_golden_state_dict if xar_convert._is_derived(k)]
    expected = {k: v for k, v in xar_golden_state_dict.items() if k not in derived}
    for model, params in (golden_model, scanned_padded_model):
        back = xar_convert.params_to_torch(params, model)
        assert set(back) == set(expected)
        for k, v in expected.items():
            np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_converter_rejects_missing_extra_and_misshapen_entries(xar_golden_state_dict):
    sd = dict(xar_golden_state_dict)
    missing = {k: v for k, v in sd.items() if k != "decoder_blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing \(1\): decoder_blocks.1.mlp.fc2.bias"):
        xar_convert.xar_from_torch(missing)
    with pytest.raises(ValueError, match=r"unexpected \(1\): head.weight"):
        xar_convert.xar_from_torch(sd | {"head.weight": np.zeros((2, 2), np.float32)})
    bad = sd | {"encoder_pos_embed_learned": np.zeros((1, 255, 64), np.float32)}
    with pytest.raises(ValueError, match="encoder_pos_embed_learned"):
        xar_convert.xar_from_torch(bad)


def test_converter_reads_released_pth_and_prefers_ema(tmp_path, xar_golden_state_dict, xar_golden):
    torch = pytest.importorskip("torch", reason="the 'torch' extra reads .pth files")
    ema = {k: torch.from_numpy(v) for k, v in xar_golden_state_dict.items()}
    raw = {k: torch.zeros_like(v) for k, v in ema.items()}
    path = tmp_path / "xar_tiny.pth"
    torch.save({"model": raw, "model_ema": ema}, path)
    model, params = xar_convert.xar_from_torch(str(path))
    v = model.apply({"params": params}, *_golden_inputs(xar_golden))
    assert rel_l2(v, xar_golden["fwd/v_seq"]) < 1e-5
    # Converted directory (the CLI's output) loads back into the same function.
    out = tmp_path / "converted"
    xar_convert.convert_file(str(path), str(out))
    model2, params2 = weights.load_xar(str(out), scan_layers=True)
    v2 = model2.apply({"params": params2}, *_golden_inputs(xar_golden))
    assert rel_l2(v2, xar_golden["fwd/v_seq"]) < 1e-5
    with pytest.raises(FileExistsError):
        xar_convert.convert_file(str(path), str(out))


@pytest.mark.parametrize("name", sorted(xar_model.PRESETS))
def test_presets_have_the_published_parameter_counts(name):
    size = xar_model.PRESETS[name]
    from xar_jax.entities import make_layout

    model = xar_model.XAR(
        make_layout("cell", 16, cell_size=8),
        size.width,
        size.encoder_depth,
        size.decoder_depth,
        size.num_heads,
        size.num_heads,
        scan_layers=True,
        mlp_multiple=128,
    )
    count = xar_model.count_params(xar_model.abstract_params(model), model=model)
    assert round(count / 1e6, 2) == size.params_millions


def test_mlp_padding_units_stay_zero_under_training(scanned_padded_model, xar_golden):
    model, params = scanned_padded_model
    x_t, t, labels = _golden_inputs(xar_golden)

    def loss(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, x_t, t, labels)))

    grads = jax.grad(loss)(params)
    mlp = grads["encoder_blocks"]["blocks"]["mlp"]
    hidden = model.mlp_hidden
    assert float(jnp.abs(mlp["fc1_g"]["kernel"][..., hidden:]).max()) == 0.0
    assert float(jnp.abs(mlp["fc1_x"]["bias"][..., hidden:]).max()) == 0.0
    assert float(jnp.abs(mlp["fc2"]["kernel"][:, hidden:]).max()) == 0.0
    assert float(jnp.abs(mlp["fc2"]["kernel"][:, :hidden]).max()) > 0.0


def test_convert_cli_writes_a_loadable_directory_and_reports_errors(
    tmp_path, xar_golden_state_dict
):
    from xar_jax.convert.__main__ import main

    src = tmp_path / "tiny.npz"
    np.savez(src, **xar_golden_state_dict)
    out = tmp_path / "out"
    assert main(["xar", "--src", str(src), "--out", str(out)]) == 0
    model, params = weights.load_xar(str(out))
    assert model.width == 64 and model.encoder_heads == 4
    assert main(["xar", "--src", str(src), "--out", str(out)]) == 1  # Exists: refused.
    assert main(["xar", "--src", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o2")]) == 1


def test_fused_attention_path_matches_reference(optimized_golden_model, xar_golden):
    # Fused attention with the block mask, scanned two blocks per iteration, padded MLP: the
    # optimised paths together.
    model, params = optimized_golden_model
    v = model.apply({"params": params}, *_golden_inputs(xar_golden))
    assert rel_l2(v, xar_golden["fwd/v_seq"]) < 1e-5
