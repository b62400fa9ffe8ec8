"""Training plans: the fastest settings that fit a TPU slice without changing the training.

A plan fixes what a user may change without changing what is trained: the mesh split
(``mesh.data`` x ``mesh.fsdp``, ``mesh.tensor``), the per-chip microbatch through
``train.grad_accum_steps`` (the config's global batch is kept), the rematerialisation policy
(``model.remat``) and scanned or unrolled layers (``model.scan_layers``). `search` compiles
candidates with the AOT tool's `compile_report` (passed in: this module never imports the CLI,
whose absl flags would clash with the trainer's):

* **Largest fitting microbatch per candidate.** A candidate (mesh, remat policy, scan) is
  compiled as a one-microbatch step with the whole per-chip batch, then halved until it fits
  (memory grows with the microbatch; a refusal compiles in seconds): the accumulation that keeps
  the global batch follows. The fastest candidate by the estimate (`predict`: ``accum`` times
  the microbatch step) wins and is compiled as planned (`verify_plan`): the plan's numbers are
  the compiler's. Compiles: one that fits per candidate plus the refusals, one more for an
  accumulating winner. ``jobs`` runs the first of them side by side in subprocesses.
* **Reduced depth for unrolled layers.** A layer scan compiles in about the same time at any
  depth; unrolled layers do not. With ``depth_points=(k1, k2)`` an unrolled candidate is
  compiled with k1 and k2 blocks per stack at the model's width and every per-chip number of
  the report (HBM parts, FLOPs, bytes, collectives, the estimate's terms) is extrapolated
  linearly to the real depth, as the layers' FLOPs are: parameters, optimizer state, saved
  residuals and per-layer collectives are per block.
* **Cache.** Every report is kept on disk with its program's optimised HLO (`ReportCache`),
  keyed by what determines the program: the compiled config, the topology, jax, libtpu and the
  package source outside `REPORT_SOURCES` (the modules that only read or report a program). A
  rerun, the time-to-train table and the trainer's ``train.plan=auto`` reuse the compiles, and
  each hit is re-estimated from its HLO (`hlo_report.from_hlo`): estimator fixes need no
  compile.

The plan (`plan_record`) carries every key, ``None`` where unknown, and the override line the
trainer takes unchanged; `xar_jax.plan_file` applies a plan file (or ``auto``) in the trainer.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from xar_jax import hlo_report
from xar_jax.model import PRESETS, resolve_layers
from xar_jax.train_config import load_config_file

log = logging.getLogger("xar_jax.plan")

# Weakest first: each saves fewer activations for the backward pass than the one before.
REMAT_ORDER = ("none", "dots", "matmuls", "dots_no_batch", "full")
# Report keys that are facts of the setup, not per-chip costs: never extrapolated in depth.
_NOT_PER_BLOCK = {
    "chips",
    "hosts",
    "num_slices",
    "global_batch",
    "per_chip_batch",
    "grad_accum_steps",
    "hbm_capacity_gib",
    "peak_bf16_tflops",
    "hbm_gbps",
    "compile_s",
    "estimate_compile_s",
    "compiler_optimal_seconds",
    "mesh",
    "est_img_per_s_per_chip",
    "est_mfu",
    "model_flops_per_step",
    "date",
    "fits",
    "ici_gbps",
    "dcn_gbits",
    "compiler_optimal_seconds_raw",
    "unknown_trip_counts",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """One candidate: the mesh inside a slice, the accumulation, remat policy and layer scan."""

    data: int
    fsdp: int
    tensor: int
    accum: int
    remat: str
    scan: bool

    def overrides(self) -> list[str]:
        return [
            f"--config.mesh.data={self.data}",
            f"--config.mesh.fsdp={self.fsdp}",
            f"--config.mesh.tensor={self.tensor}",
            f"--config.train.grad_accum_steps={self.accum}",
            f"--config.model.remat={self.remat}",
            f"--config.model.scan_layers={self.scan}",
        ]

    def apply(self, config):
        """A copy of ``config`` with these settings."""
        config = copy.deepcopy(config)
        with config.unlocked():
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (
                self.data,
                self.fsdp,
                self.tensor,
            )
            config.train.grad_accum_steps = self.accum
            config.model.remat = self.remat
            config.model.scan_layers = self.scan
        return config


def depths(config) -> tuple[int, int]:
    """(encoder, decoder) blocks of ``config.model``."""
    m = config.model
    if m.preset:
        return PRESETS[m.preset].encoder_depth, PRESETS[m.preset].decoder_depth
    return m.encoder_depth, m.decoder_depth


def with_depth(config, k: int):
    """``config`` with ``k`` blocks in each stack at the same width and heads (preset unpacked)."""
    config = copy.deepcopy(config)
    m = config.model
    with config.unlocked():
        if m.preset:
            size = PRESETS[m.preset]
            m.preset, m.width, m.num_heads = "", size.width, size.num_heads
        m.encoder_depth = m.decoder_depth = k
    return config


# ----------------------------------------------------------------------------------------------
# The compile cache.
# Modules that read, estimate or report a compiled program but never shape it, left out of the
# cache key: a fix to the estimate re-estimates cached programs (`Evaluator.report`) instead of
# compiling them again. tpu_topology.py's table of chip figures feeds the estimate; what it tells
# the compiler (`Topology.describe`) is in the key instead. What shapes the program (the model,
# the step, sharding, `xar_jax.tpu_compile`, ...) stays in it.
REPORT_SOURCES = frozenset(
    {
        "aot.py",
        "gpu_kernel_time.py",
        "hlo_cost.py",
        "hlo_report.py",
        "hlo_stats.py",
        "plan.py",
        "plan_file.py",
        "step_estimate.py",
        "tpu_topology.py",
    }
)


# Environment variables that set compiler options (libtpu's and XLA's): part of the cache key.
COMPILER_FLAG_VARIABLES = ("LIBTPU_INIT_ARGS", "XLA_FLAGS")


def source_digest(root: str | None = None) -> str:
    """Hash of the package's Python source (under ``root``, default this package) that shapes
    a compiled program, all but `REPORT_SOURCES`: a changed model or step invalidates the
    cache."""
    root = root or os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if name.endswith(".py") and rel not in REPORT_SOURCES:
                with open(os.path.join(dirpath, name), "rb") as f:
                    h.update(rel.encode() + f.read())
    return h.hexdigest()[:16]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xar_jax", "aot")


class ReportCache:
    """Compile reports on disk: per compiled program, ``KEY.json`` (the report as compiled) and,
    for a program that compiled, ``KEY.hlo.gz`` (its optimised HLO text) to re-estimate it.

    The key (`key`) is what determines the program: the config, the topology as libtpu is
    told it, the kind of program, jax, libtpu, the compiler flags in the environment
    (`COMPILER_FLAG_VARIABLES`) and the package source outside `REPORT_SOURCES`.
    """

    def __init__(self, path: str | None, versions: str):
        self.path = path
        self.versions = versions + "/" + source_digest()
        self.hits = 0

    def key(self, config, topo, what: str) -> str:
        parts = [
            config.to_json_best_effort(sort_keys=True),
            topo.name,
            topo.describe(config.mesh.num_slices),
            what,
            self.versions,
        ]
        # The compiler's own flags change the program as much as the config does.
        flags = {k: os.environ[k] for k in COMPILER_FLAG_VARIABLES if os.environ.get(k)}
        text = json.dumps(parts + [flags] if flags else parts)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def _file(self, key: str, suffix: str) -> str:
        return os.path.join(self.path or "", key + suffix)

    def has(self, key: str) -> bool:
        return bool(self.path) and os.path.exists(self._file(key, ".json"))

    def get(self, key: str) -> dict | None:
        """The report stored under ``key`` (counted as a hit), or None."""
        if not self.has(key):
            return None
        with open(self._file(key, ".json")) as f:
            self.hits += 1
            return json.load(f)

    def hlo(self, key: str) -> str | None:
        """The optimised HLO text stored under ``key``, or None (a program that did not fit)."""
        file = self._file(key, ".hlo.gz")
        if not self.path or not os.path.exists(file):
            return None
        with gzip.open(file, "rt") as f:
            return f.read()

    def put(self, key: str, record: dict, hlo_file: str | None = None) -> None:
        """Stores ``record`` and moves ``hlo_file`` (gzipped HLO text) in beside it."""
        if not self.path:
            return
        os.makedirs(self.path, exist_ok=True)
        if hlo_file and os.path.exists(hlo_file):  # First: a report implies its HLO is there.
            shutil.move(hlo_file, self._file(key, ".hlo.gz"))
        tmp = os.path.join(self.path, f".{key}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self._file(key, ".json"))


# ----------------------------------------------------------------------------------------------
def extrapolate(r1: dict, r2: dict, n1: int, n2: int, n: int) -> dict:
    """Per-chip numbers of ``r1`` (``n1`` blocks) and ``r2`` (``n2``) extrapolated to ``n``.

    Every numeric leaf not in ``_NOT_PER_BLOCK`` is taken as linear in the block count; the
    rest comes from ``r2``. Counts stay integers.
    """

    def go(a, b, name):
        if isinstance(b, dict):
            return {k: go(a.get(k) if isinstance(a, dict) else None, v, k) for k, v in b.items()}
        if (
            name in _NOT_PER_BLOCK
            or isinstance(b, bool)
            or not isinstance(b, (int, float))
            or not isinstance(a, (int, float))
            or isinstance(a, bool)
        ):
            return b
        value = a + (n - n1) * (b - a) / (n2 - n1)
        return round(value) if isinstance(b, int) and isinstance(a, int) else value

    return {k: go(r1.get(k), v, k) for k, v in r2.items()}


class Evaluator:
    """Compiles one-microbatch steps (cached) and predicts any microbatch at the real depth.

    ``measure(s, micro, k)`` compiles the step of settings ``s`` without accumulation at
    ``micro`` examples per chip and ``k`` blocks per stack (the real depth for ``k=None``); one
    compile gives memory and the estimate (`xar_jax.step_estimate` counts loops by their trip
    counts). `predict` interpolates the per-chip numbers linearly in the microbatch between two
    measured microbatches, after extrapolating each linearly in depth where asked.
    """

    def __init__(
        self,
        config,
        topo,
        *,
        compile_report: Callable[..., dict],
        cache: ReportCache,
        depth_points: tuple[int, int] | None,
        config_name: str,
        budget: int | None = None,
    ):
        self.config, self.topo = config, topo
        self.compile_report, self.cache = compile_report, cache
        self.depth_points, self.config_name = depth_points, config_name
        self.budget = budget
        self.compiles = 0
        self.full_blocks = sum(depths(config))
        self.chips = topo.chips * config.mesh.num_slices

    def report(self, config) -> dict:
        """One compile report (memory and the estimate: one compile). A cached one is
        re-estimated from its stored HLO text (`hlo_report.from_hlo`), so it carries the
        current estimator's numbers."""
        key = self.cache.key(config, self.topo, "train")
        hit = self.cache.get(key)
        if hit is not None:
            text = self.cache.hlo(key)
            return hit if text is None else hlo_report.from_hlo(hit, text, config, self.topo)
        if self.budget is not None and self.compiles >= self.budget:
            raise BudgetExhausted(self.compiles)
        with tempfile.TemporaryDirectory() as tmp:
            hlo_file = os.path.join(tmp, "program.hlo.gz")
            record = self.compile_report(
                config,
                self.topo,
                what="train",
                estimate=True,
                config_name=self.config_name,
                hlo_file=hlo_file,
            )
            self.cache.put(key, record, hlo_file)
        self.compiles += 1
        log.info(
            "plan: compiled %s, %s examples per chip, %s blocks per stack: %s (%s GiB), "
            "est. step %s s, %s s to compile",
            record["mesh"],
            record["per_chip_batch"],
            max(depths(config)),
            "fits" if record["fits"] else "does not fit",
            (record.get("hbm_per_chip_gib") or {}).get("total"),
            record.get("est_step_s"),
            record.get("compile_s"),
        )
        return record

    def measure_config(self, s: Settings, micro: int, k: int | None):
        """The config of ``s`` without accumulation, ``micro`` examples per batch shard."""
        config = dataclasses.replace(s, accum=1).apply(self.config)
        with config.unlocked():  # The batch is split over dcn x data x fsdp.
            config.train.global_batch_size = micro * self.chips // s.tensor
        return with_depth(config, k) if k is not None else config

    def measure(self, s: Settings, micro: int, k: int | None) -> dict:
        """The report of `measure_config`."""
        return self.report(self.measure_config(s, micro, k))

    def at_depth(self, s: Settings, micro: int) -> dict:
        """The one-microbatch step at the real depth, extrapolated from two depths for unrolled
        layers where asked (a layer scan compiles in about the same time at any depth)."""
        if not self.depth_points or s.scan:
            return self.measure(s, micro, None)
        k1, k2 = self.depth_points
        r1 = self.measure(s, micro, k1)
        if not r1["fits"]:
            return dict(r1, basis=f"does not fit at {k1} blocks per stack")
        r2 = self.measure(s, micro, k2)
        if not r2["fits"]:
            return dict(r2, basis=f"does not fit at {k2} blocks per stack")
        out = extrapolate(r1, r2, 2 * k1, 2 * k2, self.full_blocks)
        for key in ("model_flops_per_step",):
            if r2.get(key):
                out[key] = r2[key] * self.full_blocks / (2 * k2)
        out["compile_s"] = round(r1["compile_s"] + r2["compile_s"], 1)
        out["basis"] = (
            f"extrapolated linearly in depth from {k1} and {k2} blocks per stack "
            f"to {self.full_blocks} blocks"
        )
        return out


