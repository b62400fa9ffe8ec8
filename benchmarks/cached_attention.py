"""Cached attention of one entity over the KV cache: the Pallas kernel reading layer l of the stacked
cache in place, against the slice + concatenation + cuDNN it replaces (and XLA's two-part form).

  python -m benchmarks.cached_attention          # xAR-B sampler: B 512, n 64, H 12, d 64, L 16,
                                                 # N 256, prefixes 192 and 64, bf16
  python -m benchmarks.cached_attention --block_k 32,64,128 --num_warps 4,8 --num_stages 2,3
  python -m benchmarks.cached_attention --heads 16 --head_dim 80 --layers 20   # xAR-H heads
  python -m benchmarks.cached_attention --tiny    # CPU smoke test (interpreted kernel)

Every variant runs the L layers inside one jitted ``lax.fori_loop`` whose index is the layer read
(traced, as in the sampler's layer scan, so the per-layer slice of the concatenating path is the
real one); each layer's output is the next layer's queries. Each variant: compile, 3 warm-up
calls, then the median over timed chunks of ``--iters`` calls, synchronised with
block_until_ready. Before timing, one layer of every variant is checked against a float32
reference, and the kernel against the concatenation (relative L2 < 2e-2, else FAILED). Block
sizes and launch settings are comma lists: every combination is timed. Merges rows into
docs/benchmarks.json under "cached_attention".
"""

from __future__ import annotations

import argparse
import itertools
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks import common
from xar_jax import attention
from xar_jax import cached_attention as ca

AGREEMENT = 2e-2  # Largest relative L2 between the kernel and the concatenating path.
TINY = dict(batch=2, entity=16, heads=2, head_dim=16, layers=3, tokens=64, prefix="48,16")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _concat(impl):
    """The sampler's path today: slice layer l's prefix, concatenate, jax.nn.dot_product_attention."""

    def attend(q, k, v, cache_k, cache_v, layer, prefix_len):
        ctx = attention.KVContext(cache_k, cache_v, layer, None, prefix_len)
        return attention.fused_cached_attention(q, k, v, ctx, impl)

    return attend


def _two_part(q, k, v, cache_k, cache_v, layer, prefix_len):
    """The 'xla' impl: einsums over the layer's prefix and the own keys, one joint softmax."""
    ctx = attention.KVContext(cache_k, cache_v, layer, None, prefix_len)
    return attention.two_part_attention(q, k, v, ctx, q.shape[-1] ** -0.5)


def _kernel(blocks):
    def attend(q, k, v, cache_k, cache_v, layer, prefix_len):
        return ca.cached_attention(q, k, v, cache_k, cache_v, layer, prefix_len, block_sizes=blocks)

    return attend


def _layer_loop(attend, depth, prefix_len):
    """``fn(q, k, v, cache_k, cache_v)``: the L layers in a fori_loop, output -> next queries."""

    def run(q, k, v, cache_k, cache_v):
        body = lambda layer, x: attend(x, k, v, cache_k, cache_v, layer, prefix_len)
        return jax.lax.fori_loop(0, depth, body, q)

    return jax.jit(run)


