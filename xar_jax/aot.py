"""Ahead-of-time compilation for a Cloud TPU slice, on any machine (no TPU needed; libtpu is).

  python -m xar_jax.aot --config=configs/xar_h.py --topology=v5p-128 [--num_slices=N]
      [--what=train|sample] [--per_chip_batch=N] [--find_max_batch] [--config.X=...]
      [--json=FILE|-] [--record=docs/tpu_aot.json]
  python -m xar_jax.aot --plan --config=configs/xar_l.py --topology=v6e-8 [--json=FILE|-]

Compiles exactly what the trainer runs (`xar_jax.train.jit_train_step`, its shardings and
donation; the batch as the input pipeline shapes it) or, with ``--what=sample``, the sampler's
program as `xar_jax.generate` places it (params replicated on one host's chips, the batch split
over them), for the abstract devices of the slice (`xar_jax.tpu_topology` maps the cloud names).
It reports per chip:

* HBM from the compiler's memory analysis: arguments, temporaries, outputs, aliased (donated
  state reused for the new state), code; total = arguments + outputs - aliased + temporaries +
  code, against the chip's capacity. A program that does not fit usually fails to compile
  ("out of memory"); it is reported with ``fits: false`` and the compiler's message.
* Estimates (labelled so; a real TPU has the last word), by `xar_jax.step_estimate` from the
  optimised HLO and the chip's figures (`xar_jax.tpu_topology`): per op ``max(matmul FLOPs /
  peak bf16, HBM bytes / HBM bandwidth)`` summed over the step (``est_compute_memory_s``; its
  two sums apart: ``est_compute_s``, ``est_memory_s``), collective time from bytes and replica
  groups over ICI and DCN (``est_collective_s``), and ``est_step_s`` = the larger of the two
  (collectives overlap compute; ``est_step_s_serial`` is their sum). Loops (the scan over
  layers, gradient accumulation's microbatches, the sampler's flow steps and entities) count
  their trip count times, so one compile gives the whole step. ``est_mfu`` = model FLOPs per
  step / (chips x peak x est_step_s), model FLOPs counted as 3 x the forward matmuls and
  attention (no rematerialisation, no optimizer). For ``--what=sample``, ``est_step_s`` is one
  sampler call (the whole batch through every flow step and entity) and
  ``est_img_per_s_per_chip`` its images per second per chip. The compiler's own cost analysis
  counts a loop body once (``flops_per_chip_as_compiled``, ``bytes_per_chip_as_compiled``, kept
  for reference); libtpu 0.0.42's ``optimal_seconds`` comes back negative for compile-only
  devices, so ``compiler_optimal_seconds`` is null then (the raw value is
  ``compiler_optimal_seconds_raw``). A program that does not fit still reports every key, null
  where the compiler gave nothing (with ``hbm_temporaries_needed_gib`` where it says).
* Collectives per step from the compiled HLO (`xar_jax.hlo_stats`): count and bytes of
  all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute, loops unrolled;
  ``dcn``: those between slices (also counted under their kind).

``--plan`` searches the fastest settings that fit the slice while keeping the config's global
batch (mesh split, gradient accumulation, remat, layer scan; `xar_jax.plan`), prints the override
line for the trainer and writes the plan with ``--json``; compile reports are cached on disk with
their programs' HLO, and re-estimated from it on every hit.

What is compiled lives in `xar_jax.tpu_compile`; what is read from the compiled program's text
(collectives, the estimate) in `xar_jax.hlo_report`, which can run again on a stored program
(``--hlo=FILE`` writes it).

``--find_max_batch`` doubles the per-chip batch from the compiled one while it fits (or halves it
while it does not), then takes one bisection step between the last fit and the first failure;
it reports the largest batch that fit (memory only).
"""

from __future__ import annotations

