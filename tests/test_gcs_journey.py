"""The TPU user's journey with a ``gs://`` workdir, through `python -m xar_jax.main`, against a
local GCS emulator (tests/gcs_emulator.py; every client points at 127.0.0.1).

Trained on gs://, SIGKILLed after its first checkpoint, resumed: the same params as the local
uninterrupted run (`tiny_run`). The eval path with weights on gs:// is in
tests/test_released_weights.py.
"""

import signal
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
from conftest import (
    REPO,
    TINY_CONFIG,
    TINY_RUN_DEVICES,
    TINY_RUN_FLAGS,
    TINY_RUN_STEPS,
    main_env,
    run_main,
    train_state_params,
)
from etils import epath


def test_gs_workdir_killed_and_resumed_equals_the_uninterrupted_run(gcs_bucket, tiny_run):
    workdir = f"{gcs_bucket}/run-{uuid.uuid4().hex[:8]}"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xar_jax.main",
            f"--config={TINY_CONFIG}",
            f"--workdir={workdir}",
            *TINY_RUN_FLAGS,
        ],
        env=main_env(TINY_RUN_DEVICES),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # On an object store Orbax writes the step in place and marks it complete last.
    first_checkpoint = epath.Path(workdir) / "checkpoints" / "4" / "commit_success.txt"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (epath.Path(workdir) / "checkpoints" / str(TINY_RUN_STEPS)).exists()

    resumed = run_main(workdir, *TINY_RUN_FLAGS, devices=TINY_RUN_DEVICES)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Taking over the stale lock" in resumed.stderr  # The killed run's lock, on gs://.
    assert "Resumed from checkpoint step" in resumed.stderr
    for a, b in zip(
        jax.tree.leaves(train_state_params(workdir, TINY_RUN_STEPS)),
        jax.tree.leaves(train_state_params(tiny_run, TINY_RUN_STEPS)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    root = epath.Path(workdir)
    for name in ("run.json", "config.json", f"samples/step_{TINY_RUN_STEPS:08d}.png"):
        assert (root / name).exists(), name
    assert list(root.glob("events.out.tfevents.*"))  # TensorBoard events on gs:// too.

    # The grid of the demo's --mode=sample, written on gs://.
    sample = run_main(workdir, "--mode=sample", devices=TINY_RUN_DEVICES)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert (root / "samples.png").exists() and (root / "samples.npz").exists()
