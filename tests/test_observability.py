"""What a run tells the user, through the real entry point: the effective config (logged and in
the workdir), the compile line and the compiled step's memory, no third-party INFO noise,
interval means in TensorBoard, a profiler window, and short errors for user mistakes."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY_CONFIG, event_scalars, main_env, run_main

from xar_jax.train_config import load_config_file

OURS = {
    "main.py",
    "train.py",
    "metrics.py",
    "generate.py",
    "score.py",
    "experiment.py",
    "workdir.py",
    "checkpointing.py",
    "sample_writer.py",
}
OVERRIDES = ("--config.train.num_steps=8", "--config.optim.lr=0.002")


def _python_info_sources(stderr: str) -> set[str]:
    """Source files of the absl-formatted Python INFO lines (``I1201 10:00:00.1 123 file.py:9]``)."""
    return {
        m.group(1)
        for m in re.finditer(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\]", stderr, re.MULTILINE)
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 8 steps logged every 4 steps (with a profiler window) and every step.

    Logging leaves the train step unchanged: the second run takes it from the first's compilation
    cache.
    """
    root = tmp_path_factory.mktemp("observed")
    cache = f"--config.compile_cache_dir={root / 'compile_cache'}"
    # A CPU user's install has no libtpu; this machine has it for the aot tests, and at start-up
    # it probes for a TPU and prints its own lines when there is none. The CPU platform alone, as
    # on a user's CPU machine.
    cpu = {"JAX_PLATFORMS": "cpu"}
    every4 = run_main(
        root / "every4",
        *OVERRIDES,
        cache,
        "--config.log.every_steps=4",
        "--config.log.profile_start_step=5",
        "--config.log.profile_num_steps=2",
        **cpu,
    )
    every1 = run_main(root / "every1", *OVERRIDES, cache, "--config.log.every_steps=1", **cpu)
    for proc in (every4, every1):
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"every4": (root / "every4", every4), "every1": (root / "every1", every1)}


def test_effective_config_is_logged_and_written_to_the_workdir(runs):
    workdir, proc = runs["every4"]
    expected = load_config_file(TINY_CONFIG)
    expected.train.num_steps, expected.optim.lr = 8, 0.002
    expected.log.every_steps, expected.log.profile_start_step = 4, 5
    expected.log.profile_num_steps = 2
    expected.compile_cache_dir = str(workdir.parent / "compile_cache")
    written = json.loads((workdir / "config.json").read_text())
    assert written == json.loads(json.dumps(expected.to_dict()))
    # The console names the file instead of printing the config (TensorBoard has it too).
    assert f"Effective config written to {workdir / 'config.json'}" in proc.stderr
    assert '"lr"' not in proc.stderr


def test_a_short_run_prints_one_useful_line_per_event(runs):
    """8 steps logged every step: each line is one of ours (no library lines, no config dump,
    no 45-line parameter table), and the whole run fits in a screen."""
    workdir, proc = runs["every1"]
    lines = proc.stderr.splitlines()
    print(f"\n8-step run, logged every step: {len(lines)} console lines")
    assert len(lines) <= 40, proc.stderr
    assert all(re.match(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\]", line) for line in lines), lines
    assert _python_info_sources(proc.stderr) <= OURS
    [summary] = [line for line in lines if "Parameters by module:" in line]
    assert "encoder_blocks" in summary and str(workdir / "parameters.txt") in summary
    table = (workdir / "parameters.txt").read_text()
    assert "encoder_blocks/blocks/attn/qkv/kernel" in table and "Total: 52,821" in table


def test_log_has_compile_and_memory_lines_and_no_library_info_lines(runs):
    _, proc = runs["every4"]
    assert re.search(r"Compiled the train step in \d+\.\d s\.", proc.stderr)
    assert "Train step memory per device: arguments" in proc.stderr
    assert "Effective config written to" in proc.stderr
    assert _python_info_sources(proc.stderr) <= OURS, _python_info_sources(proc.stderr) - OURS
    assert re.search(r"step 8 \| loss .* \| ETA 0m00s$", proc.stderr, re.MULTILINE)


def test_tensorboard_scalars_are_interval_means_of_the_step_losses(runs):
    interval = dict(event_scalars(runs["every4"][0])["loss"])
    per_step = dict(event_scalars(runs["every1"][0])["loss"])
    assert sorted(interval) == [4, 8] and sorted(per_step) == list(range(1, 9))
    for end in (4, 8):
        mean = np.mean([per_step[s] for s in range(end - 3, end + 1)])
        np.testing.assert_allclose(interval[end], mean, rtol=1e-5)
    assert per_step[4] != pytest.approx(interval[4])  # A mean, not the last step's value.
    assert {"grad_norm", "loss_entity_0", "lr"} <= set(event_scalars(runs["every4"][0]))


def test_profiler_window_writes_a_trace(runs):
    workdir, _ = runs["every4"]
    assert list(workdir.glob("plugins/profile/*/*.xplane.pb"))


def test_print_config_prints_the_effective_config_and_exits(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xar_jax.main",
            f"--config={TINY_CONFIG}",
            "--print_config",
            "--config.train.num_steps=7",
        ],
        env=main_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["train"]["num_steps"] == 7


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--config.train.nope=1",), "error: --config.train.nope: no such config field."),
        (("--config.train.num_steps=abc",), "error: flag --config.train.num_steps=abc"),
        (("--bogus=1",), "error: Unknown command line flag 'bogus'"),
        (("--mode=fly",), "error: flag --mode=fly: value should be one of <train|sample|eval>"),
    ],
)
def test_flag_mistakes_end_in_two_lines_and_exit_code_2(tmp_path, flags, message):
    proc = run_main(tmp_path / "w", *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    assert not (tmp_path / "w").exists()


def test_missing_config_file_and_bad_value_end_in_an_error_line_and_exit_code_2(tmp_path):
    proc = run_main(tmp_path / "w", config=str(tmp_path / "nope.py"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: --config={tmp_path / 'nope.py'}: no such file.")
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    proc = run_main(tmp_path / "w", "--config.train.nan_policy=ignore")
    assert proc.returncode == 2
    assert (
        "error: config.train.nan_policy='ignore' is not allowed; allowed: stop | skip"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()
