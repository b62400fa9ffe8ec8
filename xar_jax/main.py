"""Command line: ``python -m xar_jax.main --config=configs/demo.py --workdir=DIR [--mode=train]``.

Modes: ``train`` (resumes from DIR automatically); ``sample``: the latest checkpoint's samples,
either class-balanced at scale into ``DIR/generated/<run>/samples.npz`` (ADM's format, resumable,
``sample.format='adm'``) or the demo's grid ``DIR/samples.png`` (``'grid'``); ``eval``: samples
``eval.num_images`` images and scores them (FID / Inception Score for ImageNet, class accuracy
for the digits), writing ``metrics.json``, ``DIR/eval.json`` and TensorBoard scalars. Any config
field can be overridden: ``--config.train.num_steps=100``. Multi-process runs (TPU pods) call
`jax.distributed.initialize()` first; see `initialize_distributed`.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

MODES = ("train", "sample", "eval")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                 lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and samples.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_enum(
    "distributed", "auto", ("auto", "on", "off"),
    "Call jax.distributed.initialize(): 'auto' when the environment shows several processes "
    "(Cloud TPU multi-host, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES set).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _looks_multiprocess() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize_distributed(mode: str = "auto") -> bool:
    """Initialises multi-process JAX (before any device use). Returns whether it did.

    Args:
      mode: 'on' always, 'off' never, 'auto' when the environment shows several processes.
        Coordinator address, process count and id come from the environment (Cloud TPU sets
        them; elsewhere JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
    """
    import jax

    if mode == "off" or (mode == "auto" and not _looks_multiprocess()):
        return False
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger("xar_jax").setLevel(logging.INFO)
    initialize_distributed(FLAGS.distributed)

    import jax

    from xar_jax import train

    config = FLAGS.config
    # Fail on a bad config before any compilation or data loading.
    from xar_jax.train_config import validate_config

    validate_config(config, jax.device_count())
    if jax.process_index() == 0:
        # epath handles gs:// workdirs (os.makedirs would create a local 'gs:' folder).
        from etils import epath

        epath.Path(FLAGS.workdir).mkdir(parents=True, exist_ok=True)
    if FLAGS.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        train.sample_to_workdir(config, FLAGS.workdir)
    else:
        train.evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
