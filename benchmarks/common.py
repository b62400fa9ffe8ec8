"""Shared pieces of the benchmark scripts: configs and overrides, FLOP counts, timing, output.

The train and sample benchmarks build what they time from a config, as `python -m xar_jax.main`
does (`xar_jax.experiment.build`); run them as modules: ``python -m benchmarks.train_step``.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from xar_jax import model as xar_model

JSON_PATH = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.json")


def flop_counts(model: xar_model.XAR) -> dict[str, float]:
    """Forward FLOPs per image.

    ``model``: 2 x non-embedding params x tokens + attention (the model FLOPs of the MFU column;
    x3 for training). ``actual``: what the network computes: the adaLN projection runs once per
    entity, not per token, and the padded MLP width counts.
    """
    lay = model.layout
    n, k, d = lay.num_tokens, lay.num_entities, model.width
    layers = model.encoder_depth + model.decoder_depth
    hidden = model.mlp_hidden
    padded = xar_model.round_up(hidden, model.mlp_multiple)
    block_no_ada = 4 * d * d + 3 * d * hidden
    ada = 6 * d * d
    top = 16 * d + 2 * d * d + d * d + d * 16  # z_proj, time MLP (per entity), decoder_embed, pred.
    attention = 2 * 2 * n * n * d * layers  # QK^T and PV over the full (masked) sequence.
    model_flops = 2 * n * (layers * (block_no_ada + ada) + top) + attention
    actual = (
        2 * n * (layers * (4 * d * d + 3 * d * padded) + top) + 2 * k * layers * ada + attention
    )
    return {"model": float(model_flops), "actual": float(actual)}


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls, each synchronised with the device."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def device_name() -> str:
    dev = jax.devices()[0]
    return f"{dev.platform}:{getattr(dev, 'device_kind', '?')} x{jax.device_count()}"


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)))


def update_json(section: str, results: dict[str, Any], path: str | None = None) -> str:
    """Merges ``{section: results}`` into docs/benchmarks.json; each row gets its device, date and
    jax version."""
    path = path or os.environ.get("XAR_BENCH_JSON", JSON_PATH)
    data: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    stamp = {
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
    }
    data.setdefault(section, {}).update({k: {**row, **stamp} for k, row in results.items()})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


BF16_PEAK_TFLOPS = {"NVIDIA H200": 795.0, "NVIDIA H100 80GB HBM3": 795.0}


def peak_tflops() -> float | None:
    """Measured bf16 matmul peak of the device (about 795 TFLOP/s on the H200 and the H100)."""
    kind = getattr(jax.devices()[0], "device_kind", "")
    return BF16_PEAK_TFLOPS.get(kind)


def report(section: str, rows: list[dict[str, Any]], columns: list[str], args: Any) -> None:
    """Prints the device and the summary table, then merges the rows into the JSON under
    ``section`` (keys: model + ``args.tag``) unless ``args.no_json`` or ``args.tiny``."""
    print(f"\ndevice: {device_name()}")
    print_table(rows, columns)
    if not args.no_json and not getattr(args, "tiny", False):
        path = update_json(section, {r["model"] + args.tag: r for r in rows})
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# Configs: a config file with --config.X overrides (as xar_jax.main), plus named override sets.
# 'fast': the fastest measured recipe, without the paper's attention-probability dropout ('auto'
# then takes cuDNN's attention on a GPU); the other dropouts stay on.
OVERRIDES: dict[str, dict[str, Any]] = {
    "fast": {"model.attn_dropout": 0.0},
}


def define_config_flags() -> None:
    """``--config=FILE`` with ``--config.X=...`` overrides (as xar_jax.main) and ``--overrides``."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Training config file (configs/*.py).", lock_config=True
    )
    flags.DEFINE_list("overrides", [], f"Named override sets, in order: {', '.join(OVERRIDES)}.")
    flags.mark_flags_as_required(["config"])


def apply_overrides(config, names: list[str]):
    """``config`` with the named override sets applied in order (a copy; exits on an unknown
    name)."""
    config = copy.deepcopy(config)
    for name in names:
        if name not in OVERRIDES:
            raise SystemExit(f"--overrides={name!r}; allowed: {', '.join(OVERRIDES)}.")
        with config.unlocked():
            for field, value in OVERRIDES[name].items():
                *path, leaf = field.split(".")
                node = config
                for part in path:
                    node = node[part]
                node[leaf] = value
    return config


def add_xla_option_flag(parser) -> None:
    """``--xla_option NAME=VALUE`` (repeatable): an XLA debug option for this program's compile
    only (`jax.stages.Lowered.compile`'s ``compiler_options``), e.g.
    ``xla_gpu_enable_dynamic_slice_fusion=true``."""
    parser.add_argument("--xla_option", action="append", default=[], metavar="NAME=VALUE")


def xla_options(pairs: list[str]) -> dict[str, bool | int | str] | None:
    """``["name=value", ...]`` -> ``{"name": value}`` for ``compile(compiler_options=...)``, or
    None when empty. Exits naming the malformed pair."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--xla_option {pair!r}: expected NAME=VALUE.")
        # XLA reads typed values: Python bools and ints, strings otherwise.
        lowered = value.lower()
        if lowered in ("true", "false"):
            options[name] = lowered == "true"
        elif value.lstrip("-").isdigit():
            options[name] = int(value)
        else:
            options[name] = value
    return options or None
