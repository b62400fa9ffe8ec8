"""The paper-recipe train step compiled for an H200 on a machine without a GPU; its HLO, read.

XLA's GPU compiler runs without a device when given the device's description (a
``GpuTargetConfig``), so layouts, fusions and buffers of the H200 program can be studied on a
laptop CPU at no device time. That is how issue 16's two fixes were found (docs/benchmarks.md):
the batch-minor layout of train B and the zero fill of the scans' stacked outputs. Autotuning
is skipped without a device, so GEMM choices (and so timings) are not the device's.

Setup, once, in its own environment (the CPU test suite should never load a CUDA plugin):

  python -m venv --system-site-packages ~/venv_gpu
  JAX_VERSION=$(python -c 'import jax; print(jax.__version__)')
  ~/venv_gpu/bin/pip install "jax-cuda12-plugin[with-cuda]==$JAX_VERSION"

Run (the constraints check would look for a CUDA driver):

  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 ~/venv_gpu/bin/python benchmarks/gpu_compile_only.py \
      --models xar_b,xar_l --hlo_dir /tmp/hlo

Prints, per model, the compile time and `xar_jax.hlo_stats.entry_traffic` of the program:
bytes written by its top-level ops, transposes, zero fills, uninitialised buffers and
batch-minor arrays; and the step-time estimate the TPU tool uses (`xar_jax.step_estimate`) with
the H200's figures (`xar_jax.tpu_topology.H200`: datasheet; `H200_MEASURED`: the ceilings
measured on this project's H200), against the measured rate of the same recipe
(`MEASURED`, rows of docs/benchmarks.json): the estimator's check on real hardware.

``--from_hlo DIR`` reads the programs a run with ``--hlo_dir DIR`` wrote instead of compiling
(seconds; no CUDA plugin needed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")  # Never touch a GPU, even where one exists.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from xar_jax import hlo_cost, step_estimate, tpu_topology  # noqa: E402

# An H200 (sm_90, 132 SMs, 141 GB HBM3e) as XLA's GpuTargetConfig text proto.
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 150000000000
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H200"
"""


# Measured img/s of the paper recipe on one H200 (benchmarks/train_step.py --recipe paper;
# docs/benchmarks.json "train" rows), at the batches below.
MEASURED = {
    "xar_b": (1886.8, "xar_b_base_r4c17"),
    "xar_l": (517.8, "xar_l_base_r4c15"),
    "xar_h": (271.2, "xar_h_dsf_r4c15"),
}


def estimate_rows(name: str, text: str, batch: int) -> dict:
    """The step-time estimate of one compiled train step with the H200's figures."""
    ops, notes = hlo_cost.module_ops(text, num_devices=1)
    row = {}
    for tag, gpu in (("sheet", tpu_topology.H200), ("ceil", tpu_topology.H200_MEASURED)):
        est = step_estimate.estimate(ops, peak_tflops=gpu.peak_bf16_tflops,
                                     hbm_gbps=gpu.hbm_gbps)
        row[f"est_ms_{tag}"] = round(est["est_step_s"] * 1e3, 1)
        row[f"est_img_s_{tag}"] = round(batch / est["est_step_s"], 1)
    row["compute_ms_ceil"] = round(est["est_compute_s"] * 1e3, 1)
    row["memory_ms_ceil"] = round(est["est_memory_s"] * 1e3, 1)
    row["opaque_kernels"] = notes["opaque_kernels"]
    measured, tag = MEASURED.get(name, (None, ""))
    if measured:
        row["measured_img_s"] = measured
        row["measured_row"] = tag
        for t in ("sheet", "ceil"):
            row[f"pred/meas_{t}"] = round(row[f"est_img_s_{t}"] / measured, 3)
    return row


def h200_device():
    """A compile-only H200 (needs jax's CUDA plugin; no GPU or driver)."""
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=H200_TARGET, topology="1x1x1"
    )
    return topology.devices[0]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="xar_b,xar_l,xar_h")
    parser.add_argument("--batch", type=int, default=0, help="0 = B 256, L 128, H 64")
    parser.add_argument(
        "--scan_outputs", default="uninitialised", choices=["uninitialised", "zeroed"]
    )
    parser.add_argument("--hlo_dir", default="", help="write each optimised HLO here")
    parser.add_argument("--from_hlo", default="",
                        help="estimate from the HLO a run with --hlo_dir wrote; no compile")
    from benchmarks import common

    common.add_xla_option_flag(parser)
    args = parser.parse_args()
    common.xla_options(args.xla_option)  # A malformed --xla_option fails before any compile.
    if args.from_hlo:
        from benchmarks.train_step import DEFAULT_BATCH

        for name in args.models.split(","):
            with open(os.path.join(args.from_hlo, f"{name}_train_step.hlo.txt")) as f:
                text = f.read()
            batch = args.batch or DEFAULT_BATCH[name]
            row = {"model": name, "batch": batch, **estimate_rows(name, text, batch)}
            common.print_table([row], list(row))
        return

    device = h200_device()
    # The model picks its kernels (and Pallas its interpret mode) from the default backend,
    # which is the CPU here; the program is compiled for the GPU.
    jax.default_backend = lambda: "gpu"
    jax.config.update("jax_default_prng_impl", "rbg")

    from benchmarks.train_step import DEFAULT_BATCH, PAPER_LAYERS, paper_optimizer_and_step
    from xar_jax import hlo_stats, scan_buffers
    from xar_jax import train_state as ts

    sharding = jax.sharding.SingleDeviceSharding(device)
    on_device = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree
    )
    rows = []
    for name in args.models.split(","):
        layers = PAPER_LAYERS[name]
        model = common.build(
            name, attention_impl="pallas", attn_dropout=0.1, dropout=0.1, dropout_impl="hash",
            dtype=jnp.bfloat16, scan_layers=not layers["unrolled"], remat=layers["remat"],
        )
        optimizer, step = paper_optimizer_and_step(model)
        init = lambda m=model, o=optimizer: ts.create_train_state(m, o, seed=0)  # noqa: E731
        state = jax.eval_shape(init)
        batch = args.batch or DEFAULT_BATCH[name]
        data = {"latents": jax.ShapeDtypeStruct((batch, 16, 16, 16), jnp.float32),
                "labels": jax.ShapeDtypeStruct((batch,), jnp.int32)}
        start = time.perf_counter()
        with scan_buffers.uninitialised_scan_outputs(args.scan_outputs == "uninitialised"):
            lowered = jax.jit(step, donate_argnums=0).lower(on_device(state), on_device(data))
        text = lowered.compile(common.xla_options(args.xla_option)).as_text()
        seconds = time.perf_counter() - start
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with open(os.path.join(args.hlo_dir, f"{name}_train_step.hlo.txt"), "w") as f:
                f.write(text)
        rows.append({"model": name, "batch": batch, "compile_s": seconds,
                     "scan_outputs": args.scan_outputs,
                     **hlo_stats.entry_traffic(text, batch), **estimate_rows(name, text, batch)})
        common.print_table(rows[-1:], list(rows[-1]))


if __name__ == "__main__":
    main()
