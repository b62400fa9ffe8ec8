"""Released weights to FID through the real entry point, with no training checkpoint and no data.

The "release" is the golden test vectors' xAR (the authors' network at a small width, on the real
16x16x16 KL-16 latent grid), written as the authors' state dict and converted with
`python -m xar_jax.convert xar`, exactly as a user converts xAR-H.pth; its class table is the
golden file's, 1,000 ImageNet classes (+ the null class). The VAE and Inception are the golden-size
networks. Sampling and evaluation take any image count (classes cycled), so the released-weights
path is smoke-tested with 10 and 20 images.
"""

import json
import pathlib
import subprocess
import sys
import uuid

import numpy as np
import pytest
from conftest import (
    RELEASE_CONFIG,
    RELEASE_MODEL_FLAGS,
    REPO,
    converted_golden_weights,
    main_env,
    run_main,
    write_release_like_xar,
)
from etils import epath

from xar_jax.evaluation import evaluate, image_sources, reference_stats

CONFIG = RELEASE_CONFIG
CLASSES = 1000


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    write_release_like_xar(tmp / "xar.npz", CLASSES)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xar_jax.convert",
            "xar",
            "--src",
            str(tmp / "xar.npz"),
            "--out",
            str(tmp / "xar"),
        ],
        env=main_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    vae_dir, inception_dir = converted_golden_weights(tmp)
    # Reference statistics of a few random images stand in for ADM's ImageNet statistics.
    rng = np.random.default_rng(0)
    np.savez(tmp / "reference.npz", arr_0=rng.integers(0, 256, (10, 64, 64, 3), np.uint8))
    reference_stats.compute_reference_stats(
        evaluate.load_inception(inception_dir),
        image_sources.NpzImages(str(tmp / "reference.npz")),
        str(tmp / "stats.npz"),
        batch_size=5,
    )
    flags = [
        f"--config.weights={tmp / 'xar'}",
        f"--config.latent.vae_checkpoint={vae_dir}",
        f"--config.eval.inception_checkpoint={inception_dir}",
        f"--config.eval.reference_stats={tmp / 'stats.npz'}",
        *RELEASE_MODEL_FLAGS,
        f"--config.latent.num_classes={CLASSES}",
        "--config.sample.batch_size=10",
        "--config.sample.num_images=10",
        "--config.eval.num_images=20",
        "--config.eval.batch_size=5",
    ]
    return tmp, flags


def _upload(local, remote):
    """Copies a file or directory tree to ``remote`` (gs:// on the emulator)."""
    local, remote = pathlib.Path(local), epath.Path(remote)
    files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
    for path in files:
        target = remote if path == local else remote / str(path.relative_to(local))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return str(remote)


def test_converted_weights_sample_without_checkpoint_or_data(release, tmp_path):
    tmp, flags = release
    workdir = tmp_path / "sample_run"
    proc = run_main(workdir, "--mode=sample", *flags, config=CONFIG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [npz] = workdir.glob("generated/weights_xar-sde2-*/samples.npz")
    with np.load(npz) as z:
        assert z["arr_0"].shape == (10, 256, 256, 3) and z["arr_0"].std() > 0
        assert sorted(z["labels"].tolist()) == list(range(10))  # 10 of the 1,000 classes.
    assert not (workdir / "checkpoints").exists()  # Nothing but the outputs was written.


def test_converted_weights_evaluate_with_everything_on_gs(release, gcs_bucket):
    """Weights, VAE, Inception, reference statistics and the workdir all on gs://."""
    tmp, flags = release
    remote = f"{gcs_bucket}/release-{uuid.uuid4().hex[:8]}"
    paths = {
        name: _upload(tmp / name, f"{remote}/{name}")
        for name in ("xar", "vae", "inception", "stats.npz")
    }
    remote_flags = [
        f"--config.weights={paths['xar']}",
        f"--config.latent.vae_checkpoint={paths['vae']}",
        f"--config.eval.inception_checkpoint={paths['inception']}",
        f"--config.eval.reference_stats={paths['stats.npz']}",
        *[
            f
            for f in flags
            if not f.startswith(
                (
                    "--config.weights=",
                    "--config.latent.vae_",
                    "--config.eval.inception_",
                    "--config.eval.ref",
                )
            )
        ],
    ]
    workdir = epath.Path(f"{remote}/eval_run")
    proc = run_main(workdir, "--mode=eval", *remote_flags, config=CONFIG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = json.loads((workdir / "eval.json").read_text())
    assert np.isfinite(record["fid"]) and record["fid"] > 0 and record["num_images"] == 20
    assert "not comparable to the paper below 50,000" in record["note"]
    assert record["settings"]["weights"] == paths["xar"]
    published = epath.Path(record["samples"])
    assert str(published).startswith(str(workdir)) and published.exists()
    assert json.loads((published.parent / "metrics.json").read_text()) == record
    assert not (workdir / "checkpoints").exists()


def test_weights_of_another_model_are_refused_before_any_work(release, tmp_path):
    _, flags = release
    proc = run_main(
        tmp_path / "w", "--mode=sample", *flags, "--config.model.width=32", config=CONFIG
    )
    assert proc.returncode != 0
    assert "does not fit the config's model (model.width: 64 in the weights, 32 in the config" in (
        proc.stderr
    )
    assert not (tmp_path / "w" / "generated").exists()