def predict(
    lo: tuple[int, dict], hi: tuple[int, dict] | None, micro: int, accum: int, shards: int
) -> dict:
    """The step of ``accum`` microbatches of ``micro`` per batch shard (per chip unless
    ``mesh.tensor`` > 1; ``shards`` = dcn x data x fsdp) from measured microbatches.

    Per-chip numbers are linear in the microbatch between (or beyond) the two measured points;
    with accumulation the estimate's times are ``accum`` times one microbatch's (its gradient
    reduction and optimizer update are counted each time: a slight overestimate) and memory
    gains one float32 copy of the sharded parameters for the accumulated gradient (a quarter of
    the argument bytes: parameters, EMA and two Adam moments).
    """
    m1, r1 = lo
    if hi is None or hi[0] == m1:
        r = dict(r1)
    else:
        r = extrapolate(r1, hi[1], m1, hi[0], micro)
    hbm = dict(r.get("hbm_per_chip_gib") or {})
    if accum > 1 and hbm:
        extra = hbm.get("arguments", 0.0) / 4
        hbm["accumulator"] = round(extra, 3)
        hbm["total"] = round(hbm["total"] + extra, 3)
    r["hbm_per_chip_gib"] = hbm
    if hbm:
        r["fits"] = hbm["total"] <= r["hbm_capacity_gib"]
    r["grad_accum_steps"] = accum
    r["global_batch"] = micro * accum * shards
    r["per_chip_batch"] = r["global_batch"] // r["chips"]
    if r.get("model_flops_per_step"):  # Taken from the larger measured microbatch.
        r["model_flops_per_step"] *= micro * accum / (hi[0] if hi else m1)
    for k in list(r):
        if k.startswith("est_") and k.endswith("_s") and isinstance(r[k], (int, float)):
            r[k] = r[k] * accum
    if r.get("est_step_s"):
        r["est_img_per_s_per_chip"] = r["global_batch"] / r["chips"] / r["est_step_s"]
        if r.get("model_flops_per_step"):
            r["est_mfu"] = r["model_flops_per_step"] / (
                r["chips"] * r["peak_bf16_tflops"] * 1e12 * r["est_step_s"]
            )
    return r