def _rel_l2(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=512, help="incl. the CFG half")
    parser.add_argument("--entity", type=int, default=64, help="tokens per entity (n)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=16, help="L of the stacked cache")
    parser.add_argument("--tokens", type=int, default=256, help="N of the stacked cache")
    parser.add_argument("--prefix", default="192,64", help="visible cache prefixes to time")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--block_q", default="64", help="comma list (capped at the entity size)")
    parser.add_argument("--block_k", default="64", help="comma list (capped at the entity size)")
    parser.add_argument("--num_warps", default="4", help="comma list")
    parser.add_argument("--num_stages", default="2", help="comma list")
    parser.add_argument("--iters", type=int, default=20, help="calls per timed chunk")
    parser.add_argument("--repeats", type=int, default=5, help="timed chunks (median reported)")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--tag", default="", help="suffix of the JSON key (variants)")
    parser.add_argument("--no_json", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype)
    b, n, h, d, depth, tokens = (
        args.batch, args.entity, args.heads, args.head_dim, args.layers, args.tokens
    )  # fmt: skip
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(x, (b, n, h, d), jnp.float32).astype(dtype) for x in keys[:3])
    cache_k, cache_v = (
        jax.random.normal(x, (depth, b, tokens, h, d), jnp.float32).astype(dtype) for x in keys[3:]
    )
    operands = (q, k, v, cache_k, cache_v)

    concat_impl = "cudnn" if on_gpu else None
    variants = [
        (f"concat_{concat_impl or 'xla'}", _concat(concat_impl), ""),
        ("two_part_xla", _two_part, ""),
    ]
    sweep = itertools.product(
        *map(_ints, (args.block_q, args.block_k, args.num_warps, args.num_stages))
    )
    for bq, bk, warps, stages in sweep:
        blocks = ca.BlockSizes(bq, bk, num_warps=warps, num_stages=stages)
        variants.append(("pallas", _kernel(blocks), f"q{bq}_k{bk}_w{warps}_s{stages}"))

    rows = []
    last = depth - 1  # The layer every variant is checked on.
    f32_layer = [x.astype(jnp.float32) for x in (q, k, v, cache_k[last:], cache_v[last:])]
    for prefix_len in _ints(args.prefix):
        want = ca.reference(*f32_layer, 0, prefix_len)
        read_gb = 2 * b * (prefix_len + n) * h * d * dtype.itemsize / 1e9  # K+V bytes per layer.
        concat = base_ms = None
        for name, attend, label in variants:
            model = f"{name}{'_' + label if label else ''}_p{prefix_len}"
            try:
                got = jax.jit(lambda *a, f=attend, p=prefix_len: f(*a, last, p))(*operands)
                concat = got if name.startswith("concat") else concat
                ref_err = _rel_l2(got, want)
                agree = float("nan") if concat is None else _rel_l2(got, concat)
                bad = name == "pallas" and not agree < AGREEMENT
                print(
                    f"{model}: rel L2 vs f32 reference {ref_err:.2e}, vs concat {agree:.2e}"
                    + (" FAILED" if bad else "")
                )
                fn = _layer_loop(attend, depth, prefix_len)
                start = time.perf_counter()
                compiled = fn.lower(*operands).compile()
                compile_s = time.perf_counter() - start
                for _ in range(3):
                    jax.block_until_ready(compiled(*operands))

                def chunk(compiled=compiled):
                    out = None
                    for _ in range(args.iters):
                        out = compiled(*operands)
                    return out

                ms = [t / args.iters * 1e3 for t in common.timed(chunk, args.repeats)]
            except Exception:  # noqa: BLE001 - report every failure and go on timing the rest.
                traceback.print_exc()
                print(f"{model}: FAILED")
                continue
            per_layer = common.median(ms) / depth
            if name.startswith("concat"):
                base_ms = per_layer
            rows.append(
                {
                    "model": model,
                    "prefix": prefix_len,
                    "tiles": label,
                    "ms_per_layer": per_layer,
                    "speedup": None if base_ms is None else base_ms / per_layer,
                    "kv_gb_per_s": read_gb / (per_layer / 1e3),
                    "rel_l2_ref": ref_err,
                    "rel_l2_concat": agree,
                    "ms_all": [round(t, 4) for t in ms],
                    "compile_s": compile_s,
                    "shape": [b, n, h, d, depth, tokens],
                    "dtype": args.dtype,
                }
            )
            common.print_table(rows[-1:], ["model", "ms_per_layer", "speedup", "kv_gb_per_s"])
    columns = ["model", "ms_per_layer", "speedup", "kv_gb_per_s", "rel_l2_concat", "compile_s"]
    common.report("cached_attention", rows, columns, args)


if __name__ == "__main__":
    main()
