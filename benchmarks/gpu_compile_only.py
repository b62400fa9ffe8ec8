"""The paper configs' train step compiled for an H200 on a machine without a GPU; its HLO, read.

XLA's GPU compiler runs without a device when given the device's description (a
``GpuTargetConfig``), so the layouts, fusions and buffers of the H200 program can be studied on a
CPU-only machine at no device time, and the step-time estimator (`xar_jax.step_estimate`, the
one ``python -m xar_jax.aot`` uses for TPUs) can be checked against the rates measured on a real
H200. Autotuning is skipped without a device, so GEMM choices (and so timings) are not the
device's.

What is compiled is the trainer's step (`xar_jax.train.jit_train_step`, lowered by
`train.lower_train_step`) for ``configs/<model>.py``, built through `xar_jax.experiment.build` on
the compile-only H200, so the config's 'auto' fields resolve as on a GPU (B unrolled without
remat, L scanned with remat 'dots', H scanned with remat 'matmuls'; the Pallas attention with
the paper's dropout). The batch is ``--batch`` or B 256, L 128, H 64.

Setup, once, in its own environment (the CPU test suite should never load a CUDA plugin):

  python -m venv --system-site-packages ~/venv_gpu
  JAX_VERSION=$(python -c 'import jax; print(jax.__version__)')
  ~/venv_gpu/bin/pip install "jax-cuda12-plugin[with-cuda]==$JAX_VERSION"

Run from the repository root (the constraints check would look for a CUDA driver):

  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 ~/venv_gpu/bin/python -m benchmarks.gpu_compile_only \\
      --models xar_b,xar_l --hlo_dir /tmp/hlo
  python -m benchmarks.gpu_compile_only --models xar_b,xar_l --from_hlo /tmp/hlo

Prints, per model, the compile time and `xar_jax.hlo_stats.entry_traffic` of the program:
bytes written by its top-level ops, transposes, zero fills, uninitialised buffers and
batch-minor arrays; and the step-time estimate with the H200's figures
(`xar_jax.tpu_topology.H200`: datasheet; `H200_MEASURED`: the ceilings measured on this
project's H200), against the measured rate of the same recipe (`MEASURED`, rows of
docs/benchmarks.json): the estimator's check on real hardware.

``--from_hlo DIR`` reads the programs a run with ``--hlo_dir DIR`` wrote instead of compiling
(seconds; no CUDA plugin needed), or a device run's dumps ``DIR/hlo_<b|l|h>.txt.gz``; with
``--profile DIR`` also the kernel profiles of the same programs (``prof_<b|l|h>.json``,
`benchmarks.profile_kernels` ``--json``) against the estimate per kernel class: GEMMs, the
flash-attention kernels, reductions, the other fusions.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")  # Never touch a GPU, even where one exists.

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from benchmarks import common  # noqa: E402
from xar_jax import hlo_cost, step_estimate, tpu_topology, train_config  # noqa: E402

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


# Measured img/s of the configs' defaults on one H200 (docs/benchmarks.json "train" rows, named
# here), at the batches of DEFAULT_BATCH.
MEASURED = {
    "xar_b": (1869.4, "xar_b_defaults"),
    "xar_l": (505.7, "xar_l_defaults"),
    "xar_h": (265.3, "xar_h_defaults"),
}


def tile_fraction(name: str) -> float:
    """The fraction of attention tiles the flash kernels compute for ``configs/<name>.py``'s
    entity mask (they skip fully masked ones)."""
    from xar_jax import entities, flash_attention

    cfg = paper_config(name, DEFAULT_BATCH.get(name, 256))
    layout = entities.layout_from_config(cfg.entity, cfg.latent.grid_size)
    return flash_attention.computed_tile_fraction(np.asarray(layout.attention_mask))


def estimate(ops, gpu) -> dict:
    """`step_estimate.estimate` with one GPU's figures."""
    return step_estimate.estimate(
        ops,
        peak_tflops=gpu.peak_bf16_tflops,
        hbm_gbps=gpu.hbm_gbps,
        sm_count=gpu.sm_count,
        sm_clock_ghz=gpu.sm_clock_ghz,
    )


