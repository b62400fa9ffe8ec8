"""Per-step statistics read from a compiled module's HLO text (``compiled.as_text()``).

`collectives` counts the cross-chip collectives one execution of the module runs, by kind, with
the bytes each moves. A collective inside a ``while`` body (a scan over layers) runs once per
iteration: each computation's counts are multiplied by the trip count XLA recorded for its loop
(``known_trip_count`` in the loop's backend config), through every level of nesting.

Compiled TPU modules often carry no ``known_trip_count``; then the count is read from the loop
as `xar_jax.hlo_cost` reads it: ``i < N`` in the condition with a constant N, the counter's start
in the loop's initial tuple and its step in the body (every `jax.lax.scan` and ``fori_loop`` with
static bounds counts from 0 by 1; XLA's windowed einsums, the collective matmuls, count by 2).

Bytes are those of the collective's result on one chip (all-gather: the gathered array;
reduce-scatter: the scattered shard; all-reduce: the reduced array), summed over executions.

TPU's compiler writes a reduce-scatter as a fusion whose computation is named
``all-reduce-scatter`` (an ``all-reduce`` of the whole array and a ``dynamic-slice`` of this
chip's shard, run as one reduce-scatter): it is counted as a reduce-scatter with the fusion's
result (the shard), and the all-reduce inside it is not counted. A program for several slices
is compiled per slice; what crosses slices is a ``send`` to the multi-slice runtime marked with
the collective it implements: counted under that kind and, separately, under ``'dcn'`` (bytes
sent per chip).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from xar_jax.hlo_cost import _DTYPE_BYTES, REDUCE_SCATTER_FUSION, loop_trip_counts

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_OP = re.compile(r"\s(" + "|".join(KINDS) + r")(-start)?\(")
_CALLEE = re.compile(r"\b(?:calls|body|to_apply|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_COND = re.compile(r"\bcondition=%?([\w.\-]+)")
_INT_CONST = re.compile(r"=\s*[su](?:32|64)\[\]\S*\s+constant\((\d+)\)")


@dataclasses.dataclass
class _Computation:
    own: dict[str, list[float]]  # kind -> [count, bytes]
    # (callee, executions per execution of this computation; None = the trip count of the loop
    # whose condition is the third entry).
    calls: list[tuple[str, int | None, str]]
    int_constants: list[int] = dataclasses.field(default_factory=list)
    less_than: bool = False


def _array_bytes(shape_text: str) -> list[float]:
    """Bytes of each array in an HLO shape (a tuple gives several)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(n * _DTYPE_BYTES[dtype])
    return out


