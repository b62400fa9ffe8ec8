"""Where the time goes: device kernels of the trainer's step or of the sampler, summed by name.

  python -m benchmarks.profile_kernels --what=train --config=configs/xar_b.py \\
      --config.train.global_batch_size=256
  python -m benchmarks.profile_kernels --what=sample --config=configs/xar_b.py \\
      --config.sample.batch_size=256 --config.sample.num_steps=8

Builds and compiles what it profiles as benchmarks/train_step.py and benchmarks/sample.py do (the
config through `xar_jax.experiment.build`, the trainer's jitted step on synthetic batches, or the
sampler `generate` runs), times ``--timed_calls`` warm calls by the wall clock (untraced), traces
a few more with `jax.profiler` (perfetto JSON), sums the durations of device-side events by kernel
name and prints the top entries with their share of the traced device time. The wall time per call
is the step time a run sees: the device time plus the gaps between kernels.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
import time

import jax
from absl import app, flags

from benchmarks import common, sample, train_step

FLAGS = flags.FLAGS


def _train_call(config):
    step = train_step.prepare(config)

    def call():
        with jax.set_mesh(step.exp.mesh), step.exp.rules_context():
            return step.call()["loss"]

    return call, config.train.global_batch_size


def _sample_call(config):
    _, _, fn, args = sample.prepare(config)
    compiled = fn.lower(*args).compile()
    return (lambda: compiled(*args)), config.sample.batch_size


def main(argv):
    del argv
    config = common.apply_overrides(FLAGS.config, FLAGS.overrides)
    call, batch = _train_call(config) if FLAGS.what == "train" else _sample_call(config)
    for _ in range(2):  # Warm-up.
        jax.block_until_ready(call())
    start = time.perf_counter()
    for _ in range(FLAGS.timed_calls):
        jax.block_until_ready(call())
    wall_ms = (time.perf_counter() - start) * 1e3 / max(FLAGS.timed_calls, 1)
    log_dir = tempfile.mkdtemp()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(FLAGS.calls):
            jax.block_until_ready(call())
    path = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    # Device streams are the processes whose name mentions the GPU.
    names = {
        e["pid"]: e.get("args", {}).get("name")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    pids = {pid for pid, name in names.items() if "/device:" in str(name)}
    print("trace processes:", sorted(set(map(str, names.values()))))
    if not pids:  # CPU runs: the XLA ops run on host threads.
        pids = set(names)
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in pids:
            totals[e["name"]] += e.get("dur", 0)
            counts[e["name"]] += 1
    total = max(sum(totals.values()), 1)
    calls = FLAGS.calls
    model = config.model.preset or "custom"
    print(
        f"{FLAGS.what} {model} batch {batch}: {total / 1e3 / calls:.1f} ms device time per call, "
        f"{wall_ms:.1f} ms wall time per call ({FLAGS.timed_calls} untraced calls)"
    )
    for name, dur in totals.most_common(FLAGS.top):
        print(
            f"{dur / total:6.1%} {dur / 1e3 / calls:9.2f} ms  x{counts[name] // calls:<5d} "
            f"{name[:110]}"
        )
    if FLAGS.json:
        kernels = [
            {"name": name, "ms_per_call": dur / 1e3 / calls, "count_per_call": counts[name] / calls}
            for name, dur in totals.most_common()
        ]
        with open(FLAGS.json, "w") as f:
            json.dump(
                {
                    "what": FLAGS.what,
                    "model": model,
                    "batch": batch,
                    "device_ms_per_call": total / 1e3 / calls,
                    "wall_ms_per_call": wall_ms,
                    "kernels": kernels,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    common.define_config_flags()
    flags.DEFINE_enum("what", "train", ("train", "sample"), "The trainer's step or the sampler.")
    flags.DEFINE_integer("calls", 3, "Traced calls.")
    flags.DEFINE_integer("timed_calls", 10, "Calls timed by the wall clock before the trace.")
    flags.DEFINE_integer("top", 30, "Kernels listed.")
    flags.DEFINE_string("json", None, "Also write every kernel's time per call to this file.")
    app.run(main)