import copy
import datetime
import gzip
import json
import logging
import os
import re
import sys
import time
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from xar_jax import experiment, hlo_report, tpu_topology
from xar_jax import plan as plan_lib
from xar_jax import sharding as sharding_lib
from xar_jax.tpu_compile import (
    OOM_MARKERS,
    compile_sample,
    compile_train,
    cost,
    hbm_per_chip,
    libtpu_version,
    topology_devices,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("topology", None, f"TPU slice: {tpu_topology.ACCEPTED_FORMS}.")
flags.DEFINE_integer("num_slices", None, "Slices joined over DCN (sets config.mesh.num_slices).")
flags.DEFINE_enum("what", "train", ("train", "sample"), "The trainer's step or the sampler.")
flags.DEFINE_integer(
    "per_chip_batch",
    None,
    "Examples per chip per step (sets train.global_batch_size = N x chips, or "
    "sample.batch_size for --what=sample); default: the config's batch.",
)
flags.DEFINE_bool("find_max_batch", False, "Bisect for the largest per-chip batch that fits.")
flags.DEFINE_bool(
    "estimate",
    True,
    "Estimate the step time from the compiled HLO (--noestimate: memory and collectives only).",
)
flags.DEFINE_bool(
    "plan",
    False,
    "Search the fastest settings that fit (xar_jax/plan.py): mesh "
    "split, grad accumulation keeping the global batch, remat, layer scan.",
)
flags.DEFINE_string(
    "plan_depths",
    "auto",
    "--plan, unrolled candidates: 'K1,K2' compiles K1 and "
    "K2 blocks per stack and extrapolates to the real depth; 'full' compiles the "
    "real depth; 'auto': 2,4 above 4 blocks per stack. Scanned: always full.",
)
flags.DEFINE_list(
    "plan_remat",
    [],
    "--plan: remat policies to try (default: the config's); e.g. none,dots_no_batch,full.",
)
flags.DEFINE_enum(
    "plan_scan",
    "config",
    ("config", "both"),
    "--plan: try the config's model.scan_layers only, or scanned and unrolled.",
)
flags.DEFINE_list(
    "plan_tensor",
    ["1"],
    "--plan: mesh.tensor sizes, tried in order; a later one "
    "only if nothing fits with the earlier ones (e.g. 1,2,4).",
)
flags.DEFINE_integer(
    "plan_jobs",
    1,
    "--plan: compiles run side by side in subprocesses (the "
    "first compile of every candidate; each takes a few GiB of host memory).",
)
flags.DEFINE_integer("plan_budget", 40, "--plan: most compiles (cached ones are free).")
flags.DEFINE_integer("plan_meshes", 2, "--plan: data x fsdp splits tried, most sharded first.")
flags.DEFINE_bool(
    "plan_verify",
    True,
    "--plan: compile the chosen plan as planned (real depth "
    "and accumulation; doubling the accumulation if it does not fit) and report "
    "the compiler's numbers (--noplan_verify: the prediction).",
)
flags.DEFINE_string(
    "plan_cache",
    None,
    "--plan: directory of cached compile reports ('none': "
    "no cache); default $XDG_CACHE_HOME/xar_jax/aot or ~/.cache/xar_jax/aot.",
)
flags.DEFINE_string("json", None, "Write the result as JSON to this file, or '-' for stdout.")
flags.DEFINE_string(
    "hlo",
    None,
    "Write the compiled program's optimised HLO text (gzip) to this file (the planner's "
    "cache keeps it to re-estimate without compiling).",
)
flags.DEFINE_string(
    "record",
    None,
    "Merge the result into this JSON list (docs/tpu_aot.json), "
    "replacing a record of the same config, topology, slices, what and batch.",
)
flags.mark_flags_as_required(["config", "topology"])

log = logging.getLogger("xar_jax.aot")


# ----------------------------------------------------------------------------------------------
def prepare_config(
    config,
    topo: tpu_topology.Topology,
    *,
    num_slices: int | None,
    per_chip_batch: int | None,
    what: str,
):
    """A copy of ``config`` set up for compiling: slices, batch, and a placeholder data path
    (validation asks for the latent cache, which compiling never reads)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        if num_slices is not None:
            config.mesh.num_slices = num_slices
        chips = topo.chips * config.mesh.num_slices
        if per_chip_batch is not None:
            if what == "train":
                config.train.global_batch_size = per_chip_batch * chips
            else:
                config.sample.batch_size = per_chip_batch * chips
        if config.data.source == "latents" and not config.data.cache_dir:
            config.data.cache_dir = "/aot-compile/reads-no-data"
    return config


def compile_report(
    config,
    topo: tpu_topology.Topology,
    *,
    what: str = "train",
    estimate: bool = True,
    config_name: str = "",
    hlo_file: str | None = None,
) -> dict[str, Any]:
    """Compiles ``config`` (already `prepare_config`-ed) for ``topo`` and returns the report.

    With ``hlo_file``, a program that compiles also leaves its optimised HLO text there
    (gzip): all `hlo_report.from_hlo` needs to recompute the report's estimate later.
    """

    num_slices = config.mesh.num_slices
    devices = topology_devices(topo, num_slices)
    chips = len(devices)
    record: dict[str, Any] = {
        "config": config_name,
        "what": what,
        "topology": topo.name,
        "topology_name": topo.topology_name,
        "num_slices": num_slices,
        "chips": chips,
        "hosts": topo.hosts * num_slices,
        **hlo_report.chip_figures(topo),
        "libtpu": libtpu_version(),
        "date": datetime.date.today().isoformat(),
    }
    # The layers as compiled: 'auto' resolved for the chips, as `experiment.build` does.
    layers = experiment.resolve_config(config, devices[0].platform, mode=what).model
    record.update(scan_layers=layers.scan_layers, remat=layers.remat)
    if what == "train":
        record["global_batch"] = config.train.global_batch_size
        record["grad_accum_steps"] = config.train.grad_accum_steps
        record["per_chip_batch"] = config.train.global_batch_size // chips
    else:
        record["global_batch"] = config.sample.batch_size
        record["per_chip_batch"] = config.sample.batch_size // chips
    # Every key is present whatever happens next; null where the compile does not tell.
    record.update({k: None for k in hlo_report.REPORT_KEYS if k not in record})
    record["mesh"] = _planned_mesh(config, chips, num_slices) if what == "train" else None
    start = time.perf_counter()
    try:
        compiled, mesh = (compile_train if what == "train" else compile_sample)(config, devices)
    except Exception as e:  # The compiler refuses programs that do not fit in HBM.
        message = str(e)
        if not any(m in message for m in OOM_MARKERS):
            raise
        record.update(
            compile_s=round(time.perf_counter() - start, 1),
            fits=False,
            error=" ".join(message.split())[:600],
            estimate_basis="none: the program does not fit (the compiler refused it)",
        )
        needed = re.search(r"required for HLO temporaries \(([\d.]+)G\)", message)
        if needed:  # XLA's "G" is GiB.
            record["hbm_temporaries_needed_gib"] = float(needed.group(1))
        return record
    record["compile_s"] = round(time.perf_counter() - start, 1)
    record["mesh"] = {k: int(v) for k, v in mesh.shape.items()}
    record["hbm_per_chip_gib"] = hbm_per_chip(compiled)
    c1 = cost(compiled)
    # libtpu's own estimate: a negative sentinel on compile-only devices (see the docstring).
    record["compiler_optimal_seconds"] = (
        c1["optimal_seconds"] if c1["optimal_seconds"] >= 0 else None
    )
    record["compiler_optimal_seconds_raw"] = c1["optimal_seconds"]
    # The cost analysis as compiled: every loop body counted once (see the module docstring).
    record["flops_per_chip_as_compiled"] = c1["flops"]
    record["bytes_per_chip_as_compiled"] = c1["bytes"]
    text = compiled.as_text()
    if hlo_file:
        write_hlo(hlo_file, text)
    return hlo_report.from_hlo(record, text, config, topo, estimate=estimate)


def write_hlo(path: str, text: str) -> None:
    """``text`` gzipped at ``path`` (written whole or not at all)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with gzip.open(tmp, "wt", compresslevel=6) as f:
        f.write(text)
    os.replace(tmp, path)


def _planned_mesh(config, chips: int, num_slices: int) -> dict[str, int] | None:
    """The mesh the trainer would build (known before compiling; None if the config's is bad)."""
    try:
        data, fsdp, tensor = sharding_lib.resolve_mesh_shape(
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor, chips // num_slices
        )
    except ValueError:
        return None
    return {"dcn": num_slices, "data": data, "fsdp": fsdp, "tensor": tensor}


def find_max_batch(
    config, topo, *, what: str, config_name: str, first: tuple[int, bool]
) -> dict[str, Any]:
    """Largest per-chip batch that fits, from ``first`` = (batch already compiled, fits): double
    while it fits (halve while it does not) to the first change, then one bisection step
    between the last fit and the first failure. Returns ``{'max_per_chip_batch',
    'max_batch_tried': [{per_chip_batch, fits, compile_s, hbm_total_gib}]}``."""
    tried = []

    def fits(b: int) -> bool:
        c = prepare_config(config, topo, num_slices=None, per_chip_batch=b, what=what)
        r = compile_report(c, topo, what=what, estimate=False, config_name=config_name)
        tried.append(
            {
                "per_chip_batch": b,
                "fits": r["fits"],
                "compile_s": r["compile_s"],
                "hbm_total_gib": (r.get("hbm_per_chip_gib") or {}).get("total"),
            }
        )
        log.info("per-chip batch %d: %s", b, "fits" if r["fits"] else "does not fit")
        return r["fits"]

    b, ok = first
    good, bad = (b, None) if ok else (0, b)
    while ok and b < 65536:
        b *= 2
        if not fits(b):
            bad = b
            break
        good = b
    while not ok and b > 1:
        b //= 2
        if fits(b):
            good = b
            break
        bad = b
    if good and bad and bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
    return {"max_per_chip_batch": good, "max_batch_tried": tried}


# ----------------------------------------------------------------------------------------------
# Output.
def format_table(r: dict[str, Any]) -> str:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    def duration(v):  # In a unit that suits, 3 significant digits: 2.41 s, 312 ms, 35.2 us.
        if v is None:
            return "n/a"
        value, unit = (v, "s") if v >= 1 else (v * 1e3, "ms") if v >= 1e-3 else (v * 1e6, "us")
        return f"{value:.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"

    hbm = r.get("hbm_per_chip_gib") or {}
    c = r.get("collectives") or {}
    rows = [
        ("config / what", f"{r['config']} / {r['what']}"),
        (
            "topology",
            f"{r['topology']} ({r['topology_name']}) x {r['num_slices']} slice(s), "
            f"{r['chips']} chips, {r['hosts']} host(s); libtpu {r['libtpu']}",
        ),
        ("mesh", str(r.get("mesh", "n/a"))),
        ("batch", f"global {r['global_batch']}, per chip {r['per_chip_batch']}"),
        ("compile", f"{r['compile_s']} s"),
        ("HBM per chip (GiB)", ", ".join(f"{k} {v}" for k, v in hbm.items()) or "n/a"),
        ("fits", f"{r['fits']} (capacity {r['hbm_capacity_gib']} GiB)"),
        (
            "est. step",
            duration(r.get("est_step_s"))
            + (
                f" = max(compute+memory per op {duration(r['est_compute_memory_s'])}, collectives "
                f"{duration(r['est_collective_s'])}); compute {duration(r['est_compute_s'])}, memory "
                f"{duration(r['est_memory_s'])}, serial {duration(r['est_step_s_serial'])}"
                if r.get("est_step_s") is not None
                else ""
            ),
        ),
        ("est. img/s/chip", num(r.get("est_img_per_s_per_chip"), ".1f")),
        (
            "est. MFU",
            num(r.get("est_mfu"), ".1%") + f" (peak bf16 {r['peak_bf16_tflops']} TFLOP/s per chip)",
        ),
    ]
    for kind in (
        "all-gather",
        "reduce-scatter",
        "all-reduce",
        "all-to-all",
        "collective-permute",
        "dcn",
    ):
        if kind in c:
            rows.append((kind, f"{c[kind]['count']} ops, {c[kind]['bytes'] / 2**20:.1f} MiB"))
    if "max_per_chip_batch" in r:
        rows.append(("max per-chip batch", str(r["max_per_chip_batch"])))
    if r.get("error"):
        rows.append(("compiler", r["error"][:200]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def record_key(r: dict[str, Any]) -> tuple:
    return (
        r["config"],
        r["what"],
        r["topology"],
        r["num_slices"],
        r["per_chip_batch"],
        r.get("grad_accum_steps", 1),
    )


def merge_record(path: str, record: dict[str, Any]) -> None:
    """Adds ``record`` to the JSON list at ``path``, replacing one with the same `record_key`."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = json.load(f)
    records = [r for r in records if record_key(r) != record_key(record)] + [record]
    records.sort(key=lambda r: tuple(str(x) for x in record_key(r)))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def run_plan(config, topo: tpu_topology.Topology, name: str) -> None:
    """``--plan``: `xar_jax.plan.search` with this module's compiler; prints and writes it."""
    if FLAGS.what != "train" or FLAGS.find_max_batch or FLAGS.per_chip_batch:
        sys.exit(
            "error: --plan plans the train step at the config's global batch; drop "
            "--what=sample, --find_max_batch and --per_chip_batch."
        )
    try:
        if FLAGS.plan_depths == "auto":
            deep = max(plan_lib.depths(config)) > 4
            depth_points = (2, 4) if deep else None
        elif FLAGS.plan_depths == "full":
            depth_points = None
        else:
            k1, k2 = (int(k) for k in FLAGS.plan_depths.split(","))
            if not 1 <= k1 < k2:
                raise ValueError
            depth_points = (k1, k2)
    except ValueError:
        sys.exit(
            f"error: --plan_depths={FLAGS.plan_depths!r}; allowed: auto, full or K1,K2 "
            "(1 <= K1 < K2)."
        )
    bad = [r for r in FLAGS.plan_remat if r not in plan_lib.REMAT_ORDER]
    if bad:
        sys.exit(
            f"error: --plan_remat={','.join(bad)}; allowed: {', '.join(plan_lib.REMAT_ORDER)}."
        )
    gb, chips = config.train.global_batch_size, topo.chips * config.mesh.num_slices
    if gb % chips:
        sys.exit(
            f"error: train.global_batch_size={gb} does not split over {chips} chips; "
            "a plan keeps the global batch."
        )
    cache_dir = FLAGS.plan_cache or plan_lib.default_cache_dir()
    cache = plan_lib.ReportCache(
        None if cache_dir == "none" else cache_dir,
        f"jax {jax.__version__} libtpu {libtpu_version()}",
    )
    config = experiment.resolve_config(config, "tpu")  # The layers of 'auto', as compiled.
    scans = (
        None
        if FLAGS.plan_scan == "config"
        else (config.model.scan_layers, not config.model.scan_layers)
    )
    result = plan_lib.search(
        config,
        topo,
        compile_report=compile_report,
        cache=cache,
        config_name=name,
        depth_points=depth_points,
        remats=tuple(FLAGS.plan_remat) or None,
        scans=scans,
        max_meshes=FLAGS.plan_meshes,
        tensors=tuple(int(t) for t in FLAGS.plan_tensor),
        jobs=FLAGS.plan_jobs,
        config_file=config_flags.get_config_filename(FLAGS["config"]),
        budget=FLAGS.plan_budget,
        verify=FLAGS.plan_verify,
    )
    result.update(
        libtpu=libtpu_version(), jax=jax.__version__, date=datetime.date.today().isoformat()
    )
    print(plan_lib.format_plan(result), file=sys.stderr if FLAGS.json == "-" else sys.stdout)
    text = json.dumps(result, indent=1)
    if FLAGS.json == "-":
        print(text)
    elif FLAGS.json:
        with open(FLAGS.json, "w") as f:
            f.write(text + "\n")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # JAX's INFO lines (no TPU backend on a compile-only host) are expected here, not news.
    logging.getLogger("jax").setLevel(logging.WARNING)
    try:
        topo = tpu_topology.parse(FLAGS.topology)
    except ValueError as e:
        sys.exit(f"error: {e}")
    name = os.path.relpath(config_flags.get_config_filename(FLAGS["config"]))
    config = prepare_config(
        FLAGS.config,
        topo,
        num_slices=FLAGS.num_slices,
        per_chip_batch=FLAGS.per_chip_batch,
        what=FLAGS.what,
    )
    if FLAGS.plan:
        return run_plan(config, topo, name)
    record = compile_report(
        config,
        topo,
        what=FLAGS.what,
        estimate=FLAGS.estimate,
        config_name=name,
        hlo_file=FLAGS.hlo,
    )
    if FLAGS.find_max_batch:
        record.update(
            find_max_batch(
                config,
                topo,
                what=FLAGS.what,
                config_name=name,
                first=(record["per_chip_batch"], record["fits"]),
            )
        )
    print(format_table(record), file=sys.stderr if FLAGS.json == "-" else sys.stdout)
    text = json.dumps(record, indent=1)
    if FLAGS.json == "-":
        print(text)
    elif FLAGS.json:
        with open(FLAGS.json, "w") as f:
            f.write(text + "\n")
    if FLAGS.record:
        merge_record(FLAGS.record, record)


if __name__ == "__main__":
    app.run(main)
