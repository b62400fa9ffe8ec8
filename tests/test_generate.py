"""--mode=sample at scale and --mode=eval: quality of a briefly trained demo model, resumption.

One small digits model is trained once (module fixture, ~300 steps at batch 32); every test
samples from its checkpoint.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import event_tags, main_env

from xar_jax import experiment, generate, score
from xar_jax import train_state as ts
from xar_jax.evaluation.digits_score import digits_quality
from xar_jax.evaluation.sample_writer import balanced_labels
from xar_jax.stop_signal import Stopped
from xar_jax.train_config import load_config_file, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = 300


# The demo, smaller (width 64, 1+1 blocks) and faster-learning, for a ~300-step run.
QUALITY_OVERRIDES = {
    "model.width": 64,
    "model.encoder_depth": 1,
    "model.decoder_depth": 1,
    "train.num_steps": TRAIN_STEPS,
    "optim.lr": 5e-3,
    "optim.warmup_epochs": 0.5,
    "optim.ema_decay": 0.98,
    "checkpoint.every_steps": 10_000,  # only the final checkpoint
    "checkpoint.async_save": False,
    "log.every_steps": 100,
    "log.sample_every_steps": 0,
    "sample.num_steps": 10,
    "sample.cfg": 4.0,
    "sample.batch_size": 100,
    "eval.num_images": 200,
}
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.py")


def quality_config():
    c = load_config_file(DEMO_CONFIG)
    for name, value in QUALITY_OVERRIDES.items():
        section, field = name.split(".")
        c[section][field] = value
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, workdir) of the briefly trained model, trained by ``python -m xar_jax.main``.

    At XLA's default optimisation level: the tests in this process compile at -O0 (conftest),
    under which these 300 steps run about 1.6x slower.
    """
    workdir = tmp_path_factory.mktemp("trained")
    flags = [f"--config.{name}={value}" for name, value in QUALITY_OVERRIDES.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "xar_jax.main", f"--config={DEMO_CONFIG}", f"--workdir={workdir}",
         *flags],
        env=main_env(XLA_FLAGS=""), cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Training done at step {TRAIN_STEPS}" in proc.stderr, proc.stderr[-3000:]
    return quality_config(), workdir


def test_eval_mode_scores_trained_model_far_above_untrained(trained):
    config, workdir = trained
    scores = score.evaluate(experiment.build(config, "eval"), str(workdir))  # --mode=eval

    # The same sampler on freshly initialised params: digits of no particular class.
    exp = experiment.build(config, "train")
    setup = experiment.training_setup(exp)
    init = ts.create_train_state(exp.model, setup.optimizer, config.seed, setup.state_shardings)
    mesh = generate.local_mesh()
    sample = generate.make_image_generator(
        exp.model,
        generate.replicate_on(init.ema_params, mesh),
        mesh=mesh,
        num_steps=config.sample.num_steps,
        cfg=config.sample.cfg,
    )
    labels = balanced_labels(config.eval.num_images, 10, seed=0)
    images = np.concatenate(
        [sample(labels[i : i + 100], jax.random.key(i)) for i in range(0, len(labels), 100)]
    )
    untrained = digits_quality(images.astype(np.float32) / 127.5 - 1.0, labels)
    assert untrained["class_accuracy"] < 0.25, untrained
    assert scores["frechet_distance"] < untrained["frechet_distance"] / 4

    # Recorded: metrics.json beside the samples, eval.json, TensorBoard scalars.
    history = json.loads((workdir / "eval.json").read_text())
    record = history[-1]
    assert record["step"] == TRAIN_STEPS
    assert record["class_accuracy"] == scores["class_accuracy"]
    assert record["settings"]["checkpoint_step"] == TRAIN_STEPS
    beside = json.loads(
        open(os.path.join(os.path.dirname(record["samples"]), "metrics.json")).read()
    )
    assert beside == record
    assert {"eval/class_accuracy", "eval/frechet_distance"} <= event_tags(workdir)


def _sample(config, workdir):
    """What --mode=sample runs."""
    return generate.sample_to_workdir(experiment.build(config, "sample"), str(workdir))


def _adm_config(config, out_dir):
    c = config.copy_and_resolve_references()
    c.sample.format = "adm"
    c.sample.num_images = 50  # 5 per class; 7 batches of 8, the last one padded
    c.sample.batch_size = 8
    c.sample.seed = 3
    c.sample.out_dir = str(out_dir)
    return c


