"""Flax InceptionV3 vs torch-fidelity's inception-v3-compat (golden vectors), and its converter."""

import hashlib
import os

import jax
import numpy as np
import pytest
from conftest import rebuild_golden_state_dict

from xar_jax.convert import inception as convert_inception
from xar_jax.convert import params_io
from xar_jax.evaluation import inception

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "inception_fid_golden.npz")


def relative_l2(got, want):
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def golden_state(golden):
    return rebuild_golden_state_dict(golden)


@pytest.fixture(scope="module")
def golden_params(golden_state):
    _, params = convert_inception.inception_from_torch(golden_state[0])
    return params


def test_rebuilt_golden_weights_have_the_recorded_sha256(golden, golden_state):
    assert golden_state[1] == str(golden["weights_sha256"])


def test_features_match_torch_fidelity_for_small_nchw_images(golden, golden_params):
    pool3, logits = inception.inception_features(
        golden_params, golden["images_a_uint8"], data_format="NCHW"
    )
    assert pool3.shape == (3, 2048) and logits.shape == (3, 1008)
    assert relative_l2(pool3, golden["pool3_a"]) < 1e-4
    assert relative_l2(logits, golden["logits_unbiased_a"]) < 1e-4


def test_features_match_torch_fidelity_for_256px_nhwc_images(golden, golden_params):
    images = np.transpose(golden["images_b_uint8"], (0, 2, 3, 1))
    pool3, logits = inception.inception_features(golden_params, images)
    assert relative_l2(pool3, golden["pool3_b"]) < 1e-4
    assert relative_l2(logits, golden["logits_unbiased_b"]) < 1e-4


def test_tf1_resize_samples_at_scaled_indices_without_half_pixel_offset():
    image = np.array([[0.0, 10.0], [20.0, 30.0]], np.float32)[None, :, :, None]
    out = np.asarray(inception.tf1_resize_bilinear(image, (4, 4)))[0, :, :, 0]
    # Output index i samples source coordinate i * 2 / 4, clamped at the last pixel.
    row = np.array([0.0, 5.0, 10.0, 10.0])
    np.testing.assert_allclose(out, np.stack([row, row + 10, row + 20, row + 20]))
    shrunk = np.asarray(inception.tf1_resize_bilinear(np.arange(6.0)[None, None, :, None], (1, 4)))
    np.testing.assert_allclose(shrunk.ravel(), [0.0, 1.5, 3.0, 4.5])


def test_inputs_of_the_wrong_type_or_layout_are_rejected_with_the_reason(golden_params):
    with pytest.raises(ValueError, match="must be uint8"):
        inception.inception_features(golden_params, np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"an NCHW batch of RGB images \(B, 3, H, W\)"):
        inception.inception_features(golden_params, np.zeros((1, 8, 8, 3), np.uint8), "NCHW")
    with pytest.raises(ValueError, match="data_format must be one of"):
        inception.inception_features(golden_params, np.zeros((1, 8, 8, 3), np.uint8), "HWC")


def test_converter_names_missing_unexpected_and_misshapen_parameters(golden_state):
    state = dict(golden_state[0])
    state["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.array(0)  # ignored: not a weight
    del state["Mixed_7c.branch_pool.bn.running_var"]
    state["fc.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as error:
        convert_inception.inception_from_torch(state)
    message = str(error.value)
    assert "missing (1): Mixed_7c.branch_pool.bn.running_var" in message
    assert "unexpected (1): fc.extra" in message

    state = dict(golden_state[0])
    state["fc.weight"] = state["fc.weight"].T
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        convert_inception.inception_from_torch(state)


def test_converted_directory_loads_the_same_params(golden_state, golden_params, tmp_path):
    src = tmp_path / "weights.npz"
    np.savez(src, **golden_state[0])
    out = tmp_path / "inception"
    convert_inception.convert_file(src, out)
    metadata = params_io.load_metadata(str(out))
    assert metadata["model"] == "inception_v3_compat"
    assert metadata["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    _, loaded = convert_inception.load_converted(out)
    jax.tree.map(np.testing.assert_array_equal, loaded, golden_params)
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_inception.convert_file(tmp_path / "missing.pth", out)  # refused before reading