def config_overrides(base, target) -> list[str]:
    """``--config.a.b=v`` flags that turn ``base`` into ``target`` (scalar fields)."""

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    old = dict(leaves(base.to_dict()))
    out = []
    for field, value in leaves(target.to_dict()):
        if field in old and old[field] != value:
            if isinstance(value, (list, tuple, dict)):
                raise ValueError(f"config.{field}: not a scalar override")
            out.append(f"--config.{field}={value}")
    return out


def prefetch(ev: Evaluator, configs: list, *, config_file: str, jobs: int) -> None:
    """Compiles the ``configs`` missing from the cache, ``jobs`` at a time, each in its own
    process (the CLI, ``python -m xar_jax.aot --config=config_file <overrides> --json=...``),
    and caches their reports: on a shared or many-core machine the compiles run side by side.
    """
    base = load_config_file(config_file)
    todo = []
    for c in configs:
        key = ev.cache.key(c, ev.topo, "train")
        if not ev.cache.has(key) and key not in [k for k, _ in todo]:
            todo.append((key, c))
    if ev.budget is not None:
        todo = todo[: max(0, ev.budget - ev.compiles)]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        running: list[tuple[subprocess.Popen, str, str]] = []
        while todo or running:
            while todo and len(running) < jobs:
                key, c = todo.pop(0)
                out = os.path.join(tmp, key + ".json")
                cmd = [
                    sys.executable,
                    "-m",
                    "xar_jax.aot",
                    f"--config={config_file}",
                    f"--topology={ev.topo.name}",
                    f"--json={out}",
                    f"--hlo={os.path.join(tmp, key + '.hlo.gz')}",
                    *config_overrides(base, c),
                ]
                log.info("plan: compiling in a subprocess: %s", " ".join(cmd[3:]))
                running.append(
                    (
                        subprocess.Popen(
                            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                        ),
                        key,
                        out,
                    )
                )
            proc, key, out = running.pop(0)
            if proc.wait() == 0 and os.path.exists(out):
                with open(out) as f:
                    ev.cache.put(key, json.load(f), os.path.join(tmp, key + ".hlo.gz"))
                ev.compiles += 1


