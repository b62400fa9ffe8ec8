"""Checkpoints: SIGKILL + restart equals an uninterrupted run; damaged newest checkpoint is
skipped; sample mode writes a grid and an .npz; eval scores it. All with configs/tiny.py."""

import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import TINY_RUN_DEVICES, TINY_RUN_FLAGS, TINY_RUN_STEPS, event_tags, main_env

from xar_jax import experiment, generate, score
from xar_jax.train_config import load_config_file, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def tiny_config(**overrides):
    config = load_config_file(TINY)
    for field, value in overrides.items():
        node = config
        *parents, leaf = field.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _cli(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "xar_jax.main",
        f"--config={TINY}",
        f"--workdir={workdir}",
        *extra,
    ]


def _final_params(workdir, config):
    state, step = experiment.restore_train_state(config, str(workdir))
    return jax.device_get(state.params), step


def _max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(x - y))) for x, y in pairs)


# The uninterrupted run is conftest's `tiny_run` (12 steps, checkpoints every 4, a sample grid
# every 4 steps, on 2 devices); the runs here use its flags and environment.
STEPS = TINY_RUN_STEPS


def test_sigkill_then_restart_matches_uninterrupted_run_and_skips_the_compile(tmp_path, tiny_run):
    workdir = tmp_path / "killed"
    args = _cli(workdir, *TINY_RUN_FLAGS)
    proc = subprocess.Popen(
        args,
        env=main_env(TINY_RUN_DEVICES),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = workdir / "checkpoints" / "4"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < STEPS, saved
    # config.compile_cache_dir='' keeps JAX's compilation cache in the workdir.
    cached = [p.name for p in (workdir / "compile_cache").iterdir()]
    assert any(name.startswith("jit_train_step-") for name in cached), cached

    # JAX_LOG_COMPILES makes JAX log its cache hits.
    resumed = subprocess.run(
        args,
        env=main_env(TINY_RUN_DEVICES, JAX_LOG_COMPILES="1"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from checkpoint step {saved[-1]}" in resumed.stderr
    assert "Persistent compilation cache hit for 'jit_train_step'" in resumed.stderr

    config = tiny_config(**{"train.num_steps": STEPS})
    expected, step_a = _final_params(tiny_run, config)
    got, step_b = _final_params(workdir, config)
    assert step_a == step_b == STEPS
    assert _max_diff(expected, got) < 1e-6


def test_damaged_newest_checkpoint_is_skipped_with_warning(tmp_path, tiny_run, caplog):
    import shutil

    workdir = tmp_path / "damaged"
    shutil.copytree(tiny_run, workdir)
    newest = workdir / "checkpoints" / str(STEPS)
    for path in (newest / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
    config = tiny_config(**{"train.num_steps": STEPS})
    with caplog.at_level(logging.WARNING, logger="xar_jax.checkpointing"):
        state, _ = experiment.restore_train_state(config, str(workdir))
    previous = max(s for s in range(0, STEPS, config.checkpoint.every_steps))
    assert int(state.step) == previous
    assert any(
        f"step {STEPS}" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records
    )
    # Nothing is deleted: the damaged directory is moved aside.
    assert any((workdir / "checkpoints_unreadable").iterdir())

    paths = generate.sample_to_workdir(experiment.build(config, "sample"), str(workdir))
    assert os.path.exists(paths["png"])
    with np.load(paths["npz"]) as data:
        assert data["images"].shape == (config.sample.num_images, 8, 8, 1)
        np.testing.assert_array_equal(data["labels"][:12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
        assert np.all(np.isfinite(data["images"]))
    scores = score.evaluate(
        experiment.build(config, "eval"), str(workdir)
    )  # --mode=eval: digits score of samples.npz.
    assert set(scores) == {"class_accuracy", "frechet_distance"}
    assert 0.0 <= scores["class_accuracy"] <= 1.0
    assert (workdir / "eval.json").exists()


def test_bad_config_value_fails_before_compilation(tmp_path):
    proc = subprocess.run(
        _cli(tmp_path, "--config.train.nan_policy=ignore"),
        env=main_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "config.train.nan_policy='ignore' is not allowed; allowed: stop | skip" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_compile_cache_dir_defaults_to_the_workdir_and_can_be_turned_off():
    from xar_jax.compile_cache import cache_path as compile_cache_path

    config = tiny_config()
    assert compile_cache_path(config, "gs://b/runs/x") == "gs://b/runs/x/compile_cache"
    assert compile_cache_path(config, "runs/x") == os.path.join(os.getcwd(), "runs/x/compile_cache")
    assert compile_cache_path(tiny_config(compile_cache_dir="none"), "/w") is None
    assert compile_cache_path(tiny_config(compile_cache_dir="gs://b/cc"), "/w") == "gs://b/cc"
    with pytest.raises(ValueError, match="config.compile_cache_dir=' /x'"):
        validate_config(tiny_config(compile_cache_dir=" /x"))
    with pytest.raises(ValueError, match="config.compile_cache_min_compile_secs=-1"):
        validate_config(tiny_config(compile_cache_min_compile_secs=-1))


def test_tensorboard_events_hold_training_metrics(tiny_run):
    tags = event_tags(tiny_run)
    expected = {
        "loss",
        "grad_norm",
        "lr",
        "steps_per_sec",
        "images_per_sec_per_device",
        "loss_entity_0",
    }
    assert expected <= tags, tags
