"""Every python command the launch scripts start on a worker exists, with every flag it is given.

Each script renders its commands with --dry-run; the ssh command strings are then executed for
real in a fake worker home (launch/ copied there, `tmux` runs the session's command at once,
`gcloud` (the workers' `gcloud storage` copies) succeeds, and the virtualenv's `python` records its arguments), so the worker-side
indirections (worker.sh -> tmux -> run_main.sh -> python) are followed as on a TPU VM. Each
recorded `python -m MODULE ...` is then checked here:

* `xar_jax.main`: the recorded command line itself plus --check_only, which parses every flag and
  every --config override against the real config file and validates the config for the mode
  (nothing compiled, no workdir touched);
* any other module (argparse): the command line itself plus a final --help, which makes argparse
  convert and check every value it meets (types, choices, a positional's choices) and then print
  its help, which must list every flag given; a MODULE:FACTORY value of --encoder must import.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch_sandbox import LAUNCH, REPO, SCRIPTS, flag, make_sandbox, run_script

# Scripts whose remote commands start no python module (slice lifecycle, logs, the CPU VM's
# TFDS build, install's import check); every other script must appear in CASES.
NO_PYTHON = {"create.sh", "delete.sh", "install.sh", "logs.sh", "stop.sh"}
EVAL_ENV = {
    "REFERENCE_STATS": "gs://my-bkt/fid/ref.npz",
    "SAMPLES_DIR": "gs://my-bkt/samples",
    "VAE_DIR": "/home/me/xar_weights/kl16",
    "INCEPTION_DIR": "/home/me/xar_weights/inc",
}
CASES = {  # id: (script, arguments, environment)
    "start-train": ("start.sh", (), {"SPOT": "1"}),  # resume.sh restarts the same command
    "start-train-flags": (
        "start.sh",
        ("--config.optim.lr=1e-4",),
        {
            "CONFIG": "configs/xar_b.py",
            "MAIN_FLAGS": "--allow_change=mesh",
            "CONFIG_OVERRIDES": "--config.train.grad_accum_steps=2",
        },
    ),
    "start-sample": ("start.sh", (), {"MODE": "sample", "CONFIG": "configs/xar_l.py"}),
    "start-eval-digits": (
        "start.sh",
        (),
        {"MODE": "eval", "CONFIG": "configs/demo.py", "DATA_SOURCE": "digits"},
    ),
    "resume": ("resume.sh", (), {"DRY_RUN_JOB": "failed:1,running"}),
    "eval": ("eval.sh", (), EVAL_ENV),
    # Two slices: queued-resources ssh to every node of both, --config.mesh.num_slices=2 (eval.sh
    # and resume.sh add nothing else to this command: tests/test_launch.py).
    "start-train-2-slices": ("start.sh", (), {"NUM_SLICES": "2", "SPOT": "1"}),
    "prepare_data-cache": ("prepare_data.sh", ("cache",), {"VAE_DIR": "/home/me/xar_weights/kl16"}),
    "prepare_data-cache-validation": (
        "prepare_data.sh",
        ("cache",),
        {"VAE_DIR": "/w/kl16", "CACHE_SPLIT": "validation", "IMAGE_SIZE": "512"},
    ),
    "convert_weights": (
        "convert_weights.sh",
        (),
        {
            "XAR_PTH": "gs://my-bkt/src/xar_h.pth",
            "VAE_CKPT": "gs://my-bkt/src/kl16.ckpt",
            "INCEPTION_PTH": "gs://my-bkt/src/weights-inception-2015-12-05-6726825d.pth",
        },
    ),
    "prepare_data-build": ("prepare_data.sh", ("build",), {}),  # a CPU VM: no TPU worker python
}
# The python modules each case must start (a script that stops starting one fails too).
EXPECTED = {
    "start-train": ["xar_jax.main"],
    "start-train-flags": ["xar_jax.main"],
    "start-sample": ["xar_jax.main"],
    "start-eval-digits": ["xar_jax.main"],
    "resume": ["xar_jax.main"],
    "eval": ["xar_jax.main"],
    "start-train-2-slices": ["xar_jax.main"],
    "prepare_data-cache": ["xar_jax.data.latent_cache"],
    "prepare_data-cache-validation": ["xar_jax.data.latent_cache"],
    "convert_weights": ["xar_jax.convert"] * 3,
    "prepare_data-build": [],
}

RECORDING_PYTHON = """#!{python}
import json, os, sys
with open(os.environ["XAR_PYTHON_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""
FAKE_TOOLS = {
    # new-session runs the session's command to its end; nothing else is ever running.
    "tmux": 'case "$1" in new-session) shift 4; exec bash -c "$1" ;; has-session) exit 1 ;; '
    "esac; exit 0",
    "gcloud": "exit 0",
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    return make_sandbox(tmp_path_factory.mktemp("launch_commands"))


def _worker_home(root: Path) -> tuple[Path, dict[str, str]]:
    """A TPU worker's home as install.sh leaves it, with recording stand-ins for the tools."""
    home, fake_bin = root / "home", root / "bin"
    shutil.copytree(
        LAUNCH, home / "xar-jax" / "launch", ignore=shutil.ignore_patterns("__pycache__")
    )
    (home / "xar-jax" / ".xar_commit").write_text("0123abcd\n")
    venv_bin = home / "xar_venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text('PATH="$HOME/xar_venv/bin:$PATH"\n')
    (venv_bin / "python").write_text(RECORDING_PYTHON.format(python=sys.executable))
    fake_bin.mkdir()
    for name, body in FAKE_TOOLS.items():
        (fake_bin / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
    for path in [venv_bin / "python", *fake_bin.iterdir()]:
        path.chmod(0o755)
    env = {
        "HOME": str(home),
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "LC_ALL": "C",
        "XAR_PYTHON_RECORD": str(root / "python_calls"),
        "TMPDIR": str(root),
    }
    return home, env


def launched_python(sandbox: Path, guard: Path, root: Path, case: str) -> list[list[str]]:
    """The python argument lists a case's script starts on the TPU workers, in order."""
    script, args, env = CASES[case]
    result = run_script(sandbox, guard, script, *args, **env)
    assert result.returncode == 0, result.stderr
    home, worker_env = _worker_home(root)
    for cmd in result.commands:
        if cmd[:3] != ["gcloud", "compute", "tpus"] or cmd[4] != "ssh":
            continue  # only TPU workers run our code; the CPU VM builds TFDS with TensorFlow
        proc = subprocess.run(
            ["bash", "-c", flag(cmd, "command")],
            cwd=home,
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"{flag(cmd, 'command')}\n{proc.stdout}{proc.stderr}"
    record = Path(worker_env["XAR_PYTHON_RECORD"])
    calls = [json.loads(ln) for ln in record.read_text().splitlines()] if record.exists() else []
    return [c for c in calls if c[:1] == ["-m"]]  # `python -c 'import torch'` is a probe


# ---- the checker ----------------------------------------------------------------------------
def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@functools.cache
def _help(module: str, *args: str) -> tuple[int, str]:
    """``python -m module ARGS --help``: argparse checks each value up to --help, then exits 0."""
    proc = _run("-m", module, *args, "--help")
    return proc.returncode, proc.stdout if proc.returncode == 0 else proc.stderr[-2000:]


def _argparse_options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", help_text))


@functools.cache
def _check_main(argv: tuple[str, ...]) -> str:
    proc = _run("-m", "xar_jax.main", *argv, "--check_only")
    if proc.returncode != 0 or proc.stdout.strip().splitlines()[-1:] != ["ok"]:
        return f"python -m xar_jax.main {' '.join(argv)} --check_only:\n{proc.stderr[-2000:]}"
    return ""


def check_command(argv: list[str]) -> list[str]:
    """Problems of one `python ARGV` command line (empty if its module and flags all exist)."""
    assert argv[0] == "-m", argv
    module, args = argv[1], argv[2:]
    if module == "xar_jax.main":
        problem = _check_main(tuple(args))
        return [problem] if problem else []
    returncode, text = _help(module, *args)
    if returncode != 0:  # a bad value, or a positional (convert's KIND) outside its choices
        return [f"python -m {module} {' '.join(args)} --help:\n{text}"]
    problems = []
    # argparse ignores unknown flags until after --help (and accepts abbreviations): look them up.
    options = _argparse_options(text)
    for arg in args:
        if not arg.startswith("--"):
            continue
        name, _, value = arg.partition("=")
        if name not in options:
            problems.append(f"python -m {module}: no flag {name} (flags: {sorted(options)})")
        if name == "--encoder" and value:
            problems += _check_factory(value)
    return problems


def _check_factory(spec: str) -> list[str]:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        return [f"--encoder={spec}: {e}"]
    return [] if callable(factory) else [f"--encoder={spec} is not callable"]


# ---- the tests ------------------------------------------------------------------------------
def test_every_launch_script_is_covered_or_starts_no_python():
    covered = {script for script, _, _ in CASES.values()}
    assert set(SCRIPTS) == covered | NO_PYTHON, "add the new script to CASES or NO_PYTHON"
    assert not covered & NO_PYTHON


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_launched_python_command_and_flag_exists(sandbox, guard_bin, tmp_path, case):
    commands = launched_python(sandbox, guard_bin, tmp_path, case)
    assert [c[1] for c in commands] == EXPECTED[case]
    problems = [p for c in commands for p in check_command(c)]
    assert not problems, "\n".join(problems)


def test_main_commands_carry_the_mode_that_start_sh_was_given(sandbox, guard_bin, tmp_path):
    for case, mode in (("start-sample", "sample"), ("eval", "eval"), ("resume", "train")):
        (command,) = launched_python(sandbox, guard_bin, tmp_path / case, case)
        assert f"--mode={mode}" in command and "--distributed=on" in command


def test_the_checker_rejects_an_unknown_flag_and_an_unknown_config_field():
    good = [
        "-m",
        "xar_jax.main",
        "--config=configs/tiny.py",
        "--workdir=/nonexistent/run",
        "--mode=train",
        "--config.train.num_steps=3",
    ]
    assert check_command(good) == []
    assert (
        "Unknown command line flag 'no_such_flag'" in check_command([*good, "--no_such_flag=1"])[0]
    )
    assert "no_such_field" in check_command([*good, "--config.train.no_such_field=1"])[0]
    assert "cache_latents" in check_command([*good, "--mode=cache_latents"])[0]
    assert "num_steps=0" in check_command([*good, "--config.train.num_steps=0"])[0]
    assert not Path("/nonexistent/run").exists()


def test_the_checker_rejects_unknown_flags_kinds_and_encoders_of_other_modules():
    cache = ["-m", "xar_jax.data.latent_cache", "--out_dir=/x", "--encoder=x:y"]
    assert any("no flag --out-dir" in p for p in check_command([*cache, "--out-dir=/y"]))
    assert any("--encoder=x:y" in p for p in check_command(cache))
    assert "invalid int value: '2x'" in check_command([*cache, "--image_size=2x"])[0]
    convert = ["-m", "xar_jax.convert", "vqgan", "--src", "a.pth", "--out", "b"]
    assert "invalid choice: 'vqgan'" in check_command(convert)[0]
