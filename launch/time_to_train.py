"""Time to train the paper's recipes on Cloud TPU slices, from the AOT planner (docs/tpu.md).

For each (model, slice) row it runs the planner, ``python -m xar_jax.aot --plan`` (the fastest
settings that fit, with their estimate; compile reports cached on disk), and, per model, the
sampler's compile (``--what=sample``) for the 50,000-image FID run; the results are kept in
``docs/time_to_train.json`` and the table is written between the marker comments of docs/tpu.md.
Rows whose plan is not in the JSON yet are listed as "not run" with the command that makes them.

    python launch/time_to_train.py --run [--models=h --slices=v5p-256]   # plan what is missing
    python launch/time_to_train.py --update docs/tpu.md                  # rewrite the table

Hours = 800 epochs x 1,281,167 images / (est. img/s per chip x chips); chip-hours and list-price
dollars from launch/projections.py's prices (assumed; check the pricing page).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import aot_table
import projections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "docs", "time_to_train.json")
BEGIN, END = "<!-- time-to-train:begin -->", "<!-- time-to-train:end -->"
MODELS = {"b": "xAR-B", "l": "xAR-L", "h": "xAR-H"}
# (slice, slices): the slices the table covers.
SLICES = (
    ("v5p-32", 1),
    ("v5p-128", 1),
    ("v5p-256", 1),
    ("v5p-512", 1),
    ("v5p-128", 2),
    ("v6e-16", 1),
    ("v6e-64", 1),
    ("v6e-256", 1),
    ("v5litepod-64", 1),
    ("v5litepod-256", 1),
)
# The search per row: the planner's defaults (the config's remat and layer scan) over the three
# most sharded data x fsdp meshes, two compiles side by side, the winner compiled as planned.
PLAN_FLAGS = ("--plan_meshes=3", "--plan_jobs=2")


def row_key(model: str, topology: str, slices: int) -> str:
    return f"{model}/{topology}/{slices}"


def plan_command(model: str, topology: str, slices: int, cache: str | None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "xar_jax.aot",
        "--plan",
        f"--config=configs/xar_{model}.py",
        f"--topology={topology}",
        f"--num_slices={slices}",
        *PLAN_FLAGS,
        "--json=-",
        *([f"--plan_cache={cache}"] if cache else []),
    ]


def sample_command(model: str, topology: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "xar_jax.aot",
        "--what=sample",
        f"--config=configs/xar_{model}.py",
        f"--topology={topology}",
        "--json=-",
    ]


def load() -> dict:
    if not os.path.exists(RESULTS):
        return {"plans": {}, "samplers": {}}
    with open(RESULTS) as f:
        return json.load(f)


def save(results: dict) -> None:
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, RESULTS)


def add(paths: list[str]) -> None:
    """Puts plan JSON files (``python -m xar_jax.aot --plan --json=FILE``) into the results."""
    if not paths:
        return
    results = load()
    for path in paths:
        with open(path) as f:
            p = json.load(f)
        model = re.sub(r"^xar_", "", os.path.splitext(os.path.basename(p["config"]))[0])
        results["plans"][row_key(model, p["topology"], p["num_slices"])] = p
    save(results)


def run(
    models: list[str],
    slices: list[tuple[str, int]],
    sampler_topology: str | None,
    cache: str | None,
) -> None:
    """Plans every missing row (and samplers), saving after each so an interrupted run keeps
    what it made."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for model in models:
        for topology, n in slices:
            results = load()
            key = row_key(model, topology, n)
            if key in results["plans"]:
                continue
            cmd = plan_command(model, topology, n, cache)
            print("running:", " ".join(cmd[1:]), flush=True)
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            results = load()
            results["plans"][key] = json.loads(proc.stdout)
            save(results)
        if sampler_topology:
            results = load()
            if model not in results["samplers"]:
                proc = subprocess.run(
                    sample_command(model, sampler_topology),
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if proc.returncode == 0:
                    results = load()
                    results["samplers"][model] = json.loads(proc.stdout)
                    save(results)


def _price(generation: str) -> float | None:
    for chip in projections.CHIPS:
        if chip.name == generation:
            return chip.usd_per_chip_hour
    return None


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def sampler_hours(record: dict | None) -> str:
    """The 50,000-sample run on the sampler's slice, where the sampler has an estimate."""
    if not record or not record.get("est_step_s"):
        return "n/a"
    batches = -(-projections.FID_SAMPLES // record["global_batch"])
    hours = batches * record["est_step_s"] / 3600
    return (
        f"{hours:.2f} h on {record['topology']} ({record['global_batch']} per batch; "
        "the sampler only, VAE decoding not included)"
    )


def table(results: dict) -> str:
    images = projections.EPOCHS * projections.IMAGENET_TRAIN
    header = (
        "| model | slice | chips | plan: mesh data x fsdp, accum x micro / chip, remat | "
        "HBM / chip GiB (of) | est. img/s / chip | est. MFU | hours | chip-hours | "
        "list $ | compiles (cached) |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for model, name in MODELS.items():
        for topology, n in SLICES:
            p = results["plans"].get(row_key(model, topology, n))
            slice_text = topology + (f" x {n}" if n > 1 else "")
            if p is None:
                rows.append(
                    f"| {name} | {slice_text} | | not run: `python launch/"
                    f"time_to_train.py --run --models={model} --slices={topology}"
                    + (f"x{n}" if n > 1 else "")
                    + "` | | | | | | | |"
                )
                continue
            if not p.get("overrides"):
                rows.append(
                    f"| {name} | {slice_text} | {p['chips']} | {p['needs']} | | | | | "
                    f"| | {p['search']['compiles']} |"
                )
                continue
            rate = p.get("est_img_per_s_per_chip")
            hours = images / (rate * p["chips"]) / 3600 if rate else None
            chip_hours = hours * p["chips"] if hours else None
            price = _price(p["generation"])
            dollars = chip_hours * price if chip_hours and price else None
            hbm = (p.get("hbm_per_chip_gib") or {}).get("total")
            plan_text = (
                f"{p['mesh']['data']} x {p['mesh']['fsdp']}, {p['grad_accum_steps']} x "
                f"{p['microbatch_per_chip']}, {p['remat']}"
            )
            rows.append(
                f"| {name} | {slice_text} | {p['chips']} | {plan_text} | "
                f"{_num(hbm, '.1f')} ({p['hbm_capacity_gib']:g}) | {_num(rate, ',.0f')} | "
                f"{_num(p.get('est_mfu'), '.0%')} | {_num(hours, ',.1f')} | "
                f"{_num(chip_hours, ',.0f')} | {_num(dollars, ',.0f')} | "
                f"{p['search']['compiles']} ({p['search']['cache_hits']}) |"
            )
    samplers = results.get("samplers", {})
    lines = ["", "| model | 50,000 FID samples |", "|---|---|"]
    for model, name in MODELS.items():
        lines.append(f"| {name} | {sampler_hours(samplers.get(model))} |")
    dates = sorted({p.get("date", "?") for p in results["plans"].values()}) or ["-"]
    libtpu = sorted({p.get("libtpu", "?") for p in results["plans"].values()}) or ["-"]
    head = (
        f"Written by `python launch/time_to_train.py --update docs/tpu.md` from plans made "
        f"on {', '.join(dates)} (libtpu {', '.join(libtpu)}; planner flags "
        f"`{' '.join(PLAN_FLAGS)}`); prices: {projections.PRICE_NOTE}"
    )
    return head + "\n\n" + "\n".join(rows + lines)


def _slices(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, n = item.partition("x")
        if n and not name.endswith("-"):
            out.append((name, int(n)))
        else:
            out.append((item, 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="plan the rows not in the JSON yet")
    parser.add_argument("--models", default="b,l,h", help="comma list of b, l, h")
    parser.add_argument(
        "--slices",
        default=",".join(t + (f"x{n}" if n > 1 else "") for t, n in SLICES),
        help="e.g. v5p-256,v5p-128x2",
    )
    parser.add_argument(
        "--sampler_topology", default="v5p-8", help="slice the sampler is compiled for ('' to skip)"
    )
    parser.add_argument("--cache", help="the planner's --plan_cache (default: its own)")
    parser.add_argument("--add", nargs="*", default=[], help="plan JSON files to take in")
    parser.add_argument("--update", help="replace the marked table in this markdown file")
    args = parser.parse_args()
    add(args.add)
    if args.run:
        run(args.models.split(","), _slices(args.slices), args.sampler_topology or None, args.cache)
    text = table(load())
    if args.update:
        aot_table.update(args.update, text, BEGIN, END)
    else:
        print(text)


if __name__ == "__main__":
    main()