def test_sample_mode_interrupted_then_restarted_equals_uninterrupted(
    trained, tmp_path, monkeypatch
):
    config, workdir = trained
    whole = _sample(_adm_config(config, tmp_path / "whole"), workdir)["npz"]

    calls = []
    real = generate.make_image_generator

    def sigterm_during_the_third_batch(*args, **kwargs):
        fn = real(*args, **kwargs)

        def wrapped(labels, key):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # As launch/stop.sh or a scheduler does.
            return fn(labels, key)

        return wrapped

    restarted = _adm_config(config, tmp_path / "restarted")
    monkeypatch.setattr(generate, "make_image_generator", sigterm_during_the_third_batch)
    with pytest.raises(Stopped, match="Stopped by SIGTERM: 3 finished batch shards") as stopped:
        _sample(restarted, workdir)
    assert stopped.value.exit_code == 0
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # The handler was removed again.
    run_dir = next((tmp_path / "restarted").iterdir())
    assert not (run_dir / "samples.npz").exists()  # the final file is complete or absent
    # The batch in flight was finished and kept; the run stopped at that shard boundary.
    assert len(list((run_dir / "shards").glob("batch_*.npz"))) == 3

    calls.clear()
    monkeypatch.setattr(
        generate,
        "make_image_generator",
        lambda *a, **k: (lambda fn: lambda labels, key: calls.append(1) or fn(labels, key))(
            real(*a, **k)
        ),
    )
    path = _sample(restarted, workdir)["npz"]
    assert len(calls) == 4  # only the missing batches were generated

    with np.load(whole) as a, np.load(path) as b:
        assert a["arr_0"].shape == (50, 8, 8, 1) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(a["labels"], minlength=10), [5] * 10)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert len(np.unique(np.load(whole)["arr_0"].reshape(50, -1), axis=0)) == 50


def test_sampling_directory_is_never_reused_for_other_settings(trained, tmp_path):
    config, workdir = trained
    first = _adm_config(config, tmp_path)
    first.sample.num_images = 10
    _sample(first, workdir)
    other = first.copy_and_resolve_references()
    other.sample.cfg_schedule = "constant"  # not in the directory name, recorded in settings
    with pytest.raises(ValueError, match="cfg_schedule"):
        _sample(other, workdir)


def _imagenet_config(tmp_path, **fields):
    c = load_config_file(os.path.join(REPO, "configs", "xar_b.py"))
    c.eval.num_images = 1000
    for name, value in fields.items():
        section, field = name.split(".")
        c[section][field] = value
    return c


def test_imagenet_eval_names_missing_files_and_their_commands_before_any_work(tmp_path):
    workdir = tmp_path / "run"  # no checkpoints: reaching the sampler would fail differently
    vae, stats = tmp_path / "vae", tmp_path / "stats.npz"
    vae.mkdir()
    (vae / "metadata.json").write_text("{}")  # What marks a converted directory.
    stats.write_bytes(b"")
    cases = [
        ({}, "config.latent.vae_checkpoint=''", "python -m xar_jax.convert vae"),
        (
            {"latent.vae_checkpoint": str(vae)},
            "config.eval.reference_stats=''",
            "python -m xar_jax.evaluation.reference_stats",
        ),
        (
            {"latent.vae_checkpoint": str(vae), "eval.reference_stats": str(stats)},
            "config.eval.inception_checkpoint=''",
            "python -m xar_jax.convert inception",
        ),
    ]
    for fields, field, command in cases:
        with pytest.raises(FileNotFoundError) as e:
            score.evaluate(
                experiment.build(_imagenet_config(tmp_path, **fields), "eval"), str(workdir)
            )
        assert field in str(e.value) and command in str(e.value)
    assert not workdir.exists()

    # Samples may go to gs:// (every process writes its shards there).
    assert generate.samples_root(_imagenet_config(tmp_path), "gs://bucket/run") == (
        "gs://bucket/run/generated"
    )


def test_config_takes_any_image_count_but_refuses_unshardable_sampling():
    c = load_config_file(os.path.join(REPO, "configs", "xar_b.py"))
    c.data.cache_dir = "/nonexistent"
    c.sample.num_images = 50_001  # Balanced to within one image.
    validate_config(c)
    c.sample.num_images = 50_000
    c.sample.batch_size = 1000
    with pytest.raises(ValueError, match=r"config.sample.batch_size=1000 .*the 64 devices"):
        validate_config(c, num_devices=64)
    c.sample.batch_size = 1024
    c.eval.num_images = 20  # Any count is scored (a smoke test of released weights)...
    validate_config(c)
    c.eval.num_images = 9  # ...from 10 up: the Inception Score has 10 splits.
    with pytest.raises(ValueError, match="config.eval.num_images=9"):
        validate_config(c)
    c.eval.num_images = 50_000
    c.sample.out_dir = "gs://bucket/samples"
    validate_config(c)  # One process may sample into gs:// (several need a shared filesystem).