def estimate_rows(name: str, text: str, batch: int, measured: tuple | None = None) -> dict:
    """The step-time estimate of one compiled train step with the H200's figures, against
    ``measured`` (img/s, where it comes from; default: `MEASURED`'s row of the model)."""
    fraction = tile_fraction(name) if os.path.exists(os.path.join(CONFIG_DIR, f"{name}.py")) else 1
    ops, notes = hlo_cost.module_ops(text, num_devices=1, flash_tile_fraction=fraction)
    row = {}
    for tag, gpu in (("sheet", tpu_topology.H200), ("ceil", tpu_topology.H200_MEASURED)):
        est = estimate(ops, gpu)
        row[f"est_ms_{tag}"] = round(est["est_step_s"] * 1e3, 1)
        row[f"est_img_s_{tag}"] = round(batch / est["est_step_s"], 1)
    row["compute_ms_ceil"] = round(est["est_compute_s"] * 1e3, 1)
    row["memory_ms_ceil"] = round(est["est_memory_s"] * 1e3, 1)
    row["element_work_ms"] = round(est["est_element_work_s"] * 1e3, 1)
    row["launch_ms"] = round(est["est_launch_s"] * 1e3, 1)
    row["opaque_kernels"] = notes["opaque_kernels"]
    measured, tag = measured or MEASURED.get(name, (None, ""))
    if measured:
        row["measured_img_s"] = measured
        row["measured_row"] = tag
        for t in ("sheet", "ceil"):
            row[f"pred/meas_{t}"] = round(row[f"est_img_s_{t}"] / measured, 3)
    return row


def kernel_class(name: str, flash: bool = False, flops: float = 0.0) -> str:
    """'attention' (the flash kernels), 'gemm', 'reduction' or 'other', of an HLO op (its name,
    whether it is a flash kernel, its FLOPs) or of a profiled kernel (its name alone)."""
    if flash or name.startswith("flash_attention"):
        return "attention"
    if flops or any(k in name for k in ("nvjet", "gemm", "cublas", "cutlass", "xmma")):
        return "gemm"
    return "reduction" if "reduce" in name else "other"


def class_rows(name: str, text: str, profile: dict) -> list[dict]:
    """Predicted (measured ceilings) against profiled milliseconds per step, by kernel class."""
    ops, _ = hlo_cost.module_ops(text, num_devices=1, flash_tile_fraction=tile_fraction(name))
    gpu = tpu_topology.H200_MEASURED
    predicted: dict[str, float] = {}
    for o in ops:
        if o.collective:
            continue
        k = kernel_class(o.name, bool(o.kernel), o.flops)
        predicted[k] = predicted.get(k, 0.0) + estimate([o], gpu)["est_step_s"] * 1e3
    measured: dict[str, float] = {}
    for kernel in profile["kernels"]:
        k = kernel_class(kernel["name"])
        measured[k] = measured.get(k, 0.0) + kernel["ms_per_call"]
    rows = []
    for k in ("gemm", "attention", "reduction", "other"):
        p, m = predicted.get(k, 0.0), measured.get(k, 0.0)
        rows.append(
            {
                "model": name,
                "class": k,
                "pred_ms": round(p, 1),
                "meas_ms": round(m, 1),
                "pred/meas": round(p / m, 2) if m else None,
            }
        )
    return rows


def read_hlo(directory: str, name: str, tag: str = "") -> str:
    """``DIR/<name>_train_step.hlo.txt`` (written by --hlo_dir) or ``DIR/hlo_<b|l|h><tag>.txt.gz``
    (a device run's dump)."""
    path = os.path.join(directory, f"{name}_train_step.hlo.txt")
    if os.path.exists(path) and not tag:
        with open(path) as f:
            return f.read()
    short = name.removeprefix("xar_")
    with gzip.open(os.path.join(directory, f"hlo_{short}{tag}.txt.gz"), "rt") as f:
        return f.read()


def h200_device():
    """A compile-only H200 (needs jax's CUDA plugin; no GPU or driver)."""
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=H200_TARGET, topology="1x1x1"
    )
    return topology.devices[0]


# The batch of each paper config's measured rate (MEASURED) on one H200.
DEFAULT_BATCH = {"xar_b": 256, "xar_l": 128, "xar_h": 64}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def paper_config(name: str, batch: int):
    """``configs/<name>.py`` at ``batch``, with a placeholder latent cache (never read)."""
    config = train_config.load_config_file(os.path.join(CONFIG_DIR, f"{name}.py"))
    config.train.global_batch_size = batch
    if config.data.source == "latents" and not config.data.cache_dir:
        config.data.cache_dir = "/gpu-compile-only/reads-no-data"
    return config


