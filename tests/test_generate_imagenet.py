"""The ImageNet evaluation path end to end, on tiny networks: xAR latents -> KL-16 decode ->
ADM .npz -> Inception statistics -> FID / IS (the networks are the golden-file test sizes)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from conftest import converted_golden_weights

from xar_jax import entities as ent
from xar_jax import generate, score
from xar_jax import model as xar_model
from xar_jax.evaluation import evaluate, image_sources, reference_stats, sample_writer


def test_imagenet_samples_decode_to_an_adm_npz_and_score(tmp_path):
    vae_dir, inception_dir = converted_golden_weights(tmp_path)
    # A tiny xAR on the real latent geometry: 16x16 grid of 16 channels, 4 cells of 8x8.
    model = xar_model.XAR(
        ent.make_layout("cell", 16, cell_size=8), 32, 1, 1, 2, 2, dropout=0.0, attn_dropout=0.0
    )
    params = model.init(
        jax.random.key(0), jnp.zeros((1, 256, 16)), jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32)
    )["params"]
    mesh = generate.local_mesh()
    generator = generate.make_image_generator(
        model,
        generate.replicate_on(params, mesh),
        mesh=mesh,
        num_steps=2,
        cfg=1.5,
        decoder=generate.vae_decoder(vae_dir, 0.2325, mesh),
    )
    out = sample_writer.write_samples(
        generator,
        str(tmp_path / "run"),
        num_images=10,
        num_classes=10,
        batch_size=5,
        progress=False,
    )
    with np.load(out) as z:
        images, labels = z["arr_0"], z["labels"]
    assert images.shape == (10, 256, 256, 3) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [1] * 10
    assert images.std() > 0  # Decoded, not blank.

    # Reference statistics of the same images: FID against itself is ~0 through the whole path.
    params_inc = evaluate.load_inception(inception_dir)
    stats_path = str(tmp_path / "stats.npz")
    reference_stats.compute_reference_stats(
        params_inc, image_sources.NpzImages(out), stats_path, batch_size=5
    )
    config = ml_collections.ConfigDict(
        {
            "eval": {
                "reference_stats": stats_path,
                "inception_checkpoint": inception_dir,
                "batch_size": 5,
            }
        }
    )
    metrics = score.score_imagenet(config, out)
    assert os.path.exists(stats_path)
    assert abs(metrics["fid"]) < 1e-3, metrics
    assert np.isfinite(metrics["inception_score"]) and metrics["inception_score"] >= 1.0
    assert metrics["num_images"] == 10
