"""Sampling throughput of the sampler `python -m xar_jax.main --mode=sample` runs (KV cache, CFG,
the config's solver), on random weights (speed does not depend on them).

  python -m benchmarks.sample --config=configs/xar_b.py --config.sample.batch_size=256
  python -m benchmarks.sample --config=configs/tiny.py --config.sample.batch_size=2 --no_json

The config goes through `xar_jax.experiment.build` (mode 'sample') and the sampler is
`xar_jax.generate.latent_sampler` at the config's ``sample.*`` settings, on this process's devices
as `generate` places it; the VAE decode is not timed (benchmarks/vae_decode.py). Prints img/s,
seconds per batch, compile s, peak GiB and MFU, and merges the row into docs/benchmarks.json under
"sample".
"""

from __future__ import annotations

import time

import jax
from absl import app, flags
from flax import linen as nn

from benchmarks import common
from xar_jax import compile_cache, experiment, generate, sampling
from xar_jax import sharding as sharding_lib
from xar_jax.model import example_inputs

FLAGS = flags.FLAGS


def define_flags() -> None:
    common.define_config_flags()
    flags.DEFINE_integer("repeats", 3, "Timed batches (the median is reported).")
    flags.DEFINE_string("tag", "", "Suffix of the JSON key (variants).")
    flags.DEFINE_bool("no_json", False, "Do not write docs/benchmarks.json.")


def random_params(exp: experiment.Experiment, mesh):
    """Initialised params, replicated on ``mesh`` (made on the devices, nothing on the host)."""
    model = exp.model
    init = jax.jit(lambda k: nn.meta.unbox(model.init(k, *example_inputs(model))["params"]))
    return generate.replicate_on(init(jax.random.key(exp.config.seed)), mesh)


def prepare(config):
    """``(exp, mesh, fn, args)``: the jitted sampler `generate` runs for ``config`` and its
    arguments (random params on this process's devices, ``sample.batch_size`` labels, a key);
    ``fn(*args)`` samples one batch of latents."""
    exp = experiment.build(config, "sample")
    s = exp.config.sample
    mesh = generate.local_mesh()
    params = random_params(exp, mesh)
    labels = jax.device_put(
        jax.random.randint(jax.random.key(1), (s.batch_size,), 0, exp.config.latent.num_classes),
        sharding_lib.batch_sharding(mesh),
    )
    key = jax.random.key(s.seed)
    fn = generate.latent_sampler(
        exp.model, num_steps=s.num_steps, cfg=s.cfg, sampler=s.sampler, cfg_schedule=s.cfg_schedule
    )
    return exp, mesh, fn, (params, labels, key, None)


def run(config) -> dict:
    exp, mesh, fn, args = prepare(config)
    config, model = exp.config, exp.model
    s = config.sample
    batch = s.batch_size
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # Warm-up.
    times = common.timed(lambda: compiled(*args), FLAGS.repeats)
    sec = common.median(times)
    flops = common.flop_counts(model)
    k = model.layout.num_entities
    # Every flow step runs the current entity (1/K of the tokens) for both CFG halves; one more
    # forward per entity computes its clean keys/values. Attention counted over the full sequence.
    # The release's work: both halves everywhere. Run: an entity guided with scale 1 (the first
    # under the linear schedule) runs only its conditional half (sampling.make_sampler).
    per_entity = flops["actual"] / k
    per_image = 2 * per_entity * k * (s.num_steps + 1)
    unit = len(sampling.skipped_unconditional_entities(model.layout, s.cfg, s.cfg_schedule))
    run_per_image = per_image - unit * per_entity * s.num_steps
    peak = common.peak_tflops()
    if peak is not None:
        peak *= len(mesh.devices.flat)
    return {
        "model": config.model.preset or "custom",
        "batch": batch,
        "num_steps": s.num_steps,
        "cfg": s.cfg,
        "sampler": s.sampler,
        "img_per_s": batch / sec,
        "sec_per_batch": sec,
        "compile_s": compile_s,
        "peak_gib": common.peak_memory_gib(),
        "tflops": run_per_image * batch / sec / 1e12,
        # mfu: FLOPs run; mfu_release: the release's FLOPs (both CFG halves on every entity)
        # over the same time, i.e. img/s in MFU units.
        "mfu": None if peak is None else run_per_image * batch / sec / 1e12 / peak,
        "mfu_release": None if peak is None else per_image * batch / sec / 1e12 / peak,
        "unit_guidance_entities_skipped": unit,
        "attention_impl": model.attention_impl,
        "scan_layers": config.model.scan_layers,
        "dtype": config.model.dtype,
        "overrides": ",".join(FLAGS.overrides),
        "times_s": [round(t, 4) for t in times],
    }


def main(argv):
    del argv
    config = common.apply_overrides(FLAGS.config, FLAGS.overrides)
    compile_cache.enable(config)
    row = run(config)
    common.report(
        "sample",
        [row],
        [
            "model",
            "batch",
            "num_steps",
            "cfg",
            "img_per_s",
            "sec_per_batch",
            "compile_s",
            "peak_gib",
            "tflops",
            "mfu",
            "mfu_release",
            "attention_impl",
        ],
        FLAGS,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