def compile_train_step(config, device, scan_outputs: str, options):
    """``(optimised HLO text, experiment)`` of the trainer's step for ``config`` on ``device``."""
    from xar_jax import experiment, train

    exp = experiment.build(config, "train", devices=[device])
    setup = experiment.training_setup(exp)
    jitted = train.jit_train_step(exp, setup)
    batch = train.train_batch_spec(exp.config, exp.mesh)
    with jax.set_mesh(exp.mesh), exp.rules_context():
        if scan_outputs == "uninitialised":
            lowered = train.lower_train_step(jitted, setup.abstract_state, batch)
        else:  # jax's zero fill of the scans' stacked outputs, for comparison.
            lowered = jitted.lower(setup.abstract_state, batch)
        return lowered.compile(options).as_text(), exp


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default="xar_b,xar_l,xar_h", help="comma-separated configs/<model>.py names"
    )
    parser.add_argument("--batch", type=int, default=0, help="0 = B 256, L 128, H 64")
    parser.add_argument(
        "--scan_outputs", default="uninitialised", choices=["uninitialised", "zeroed"]
    )
    parser.add_argument("--hlo_dir", default="", help="write each optimised HLO here")
    parser.add_argument(
        "--from_hlo",
        default="",
        help="estimate from the HLO a run with --hlo_dir wrote; no compile",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="with --from_hlo: a folder of prof_<b|l|h>.json (benchmarks.profile_kernels --json "
        "of the same programs on the H200): predicted against measured time per kernel class",
    )
    parser.add_argument(
        "--tag",
        default="",
        help="with --from_hlo: read hlo_<b|l|h><tag>.txt.gz and prof_<b|l|h><tag>.json (a "
        "benchmarks/gpu_profile.sh run with TAG and OVERRIDES) and compare with the wall time "
        "per step that profile measured, at its batch",
    )
    common.add_xla_option_flag(parser)
    args = parser.parse_args()
    options = common.xla_options(args.xla_option)  # A malformed one fails before any compile.
    names = args.models.split(",")
    for name in names:
        if not os.path.exists(os.path.join(CONFIG_DIR, f"{name}.py")):
            parser.error(f"--models: no config {name!r} in configs/")
    if args.from_hlo:
        for name in names:
            text = read_hlo(args.from_hlo, name, args.tag)
            path = os.path.join(args.profile, f"prof_{name.removeprefix('xar_')}{args.tag}.json")
            profile = None
            if args.profile and os.path.exists(path):
                with open(path) as f:
                    profile = json.load(f)
            batch = args.batch or DEFAULT_BATCH.get(name, 0)
            measured = None
            if args.tag:
                if not profile or "wall_ms_per_call" not in profile:
                    parser.error(f"--tag: {path} with a wall time per call is needed")
                batch = profile["batch"]
                wall_img_s = batch / (profile["wall_ms_per_call"] / 1e3)
                measured = (round(wall_img_s, 1), f"wall time of prof_*{args.tag}.json")
            row = {"model": name + args.tag, "batch": batch}
            row.update(estimate_rows(name, text, batch, measured))
            common.print_table([row], list(row))
            if profile:
                rows = class_rows(name, text, profile)
                common.print_table(rows, list(rows[0]))
        return

    device = h200_device()
    # Pallas picks its interpret mode from the default backend, which is the CPU here; the
    # program is compiled for the GPU.
    jax.default_backend = lambda: "gpu"

    from xar_jax import hlo_stats

    rows = []
    for name in names:
        batch = args.batch or DEFAULT_BATCH.get(name, 256)
        start = time.perf_counter()
        text, exp = compile_train_step(
            paper_config(name, batch), device, args.scan_outputs, options
        )
        seconds = time.perf_counter() - start
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with open(os.path.join(args.hlo_dir, f"{name}_train_step.hlo.txt"), "w") as f:
                f.write(text)
        m = exp.config.model
        rows.append(
            {
                "model": name,
                "batch": batch,
                "compile_s": seconds,
                "scan_layers": m.scan_layers,
                "remat": m.remat,
                "attention_impl": exp.settings.attention_impl,
                "scan_outputs": args.scan_outputs,
                **hlo_stats.entry_traffic(text, batch),
                **estimate_rows(name, text, batch),
            }
        )
        common.print_table(rows[-1:], list(rows[-1]))


if __name__ == "__main__":
    main()
