"""Sampling throughput of xAR-B/L/H: the real jit-compiled sampler (KV cache, CFG, Euler-Maruyama).

  python benchmarks/sample.py                       # B, L, H at the published settings, batch 256
  python benchmarks/sample.py --models xar_b --batch 8 --num_steps 4 --tiny   # smoke test on a CPU

Prints a table (img/s, seconds per batch, compile s, peak GiB, MFU) and merges the numbers into
docs/benchmarks.json under "sample". Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from xar_jax import sampling  # noqa: E402
from xar_jax.attention import ATTENTION_IMPLS  # noqa: E402
from xar_jax.attention import resolve as resolve_attention_impl  # noqa: E402

PUBLISHED = {"xar_b": (40, 2.7), "xar_l": (50, 2.3), "xar_h": (50, 2.2)}


def run_one(name, args):
    steps, cfg = PUBLISHED[name]
    steps = args.num_steps or steps
    settings = {
        "mlp_multiple": args.mlp_multiple,
        "scan_layers": not args.unrolled,
        "scan_unroll": args.scan_unroll,
        "attention_impl": args.attention_impl,
    }
    tiny = common.TINY_OVERRIDES if args.tiny else {}
    model = common.build(name, **settings, dtype=jnp.dtype(args.dtype), **tiny)
    params = common.random_params(model)
    labels = jax.random.randint(jax.random.key(1), (args.batch,), 0, 1000)
    fn = sampling.make_sampler(
        model,
        num_steps=steps,
        cfg=cfg,
        state_dtype=jnp.dtype(args.state_dtype),
        skip_unit_guidance=not args.both_halves,
    )
    key = jax.random.key(2)
    start = time.perf_counter()
    compiled = fn.lower(params, labels, key, None).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, labels, key, None))  # Warm-up.
    times = common.timed(lambda: compiled(params, labels, key, None), args.repeats)
    sec = common.median(times)
    flops = common.flop_counts(model)
    k = model.layout.num_entities
    # Every flow step runs the current entity (1/K of the tokens) for both CFG halves; one more
    # forward per entity computes its clean keys/values. Attention counted over the full sequence.
    # The release's work: both halves everywhere. Run: an entity guided with scale 1 (the first
    # under the linear schedule) runs only its conditional half (sampling.make_sampler).
    per_entity = flops["actual"] / k
    per_image = 2 * per_entity * k * (steps + 1)
    skipped = sampling.skipped_unconditional_entities(model.layout, cfg)
    unit = 0 if args.both_halves else len(skipped)
    run_per_image = per_image - unit * per_entity * steps
    peak = common.peak_tflops()
    row = {
        "model": name,
        "batch": args.batch,
        "num_steps": steps,
        "cfg": cfg,
        "img_per_s": args.batch / sec,
        "sec_per_batch": sec,
        "compile_s": compile_s,
        "peak_gib": common.peak_memory_gib(),
        "tflops": run_per_image * args.batch / sec / 1e12,
        # mfu: FLOPs run; mfu_release: the release's FLOPs (both CFG halves on every entity)
        # over the same time, i.e. img/s in MFU units, comparable with rows before the skip.
        "mfu": None if peak is None else run_per_image * args.batch / sec / 1e12 / peak,
        "mfu_release": None if peak is None else per_image * args.batch / sec / 1e12 / peak,
        "unit_guidance_entities_skipped": unit,
        "state_dtype": args.state_dtype,
        **settings,
        "dtype": args.dtype,
        "times_s": [round(t, 4) for t in times],
    }
    return row


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="xar_b,xar_l,xar_h")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--num_steps", type=int, default=0, help="0 = the published count")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--state_dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--mlp_multiple", type=int, default=128)
    parser.add_argument("--unrolled", action="store_true", help="no layer scan")
    parser.add_argument(
        "--scan_unroll", type=int, default=1, help="blocks per layer-scan iteration"
    )
    parser.add_argument(
        "--attention_impl",
        default="auto",
        choices=list(ATTENTION_IMPLS),
        help="cached attention: xla = two-part softmax; cudnn and pallas = the Pallas kernel "
        "reading the cache in place (xar_jax/cached_attention.py; bf16/fp16 on GPUs); "
        "dot_product = jax.nn.dot_product_attention over [cache, entity]; auto = the model's "
        "choice for sampling (no dropout): cudnn on GPUs, else xla",
    )
    parser.add_argument(
        "--both_halves",
        action="store_true",
        help="run both CFG halves on every entity (no skip of the scale-1 entity's "
        "unconditional half)",
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON key (variants)")
    parser.add_argument("--tiny", action="store_true", help="shrink the network (CPU smoke test)")
    parser.add_argument("--no_json", action="store_true")
    args = parser.parse_args()
    # Sampling has no dropout: 'auto' resolves as for a model trained without attention dropout.
    args.attention_impl = resolve_attention_impl(args.attention_impl, 0.0, jnp.dtype(args.dtype))
    if args.state_dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    rows = []
    for name in args.models.split(","):
        rows.append(run_one(name, args))
        common.print_table(rows[-1:], ["model", "img_per_s", "sec_per_batch", "compile_s"])
    common.report(
        "sample",
        rows,
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
        ],
        args,
    )


if __name__ == "__main__":
    main()
