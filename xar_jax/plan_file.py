"""A plan in the trainer: ``train.plan`` = a plan file of `xar_jax.plan`, or ``auto``.

`config_with_plan` checks a plan against the config and the run's devices (`check_plan`: the
same model, global batch, number of slices, chip generation and count) and applies its
overrides before the config is validated; ``auto`` runs the planner for the run's own TPU slice
first (`python -m xar_jax.aot --plan` in a subprocess: its absl flags would clash with the
trainer's), and is refused off TPU, where the search cannot compile for the chips it would run
on.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
from typing import Any

from xar_jax import fileio
from xar_jax.errors import UserError
from xar_jax.plan import cloud_name, model_identity

log = logging.getLogger("xar_jax.plan_file")
# What a plan may set: how the step runs, never what is trained.
PLAN_FIELDS = (
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "train.grad_accum_steps",
    "model.remat",
    "model.scan_layers",
    "model.scan_unroll",
)


def generation_of(device_kind: str) -> str | None:
    """The TPU generation of a jax ``device_kind`` ('TPU v5 lite' -> 'v5e'); None off TPU."""
    kind = device_kind.lower().replace(" ", "")
    for names, gen in (
        (("v5lite", "v5e"), "v5e"),
        (("v6lite", "v6e"), "v6e"),
        (("v5p", "tpuv5"), "v5p"),
        (("tpuv4",), "v4"),
    ):
        if any(n in kind for n in names):
            return gen
    return None


def check_plan(plan: dict[str, Any], config, *, devices: list | None) -> None:
    """Raises UserError (one line) if ``plan`` was made for another model, global batch or
    slice. ``devices``: this run's (None: only the config is checked, as ``--check_only`` does).
    """
    where = f"train.plan: the plan ({plan.get('config')} on {plan.get('topology')})"
    if not plan.get("overrides"):
        raise UserError(f"{where} has no settings that fit: {plan.get('needs')}")
    mine = model_identity(config)
    theirs = plan.get("model") or {}
    for key in ("preset", "width", "depths", "grid_size", "channels"):
        if theirs.get(key) != mine[key]:
            raise UserError(
                f"{where} is for another model: {key} {theirs.get(key)} there, {mine[key]} here."
            )
    if plan.get("global_batch") != config.train.global_batch_size:
        raise UserError(
            f"{where} is for global batch {plan.get('global_batch')}; "
            f"train.global_batch_size is {config.train.global_batch_size}."
        )
    if plan.get("num_slices", 1) != config.mesh.num_slices:
        raise UserError(
            f"{where} is for {plan.get('num_slices')} slice(s); mesh.num_slices is "
            f"{config.mesh.num_slices}."
        )
    for item in plan["overrides"]:
        field = item.removeprefix("--config.").split("=", 1)[0]
        if field not in PLAN_FIELDS:
            raise UserError(f"{where} sets {field}; a plan may set only {', '.join(PLAN_FIELDS)}.")
    if devices is None:
        return
    kind = devices[0].device_kind
    if generation_of(kind) != plan.get("generation") or len(devices) != plan.get("chips"):
        raise UserError(
            f"{where} is for {plan.get('chips')} TPU {plan.get('generation')} chips; "
            f"this run has {len(devices)} {devices[0].platform} device(s) ({kind})."
        )


def apply_overrides(config, overrides: list[str]):
    """``config`` with ``--config.a.b=v`` overrides applied (a copy)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for item in overrides:
            field, value = item[len("--config.") :].split("=", 1)
            *parents, leaf = field.split(".")
            node = config
            for p in parents:
                node = node[p]
            old = node[leaf]
            if isinstance(old, bool):
                node[leaf] = value == "True"
            else:
                node[leaf] = type(old)(value)
    return config


def load_plan(path: str) -> dict[str, Any]:
    """The plan file at ``path`` (local or gs://)."""
    try:
        return fileio.read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"train.plan={path!r}: cannot read a plan file ({e}).") from None


def search_in_subprocess(
    argv: list[str], generation: str, chips: int, num_slices: int
) -> dict[str, Any]:
    """``train.plan=auto``: the AOT planner (`python -m xar_jax.aot --plan`) for this slice, run
    with the trainer's config file and overrides; compile reports cached as the CLI caches them.
    """
    args = [
        a for a in argv[1:] if a.startswith("--config") and not a.startswith("--config.train.plan=")
    ]
    topology = cloud_name(generation, chips // num_slices)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        cmd = [
            sys.executable,
            "-m",
            "xar_jax.aot",
            "--plan",
            f"--topology={topology}",
            f"--num_slices={num_slices}",
            *args,
            f"--json={out}",
        ]
        log.info("train.plan=auto: %s", " ".join(cmd))
        proc = subprocess.run(cmd, check=False)
        if proc.returncode or not os.path.exists(out):
            raise UserError(
                f"train.plan=auto: the planner failed (exit {proc.returncode}): {' '.join(cmd)}"
            )
        with open(out) as f:
            return json.load(f)


def config_with_plan(config, *, devices: list | None, argv: list[str]):
    """``config`` with ``train.plan`` applied: a plan file's overrides, or (``auto``) those of a
    search for these devices. Checked first (`check_plan`); ``devices=None`` (``--check_only``)
    checks a plan file against the config only and leaves ``auto`` for the run.

    Raises:
      UserError: unreadable or mismatched plan file; ``auto`` off TPU.
    """
    value = config.train.plan
    if not value:
        return config
    if value == "auto":
        if devices is None:
            return config
        generation = generation_of(devices[0].device_kind)
        if devices[0].platform != "tpu" or generation is None:
            raise UserError(
                f"train.plan='auto' searches on TPU devices; this run has {len(devices)} "
                f"{devices[0].platform} device(s): make a plan with python -m xar_jax.aot --plan "
                "--config=... --topology=... --json=plan.json and pass --config.train.plan="
                "plan.json."
            )
        plan = search_in_subprocess(argv, generation, len(devices), config.mesh.num_slices)
    else:
        plan = load_plan(value)
    check_plan(plan, config, devices=devices)
    log.info("train.plan: %s", plan["override_line"])
    return apply_overrides(config, plan["overrides"])
