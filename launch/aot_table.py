"""The runbook's table of ahead-of-time compiled results (docs/tpu.md, section 5).

Reads the records that ``python -m xar_jax.aot --record=docs/tpu_aot.json`` wrote and prints a
markdown table; ``--update docs/tpu.md`` replaces the table between its marker comments.

    python launch/aot_table.py [--json docs/tpu_aot.json] [--update docs/tpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"
MODEL_NAMES = {"xar_b": "xAR-B", "xar_l": "xAR-L", "xar_h": "xAR-H"}


def _model(config: str) -> str:
    stem = os.path.splitext(os.path.basename(config))[0]
    return MODEL_NAMES.get(stem, stem)


def _mib(collectives: dict, kind: str) -> str:
    c = collectives.get(kind, {})
    return f"{c.get('count', 0)} / {c.get('bytes', 0) / 2**20:,.0f}"


def _batch(r: dict) -> str:
    accum = r.get("grad_accum_steps", 1)
    b = r["per_chip_batch"]
    return f"{b} ({accum} x {b // accum})" if accum > 1 else str(b)


def _hbm(r: dict) -> str:
    total = (r.get("hbm_per_chip_gib") or {}).get("total")
    if total is not None:
        return f"{total:.1f}"
    needed = r.get("hbm_temporaries_needed_gib")
    return f"temporaries alone {needed:.1f}" if needed else "n/a"


def _step(r: dict) -> str:
    if r.get("est_step_s") is None:
        return "n/a"
    if r.get("est_collective_s") is None:  # A record of the earlier whole-step roofline.
        return f"{r['est_step_s']:.3f} ({r['est_compute_s']:.3f} / {r['est_memory_s']:.3f})"
    return (
        f"{r['est_step_s']:.3f} (compute+memory {r['est_compute_memory_s']:.3f} / "
        f"collectives {r['est_collective_s']:.3f})"
    )


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def table(records: list[dict]) -> str:
    """Markdown rows, one per record (sorted by model, chip generation, chips, slices, batch)."""
    header = (
        "| model | slice | chips | mesh (dcn, data, fsdp, tensor) | batch / chip | "
        "HBM / chip GiB (of) | fits | compile s | est. step s (parts) | "
        "est. img/s / chip | est. MFU | "
        "all-gather n / MiB | reduce-scatter n / MiB | all-reduce n / MiB | max batch / chip |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    order = sorted(
        records,
        key=lambda r: (
            _model(r["config"]),
            r["topology"].split("-")[0],
            r["chips"],
            r["num_slices"],
            r["per_chip_batch"],
        ),
    )
    for r in order:
        if r.get("what", "train") != "train":
            continue
        mesh = r.get("mesh") or {}
        mesh_text = ", ".join(str(mesh.get(k, "?")) for k in ("dcn", "data", "fsdp", "tensor"))
        slice_text = r["topology"] + (f" x {r['num_slices']}" if r["num_slices"] > 1 else "")
        c = r.get("collectives") or {}
        rows.append(
            f"| {_model(r['config'])} | {slice_text} | {r['chips']} | "
            f"{mesh_text if mesh else 'n/a'} | {_batch(r)} | "
            f"{_hbm(r)} ({r['hbm_capacity_gib']:g}) | "
            f"{'yes' if r['fits'] else 'no'} | {r['compile_s']:.0f} | "
            f"{_step(r)} | {_num(r.get('est_img_per_s_per_chip'), ',.0f')} | "
            f"{_num(r.get('est_mfu'), '.0%')} | "
            + " | ".join(
                _mib(c, k) if c else "n/a" for k in ("all-gather", "reduce-scatter", "all-reduce")
            )
            + f" | {r.get('max_per_chip_batch', 'n/a')} |"
        )
    return "\n".join(rows)


def provenance(records: list[dict]) -> str:
    libtpu = sorted({r.get("libtpu", "?") for r in records})
    dates = sorted({r.get("date", "?") for r in records})
    return (
        f"Compiled on a CPU machine for abstract TPU devices with libtpu {', '.join(libtpu)} "
        f"on {', '.join(dates)}."
    )


def update(doc_path: str, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replaces the ``begin`` ... ``end`` block of the Markdown file ``doc_path`` with ``text``."""
    with open(doc_path) as f:
        doc = f.read()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{doc_path} has no {begin} ... {end} block to replace.")
    doc = pattern.sub(lambda _: f"{begin}\n{text}\n{end}", doc)
    with open(doc_path, "w") as f:
        f.write(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(REPO, "docs", "tpu_aot.json"))
    parser.add_argument("--update", help="replace the marked table in this markdown file")
    args = parser.parse_args()
    with open(args.json) as f:
        records = json.load(f)
    text = provenance(records) + "\n\n" + table(records)
    if args.update:
        update(args.update, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
