"""Where the time goes: device kernels of the train step or the sampler, summed by name.

  python benchmarks/profile_kernels.py --what train --model xar_b
  python benchmarks/profile_kernels.py --what train --model xar_b --recipe paper
  python benchmarks/profile_kernels.py --what sample --model xar_b --num_steps 8

Traces a few warm calls with `jax.profiler` (perfetto JSON), sums the durations of device-side
events by kernel name and prints the top entries with their share of the traced device time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common, train_step  # noqa: E402
from xar_jax import scan_buffers  # noqa: E402
from xar_jax.attention import resolve as resolve_attention_impl  # noqa: E402


def _model_overrides(args):
    return dict(
        attention_impl=resolve_attention_impl(
            args.attention_impl, args.attn_dropout, jnp.bfloat16
        ),
        scan_layers=not args.unrolled,
        scan_unroll=args.scan_unroll,
    )


def _train_call(args):
    from xar_jax import train_state as ts

    model = common.build(
        args.model,
        attn_dropout=args.attn_dropout,
        dropout=args.dropout,
        dropout_impl=args.dropout_impl,
        remat=args.remat,
        **_model_overrides(args),
    )
    optimizer, step = train_step.paper_optimizer_and_step(model)
    state = ts.create_train_state(model, optimizer, seed=0)
    step = jax.jit(step, donate_argnums=0)
    batch = {
        "latents": jax.random.normal(jax.random.key(1), (args.batch, 16, 16, 16)),
        "labels": jax.random.randint(jax.random.key(2), (args.batch,), 0, 1000),
    }
    holder = {"s": state}

    def call():
        holder["s"], m = step(holder["s"], batch)
        return m["loss"]

    return call


def _sample_call(args):
    from xar_jax import sampling

    model = common.build(args.model, **_model_overrides(args))
    params = common.random_params(model)
    labels = jax.random.randint(jax.random.key(1), (args.batch,), 0, 1000)
    fn = sampling.make_sampler(model, num_steps=args.num_steps, cfg=2.0)
    return lambda: fn(params, labels, jax.random.key(0), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--what", choices=["train", "sample"], default="train")
    parser.add_argument("--model", default="xar_b")
    parser.add_argument(
        "--batch", type=int, default=None, help="default: train_step.py's batch for --model"
    )
    parser.add_argument("--num_steps", type=int, default=8)
    parser.add_argument("--attention_impl", default="cudnn")
    parser.add_argument("--attn_dropout", type=float, default=0.0)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--dropout_impl", default="rng")
    parser.add_argument("--remat", default="none")
    parser.add_argument(
        "--recipe",
        default="flags",
        choices=["flags", *train_step.RECIPES],
        help="train: take attention, dropouts, layers and PRNG from benchmarks/train_step.py's "
        "recipe for --model (paper = the paper's recipe on the fast path)",
    )
    parser.add_argument("--unrolled", action="store_true", help="no layer scan")
    parser.add_argument("--scan_unroll", type=int, default=1)
    parser.add_argument("--prng", default="rbg", help="PRNG behind dropout masks")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    if args.recipe != "flags":
        args.models = args.model
        args = train_step.model_args(args.model, args)
    jax.config.update("jax_default_prng_impl", args.prng)
    args.batch = args.batch or train_step.DEFAULT_BATCH.get(args.model, 256)
    call = _train_call(args) if args.what == "train" else _sample_call(args)
    # The first call lowers and compiles: inside the trainer's scan-output swap (a no-op for
    # programs without a layer scan), so the profile is of the program the trainer runs.
    with scan_buffers.uninitialised_scan_outputs(True):
        jax.block_until_ready(call())
    jax.block_until_ready(call())
    log_dir = tempfile.mkdtemp()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(args.calls):
            jax.block_until_ready(call())
    path = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    # Device streams are the processes whose name mentions the GPU.
    pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
            and "/device:" in str(e.get("args", {}).get("name", ""))}
    names = {e["pid"]: e.get("args", {}).get("name") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    print("trace processes:", sorted(set(map(str, names.values()))))
    if not pids:  # CPU runs: the XLA ops run on host threads.
        pids = set(names)
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in pids:
            totals[e["name"]] += e.get("dur", 0)
            counts[e["name"]] += 1
    total = sum(totals.values())
    print(f"{args.what} {args.model} batch {args.batch}: {total / 1e3 / args.calls:.1f} ms device time per call")
    for name, dur in totals.most_common(args.top):
        print(f"{dur / total:6.1%} {dur / 1e3 / args.calls:9.2f} ms  x{counts[name] // args.calls:<5d} {name[:110]}")


if __name__ == "__main__":
    main()
