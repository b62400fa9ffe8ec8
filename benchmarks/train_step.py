"""Training throughput of xAR-B/L/H: the real train step (forward, backward, clip, AdamW, EMA).

  python benchmarks/train_step.py                    # B@256, L@128, H@64, bf16, dropout on
  python benchmarks/train_step.py --recipe paper     # the paper's recipe on the fast path
  python benchmarks/train_step.py --recipe fast      # fastest measured, without attention dropout
  python benchmarks/train_step.py --models xar_b --batch 8 --tiny --steps 2   # CPU smoke test

Uses `xar_jax.train_state.make_train_step` (the trainer's own step, jitted with donated state) on
synthetic latents. Prints img/s, step time, MFU, peak device memory and compile time, and merges
the numbers into docs/benchmarks.json under "train".
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
from xar_jax import model as xar_model  # noqa: E402
from xar_jax import scan_buffers  # noqa: E402
from xar_jax import train_state as ts  # noqa: E402
from xar_jax.attention import ATTENTION_IMPLS  # noqa: E402
from xar_jax.attention import resolve as resolve_attention_impl  # noqa: E402
from xar_jax.dropout import DROPOUT_IMPLS  # noqa: E402

DEFAULT_BATCH = {"xar_b": 256, "xar_l": 128, "xar_h": 64}

# --recipe fast: the fastest settings measured on one H200 (docs/benchmarks.md). cuDNN attention has
# no attention-probability dropout; the other dropouts stay on.
FAST_COMMON = {"attention_impl": "cudnn", "attn_dropout": 0.0, "prng": "rbg"}
FAST_LAYERS = {
    "xar_b": {"unrolled": True, "remat": "none"},  # 46 s compile; 1,460 img/s with scan + dots.
    "xar_l": {"unrolled": False, "remat": "dots"},  # Unrolled compiles in 80 s.
    "xar_h": {"unrolled": False, "remat": "none"},
}


# --recipe paper: the paper's recipe (bf16, dropout 0.1 after the projection and in the MLP,
# dropout 0.1 on attention probabilities) on the configs' 'auto' attention: the fused Pallas kernel
# on a GPU, the XLA form elsewhere; the other dropouts by the fused hash ('hash', the configs'
# choice). Layers as measured fastest with that kernel on one H200 (docs/benchmarks.md, 2026-12-01).
PAPER_COMMON = {
    "attention_impl": "auto",
    "attn_dropout": 0.1,
    "dropout": 0.1,
    "dropout_impl": "hash",
    "dtype": "bfloat16",
    "prng": "rbg",
}
PAPER_LAYERS = {
    "xar_b": {"unrolled": True, "remat": "none"},  # 43 s compile; 1,540 img/s scanned + dots.
    "xar_l": {"unrolled": False, "remat": "dots"},  # 'matmuls' tied (495 vs 494), 2 GiB more.
    "xar_h": {"unrolled": False, "remat": "matmuls"},  # 260 vs 256 (dots) and 236 (none).
}
RECIPES = {"fast": (FAST_COMMON, FAST_LAYERS), "paper": (PAPER_COMMON, PAPER_LAYERS)}


def model_args(name: str, args: argparse.Namespace) -> argparse.Namespace:
    """The command-line settings, or the chosen recipe's for ``name``."""
    if args.recipe not in RECIPES:
        return args
    common_settings, layers = RECIPES[args.recipe]
    chosen = common_settings | layers[name]
    if chosen["attention_impl"] == "cudnn" and jax.default_backend() != "gpu":
        chosen["attention_impl"] = "dot_product"  # CPU smoke tests: the same kernel's XLA form.
    return argparse.Namespace(**(vars(args) | chosen))


def paper_optimizer_and_step(model: xar_model.XAR):
    """The paper's optimizer (AdamW 4e-4, betas 0.9/0.96, decay 0.02, clip 1) and the trainer's
    step for ``model`` (EMA 0.9999, labels dropped with probability 0.1)."""
    optimizer = ts.make_optimizer(
        learning_rate=4e-4,
        b1=0.9,
        b2=0.96,
        weight_decay=0.02,
        clip_norm=1.0,
        weight_decay_mask=ts.weight_decay_mask_fn(xar_model.abstract_params(model)),
    )
    step = ts.make_train_step(model, model.layout, optimizer, ema_decay=0.9999, label_drop_prob=0.1)
    return optimizer, step


