"""Command line: ``python -m xar_jax.main --config=configs/demo.py --workdir=DIR [--mode=train]``.

Modes: ``train`` (resumes from DIR automatically); ``sample``: the latest checkpoint's samples,
either class-balanced at scale into ``DIR/generated/<run>/samples.npz`` (ADM's format, resumable,
``sample.format='adm'``) or the demo's grid ``DIR/samples.png`` (``'grid'``); ``eval``: samples
``eval.num_images`` images and scores them (FID / Inception Score for ImageNet, class accuracy
for the digits), writing ``metrics.json``, ``DIR/eval.json`` and TensorBoard scalars. Any config
field can be overridden: ``--config.train.num_steps=100``. Multi-process runs (TPU pods) call
`jax.distributed.initialize()` first; see `initialize_distributed`. ``--check_only`` parses the
flags and the config with its overrides, validates it for the mode and prints ``ok`` (what
tests/test_launch_commands.py runs on every command line the launch scripts start).

Exit codes: 0 done, or stopped by SIGTERM after saving (training: a checkpoint of the step in
flight; ADM sampling: the finished shards); 130 the same after SIGINT (Ctrl-C); 2 a user error
(flags, config, input files, workdir), printed in a line or two; 1 anything else.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from xar_jax import compile_cache, experiment, generate, plan_file, score, train
from xar_jax.console import configure_logging, report_user_error
from xar_jax.errors import UserError
from xar_jax.experiment import MODES
from xar_jax.stop_signal import Stopped
from xar_jax.train_config import load_config_file, validate_config
from xar_jax.workdir import ALLOWED_CHANGES

log = logging.getLogger("xar_jax.main")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and samples.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_enum(
    "distributed",
    "auto",
    ("auto", "on", "off"),
    "Call jax.distributed.initialize(): 'on' always (the launch/ scripts pass it on Cloud TPU VMs), "
    "'off' never, 'auto' when environment variables show several processes "
    "(JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES, or TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES on GKE).",
)
flags.DEFINE_multi_enum(
    "allow_change",
    [],
    ALLOWED_CHANGES,
    "A resume may change these recorded run fields (repeat the flag for both): 'mesh' (mesh axes "
    "or process count; the checkpoint is resharded onto the new mesh), 'data' (data pipeline, "
    "global batch or seed; the data iterator restarts). Model fields can never change in a workdir.",
)
flags.DEFINE_bool(
    "print_config", False, "Print the effective config (file + overrides) as JSON and exit."
)
flags.DEFINE_bool(
    "check_only",
    False,
    "Parse the flags and the config with its overrides, validate the config for --mode (no device "
    "count: the mesh is not checked), print 'ok' and exit. Touches no workdir, starts no "
    "jax.distributed and compiles nothing: the launch tests run every launched command this way.",
)
flags.mark_flags_as_required(["config"])


def _env_int(name: str) -> int | None:
    """The integer in environment variable ``name``; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name}={value!r} must be an integer.") from None


def _looks_multiprocess() -> bool:
    """Whether the environment names several processes (read without touching JAX).

    True when JAX_COORDINATOR_ADDRESS is set, JAX_NUM_PROCESSES > 1, or (GKE TPU jobs)
    TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES list more than one host. A TPU VM created with
    ``gcloud compute tpus`` (GCE) exports none of these: its worker list lives in the VM metadata,
    which JAX reads inside ``jax.distributed.initialize()``. There, pass ``--distributed=on``
    (the launch/ scripts do).
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if (_env_int("JAX_NUM_PROCESSES") or 1) > 1:
        return True
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = os.environ.get(name, "")
        if len([h for h in hosts.split(",") if h.strip()]) > 1:
            return True
    return False


def initialize_distributed(mode: str = "auto") -> bool:
    """Initialises multi-process JAX (before any device use). Returns whether it did.

    Args:
      mode: 'on' always, 'off' never, 'auto' when `_looks_multiprocess()` (environment variables
        only; GCE TPU VMs need 'on').

    Returns:
      True if ``jax.distributed.initialize`` ran.

    Where the coordinator, process count and process id come from:
      * JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID: all
        three or none (local multi-process runs, clusters JAX does not know);
      * otherwise JAX's own cluster detection: Cloud TPU VM metadata (GCE), GKE TPU variables,
        SLURM, Open MPI. On a single-host TPU VM this yields one process, which is harmless and
        lets Orbax see preemption notices.
    Multi-process CPU runs (tests) need no extra setting: in the supported jax (>= 0.10.2)
    ``jax_cpu_collectives_implementation`` defaults to 'gloo', which the CPU client uses for
    cross-process collectives once ``jax.distributed`` is initialised.

    Raises:
      ValueError: ``mode`` is not 'auto', 'on' or 'off', or the JAX_* variables are incomplete
        or inconsistent (checked before JAX starts).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode={mode!r} is not allowed; allowed: 'auto', 'on', 'off'.")
    if mode == "off" or (mode == "auto" and not _looks_multiprocess()):
        return False
    kwargs = {}
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = [n for n in names if os.environ.get(n, "").strip()]
    if present:
        if len(present) != len(names):
            missing = ", ".join(n for n in names if n not in present)
            raise ValueError(
                f"{', '.join(present)} set but {missing} not: set all three of {', '.join(names)} "
                "(or none, to let JAX detect the cluster)."
            )
        count, index = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
        if count < 1 or not 0 <= index < count:
            raise ValueError(
                f"JAX_PROCESS_ID={index} must lie in [0, JAX_NUM_PROCESSES={count}) and "
                "JAX_NUM_PROCESSES must be at least 1."
            )
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"].strip(),
            num_processes=count,
            process_id=index,
        )
    jax.distributed.initialize(**kwargs)
    return True