class BudgetExhausted(Exception):
    """The search reached its compile budget."""


# ----------------------------------------------------------------------------------------------
def mesh_options(slice_chips: int, tensor: int = 1) -> list[tuple[int, int]]:
    """(data, fsdp) splits of a slice's chips, most sharded first (powers of two of fsdp)."""
    chips = slice_chips // tensor
    out, f = [], chips
    while f >= 1:
        if chips % f == 0:
            out.append((chips // f, f))
        f //= 2
    return out


def accum_options(global_batch: int, shards: int) -> list[int]:
    """Accumulation steps keeping ``global_batch``, smallest first (largest microbatch first)."""
    if global_batch % shards:
        return []
    per_shard = global_batch // shards
    return [a for a in range(1, per_shard + 1) if per_shard % a == 0 and a & (a - 1) == 0]


def _point(s: Settings, micro: int, r: dict) -> dict:
    return dict(
        dataclasses.asdict(s),
        micro=micro,
        fits=r["fits"],
        hbm_total_gib=(r.get("hbm_per_chip_gib") or {}).get("total"),
        hbm_temporaries_needed_gib=r.get("hbm_temporaries_needed_gib"),
        est_step_s=r.get("est_step_s"),
    )


def ladder(per_shard: int, levels: int) -> list[int]:
    """The microbatches tried first: the whole per-shard batch, then halved, ``levels`` long."""
    out, m = [], per_shard
    while m >= 1 and len(out) < levels:
        out.append(m)
        if m % 2:
            break
        m //= 2
    return out


def search(
    config,
    topo,
    *,
    compile_report: Callable[..., dict],
    cache: ReportCache,
    config_name: str = "",
    depth_points: tuple[int, int] | None = None,
    remats: tuple[str, ...] | None = None,
    scans: tuple[bool, ...] | None = None,
    max_meshes: int = 2,
    budget: int | None = 40,
    verify: bool = True,
    tensors: tuple[int, ...] = (1,),
    jobs: int = 1,
    config_file: str | None = None,
) -> dict[str, Any]:
    """The fastest fitting plan for ``config`` (already `aot.prepare_config`-ed) on ``topo``.

    Each candidate (scan, remat, data x fsdp x tensor mesh) compiles its one-microbatch step with
    the whole per-chip batch, then halved until it fits (the compiler refuses what does not fit
    quickly): its largest fitting microbatch, and the accumulation that keeps the global batch.
    The fastest by the estimate (`predict`: ``accum`` microbatch steps) wins and is compiled as
    planned (`verify_plan`).

    Args:
      config: the training config; its global batch, model and data stay as they are.
      topo: `tpu_topology.Topology`; ``config.mesh.num_slices`` copies of it.
      compile_report: `xar_jax.aot.compile_report`.
      cache: where compile reports are kept.
      config_name: the config file's name, for the records.
      depth_points: compile k1 and k2 blocks per stack and extrapolate (None: the real depth).
      remats: policies to try (default: the config's).
      scans: layer scan settings to try (default: the config's).
      max_meshes: data x fsdp splits tried, from the most sharded.
      budget: most compiles (cached reports are free); None: no limit.
      verify: compile the winner as planned (`verify_plan`); its report becomes the plan's.
      tensors: ``mesh.tensor`` sizes to try; a larger one only if nothing fits with the ones
        before.
      jobs: with ``config_file``, the first tensor size's compiles run this many at a time in
        subprocesses first (`prefetch`); the search then reads them from the cache.
      config_file: the config file ``config`` came from (for `prefetch`).

    Returns:
      The plan as a dict (`plan_record`).
    """
    ev = Evaluator(
        config,
        topo,
        compile_report=compile_report,
        cache=cache,
        depth_points=depth_points,
        config_name=config_name,
        budget=budget,
    )
    slices = config.mesh.num_slices
    gb = config.train.global_batch_size
    m = config.model  # Its 'auto' layers as `experiment.build` resolves them for TPU chips.
    scan, remat = resolve_layers(m.preset, m.scan_layers, m.remat, "tpu")
    remats = (remat,) if remats is None else remats
    scans = (scan,) if scans is None else scans
    candidates: list[tuple[Settings, dict]] = []
    measured: list[dict] = []
    stopped = None
    if jobs > 1 and config_file and cache.path:
        first = []
        for scan in scans:
            for remat in remats:
                for data, fsdp in mesh_options(topo.chips, tensors[0])[:max_meshes]:
                    base = Settings(data, fsdp, tensors[0], 1, remat, scan)
                    shards = slices * data * fsdp
                    if gb % shards:
                        continue
                    first.append((base, gb // shards))
        levels = max(1, jobs // max(1, len(first)))
        configs = [
            ev.measure_config(base, m, k)
            for base, per_shard in first
            for m in ladder(per_shard, levels)
            for k in (ev.depth_points if ev.depth_points and not base.scan else (None,))
        ]
        if verify:  # Each level's accumulating step as `verify_plan` would compile it.
            configs += [
                dataclasses.replace(base, accum=per_shard // m).apply(config)
                for base, per_shard in first
                for m in ladder(per_shard, levels)[1:]
            ]
        prefetch(ev, configs, config_file=config_file, jobs=jobs)
    try:
        for tensor in tensors:
            for scan in scans:
                for remat in remats:
                    for data, fsdp in mesh_options(topo.chips, tensor)[:max_meshes]:
                        accums = accum_options(gb, slices * data * fsdp)
                        if not accums:
                            continue
                        base = Settings(data, fsdp, tensor, 1, remat, scan)
                        per_shard = gb // (slices * data * fsdp)
                        # The whole batch, halved until it fits (refusals compile fast): the
                        # largest microbatch that fits, compiled.
                        m = per_shard
                        r = ev.at_depth(base, m)
                        while not r["fits"] and m % 2 == 0:
                            measured.append(_point(base, m, r))
                            m //= 2
                            r = ev.at_depth(base, m)
                        measured.append(_point(base, m, r))
                        if r["fits"]:
                            accum = per_shard // m
                            candidates.append(
                                (
                                    dataclasses.replace(base, accum=accum),
                                    predict((m, r), None, m, accum, slices * data * fsdp),
                                )
                            )
            if candidates:
                break
    except BudgetExhausted as e:
        stopped = f"stopped at the compile budget ({e.args[0]} compiles)"
    ranked = sorted(candidates, key=lambda c: c[1].get("est_step_s") or math.inf)
    winner, verified = (ranked[0] if ranked else None), None
    if winner and verify:
        try:
            winner, verified = verify_plan(ev, winner, gb, slices)
        except BudgetExhausted as e:
            stopped = f"not verified: the compile budget ({e.args[0]} compiles) ran out"
    return plan_record(
        config,
        topo,
        config_name=config_name,
        winner=winner,
        candidates=candidates,
        measured=measured,
        compiles=ev.compiles,
        cache_hits=cache.hits,
        stopped=stopped,
        depth_points=depth_points,
        verified=verified,
    )


def verify_plan(
    ev: Evaluator, winner: tuple[Settings, dict], gb: int, slices: int
) -> tuple[tuple[Settings, dict] | None, dict]:
    """Compiles the chosen plan as planned (real depth, with its accumulation); where the
    prediction was wrong and it does not fit, doubles the accumulation until it does. The
    plan's numbers are then the compiler's."""
    s, predicted = winner
    accums = accum_options(gb, slices * s.data * s.fsdp)
    tries = []
    while True:
        real = ev.report(s.apply(ev.config))
        tries.append(
            {
                "grad_accum_steps": s.accum,
                "fits": real["fits"],
                "hbm_total_gib": (real.get("hbm_per_chip_gib") or {}).get("total"),
            }
        )
        if real["fits"] or s.accum == accums[-1]:
            break
        s = dataclasses.replace(s, accum=accums[accums.index(s.accum) + 1])
    note = {
        "predicted_hbm_total_gib": (predicted.get("hbm_per_chip_gib") or {}).get("total"),
        "predicted_est_step_s": predicted.get("est_step_s"),
        "compiled": tries,
    }
    return ((s, real) if real["fits"] else None), note


def cloud_name(generation: str, chips: int) -> str:
    """The Cloud name of a slice of ``chips`` chips (v4 and v5p names count TensorCores)."""
    return f"{generation}-{2 * chips if generation in ('v4', 'v5p') else chips}"


def needs(topo, measured: list[dict]) -> str:
    """What a plan that fits nowhere would need: about the chips that bring the smallest
    per-chip need within HBM (sharded state and the microbatch shrink with the chips)."""
    g = topo.generation
    asked = [
        m.get("hbm_total_gib") or m.get("hbm_temporaries_needed_gib")
        for m in measured
        if m.get("hbm_total_gib") or m.get("hbm_temporaries_needed_gib")
    ]
    if not asked:
        return (
            f"nothing fits {g.hbm_gib:g} GiB per chip on {topo.chips} chips, not even a "
            "microbatch of 1 per chip: try a slice with more chips"
        )
    need = min(asked)
    factor = 2 ** math.ceil(math.log2(max(need / g.hbm_gib, 1.0001)))
    chips = topo.chips * factor
    return (
        f"nothing fits {g.hbm_gib:g} GiB per chip on {topo.chips} chips (the least needs "
        f"{need:.1f} GiB): try {chips} chips ({cloud_name(g.name, chips)}) or more"
    )


def plan_record(
    config,
    topo,
    *,
    config_name,
    winner,
    candidates,
    measured,
    compiles,
    cache_hits,
    stopped,
    depth_points,
    verified,
) -> dict[str, Any]:
    """Every key of a plan; None where unknown."""
    slices = config.mesh.num_slices
    chips = topo.chips * slices
    gb = config.train.global_batch_size
    s, r = winner if winner else (None, {})
    r = r or {}
    out: dict[str, Any] = {
        "config": config_name,
        "topology": topo.name,
        "topology_name": topo.topology_name,
        "num_slices": slices,
        "chips": chips,
        "generation": topo.generation.name,
        "global_batch": gb,
        "per_chip_batch": gb // chips if gb % chips == 0 else None,
        "model": model_identity(config),
        "fits": bool(s is not None and r.get("fits", True)),
        "settings": dataclasses.asdict(s) if s else None,
        "mesh": (
            {"dcn": slices, "data": s.data, "fsdp": s.fsdp, "tensor": s.tensor} if s else None
        ),
        "grad_accum_steps": s.accum if s else None,
        "microbatch_per_chip": (gb // chips // s.accum) if s and gb % chips == 0 else None,
        "remat": s.remat if s else None,
        "scan_layers": s.scan if s else None,
        "overrides": s.overrides() if s else None,
        "override_line": " ".join(s.overrides()) if s else None,
        "hbm_per_chip_gib": r.get("hbm_per_chip_gib"),
        "hbm_capacity_gib": topo.generation.hbm_gib,
        "est_step_s": r.get("est_step_s"),
        "est_img_per_s_per_chip": r.get("est_img_per_s_per_chip"),
        "est_mfu": r.get("est_mfu"),
        "estimate": {k: v for k, v in r.items() if k.startswith("est_")} or None,
        "estimate_basis": r.get("estimate_basis"),
        "depth_basis": r.get("basis"),
        "collectives": r.get("collectives"),
        "verified": verified,
        "needs": None if s else needs(topo, measured),
        "search": {
            "compiles": compiles,
            "cache_hits": cache_hits,
            "stopped": stopped,
            "depth_points": list(depth_points) if depth_points else None,
            "measured": measured,
            "candidates": [
                dict(
                    dataclasses.asdict(c),
                    est_step_s=e.get("est_step_s"),
                    est_mfu=e.get("est_mfu"),
                    hbm_total_gib=(e.get("hbm_per_chip_gib") or {}).get("total"),
                )
                for c, e in candidates
            ],
        },
    }
    return out


def model_identity(config) -> dict[str, Any]:
    """What a plan must agree on with the config it is applied to (the training, not how)."""
    m = config.model
    size = PRESETS[m.preset] if m.preset else None
    return {
        "preset": m.preset or None,
        "width": size.width if size else m.width,
        "depths": list(depths(config)),
        "grid_size": config.latent.grid_size,
        "channels": config.latent.channels,
        "global_batch": config.train.global_batch_size,
    }


def format_plan(p: dict[str, Any]) -> str:
    """A few lines for people: the settings, the estimate, the override line."""
    if not p["overrides"]:
        return f"plan for {p['config']} on {p['topology']}: none fits. {p['needs']}"
    est = p.get("est_step_s")
    lines = [
        f"plan for {p['config']} on {p['topology']} ({p['chips']} chips), global batch "
        f"{p['global_batch']}: mesh data {p['mesh']['data']} x fsdp {p['mesh']['fsdp']} x "
        f"tensor {p['mesh']['tensor']}, {p['grad_accum_steps']} x {p['microbatch_per_chip']} "
        f"per chip, remat {p['remat']}, scan_layers {p['scan_layers']}",
        f"HBM per chip {(p['hbm_per_chip_gib'] or {}).get('total', 'n/a')} of "
        f"{p['hbm_capacity_gib']:g} GiB; est. step "
        + (
            "n/a"
            if est is None
            else f"{est:.4f} s, {p['est_img_per_s_per_chip']:.1f} img/s per "
            f"chip, MFU {p['est_mfu']:.1%}"
            if p.get("est_mfu")
            else f"{est:.4f} s"
        ),
        "est. parts (s): "
        + ", ".join(
            f"{k[4:-2]} {v:.4f}"
            for k, v in (p.get("estimate") or {}).items()
            if k.endswith("_s") and k != "est_step_s" and isinstance(v, (int, float))
        ),
        f"search: {p['search']['compiles']} compiles, {p['search']['cache_hits']} cached"
        + (f"; {p['search']['stopped']}" if p["search"]["stopped"] else "")
        + (f"; {p['depth_basis']}" if p.get("depth_basis") else "")
        + (
            f"; compiled as planned (predicted HBM {p['verified']['predicted_hbm_total_gib']} GiB)"
            if p.get("verified")
            else ""
        ),
        "override line: " + p["override_line"],
    ]
    return "\n".join(lines)
