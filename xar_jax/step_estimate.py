"""Per-chip step time of a compiled program, from its optimised HLO and the chip's figures.

The model (pure functions of `xar_jax.hlo_cost.module_ops` and a chip's figures in
`xar_jax.tpu_topology`):

* **Compute and memory, per op.** Each op outside fusion bodies (a fusion, a custom call, a
  copy, ...) runs in ``max(flops / peak, hbm_bytes / hbm_bandwidth)``: an op is either bound by
  the matrix units or by HBM, and XLA runs one op (kernel) at a time. The sum over the step's
  ops, with loop bodies counted their trip count times, is ``est_compute_memory_s``. FLOPs are
  matrix products only; bytes are counted as the hardware moves them (`xar_jax.hlo_cost`:
  slices of stacked buffers, in-place updates, VMEM prefetches). ``est_compute_s`` and
  ``est_memory_s`` are the two sums taken apart (the whole-step roofline's terms).
* **Element work and launches of GPU kernels** (only given a GPU's SM count and clock;
  `xar_jax.gpu_kernel_time`): this package's flash-attention kernels also spend time per score
  element on the CUDA cores and special-function units (softmax, dropout hash, conversions),
  which adds to their matmul time: ``max(flops / peak + element work, bytes / bandwidth)``.
  XLA's element-wise (loop) fusions do their element-wise ops (dropout hashes, ``erf``,
  conversions) while they stream their bytes: ``max(bytes / bandwidth, element work)``. XLA's
  reduction kernels do them in turn with the loads: ``bytes / bandwidth + element work`` (each
  thread folds its inputs into one accumulator, so its loads wait on its arithmetic; the H200
  profile in docs/tpu.md shows both behaviours). ``est_element_work_s`` sums both kinds of
  element work. Every kernel also costs a launch (``est_launch_s``: 1 us each).
  TPU programs are estimated without these terms: the vector units' per-op rates and a TPU
  core's per-op overhead are not public, so a TPU op's element-wise work is taken to hide under
  its bytes.
* **Collectives**, per op, from the bytes on one chip and its replica group of ``n`` chips, as
  ring algorithms move them: all-gather ``B (n-1)/n`` (B: the gathered result), reduce-scatter
  ``B (n-1)`` (B: the shard), all-reduce ``2 B (n-1)/n``, all-to-all ``B (n-1)/n``,
  collective-permute ``B``. Inside a slice they run at the chip's ICI bandwidth in one direction
  (half the bidirectional figure: all links of the chip busy, as on a torus when the group
  spans the slice); a collective-permute sends to one neighbour, over one link (the chip's
  one-way bandwidth / its ICI ports: XLA's collective matmuls are loops of these). A group whose chips lie in ``s > 1`` slices (device ids slice-major) sends
  its cross-slice share, the same ring formula over ``s`` members for ``B s / n`` bytes, over the
  data-centre network at the chip's DCN rate. Per-op latency is not modelled.
* **Overlap.** XLA issues collectives asynchronously and schedules them under compute (the
  latency-hiding scheduler), so the total is ``est_step_s = max(est_compute_memory_s,
  est_collective_s)``; ``est_step_s_serial`` = their sum is the bound if nothing overlapped.

`estimate` returns all of these for one program. Loops (the layer scan, gradient accumulation's
microbatches, the sampler's flow steps and entities) are in the ops' execution counts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from xar_jax import gpu_kernel_time
from xar_jax.hlo_cost import Op

OVERLAP = (
    "max(compute+memory per op, collectives): collectives overlap compute and HBM "
    "traffic; est_step_s_serial = their sum"
)


def collective_seconds(
    kind: str,
    result_bytes: float,
    group: Iterable[int],
    *,
    chips_per_slice: int,
    ici_gbps: float,
    dcn_gbits: float,
    ici_links: int = 1,
) -> tuple[float, float]:
    """``(ici_s, dcn_s)`` of one collective (see the module docstring)."""
    group = list(group)
    n = max(len(group), 1)
    if n == 1 or result_bytes <= 0:
        return 0.0, 0.0
    slices = len({d // max(chips_per_slice, 1) for d in group})

    def ring(members: int, b: float) -> float:
        return ring_bytes(kind, members, b)

    if kind == "collective-permute":
        crosses = slices > 1
        return (
            (0.0, b_over(result_bytes, dcn_gbits))
            if crosses
            else (result_bytes / (ici_gbps / 2 / max(ici_links, 1) * 1e9), 0.0)
        )
    per_slice = n // slices
    # Reduce-scatter's B is the shard: the data per chip in the ring over a slice's members is
    # the shard times the cross-slice members (the other slices' shards still to reduce).
    ici_b = result_bytes * slices if kind == "reduce-scatter" else result_bytes
    ici = ring(per_slice, ici_b) / (ici_gbps / 2 * 1e9)
    dcn = 0.0
    if slices > 1:
        dcn_b = result_bytes if kind == "reduce-scatter" else result_bytes * slices / n
        dcn = b_over(ring(slices, dcn_b), dcn_gbits)
    return ici, dcn


def ring_bytes(kind: str, members: int, b: float) -> float:
    """Bytes one chip sends in a ring ``kind`` over ``members`` chips, ``b`` its result bytes."""
    if members <= 1:
        return 0.0
    return {
        "all-gather": b * (members - 1) / members,
        "reduce-scatter": b * (members - 1),
        "all-reduce": 2 * b * (members - 1) / members,
        "all-to-all": b * (members - 1) / members,
        "collective-permute": b,
    }[kind]


def b_over(nbytes: float, gbits: float) -> float:
    return nbytes / (gbits / 8 * 1e9)


def estimate(
    ops: list[Op],
    *,
    peak_tflops: float,
    hbm_gbps: float,
    chips_per_slice: int = 1,
    ici_gbps: float = 0.0,
    dcn_gbits: float = 0.0,
    ici_links: int = 1,
    sm_count: int = 0,
    sm_clock_ghz: float = 0.0,
) -> dict[str, Any]:
    """The step's parts and total (seconds), FLOPs and HBM bytes, per chip.

    ``sm_count`` and ``sm_clock_ghz`` (a GPU's) turn on the kernels' element work and launches;
    0 leaves them out (TPU)."""
    peak, bw = peak_tflops * 1e12, hbm_gbps * 1e9
    flops = hbm = compute = memory = per_op = ici = dcn = elements = launches = 0.0
    launch_s = gpu_kernel_time.KERNEL_LAUNCH_S if sm_count else 0.0
    for o in ops:
        if o.collective:
            hbm += o.bytes * o.times
            if o.slices > 1:  # Between slices: a ring over the slices on the DCN.
                i, d = 0.0, b_over(ring_bytes(o.collective, o.slices, o.result_bytes), dcn_gbits)
            else:
                i, d = collective_seconds(
                    o.collective,
                    o.result_bytes,
                    o.group,
                    chips_per_slice=chips_per_slice,
                    ici_gbps=ici_gbps,
                    dcn_gbits=dcn_gbits,
                    ici_links=ici_links,
                )
            ici += i * o.times
            dcn += d * o.times
            continue
        flops += o.flops * o.times
        hbm += o.bytes * o.times
        c, m = o.flops / peak, o.bytes / bw
        e = gpu_kernel_time.element_seconds(
            o.kernel, o.elements, sm_count=sm_count, sm_clock_ghz=sm_clock_ghz
        )
        f = gpu_kernel_time.fusion_seconds(
            o.element_ops, sm_count=sm_count, sm_clock_ghz=sm_clock_ghz
        )
        compute += c * o.times
        memory += m * o.times
        elements += (e + f) * o.times
        launches += launch_s * o.times
        busy = max(c + e, m + f) if o.reduction else max(c + e, m, f)
        per_op += (busy + launch_s) * o.times
    collective = ici + dcn
    return {
        "flops": flops,
        "bytes": hbm,
        "est_compute_s": compute,
        "est_memory_s": memory,
        "est_element_work_s": elements,
        "est_launch_s": launches,
        "est_compute_memory_s": per_op,
        "est_ici_s": ici,
        "est_dcn_s": dcn,
        "est_collective_s": collective,
        "est_step_s": max(per_op, collective),
        "est_step_s_serial": per_op + collective,
        "est_overlap": OVERLAP,
    }


def rates(
    est: dict[str, Any],
    *,
    examples_per_chip: float,
    model_flops_per_step: float,
    chips: int,
    peak_tflops: float,
) -> dict[str, float | None]:
    """Images per second per chip and MFU of an estimate."""
    step = est.get("est_step_s")
    if not step or not math.isfinite(step):
        return {"est_img_per_s_per_chip": None, "est_mfu": None}
    return {
        "est_img_per_s_per_chip": examples_per_chip / step,
        "est_mfu": model_flops_per_step / (chips * peak_tflops * 1e12 * step),
    }


# ----------------------------------------------------------------------------------------------
# Where the time goes: the per-op terms grouped by what the ops came from.
_PARTS = (
    ("attention qkv", re.compile(r"/attn/qkv/")),
    ("attention proj", re.compile(r"/attn/(proj|proj_drop)/")),
    ("attention core", re.compile(r"/attn/")),
    ("mlp", re.compile(r"/mlp/")),
    ("block (norms, modulation, residual)", re.compile(r"_blocks?\b|/blocks/")),
)


def part(source: str) -> str:
    """The part of the model an op comes from, read from its JAX op name (``Op.source``): the
    attention's qkv and proj matmuls, its core (logits, softmax, dropout, values), the MLP, the
    rest of the blocks, or 'other' (embeddings, loss, optimizer, collectives' plumbing); prefixed
    by the pass, 'forward', 'backward' or 'remat' (the backward pass recomputing the forward)."""
    phase = (
        "remat"
        if "rematted_computation" in source
        else "backward"
        if "transpose(" in source
        else "forward"
    )
    name = next((n for n, pattern in _PARTS if pattern.search(source)), "other")
    return f"{phase} {name}"


def breakdown(
    ops: list[Op], *, peak_tflops: float, hbm_gbps: float, key=part
) -> list[dict[str, Any]]:
    """The compute+memory term (collectives apart) summed per ``key(op.source)``, slowest first:
    ``[{'part', 'est_s', 'bytes', 'flops', 'ops'}]`` (executions counted, per chip)."""
    peak, bw = peak_tflops * 1e12, hbm_gbps * 1e9
    groups: dict[str, dict[str, Any]] = {}
    for o in ops:
        name = "collectives" if o.collective else key(o.source)
        g = groups.setdefault(
            name, {"part": name, "est_s": 0.0, "bytes": 0.0, "flops": 0.0, "ops": 0}
        )
        g["bytes"] += o.bytes * o.times
        g["flops"] += o.flops * o.times
        g["ops"] += int(o.times)
        if not o.collective:
            g["est_s"] += max(o.flops / peak, o.bytes / bw) * o.times
    return sorted(groups.values(), key=lambda g: -g["est_s"])


def main(argv: list[str] | None = None) -> None:
    """``python -m xar_jax.step_estimate HLO_FILE [--chip v5p] [--devices N]``: the per-part
    table of a program written by ``python -m xar_jax.aot --hlo=HLO_FILE`` (gzip or plain text)."""
    import argparse
    import gzip

    from xar_jax import hlo_cost, tpu_topology

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("hlo")
    parser.add_argument("--chip", default="v5p", choices=sorted(tpu_topology.GENERATIONS))
    parser.add_argument("--devices", type=int, default=1, help="devices of the program")
    args = parser.parse_args(argv)
    gen = tpu_topology.GENERATIONS[args.chip]
    with open(args.hlo, "rb") as f:
        raw = f.read()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
    ops, _ = hlo_cost.module_ops(text, args.devices)
    rows = breakdown(ops, peak_tflops=gen.peak_bf16_tflops, hbm_gbps=gen.hbm_gbps)
    total = sum(r["est_s"] for r in rows)
    print(f"{'part':48s} {'est. ms':>8s} {'share':>6s} {'HBM GB':>8s} {'TFLOP':>7s}")
    for r in rows:
        share = r["est_s"] / total if total else 0.0
        print(
            f"{r['part']:48s} {r['est_s'] * 1e3:8.2f} {share:6.1%} {r['bytes'] / 1e9:8.2f} "
            f"{r['flops'] / 1e12:7.2f}"
        )
    print(f"{'total (compute+memory per op)':48s} {total * 1e3:8.2f}")


if __name__ == "__main__":
    main()
