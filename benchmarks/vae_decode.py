"""Throughput of KL-16 VAE decoding (and encoding) per compute dtype and batch size.

Prints one table row per (op, dtype, batch): seconds of the first call (compile + run),
steady-state images per second on all local devices (the batch is sharded over them), and the
relative L2 error against float32 (the first dtype listed).
Random weights unless ``--params DIR`` names a directory written by ``python -m xar_jax.convert
vae``; errors on random weights overstate what trained weights give.

  python -m benchmarks.vae_decode --config kl16 --batch 8 32 --dtype float32 bfloat16
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xar_jax import vae as vae_lib


def _timed(fn, iters: int) -> tuple[float, float, jax.Array]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - start) / iters, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="kl16", choices=sorted(vae_lib.VAE_CONFIGS))
    parser.add_argument("--params", default=None, help="converted VAE directory (optional)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument(
        "--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    parser.add_argument(
        "--ops", nargs="+", default=["decode", "encode"], choices=["decode", "encode"]
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    if args.params:
        from xar_jax.weights import load_vae

        base, params = load_vae(args.params)
    else:
        base = vae_lib.VAE(**vae_lib.vae_config(args.config))
        params = vae_lib.init_params(base, jax.random.key(0))
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    side = args.image_size // base.downsample_factor

    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; config {args.config}; "
        f"{args.image_size}x{args.image_size} images; {args.iters} timed iterations"
    )
    print(f"{'op':<7}{'dtype':<10}{'batch':>6}{'1st call s':>11}{'img/s':>10}{'rel err':>10}")
    for op in args.ops:
        for batch in args.batch:
            if batch % jax.device_count():
                raise SystemExit(f"--batch {batch} must be a multiple of the device count.")
            key = jax.random.key(batch)
            if op == "decode":
                x = jax.random.normal(key, (batch, side, side, base.embed_dim)) * 0.5
            else:
                size = args.image_size
                x = jax.random.uniform(key, (batch, size, size, 3), minval=-1, maxval=1)
            x = jax.device_put(x, batch_sharding)
            reference = None
            for name in args.dtype:
                model = base.clone(dtype=jnp.dtype(name))
                if op == "decode":
                    fn = lambda m=model, x=x: vae_lib.decode(params, x, model=m, clip=False)
                else:
                    fn = lambda m=model, x=x: vae_lib.encode(params, x, model=m)
                compile_s, step_s, out = _timed(fn, args.iters)
                out = np.asarray(out, np.float64)
                if reference is None:
                    reference = out
                err = np.linalg.norm(out - reference) / np.linalg.norm(reference)
                print(
                    f"{op:<7}{name:<10}{batch:>6}{compile_s:>11.1f}{batch / step_s:>10.1f}"
                    f"{err:>10.2e}"
                )


if __name__ == "__main__":
    main()
