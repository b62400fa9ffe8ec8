"""The compile report's keys read from a compiled program's optimised HLO text.

`from_hlo` fills a report (`xar_jax.aot.compile_report`) with what the HLO text and the chip's
figures give: collective statistics (`xar_jax.hlo_stats`), the step-time estimate
(`xar_jax.hlo_cost`, `xar_jax.step_estimate`), the chip's figures (`xar_jax.tpu_topology`) and
whether the compiler's memory fits them. None of it changes the program, so the planner's cache
(`xar_jax.plan.ReportCache`) keeps the HLO text beside each report and runs `from_hlo` again on
every hit: an estimator fix reaches cached plans without a compile.
"""

from __future__ import annotations

import math
from typing import Any

from xar_jax import hlo_cost, hlo_stats, step_estimate
from xar_jax.model import PRESETS, mlp_hidden_width

ESTIMATE_KEYS = (
    "est_step_s",
    "est_step_s_serial",
    "est_compute_s",
    "est_memory_s",
    "est_compute_memory_s",
    "est_collective_s",
    "est_ici_s",
    "est_dcn_s",
    "est_overlap",
)
REPORT_KEYS = (
    "mesh",
    "compile_s",
    "fits",
    "error",
    "hbm_temporaries_needed_gib",
    "hbm_per_chip_gib",
    "collectives",
    "compiler_optimal_seconds",
    "compiler_optimal_seconds_raw",
    "flops_per_chip_as_compiled",
    "bytes_per_chip_as_compiled",
    "compiled_flops_per_chip",
    "compiled_bytes_per_chip",
    "model_flops_per_step",
    *ESTIMATE_KEYS,
    "est_img_per_s_per_chip",
    "est_mfu",
    "opaque_kernels",
    "estimate_basis",
)


def _depths(config) -> tuple[int, int]:
    m = config.model
    if m.preset:
        return PRESETS[m.preset].encoder_depth, PRESETS[m.preset].decoder_depth
    return m.encoder_depth, m.decoder_depth


def model_flops_per_example(config) -> float:
    """Training FLOPs of one example: 3 x (forward matmuls + attention), MLP padding excluded.

    Per token and block the forward does 2 x (4 D^2 + 3 D H) for qkv, projection and the gated
    MLP, and 4 T D for scores and values over the whole sequence (the block-causal mask is
    applied as a dense mask, so all of it is computed). adaLN runs per entity and is left out.
    """
    m = config.model
    d = PRESETS[m.preset].width if m.preset else m.width
    h = mlp_hidden_width(d)
    t = config.latent.grid_size**2
    depth = sum(_depths(config))
    return 3.0 * t * depth * (2.0 * (4 * d * d + 3 * d * h) + 4.0 * t * d)


def chip_figures(topo) -> dict[str, float]:
    """The report's figures of ``topo``'s chip (`xar_jax.tpu_topology`'s table)."""
    gen = topo.generation
    return {
        "hbm_capacity_gib": gen.hbm_gib,
        "peak_bf16_tflops": gen.peak_bf16_tflops,
        "hbm_gbps": gen.hbm_gbps,
        "ici_gbps": gen.ici_gbps,
        "dcn_gbits": gen.dcn_gbits,
    }


def from_hlo(record: dict[str, Any], text: str, config, topo, *, estimate: bool = True) -> dict:
    """``record`` with its HLO-derived keys (re)computed from the program's ``text``.

    Args:
      record: a report of a program that compiled (``mesh`` as compiled, ``hbm_per_chip_gib``
        from the compiler's memory analysis, ``what``, ``num_slices``, ``chips``).
      text: the optimised HLO (``compiled.as_text()``).
      config: the config compiled (`xar_jax.aot.prepare_config`-ed).
      topo: `tpu_topology.Topology` of one slice.
      estimate: False leaves the estimate's keys out (``--noestimate``).

    Returns:
      A new dict: the chip's figures, ``fits``, ``collectives`` and, with ``estimate``, every
      estimate key.
    """
    out = dict(record, **chip_figures(topo))
    hbm = out.get("hbm_per_chip_gib") or {}
    if "total" in hbm:
        out["fits"] = hbm["total"] <= out["hbm_capacity_gib"]
    out["collectives"] = hlo_stats.collectives(text)
    if not estimate:
        out["estimate_basis"] = "none: --noestimate"
        return out
    what, num_slices, gen = out["what"], out["num_slices"], topo.generation
    # The program's own devices: all chips for the train step, one host's for the sampler.
    devices = math.prod((out.get("mesh") or {"all": out["chips"]}).values())
    ops, notes = hlo_cost.module_ops(text, int(devices), num_slices if what == "train" else 1)
    est = step_estimate.estimate(
        ops,
        peak_tflops=gen.peak_bf16_tflops,
        hbm_gbps=gen.hbm_gbps,
        chips_per_slice=topo.chips,
        ici_gbps=gen.ici_gbps,
        dcn_gbits=gen.dcn_gbits,
        ici_links=gen.ici_links,
    )
    out.update(
        _estimate_keys(
            config, est, notes, what=what, chips=out["chips"], peak_tflops=gen.peak_bf16_tflops
        )
    )
    return out


def _estimate_keys(
    config, est: dict[str, Any], notes: dict[str, Any], *, what: str, chips: int, peak_tflops: float
) -> dict[str, Any]:
    """The report's estimate keys from a `step_estimate.estimate` of the compiled program."""
    if what == "train":
        examples = config.train.global_batch_size / chips
        model_flops = model_flops_per_example(config) * config.train.global_batch_size
    else:
        examples = config.sample.batch_size / chips
        model_flops = None
    out = {k: est[k] for k in ESTIMATE_KEYS}
    out.update(
        compiled_flops_per_chip=est["flops"],
        compiled_bytes_per_chip=est["bytes"],
        model_flops_per_step=model_flops,
        est_img_per_s_per_chip=examples / est["est_step_s"] if est["est_step_s"] else None,
        est_mfu=(
            model_flops / (chips * peak_tflops * 1e12 * est["est_step_s"])
            if model_flops and est["est_step_s"]
            else None
        ),
        opaque_kernels=notes["opaque_kernels"],
        estimate_basis=(
            "xar_jax.step_estimate on the optimised HLO: matmul FLOPs and HBM bytes per op "
            "(loops counted their trip count times), collectives from bytes and replica groups "
            "over ICI/DCN; "
            + est["est_overlap"]
            + (
                "; unknown loop trip counts (counted once): "
                + ", ".join(notes["unknown_trip_counts"])
                if notes["unknown_trip_counts"]
                else ""
            )
        ),
    )
    return out