def run_one(name, args):
    batch = args.batch or DEFAULT_BATCH[name]
    settings = {
        "attention_impl": resolve_attention_impl(
            args.attention_impl, args.attn_dropout, jnp.dtype(args.dtype)
        ),
        "dropout_impl": args.dropout_impl,
        "attn_dropout": args.attn_dropout,
        "dropout": args.dropout,
        "remat": args.remat,
        "scan_layers": not args.unrolled,
        "scan_unroll": args.scan_unroll,
        "mlp_multiple": args.mlp_multiple,
    }
    tiny = common.TINY_OVERRIDES if args.tiny else {}
    model = common.build(name, **settings, dtype=jnp.dtype(args.dtype), **tiny)
    optimizer, step = paper_optimizer_and_step(model)
    data = {
        "latents": jax.random.normal(jax.random.key(1), (batch, 16, 16, 16), jnp.float32),
        "labels": jax.random.randint(jax.random.key(2), (batch,), 0, 1000),
    }
    if args.mesh:
        # The trainer's sharding: logical-axis rules over a (data, fsdp, tensor) mesh.
        from flax import linen as nn

        from xar_jax import sharding as sharding_lib

        data_n, fsdp_n = (int(v) for v in args.mesh.split(","))
        mesh = sharding_lib.make_mesh(data_n, fsdp_n, 1)
        rng_data = jax.random.key_data(jax.random.key(0))
        specs = ts.state_partition_specs(model, optimizer, rng_data)
        shardings = sharding_lib.logical_shardings(specs, mesh)
        batch_sharding = sharding_lib.batch_sharding(mesh)
        data = jax.device_put(data, batch_sharding)
        ctx = (jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding_lib.LOGICAL_AXIS_RULES)))
        for c in ctx:
            c.__enter__()
        state = ts.create_train_state(model, optimizer, seed=0, shardings=shardings)
        step = jax.jit(
            step,
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, sharding_lib.replicated(mesh)),
            donate_argnums=0,
        )
    else:
        state = ts.create_train_state(model, optimizer, seed=0)
        step = jax.jit(step, donate_argnums=0)
    start = time.perf_counter()
    fill = float("nan") if args.scan_outputs == "nan" else None
    swap = args.scan_outputs != "zeroed"
    with scan_buffers.uninitialised_scan_outputs(swap, fill_value=fill) as swapped:
        lowered = step.lower(state, data)
    compiled = lowered.compile(common.xla_options(args.xla_option))
    compile_s = time.perf_counter() - start
    for _ in range(2):  # Warm-up.
        state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    holder = {"state": state}

    def chunk():
        s = holder["state"]
        for _ in range(args.steps):
            s, m = compiled(s, data)
        holder["state"], holder["loss"] = s, m["loss"]
        return m["loss"]

    times = [t / args.steps for t in common.timed(chunk, args.repeats)]
    final_loss = float(jax.device_get(holder["loss"]))  # Same seed and steps: A/B comparable.
    sec = common.median(times)
    flops = common.flop_counts(model)
    peak = common.peak_tflops()
    if peak is not None:
        peak *= jax.device_count()  # MFU over all devices the step runs on.
    issue_tflops = 3 * flops["issue"] * batch / sec / 1e12
    actual_tflops = 3 * flops["actual"] * batch / sec / 1e12
    return {
        "model": name,
        "batch": batch,
        "img_per_s": batch / sec,
        "step_s": sec,
        "compile_s": compile_s,
        "peak_gib": common.peak_memory_gib(),
        "mfu": None if peak is None else issue_tflops / peak,
        "hw_flops_util": None if peak is None else actual_tflops / peak,
        "tflops": issue_tflops,
        **settings,
        "recipe": args.recipe,
        "scan_outputs": args.scan_outputs if swapped else "zeroed",
        "prng": args.prng,
        "mesh": args.mesh or "1,1",
        "devices": jax.device_count(),
        "steps_run": int(jax.device_get(holder["state"].step)),
        "final_loss": final_loss,
        "times_s": [round(t, 5) for t in times],
        **({"xla_options": args.xla_option} if args.xla_option else {}),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="xar_b,xar_l,xar_h")
    parser.add_argument("--batch", type=int, default=0, help="0 = B 256, L 128, H 64")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks (median reported)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--attention_impl", default="xla", choices=list(ATTENTION_IMPLS))
    parser.add_argument("--attn_dropout", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.1, help="after attention proj and MLP")
    parser.add_argument(
        "--dropout_impl",
        default="rng",
        choices=list(DROPOUT_IMPLS),
        help="dropout after proj and MLP: rng = nn.Dropout bits; hash = fused counter hash",
    )
    parser.add_argument("--remat", default="none", choices=list(xar_model.REMAT_POLICIES))
    parser.add_argument("--mlp_multiple", type=int, default=128)
    parser.add_argument("--unrolled", action="store_true", help="no layer scan")
    parser.add_argument(
        "--scan_unroll", type=int, default=1, help="blocks per layer-scan iteration"
    )
    parser.add_argument(
        "--mesh", default="", help="DATA,FSDP mesh over all devices (global batch = --batch)"
    )
    parser.add_argument(
        "--scan_outputs",
        default="uninitialised",
        choices=["uninitialised", "zeroed", "nan"],
        help="layer scans' stacked outputs: no zero fill (the trainer's), jax's zero fill, or a "
        "NaN fill (a check: a slot read before it is written shows as a NaN loss)",
    )
    common.add_xla_option_flag(parser)
    parser.add_argument("--tiny", action="store_true", help="shrink the network (CPU smoke test)")
    parser.add_argument(
        "--prng",
        default="threefry2x32",
        choices=["threefry2x32", "rbg", "unsafe_rbg"],
        help="PRNG behind dropout masks (rbg: far cheaper bits on GPU/TPU)",
    )
    parser.add_argument(
        "--recipe",
        default="flags",
        choices=["flags", *RECIPES],
        help="flags: as given; paper: the paper's recipe (attention dropout 0.1) on the 'auto' "
        "attention and hash dropout; fast: without attention dropout. Both override attention, "
        "dropout rates, dtype, dropout PRNG, layer scan and remat flags with per-model settings "
        "(paper also the dropout implementation)",
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON key (variants)")
    parser.add_argument("--no_json", action="store_true")
    args = parser.parse_args()
    common.xla_options(args.xla_option)  # A malformed --xla_option fails before any compile.
    names = args.models.split(",")
    prngs = {model_args(name, args).prng for name in names}
    if len(prngs) > 1:
        parser.error(f"one --prng per process; the models would need {sorted(prngs)}")
    jax.config.update("jax_default_prng_impl", prngs.pop())
    rows = []
    for name in names:
        rows.append(run_one(name, model_args(name, args)))
        common.print_table(rows[-1:], ["model", "img_per_s", "step_s", "compile_s", "mfu"])
    common.report(
        "train",
        rows,
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
            "prng",
            "scan_layers",
            "remat",
            "scan_outputs",
            "final_loss",
        ],
        args,
    )


if __name__ == "__main__":
    main()