def _result_bytes(shape_text: str, is_start: bool) -> float:
    arrays = _array_bytes(shape_text)
    if is_start and len(arrays) > 1:
        # Async starts return (operands..., results..., [scalar contexts]): keep the results.
        arrays = [a for a in arrays if a > 4] or arrays
        arrays = arrays[len(arrays) // 2 :]
    return float(sum(arrays))


def _parse(text: str) -> tuple[dict[str, _Computation], str, list[str]]:
    comps: dict[str, _Computation] = {}
    entry, current, unknown_trips = "", None, []
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = _Computation(own={}, calls=[])
            comps[header.group(1)] = current
            if line.startswith("ENTRY"):
                entry = header.group(1)
            continue
        if current is None or "=" not in line:
            continue
        const = _INT_CONST.search(line)
        if const:
            current.int_constants.append(int(const.group(1)))
        if "direction=LT" in line:
            current.less_than = True
        rhs = line.split("=", 1)[1]
        op = _OP.search(rhs)
        callees = _CALLEE.findall(line)
        fused_rs = [c for c in callees if c.startswith(REDUCE_SCATTER_FUSION)]
        if fused_rs:
            # TPU's reduce-scatter: a fusion around an all-reduce and the dynamic-slice of this
            # chip's shard, run as one reduce-scatter. Counted as that, its body not entered.
            shape = rhs[: rhs.index(" fusion(")] if " fusion(" in rhs else rhs
            counts = current.own.setdefault("reduce-scatter", [0, 0.0])
            counts[0] += 1
            counts[1] += _result_bytes(shape, False)
            callees = [c for c in callees if c not in fused_rs]
        elif op:
            shape = rhs[: op.start()]
            counts = current.own.setdefault(op.group(1), [0, 0.0])
            counts[0] += 1
            counts[1] += _result_bytes(shape, bool(op.group(2)))
        elif " send(" in rhs and (dcn := _MEGASCALE.search(line)):
            # Between slices: a send to the multi-slice runtime, marked with its collective.
            kind = dcn.group(1).lower().replace("_", "-")
            sent = float((_array_bytes(rhs[: rhs.index(" send(")]) or [0.0])[0])
            for key in (kind, "dcn"):
                counts = current.own.setdefault(key, [0, 0.0])
                counts[0] += 1
                counts[1] += sent
        for group in _BRANCHES.findall(line):
            callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        if not callees:
            continue
        times, cond = 1, ""
        if " while(" in line:
            trip = _TRIP.search(line)
            cond_match = _COND.search(line)
            if trip:
                times = int(trip.group(1))
            elif cond_match:
                times, cond = None, cond_match.group(1)
            else:
                unknown_trips.append(line.split("=", 1)[0].strip())
        current.calls += [(c, times, cond) for c in callees]
    return comps, entry, unknown_trips


def _trip_count(comps: dict[str, _Computation], cond: str) -> int | None:
    c = comps.get(cond)
    if c is not None and c.less_than and len(c.int_constants) == 1:
        return c.int_constants[0]
    return None


def collectives(hlo_text: str) -> dict[str, Any]:
    """Collectives of one execution of the module: ``{kind: {'count', 'bytes'}}`` for every kind
    in `KINDS` and ``'dcn'`` (zeros included), plus ``'unknown_trip_counts'``: loops counted once because XLA
    recorded no trip count (an undercount; empty in the train step's scan over layers)."""
    comps, entry, unknown = _parse(hlo_text)
    trips = loop_trip_counts(hlo_text)
    memo: dict[str, dict[str, list[float]]] = {}

    def total(name: str, depth: int = 0) -> dict[str, list[float]]:
        if name in memo:
            return memo[name]
        comp = comps.get(name)
        out: dict[str, list[float]] = {}
        if comp is not None and depth < 64:
            for kind, (n, b) in comp.own.items():
                out[kind] = [n, b]
            for callee, times, cond in comp.calls:
                if times is None:
                    times = trips.get(cond, _trip_count(comps, cond))
                    if times is None:
                        unknown.append(f"loop with condition {cond}")
                        times = 1
                for kind, (n, b) in total(callee, depth + 1).items():
                    acc = out.setdefault(kind, [0, 0.0])
                    acc[0] += times * n
                    acc[1] += times * b
        memo[name] = out
        return out

    counts = total(entry) if entry else {}
    result: dict[str, Any] = {
        k: {"count": int(counts.get(k, [0, 0])[0]), "bytes": int(counts.get(k, [0, 0.0])[1])}
        for k in (*KINDS, "dcn")
    }
    result["unknown_trip_counts"] = unknown
    return result


def layer_copies_compiled(depth: int, unroll: int) -> int:
    """How many copies of a block a layer scan of ``depth`` compiles, at ``unroll`` per iteration.

    The cost analysis counts each copy once: the ``unroll`` copies of the loop body, plus the
    ``depth % unroll`` remainder that jax's scan unrolls after the loop; a scan of at most one
    iteration (unroll >= depth) is unrolled whole.
    """
    if unroll >= depth:
        return depth
    return unroll + depth % unroll


_ENTRY_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+(fusion|custom-call|copy|transpose)\((.*)$"
)
_LAYOUT_ARRAY = re.compile(r"\b(\w+)\[([\d,]+)\]\{([\d,]+)")


def entry_traffic(hlo_text: str, batch: int) -> dict[str, float]:
    """What a compiled GPU module's top-level (ENTRY) ops write in transposes and zero fills.

    ``transpose_gb``: bytes written by transposes (fusions XLA named for one, and plain ones);
    ``zero_fill_gb``: by fusions without operands (the fill of a broadcast constant, e.g. a
    scan's stacked outputs); ``allocate_buffers``: uninitialised buffers (``AllocateBuffer``);
    ``batch_minor_arrays``: arrays of rank >= 3 with the batch axis minor-most, either by layout
    (before layout normalisation) or, as the optimised program writes them, as the last logical
    axis of an array not led by it (f32[K, n, D, B]: the layout that forced the transposes);
    ``written_gb``: all of the above ops.
    The byte counts do not enter loop bodies (a scan's work shows once, in its while op's
    buffers); ``batch_minor_arrays`` counts the arrays of every computation in the text.
    """
    entry = hlo_text[hlo_text.index("\nENTRY") :] if "\nENTRY" in hlo_text else hlo_text
    out = {"written_gb": 0.0, "transpose_gb": 0.0, "zero_fill_gb": 0.0, "allocate_buffers": 0}
    for line in entry.splitlines():
        m = _ENTRY_OP.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        gb = sum(_array_bytes(shape)) / 1e9
        out["written_gb"] += gb
        if op == "transpose" or (op == "fusion" and "transpose" in name):
            out["transpose_gb"] += gb
        elif op == "fusion" and rest.startswith(")"):
            out["zero_fill_gb"] += gb
        elif op == "custom-call" and 'custom_call_target="AllocateBuffer"' in rest:
            out["allocate_buffers"] += 1
    b = str(batch)
    out["batch_minor_arrays"] = sum(
        1
        for _, dims, layout in _LAYOUT_ARRAY.findall(hlo_text)
        if dims.count(",") >= 2
        and (
            (dims.split(",")[0] == b and layout.split(",")[0] == "0")
            or (dims.split(",")[-1] == b and dims.split(",")[0] != b)
        )
    )
    return out