def _config_file_flag(argv: list[str]) -> str | None:
    for arg in argv:
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
    return None


def _unknown_override(argv: list[str]) -> str | None:
    """The first ``--config.a.b=...`` of ``argv`` naming no field of the config file."""
    path = _config_file_flag(argv)
    if path is None or not os.path.exists(path):
        return None
    base = load_config_file(path)
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            field = arg[len("--config.") :].split("=", 1)[0]
            node = base
            for part in field.split("."):
                if not hasattr(node, "keys") or part not in node:
                    return field
                node = node[part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose user mistakes end in two lines and exit code 2, not a traceback."""
    hint = "Every config field, with its meaning: xar_jax/train_config.py (base_config)."
    try:
        rest = FLAGS(argv)
        FLAGS.config.to_dict()  # Loads the config file and applies the overrides now.
    except flags.Error as e:
        report_user_error(str(e), "Run with --helpshort to list the flags.")
        sys.exit(2)
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        path = _config_file_flag(argv)
        if path and not os.path.exists(path):
            report_user_error(f"--config={path}: no such file.", "Configs: configs/*.py.")
        elif (field := _unknown_override(argv)) is not None:
            report_user_error(f"--config.{field}: no such config field.", hint)
        else:
            report_user_error(f"--config: {type(e).__name__}: {e}", hint)
        sys.exit(2)
    return rest


def main(argv):
    if len(argv) > 1:
        report_user_error(f"unexpected arguments: {argv[1:]}")
        sys.exit(2)
    configure_logging()
    config, workdir, mode = FLAGS.config, FLAGS.workdir, FLAGS.mode
    if FLAGS.print_config:
        # As the run would use it: 'auto' layer settings resolved for this machine (and workdir).
        resolved = experiment.resolve_config(config, jax.default_backend(), workdir or None, mode)
        print(resolved.to_json_best_effort(indent=2, sort_keys=True))
        return
    if not workdir:
        report_user_error("--workdir is required (a local directory or gs://bucket/path).")
        sys.exit(2)
    if FLAGS.check_only:
        try:
            if mode == "train":
                config = plan_file.config_with_plan(config, devices=None, argv=sys.argv)
            validate_config(config, num_devices=None, training=mode == "train")
        except UserError as e:
            report_user_error(str(e))
            sys.exit(2)
        print("ok")
        return
    compile_cache.enable(config, workdir)
    initialize_distributed(FLAGS.distributed)
    try:
        if mode == "train":  # The plan's settings, before validation.
            config = plan_file.config_with_plan(config, devices=jax.devices(), argv=sys.argv)
        # Validates the config for this mode before any compilation or data loading. The config
        # itself goes to WORKDIR/config.json and TensorBoard (training), or --print_config.
        exp = experiment.build(config, mode, workdir=workdir)
        if mode == "train":
            train.train_and_evaluate(
                exp.config, workdir, allow_change=tuple(FLAGS.allow_change), exp=exp
            )
        elif mode == "sample":
            generate.sample_to_workdir(exp, workdir)
        else:
            score.evaluate(exp, workdir)
    except UserError as e:
        report_user_error(str(e))
        sys.exit(2)
    except Stopped as e:
        # SIGTERM / preemption: 0; SIGINT: 130 (see xar_jax/stop_signal.py).
        log.warning("%s", e)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
