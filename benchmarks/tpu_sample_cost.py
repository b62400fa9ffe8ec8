"""The sampler compiled for a Cloud TPU slice on this machine (libtpu, no TPU): what the compiler
counts per chip, to compare two trees of the code.

The cost analysis counts each loop body once (the flow-step loop, the layer scan), so these are
not per-image figures: they compare programs of the same loop structure. ``optimal_ms`` is
libtpu's own ``optimal_seconds`` for the program (`xar_jax.tpu_compile.cost`), counted the same way.

  python -m benchmarks.tpu_sample_cost --config configs/xar_b.py --topology v5p-8 --per_chip_batch 16
"""

from __future__ import annotations

import argparse
import os

from benchmarks import common
from xar_jax import aot, tpu_compile, tpu_topology
from xar_jax.train_config import load_config_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/xar_b.py")
    parser.add_argument("--topology", default="v5p-8")
    parser.add_argument("--per_chip_batch", type=int, default=16)
    args = parser.parse_args()
    topo = tpu_topology.parse(args.topology)
    config = load_config_file(args.config)
    config = aot.prepare_config(
        config, topo, num_slices=None, per_chip_batch=args.per_chip_batch, what="sample"
    )
    compiled, _ = tpu_compile.compile_sample(config, tpu_compile.topology_devices(topo, 1))
    c = tpu_compile.cost(compiled)
    hbm = tpu_compile.hbm_per_chip(compiled)
    row = {
        "config": os.path.basename(args.config),
        "topology": args.topology,
        "per_chip_batch": args.per_chip_batch,
        "gflops": f"{c['flops'] / 1e9:.1f}",
        "gbytes": f"{c['bytes'] / 1e9:.3f}",
        "optimal_ms": f"{c['optimal_seconds'] * 1e3:.3f}",
        "hbm_total_gib": hbm["total"],
        "hbm_temporaries_gib": hbm["temporaries"],
    }
    common.print_table([row], list(row))


if __name__ == "__main__":
    main()
