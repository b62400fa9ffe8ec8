"""The user's journeys through the real entry point, `python -m xar_jax.main`, on tiny configs.

A workdir never loses a run: a config that does not fit it is refused before anything is touched;
a deliberate mesh change resumes by resharding; one trainer per workdir; evaluation repeats and
keeps a history. One tiny run on two CPU devices (module fixture) serves every test; each test
that changes a workdir works on its own copy.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import (
    REPO,
    TINY_CONFIG,
    TINY_RUN_DEVICES,
    TINY_RUN_STEPS,
    main_env,
    run_main,
    train_state_params,
    tree_digest,
)

STEPS, DEVICES = TINY_RUN_STEPS, TINY_RUN_DEVICES


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run


def _copy(trained, tmp_path, name="run"):
    workdir = tmp_path / name
    shutil.copytree(trained, workdir)
    return workdir


def _refused(proc, *phrases):
    assert proc.returncode != 0, proc.stdout[-2000:]
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr[-3000:]


def test_run_record_keeps_config_mesh_and_versions(trained):
    record = json.loads((trained / "run.json").read_text())
    assert record["config"]["train"]["num_steps"] == STEPS
    assert record["mesh"] == {"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 1, "process_count": 1}
    assert record["model"]["model.width"] == 32
    assert record["versions"]["jax"] == jax.__version__
    assert not (trained / "train.lock").exists()  # Released at the end of the run.


def test_config_that_does_not_fit_the_workdir_is_refused_and_nothing_is_touched(trained):
    before = tree_digest(trained)
    # Resume with another model width: refused, naming the field.
    _refused(
        run_main(trained, "--config.model.width=64", devices=DEVICES),
        "model.width: 32 in the workdir, 64 now",
        "nothing was touched",
    )
    # Sample and eval with the wrong config: refused the same way.
    for mode in ("sample", "eval"):
        _refused(
            run_main(trained, f"--mode={mode}", "--config.model.width=64", devices=DEVICES),
            f"--mode={mode} refused",
            "model.width",
        )
    # Another mesh without saying so: refused, naming the fields and the flag that accepts them.
    _refused(
        run_main(trained, "--config.mesh.data=1", "--config.mesh.fsdp=2", devices=DEVICES),
        "mesh.fsdp: 1 in the workdir, 2 now",
        "--allow_change=mesh",
    )
    # Another global batch: the saved data position would be meaningless.
    _refused(
        run_main(trained, "--config.train.global_batch_size=16", devices=DEVICES),
        "train.global_batch_size",
        "--allow_change=data",
    )
    assert tree_digest(trained) == before  # Every checkpoint in place and byte-identical.
    assert not (trained / "checkpoints_unreadable").exists()


def test_changed_mesh_with_override_reshards_and_resumes_to_the_same_params(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # Resume from step 8.
    # The step-12 grid of the first run exists: the resumed run replaces it.
    proc = run_main(
        workdir,
        f"--config.train.num_steps={STEPS}",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=2",
        "--allow_change=mesh",
        "--config.log.sample_every_steps=4",
        devices=DEVICES,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resumed from checkpoint step 8" in proc.stderr
    assert not list(workdir.rglob("*.tmp")) and not list(workdir.rglob("*.tmp-*"))
    record = json.loads((workdir / "run.json").read_text())
    assert record["mesh"]["mesh.fsdp"] == 2  # The accepted mesh is the run's mesh now.
    assert record["history"][-1]["accepted_changes"] == ["mesh"]
    resharded, original = train_state_params(workdir, STEPS), train_state_params(trained, STEPS)
    for a, b in zip(jax.tree.leaves(resharded), jax.tree.leaves(original), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_eval_train_eval_eval_keeps_an_evaluation_history(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    for flags in (
        ["--mode=eval"],
        [f"--config.train.num_steps={STEPS + 4}"],
        ["--mode=eval"],
        ["--mode=eval"],
    ):
        proc = run_main(workdir, *flags, devices=DEVICES)
        assert proc.returncode == 0, (flags, proc.stderr[-3000:])
    history = json.loads((workdir / "eval.json").read_text())
    assert [record["step"] for record in history] == [STEPS, STEPS + 4, STEPS + 4]
    assert all(0.0 <= r["class_accuracy"] <= 1.0 for r in history)
    # metrics.json beside the samples holds the latest evaluation of those samples.
    beside = json.loads(
        open(os.path.join(os.path.dirname(history[-1]["samples"]), "metrics.json")).read()
    )
    assert beside == history[-1]
    assert not list(workdir.rglob("*.tmp-*"))  # Atomic writes leave no temporary files.


def test_sample_grid_twice_replaces_its_files(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    for _ in range(2):
        proc = run_main(workdir, "--mode=sample", devices=DEVICES)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # The read-only checkpoint manager knows every item and sets no option Orbax must reset.
        assert "could not be restored" not in proc.stderr
        assert "CheckpointManagerOptions.read_only=True, setting" not in proc.stderr
    with np.load(workdir / "samples.npz") as data:
        assert data["images"].shape == (20, 8, 8, 1)
    assert (workdir / "samples.png").exists()


def test_second_trainer_is_refused_and_a_killed_trainers_lock_is_not_an_obstacle(tmp_path):
    workdir = tmp_path / "locked"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xar_jax.main",
            f"--config={TINY_CONFIG}",
            f"--workdir={workdir}",
            "--config.train.num_steps=100000",
            "--config.checkpoint.every_steps=1000",
        ],
        env=main_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (workdir / "train.lock").exists() and time.time() < deadline:
            assert first.poll() is None, "the first trainer ended early"
            time.sleep(0.1)
        holder = json.loads((workdir / "train.lock").read_text())
        assert holder["pid"] == first.pid
        second = run_main(workdir, "--config.train.num_steps=4")
        _refused(second, "is in use by a trainer", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (workdir / "train.lock").exists()  # SIGKILL leaves the lock behind...
    third = run_main(workdir, "--config.train.num_steps=4")
    assert third.returncode == 0, third.stderr[-3000:]  # ...and it is detected as stale.
    assert "Taking over the stale lock" in third.stderr
    assert (workdir / "checkpoints" / "4").exists()
    assert not (workdir / "train.lock").exists()
