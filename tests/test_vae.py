"""The KL-16 VAE: parity with MAR's PyTorch code (golden vectors), the posterior and latent scale,
the strict checkpoint converter and converted-params directories.

Compilations are shared: the float32 encoder and decoder of the ch=32 golden model compile once
(module fixtures) and the round-trip tests hit the same jit cache.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import import_torch

from xar_jax import vae as vae_lib
from xar_jax import weights
from xar_jax.convert import vae as convert_vae

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "vae_ch32_golden.npz")
# Relative L2 error of bfloat16 decoding vs float32 on the golden decoder input, measured at
# 0.041 (jax 0.10.2, CPU). About half of it is rounding the random golden weights to bfloat16.
BF16_DECODE_REL_TOL = 0.06


def rel_l2(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def state_dict(golden):
    return {k.removeprefix("param/"): v for k, v in golden.items() if k.startswith("param/")}


@pytest.fixture(scope="module")
def converted(state_dict):
    return convert_vae.vae_from_torch(state_dict)


@pytest.fixture(scope="module")
def moments(converted, golden):
    model, params = converted
    return np.asarray(vae_lib.encode(params, nhwc(golden["enc/image_nchw"]), model=model))


@pytest.fixture(scope="module")
def raw_images(converted, golden):
    model, params = converted
    z = nhwc(golden["dec/z_nchw"])
    return np.asarray(vae_lib.decode(params, z, model=model, scale=1.0, clip=False))


# ---------------------------------------------------------------------------------------------
# Parity with the reference.


def test_converter_infers_width_of_golden_checkpoint(converted, golden):
    model, _ = converted
    assert model == vae_lib.VAE(**vae_lib.vae_config("kl16_ch32"))
    assert model.ch == int(golden["config/ch"])


def test_encoder_matches_golden_moments(moments, golden):
    expected = nhwc(golden["enc/moments_nchw"])
    assert moments.shape == expected.shape == (2, 16, 16, 32)
    assert moments.dtype == np.float32
    assert rel_l2(moments, expected) < 1e-5


def test_decoder_matches_golden_images(raw_images, golden):
    expected = nhwc(golden["dec/image_nchw"])
    assert raw_images.shape == expected.shape == (2, 256, 256, 3)
    assert rel_l2(raw_images, expected) < 1e-5


def test_full_width_param_count_equals_released_tokenizer():
    model = vae_lib.VAE(**vae_lib.vae_config("kl16"))
    images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 66_456_019
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    out = jax.eval_shape(lambda p, x: model.apply(p, x, method=vae_lib.VAE.encode), shapes, images)
    assert out.shape == (1, 16, 16, 32)


def test_decode_divides_by_latent_scale_and_clips(converted, golden, raw_images):
    model, params = converted
    scaled = nhwc(golden["dec/z_nchw"]) * vae_lib.LATENT_SCALE
    images = np.asarray(vae_lib.decode(params, scaled, model=model))
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert (np.abs(raw_images) > 1).any()  # the clip is exercised
    # z * s / s is not exactly z in float32; the decoder amplifies that last-bit difference.
    np.testing.assert_allclose(images, np.clip(raw_images, -1, 1), atol=1e-4)


def test_bfloat16_decode_stays_close_to_float32(converted, golden, raw_images):
    model, params = converted
    bf16 = model.clone(dtype=jnp.bfloat16)
    images = vae_lib.decode(params, nhwc(golden["dec/z_nchw"]), model=bf16, scale=1.0, clip=False)
    assert images.dtype == jnp.float32
    error = rel_l2(images, raw_images)
    assert 0 < error < BF16_DECODE_REL_TOL  # > 0: the module really computed in bfloat16


# ---------------------------------------------------------------------------------------------
# Posterior and latent scaling.


def test_sample_latents_draws_scaled_gaussian_with_clamped_logvar():
    mean = np.zeros((8, 16, 16, 16), np.float32)
    mean[..., 0] = 2.0
    logvar = np.full_like(mean, np.log(0.25))  # std 0.5
    logvar[..., 1] = 50.0  # clamped to 20: std exp(10)
    logvar[..., 2] = -100.0  # clamped to -30: std exp(-15)
    moments = jnp.asarray(np.concatenate([mean, logvar], axis=-1))
    z = np.asarray(vae_lib.sample_latents(moments, jax.random.key(0))) / vae_lib.LATENT_SCALE
    assert z.shape == mean.shape and z.dtype == np.float32
    free = z[..., 3:]
    assert abs(free.mean()) < 0.01 and abs(free.std() - 0.5) < 0.01
    assert abs(z[..., 0].mean() - 2.0) < 0.05
    assert abs(z[..., 1].std() / np.exp(10.0) - 1) < 0.1
    assert 0 < np.abs(z[..., 2]).max() < 20 * np.exp(-15.0)
    again = vae_lib.sample_latents(moments, jax.random.key(0))
    other = vae_lib.sample_latents(moments, jax.random.key(1))
    np.testing.assert_array_equal(again, z * vae_lib.LATENT_SCALE)
    assert not np.allclose(other, again)


def test_latents_mode_is_scaled_mean(moments):
    np.testing.assert_allclose(vae_lib.latents_mode(moments), moments[..., :16] * 0.2325, rtol=1e-6)
    posterior = vae_lib.DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(posterior.logvar, np.clip(moments[..., 16:], -30, 20))


def test_posterior_rejects_odd_channel_count():
    with pytest.raises(ValueError, match="even last axis"):
        vae_lib.sample_latents(jnp.zeros((1, 2, 2, 31)), jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# Input validation (fails before tracing).


def test_encode_rejects_nchw_and_integer_images(converted, golden):
    model, params = converted
    with pytest.raises(ValueError, match=r"NHWC \(B, H, W, 3\).*\(2, 3, 256, 256\)"):
        vae_lib.encode(params, golden["enc/image_nchw"], model=model)
    with pytest.raises(ValueError, match="multiples of 16"):
        vae_lib.encode(params, np.zeros((1, 40, 32, 3), np.float32), model=model)
    with pytest.raises(ValueError, match="uint8"):
        vae_lib.encode(params, np.zeros((1, 32, 32, 3), np.uint8), model=model)


def test_decode_rejects_wrong_latents_scale_and_wrapped_params(converted):
    model, params = converted
    with pytest.raises(ValueError, match=r"\(B, h, w, 16\)"):
        vae_lib.decode(params, np.zeros((1, 2, 2, 32), np.float32), model=model)
    with pytest.raises(ValueError, match="scale must be positive"):
        vae_lib.decode(params, np.zeros((1, 2, 2, 16), np.float32), model=model, scale=0.0)
    with pytest.raises(ValueError, match=r"variables\['params'\]"):
        vae_lib.decode({"params": params}, np.zeros((1, 2, 2, 16), np.float32), model=model)


def test_model_config_errors_name_allowed_values():
    with pytest.raises(ValueError, match="kl16"):
        vae_lib.vae_config("kl8")
    with pytest.raises(ValueError, match="multiples of 32"):
        vae_lib.VAE(ch=48)
    with pytest.raises(ValueError, match="Unknown VAE config keys"):
        vae_lib.VAE.from_config({"ch": 32, "channels": 3})


# ---------------------------------------------------------------------------------------------
# Converter strictness.


def test_converter_lists_missing_names(state_dict):
    partial = dict(state_dict)
    del partial["decoder.up.3.block.0.nin_shortcut.weight"]
    with pytest.raises(ValueError, match=r"missing \(1\): decoder\.up\.3\.block\.0\.nin_shortcut"):
        convert_vae.vae_from_torch(partial)


def test_converter_lists_unexpected_names(state_dict):
    extra = {**state_dict, "decoder.up.4.attn.0.q.weight": np.zeros((128, 128, 1, 1))}
    with pytest.raises(ValueError, match=r"unexpected \(1\): decoder\.up\.4\.attn\.0\.q\.weight"):
        convert_vae.vae_from_torch(extra)


def test_converter_rejects_wrong_shape(state_dict):
    bad = {**state_dict, "quant_conv.weight": np.zeros((32, 32, 3, 3), np.float32)}
    expected = r"'quant_conv\.weight'.*\(32, 32, 3, 3\).*\(32, 32, 1, 1\)"
    with pytest.raises(ValueError, match=expected):
        convert_vae.vae_from_torch(bad)


def test_converter_ignores_ldm_loss_entries_and_unwraps_state_dict(state_dict, converted):
    wrapped = {
        "state_dict": {
            **state_dict,
            "loss.logvar": np.zeros(()),
            "loss.discriminator.main.0.weight": np.ones((64, 3, 4, 4)),
        }
    }
    _, params = convert_vae.vae_from_torch(wrapped)
    jax.tree.map(np.testing.assert_array_equal, params, converted[1])


def test_converter_needs_conv_in_to_infer_width(state_dict):
    no_conv_in = {k: v for k, v in state_dict.items() if not k.startswith("encoder.conv_in")}
    with pytest.raises(ValueError, match="Pass ch= explicitly"):
        convert_vae.vae_from_torch(no_conv_in)


def test_conv_kernels_become_hwio(state_dict, converted):
    params = converted[1]
    np.testing.assert_array_equal(
        params["encoder"]["down_2"]["block_0"]["conv1"]["kernel"],
        state_dict["encoder.down.2.block.0.conv1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        params["decoder"]["mid"]["attn_1"]["norm"]["scale"],
        state_dict["decoder.mid.attn_1.norm.weight"],
    )


# ---------------------------------------------------------------------------------------------
# Files: .pth, converted directories.


def test_torch_pth_checkpoint_loads(tmp_path, state_dict, converted):
    torch = import_torch()
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()}}, path)
    model, params = convert_vae.vae_from_torch(path)
    assert model == converted[0]
    jax.tree.map(np.testing.assert_array_equal, params, converted[1])


def test_missing_torch_gives_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "kl16.ckpt"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match="pip install"):
        convert_vae.convert_file(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_convert_file_round_trip_gives_same_outputs(
    tmp_path, state_dict, converted, golden, moments
):
    src, out = str(tmp_path / "kl16.npz"), str(tmp_path / "vae")
    np.savez(src, **state_dict)
    convert_vae.convert_file(src, out)
    with open(os.path.join(out, weights.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert metadata["kind"] == "vae" and metadata["ch"] == 32
    model, params = weights.load_vae(out)
    assert model == converted[0]
    jax.tree.map(np.testing.assert_array_equal, params, converted[1])
    again = vae_lib.encode(params, nhwc(golden["enc/image_nchw"]), model=model)
    np.testing.assert_array_equal(again, moments)
    bf16, _ = weights.load_vae(out, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16 and bf16.ch == 32


def test_convert_file_never_overwrites_without_permission(tmp_path, state_dict):
    src, out = str(tmp_path / "kl16.npz"), tmp_path / "vae"
    np.savez(src, **state_dict)
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_vae.convert_file(src, str(out))
    assert (out / "keep.txt").read_text() == "user data"
    # Not a converter output: --overwrite refuses it too (tests/test_convert_files.py).
    with pytest.raises(FileExistsError, match="Refusing to overwrite"):
        convert_vae.convert_file(src, str(out), overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    out.rmdir()
    convert_vae.convert_file(src, str(out))
    convert_vae.convert_file(src, str(out), overwrite=True)
    assert weights.load_vae(str(out))[0].ch == 32


def test_latent_cache_encoder_of_a_converted_directory_gives_the_golden_moments(
    tmp_path, converted, golden, moments
):
    # What `launch/prepare_data.sh cache` passes as --encoder to xar_jax.data.latent_cache.
    from xar_jax.data.latent_cache import converted_vae_encoder

    model, params = converted
    weights.save_params(
        str(tmp_path / "kl16"), params, {"kind": convert_vae.KIND, "config": model.arch_config()}
    )
    encode_fn = converted_vae_encoder(str(tmp_path / "kl16"))
    out = encode_fn(nhwc(golden["enc/image_nchw"]))
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, moments, rtol=1e-5, atol=1e-5)


def test_load_vae_rejects_other_kinds(tmp_path):
    weights.save_params(str(tmp_path / "x"), {"w": np.zeros(2, np.float32)}, {"kind": "xar"})
    with pytest.raises(ValueError, match="'xar' params, not 'vae'"):
        weights.load_vae(str(tmp_path / "x"))


# ---------------------------------------------------------------------------------------------
# Data parallelism.

_SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from xar_jax import vae

    model = vae.VAE(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, attn_resolutions=(16,))
    params = vae.init_params(model, jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = NamedSharding(mesh, P("data"))
    moments = vae.encode(params, jax.device_put(images, batch), model=model)
    assert moments.sharding.spec == P("data"), moments.sharding
    # Changing one example changes only its own moments (same compiled function).
    changed = vae.encode(params, jax.device_put(images.at[0].multiply(-1), batch), model=model)
    assert not np.allclose(changed[0], moments[0])
    np.testing.assert_array_equal(changed[1:], moments[1:])
    out = vae.decode(params, jax.device_put(vae.latents_mode(moments), batch), model=model)
    assert out.shape == (4, 32, 32, 3) and out.sharding.spec == P("data"), out.sharding
    print("OK")
    """
)


def test_batch_sharded_encode_and_decode_keep_examples_independent():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
