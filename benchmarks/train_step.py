"""Training throughput of the trainer's own program: `python -m xar_jax.main`'s step, timed.

  python -m benchmarks.train_step --config=configs/xar_b.py --config.train.global_batch_size=256
  python -m benchmarks.train_step --config=configs/xar_l.py --config.train.global_batch_size=128 \\
      --overrides=fast                # a named override set (benchmarks/common.py OVERRIDES)
  python -m benchmarks.train_step --config=configs/tiny.py --steps=1 --repeats=1 --no_json

The config (file, ``--config.X=...`` overrides, then ``--overrides`` sets) goes through
`xar_jax.experiment.build` and `training_setup`; the step is `xar_jax.train.jit_train_step`,
lowered by `train.lower_train_step` and run on a state made by `train_state.create_train_state`,
exactly as the trainer does. The batch is synthetic (``--input=synthetic``: random arrays of the
shapes and shardings the input pipeline gives, reused every step) or the config's input pipeline
(``--input=pipeline``: a new batch every step, e.g. a latent cache). Prints img/s, step time,
MFU, peak device memory and compile time, and merges the row into docs/benchmarks.json under
"train" (key: the preset or 'custom', plus ``--tag``).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import app, flags

from benchmarks import common
from xar_jax import compile_cache, experiment, train
from xar_jax import train_state as ts
from xar_jax.console import report_user_error
from xar_jax.errors import UserError

FLAGS = flags.FLAGS
SYNTHETIC = "(synthetic)"  # data.cache_dir of a latents config run on synthetic batches.
INPUTS = ("synthetic", "pipeline")


def define_flags() -> None:
    common.define_config_flags()
    flags.DEFINE_enum(
        "input",
        "synthetic",
        INPUTS,
        "synthetic: random arrays shaped as the pipeline's batch; pipeline: the "
        "config's input pipeline (train.make_data_iterator), a new batch every step.",
    )
    flags.DEFINE_integer("steps", 10, "Steps per timed chunk.")
    flags.DEFINE_integer("repeats", 3, "Timed chunks (the median is reported).")
    flags.DEFINE_multi_string(
        "xla_option",
        [],
        "NAME=VALUE: an XLA option for this compile only (`Lowered.compile`'s compiler_options).",
    )
    flags.DEFINE_string("tag", "", "Suffix of the JSON key (variants).")
    flags.DEFINE_bool("no_json", False, "Do not write docs/benchmarks.json.")


def synthetic_batch(config, mesh) -> dict[str, jax.Array]:
    """Random arrays with the shapes, dtypes and shardings of the trainer's batch."""
    spec = train.train_batch_spec(config, mesh)
    batch = {}
    for i, (name, s) in enumerate(sorted(spec.items())):
        key = jax.random.key(i)
        if name == "labels":
            value = jax.random.randint(key, s.shape, 0, config.latent.num_classes, s.dtype)
        else:
            value = jax.random.normal(key, s.shape, s.dtype)
        batch[name] = jax.device_put(value, s.sharding)
    return batch


@dataclasses.dataclass
class Step:
    """The trainer's compiled step for a config, with a state and batches to run it on."""

    exp: experiment.Experiment
    compiled: Any
    state: Any
    next_batch: Callable[[], dict[str, jax.Array]]
    compile_s: float

    def call(self):
        """One step (the state is donated and replaced); returns the step's metrics."""
        self.state, metrics = self.compiled(self.state, self.next_batch())
        return metrics


def prepare(config, input_kind: str = "synthetic", xla_options=None) -> Step:
    """Builds and compiles the trainer's step for ``config`` as `xar_jax.train` does."""
    if input_kind == "synthetic" and config.data.source == "latents" and not config.data.cache_dir:
        config = copy.deepcopy(config)
        with config.unlocked():
            config.data.cache_dir = SYNTHETIC  # Nothing reads it: the batch is made here.
    exp = experiment.build(config, "train")
    config = exp.config  # 'auto' fields resolved.
    setup = experiment.training_setup(exp)
    state = ts.create_train_state(exp.model, setup.optimizer, config.seed, setup.state_shardings)
    if input_kind == "pipeline":
        iterator = train.make_data_iterator(config, exp.mesh)

        def next_batch():
            return train.to_model_batch(next(iterator), config.latent.tokenizer)
    else:
        fixed = synthetic_batch(config, exp.mesh)

        def next_batch():
            return fixed

    with jax.set_mesh(exp.mesh), exp.rules_context():
        start = time.perf_counter()
        lowered = train.lower_train_step(train.jit_train_step(exp, setup), state, next_batch())
        compiled = lowered.compile(xla_options)
        compile_s = time.perf_counter() - start
    return Step(exp, compiled, state, next_batch, compile_s)


def run(config) -> dict:
    """Compiles and times the trainer's step for ``config``; returns the table row."""
    step = prepare(config, FLAGS.input, common.xla_options(FLAGS.xla_option))
    exp, config = step.exp, step.exp.config
    with jax.set_mesh(exp.mesh), exp.rules_context():
        for _ in range(2):  # Warm-up.
            metrics = step.call()
        jax.block_until_ready(step.state)

        def chunk():
            nonlocal metrics
            for _ in range(FLAGS.steps):
                metrics = step.call()
            return metrics["loss"]

        times = [t / FLAGS.steps for t in common.timed(chunk, FLAGS.repeats)]
    batch_size = config.train.global_batch_size
    sec = common.median(times)
    flops = common.flop_counts(exp.model)
    peak = common.peak_tflops()
    if peak is not None:
        peak *= jax.device_count()  # MFU over all devices the step runs on.
    model_tflops = 3 * flops["model"] * batch_size / sec / 1e12
    actual_tflops = 3 * flops["actual"] * batch_size / sec / 1e12
    m = config.model
    return {
        "model": m.preset or "custom",
        "batch": batch_size,
        "img_per_s": batch_size / sec,
        "step_s": sec,
        "compile_s": step.compile_s,
        "peak_gib": common.peak_memory_gib(),
        "mfu": None if peak is None else model_tflops / peak,
        "hw_flops_util": None if peak is None else actual_tflops / peak,
        "tflops": model_tflops,
        "attention_impl": exp.settings.attention_impl,
        "attn_dropout": m.attn_dropout,
        "dropout_impl": m.dropout_impl,
        "dtype": m.dtype,
        "scan_layers": m.scan_layers,
        "remat": m.remat,
        "prng_impl": config.prng_impl,
        "input": FLAGS.input,
        "overrides": ",".join(FLAGS.overrides),
        "mesh": exp.mesh_shape,
        "devices": jax.device_count(),
        "steps_run": int(jax.device_get(step.state.step)),
        "final_loss": float(jax.device_get(metrics["loss"])),  # Same seed and steps: comparable.
        "times_s": [round(t, 5) for t in times],
        **({"xla_options": FLAGS.xla_option} if FLAGS.xla_option else {}),
    }


def main(argv):
    del argv
    common.xla_options(FLAGS.xla_option)  # A malformed --xla_option fails before any compile.
    config = common.apply_overrides(FLAGS.config, FLAGS.overrides)
    compile_cache.enable(config)
    try:
        row = run(config)
    except UserError as e:
        report_user_error(str(e))
        raise SystemExit(2) from None
    common.report(
        "train",
        [row],
        [
            "model",
            "batch",
            "img_per_s",
            "step_s",
            "mfu",
            "hw_flops_util",
            "peak_gib",
            "compile_s",
            "attention_impl",
            "attn_dropout",
            "dropout_impl",
            "prng_impl",
            "scan_layers",
            "remat",
            "final_loss",
        ],
        FLAGS,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
