"""One attention layer's forward + backward: cuDNN, XLA with dropout, the Pallas kernel with dropout.

  python -m benchmarks.attention_layer                  # xAR-B: B 256, N 256, 12 heads, d 64, bf16
  python -m benchmarks.attention_layer --batch 2 --tiny # CPU smoke test (interpreted kernels)

Times ``grad(sum(attention(q, k, v) * w))`` over q, k, v with the block-causal entity mask of the
16x16 grid in 8x8 cells. Each variant: compile, 3 warm-up calls, then the median over timed chunks
of ``--iters`` calls. Before timing, the Pallas kernel's output and gradients are checked against
the XLA form given the same keep mask, in float32 (relative L2). Merges rows into
docs/benchmarks.json under "attention_layer".
"""

from __future__ import annotations

import argparse
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks import common
from xar_jax import attention
from xar_jax import entities as ent
from xar_jax import flash_attention as fa

RATE = 0.1


def _xla(q, k, v, mask, key, rate):
    """The XLA path of layers.Attention (attention.attend): einsum, masked softmax, Bernoulli dropout (as nn.Dropout)."""

    def drop(p):
        if rate == 0:
            return p
        keep = jax.random.bernoulli(key, 1.0 - rate, p.shape)
        return jnp.where(keep, p / (1.0 - rate), 0.0)

    return attention.masked_softmax_attention(q, k, v, mask, q.shape[-1] ** -0.5, drop)


def _cudnn(q, k, v, mask, key, rate):
    del key, rate
    return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation="cudnn")


def _pallas(blocks):
    def attend(q, k, v, mask, key, rate):
        return fa.flash_attention(q, k, v, mask, key=key, rate=rate, block_sizes=blocks)

    return attend


def _fwd_bwd(attend, mask, rate):
    def loss(q, k, v, w, key):
        return jnp.sum(attend(q, k, v, mask, key, rate).astype(jnp.float32) * w)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _calls(compiled, args, key, n):
    """A chunk of ``n`` calls of ``compiled(*args, key_i)``, each with its own dropout key."""

    def chunk():
        out = None
        for i in range(n):
            out = compiled(*args, jax.random.fold_in(key, i))
        return out

    return chunk


def _rel_l2(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def check(blocks, q, k, v, w, mask, key, rate):
    """Relative L2 of the kernel's output and q/k/v gradients against the float32 XLA form."""
    keep = fa.attention_dropout_mask(key, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]), rate)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]

    def ref(q, k, v):
        return fa.reference_attention(q, k, v, mask, keep, rate)

    def fused(q, k, v):
        return fa.flash_attention(q, k, v, mask, key=key, rate=rate, block_sizes=blocks)

    def grads(fn, args):
        out, vjp = jax.vjp(fn, *args)
        return (out, *vjp(w.astype(out.dtype)))

    want = jax.jit(lambda *a: grads(ref, a))(*f32)
    got = jax.jit(lambda *a: grads(fused, a))(q, k, v)
    got32 = jax.jit(lambda *a: grads(fused, a))(*f32)
    return {
        "bf16_rel_l2": [round(_rel_l2(g, r), 5) for g, r in zip(got, want, strict=True)],
        "f32_rel_l2": [round(_rel_l2(g, r), 7) for g, r in zip(got32, want, strict=True)],
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20, help="calls per timed chunk")
    parser.add_argument("--repeats", type=int, default=5, help="timed chunks (median reported)")
    parser.add_argument("--prng", default="rbg", choices=["threefry2x32", "rbg", "unsafe_rbg"])
    parser.add_argument("--tiny", action="store_true", help="8x8 grid, cells of 4 (CPU smoke)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--no_json", action="store_true")
    args = parser.parse_args()
    jax.config.update("jax_default_prng_impl", args.prng)
    on_gpu = jax.default_backend() == "gpu"
    grid, cell = (8, 4) if args.tiny else (16, 8)
    mask = jnp.asarray(ent.make_layout("cell", grid, cell_size=cell).attention_mask)
    n = mask.shape[0]
    shape = (args.batch, n, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(x, shape, jnp.float32).astype(jnp.bfloat16) for x in keys[:3])
    w = jax.random.normal(keys[3], shape, jnp.float32)
    key = jax.random.key(1)

    small = fa.BlockSizes(16, 16, 16, 16)
    variants = [("xla", _xla, RATE, ""), ("pallas", _pallas(small), RATE, "tiles 16")]
    if on_gpu:
        variants = [
            ("cudnn", _cudnn, 0.0, ""),
            ("xla", _xla, RATE, ""),
            ("xla", _xla, 0.0, ""),
            ("pallas", _pallas(fa.BlockSizes()), 0.0, "tiles 64/64, 64/64"),
        ]
        for bq, bk, bqb, bkb, warps in [
            (64, 64, 64, 64, 4),
            (128, 64, 64, 64, 4),
            (128, 64, 64, 64, 8),
            (64, 64, 32, 32, 4),
            (128, 128, 64, 64, 8),
        ]:
            blocks = fa.BlockSizes(bq, bk, bqb, bkb, num_warps=warps)
            label = f"tiles {bq}/{bk}, {bqb}/{bkb}, {warps} warps"
            variants.append(("pallas", _pallas(blocks), RATE, label))
        # The first variants run on a card just woken up: time them again last (clock drift).
        variants += [(i, f, r, (lab + " again").strip()) for i, f, r, lab in variants[:4]]

    rows = []
    if not args.tiny or not on_gpu:
        blocks = fa.BlockSizes() if on_gpu else small
        try:
            errors = check(blocks, q, k, v, w, mask, key, RATE)
            print("pallas vs XLA form (same keep mask), rel L2 of [out, dq, dk, dv]:", errors)
            rows.append({"model": "check", **errors})
        except Exception:  # noqa: BLE001 - report every failure and go on timing the rest.
            traceback.print_exc()
    for impl, attend, rate, label in variants:
        name = f"{impl}{'_drop' if rate else ''}{'_' + label.replace(' ', '') if label else ''}"
        name = name.replace(",", "_").replace("/", "x")
        try:
            fn = _fwd_bwd(attend, mask, rate)
            start = time.perf_counter()
            compiled = fn.lower(q, k, v, w, key).compile()
            compile_s = time.perf_counter() - start
            for i in range(3):
                jax.block_until_ready(compiled(q, k, v, w, jax.random.fold_in(key, i)))
            chunk = _calls(compiled, (q, k, v, w), key, args.iters)
            ms = [t / args.iters * 1e3 for t in common.timed(chunk, args.repeats)]
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            print(f"{name}: FAILED")
            continue
        rows.append(
            {
                "model": name,
                "impl": impl,
                "attn_dropout": rate,
                "tiles": label,
                "ms": common.median(ms),
                "ms_all": [round(t, 4) for t in ms],
                "compile_s": compile_s,
                "shape": list(shape),
                "prng": args.prng,
            }
        )
        common.print_table(rows[-1:], ["model", "ms", "compile_s"])
    common.report("attention_layer", rows, ["model", "ms", "compile_s", "attn_dropout"], args)


if __name__ == "__main__":
    main()
