"""FLOPs and HBM bytes of one execution of a compiled module, read from its optimised HLO text.

XLA's own cost analysis (``compiled.cost_analysis()``) counts a ``while`` body once, and charges a
fusion that updates one slice of a loop-carried stacked buffer (a scan's per-layer outputs, its
gradients) as if it read and wrote the whole buffer. `module_cost` walks the text instead:

* Every computation runs as often as its callers say: a ``while`` body the loop's trip count
  (``known_trip_count``, else ``for (i = start; i < N; i += step)`` read from the condition,
  the initial tuple and the body: XLA's windowed einsums step by 2; `loop_trip_counts`), a fusion
  body as often as its fusion op, branches of a ``conditional`` once each (an upper bound).
* **FLOPs** are the matrix products, wherever they are (fusion bodies included): ``dot`` =
  2 x result elements x contracted size; ``convolution`` = 2 x result elements x kernel input
  features x kernel window; cuBLAS GEMM custom calls likewise from their dimension numbers.
  Element-wise work is not in the FLOPs (it runs on other units); it is counted apart (last
  item). Kernels the text cannot see into (Pallas/Mosaic/Triton custom calls) count only where
  their backend config carries a cost estimate (``"flops"``); the others are listed in
  ``opaque_kernels``.
* **HBM bytes** are counted per op outside fusion bodies, as the hardware moves them: operands
  read plus results written, where only arrays in HBM count (TPU layouts mark on-chip VMEM as
  memory space ``S(1)``: a ``copy-start`` that prefetches into VMEM is charged its read, and the
  fusion that then reads the VMEM copy is not charged for it; a ``slice-start``, an asynchronous
  slice that prefetches one chunk of an array, is charged the chunk, not the array). A fusion operand that the body
  only slices (``dynamic-slice``, ``slice``, ``gather``) is charged the slices; a fusion (or
  op) whose result is a ``dynamic-update-slice`` of an operand writes in place and is charged
  the update, not the buffer. Tuple plumbing, bitcasts, parameters, constants and loop ops
  move nothing.
* **Element-wise work** of a fusion without matrix products (`Op.element_ops`): the elements
  each arithmetic, logic, comparison or conversion op of its body computes, keyed by opcode and
  types; a ``reduce`` applies its reducer's ops once per input element. Ops that only move or
  index elements (broadcast, slice, transpose, pad, ...) count nothing: their cost is in the
  bytes. `xar_jax.gpu_kernel_time` turns these counts into time on a GPU's cores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any

# The computation name TPU's compiler gives a reduce-scatter it lowers as a fusion.
REDUCE_SCATTER_FUSION = "all-reduce-scatter"

_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
# An operand: an instruction's name, or element k of a tuple-shaped one as ``%name#k`` (the form
# newer XLA prints instead of a get-tuple-element).
_NAME = re.compile(r"%([\w.\-]+(?:#\d+)?)")
_SPACE = re.compile(r"S\((\d+)\)")
_TILE = re.compile(r":T\(([\d,]+)\)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_INT_CONST = re.compile(r"^[su](?:32|64)\[\]\S*$")

# Ops that move no data: tuple plumbing, views, control flow (their bodies are walked), the
# completions of async pairs (the start is charged).
_FREE = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "constant",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "copy-done",
    "slice-done",
    "all-gather-done",
    "all-reduce-done",
    "collective-permute-done",
    "async-done",
    "call-done",
    "send-done",
    "recv-done",
    "async-update",
    "domain",
    "get-dimension-size",
}
_SLICERS = {"dynamic-slice", "slice", "gather"}
# Ops that only move, view or index elements: no arithmetic per element (`Op.element_ops`).
_MOVES = (
    _FREE
    | _SLICERS
    | {
        "broadcast",
        "reshape",
        "transpose",
        "copy",
        "concatenate",
        "pad",
        "reverse",
        "iota",
        "dynamic-update-slice",
        "scatter",
        "bitcast-convert",
    }
)
_FLASH = re.compile(r'op_name="[^"]*flash_attention\w*_(fwd|dkdv|dq)/pallas_call')
_FLASH_UNITS = {"fwd": 4.0, "dkdv": 8.0, "dq": 6.0}
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublasLt$matmul")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    op: str
    operands: list[str]
    args: str  # The text between the op's parentheses (a constant's value, a parameter's index).
    attrs: str
    root: bool


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr] = dataclasses.field(default_factory=list)

    @property
    def root(self) -> Instr | None:
        return next((i for i in self.instrs if i.root), self.instrs[-1] if self.instrs else None)


def _match_paren(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def parse(text: str) -> tuple[dict[str, Computation], str]:
    """``({computation name: Computation}, entry name)`` of an HLO module's text."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = Computation(header.group(2))
            comps[current.name] = current
            if header.group(1):
                entry = current.name
            continue
        m = _INSTR.match(line)
        if current is None or not m:
            continue
        rest = line[m.end() :]
        if rest.startswith("("):
            end = _match_paren(rest, 0)
            shape, rest = rest[:end], rest[end:].lstrip()
        else:
            shape, _, rest = rest.partition(" ")
        op_match = re.match(r"([\w\-]+)\(", rest)
        if not op_match:
            continue
        end = _match_paren(rest, op_match.end() - 1)
        args = rest[op_match.end() : end - 1]
        current.instrs.append(
            Instr(
                m.group(2),
                shape,
                op_match.group(1),
                _NAME.findall(args),
                args,
                rest[end:],
                bool(m.group(1)),
            )
        )
    return comps, entry


def tuple_elements(shape: str) -> list[str]:
    """The element shapes of a tuple shape ``(s32[], f32[2,3]{1,0}, ...)``, in order."""
    text = re.sub(r"/\*.*?\*/", "", shape.strip())
    if not text.startswith("("):
        return [text]
    out, depth, start = [], 0, 1
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if (c == "," and depth == 1) or (depth == 0 and c == ")"):
            element = text[start:i].strip()
            if element:
                out.append(element)
            start = i + 1
        if depth == 0 and c == ")":
            break
    return out


def _padded(dims: list[int], layout: str) -> list[int]:
    """Dims padded to the layout's first tile (TPU ``{1,0:T(8,128)}``: the most minor dim to a
    multiple of 128, the next to 8), as the array lies in memory."""
    tile = _TILE.search(layout)
    order = layout.strip("{}").split(":")[0]
    if not tile or not dims:
        return dims
    try:
        minor_to_major = [int(x) for x in order.split(",") if x]
        sizes = [int(x) for x in tile.group(1).split(",")]
    except ValueError:
        return dims
    out = list(dims)
    for k, size in enumerate(reversed(sizes)):
        if k < len(minor_to_major) and minor_to_major[k] < len(out):
            d = minor_to_major[k]
            out[d] = -(-out[d] // size) * size
    return out


def arrays(shape: str) -> list[tuple[list[int], float, bool]]:
    """``(dims, bytes, in_hbm)`` of each array in an HLO shape (a tuple gives several); bytes
    as laid out (tiles padded)."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        d = [int(x) for x in dims.split(",") if x]
        space = _SPACE.search(layout or "")
        size = math.prod(_padded(d, layout) if layout else d) * _DTYPE_BYTES[dtype]
        out.append((d, size, not space or space.group(1) == "0"))
    return out


def hbm_bytes(shape: str) -> float:
    return float(sum(b for _, b, hbm in arrays(shape) if hbm))


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


@functools.lru_cache(maxsize=4096)
def _valid_pairs(
    size_in: int,
    size_k: int,
    size_out: int,
    stride: int,
    pad_low: int,
    lhs_dilate: int,
    rhs_dilate: int,
) -> int:
    """(output, kernel) positions of one convolution dimension that read an input element."""
    extent = (size_in - 1) * lhs_dilate
    count = 0
    for o in range(size_out):
        for k in range(size_k):
            pos = o * stride + k * rhs_dilate - pad_low
            if 0 <= pos <= extent and pos % lhs_dilate == 0:
                count += 1
    return count


def _dims(attrs: str, key: str) -> list[int]:
    m = re.search(rf"\b{key}=\{{([\d,]*)\}}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


class _Module:
    def __init__(self, text: str):
        self.comps, self.entry = parse(text)
        # Names are unique in a compiled module; per computation in hand-written text.
        self.local = {c.name: {i.name: i for i in c.instrs} for c in self.comps.values()}
        self.producers = {i.name: i for c in self.comps.values() for i in c.instrs}
        self.where = {id(i): c.name for c in self.comps.values() for i in c.instrs}
        self.unknown_trips: list[str] = []
        self._reads_memo: dict[str, dict[int, float | None]] = {}
        self._element_memo: dict[str, dict[tuple[str, str, str], float]] = {}

    def producer(self, instr: Instr, name: str) -> Instr | None:
        """The instruction named ``name`` as seen from ``instr``'s computation (for ``name#k``,
        the tuple-shaped instruction)."""
        name = name.partition("#")[0]
        local = self.local.get(self.where.get(id(instr), ""), {})
        return local.get(name) or self.producers.get(name)

    def shape(self, instr: Instr, name: str) -> str:
        p = self.producer(instr, name)
        if p is None:
            return ""
        base, _, k = name.partition("#")
        if not k:
            return p.shape
        elements = tuple_elements(p.shape)
        return elements[int(k)] if int(k) < len(elements) else ""

    # -- execution counts ----------------------------------------------------------------------
    def trip_count(self, instr: Instr) -> int:
        """Iterations of a ``while``: its ``known_trip_count``, else read from the loop as
        ``for (i = start; i < N; i += step)``: N from the condition's compare with a constant,
        start from the loop's initial tuple (0 if not a constant) and step from the body's
        ``add`` to the counter (1 if not a constant; XLA's windowed einsums step by 2)."""
        m = _TRIP.search(instr.attrs)
        if m:
            return int(m.group(1))
        cond = self.comps.get(_attr(instr.attrs, "condition") or "")
        if cond is not None and any("direction=LT" in i.attrs for i in cond.instrs):
            counter = self._loop_counter(instr, cond)
            if counter is not None:
                return counter
            consts = [i for i in cond.instrs if i.op == "constant" and _INT_CONST.match(i.shape)]
            if len(consts) == 1 and consts[0].args.strip().isdigit():
                return int(consts[0].args)
        self.unknown_trips.append(instr.name)
        return 1

    def _constant(self, instr: Instr, name: str) -> int | None:
        """The integer value of ``name`` seen from ``instr`` through copies, bitcasts and
        converts; None if it is not a constant."""
        p = self.producer(instr, name)
        for _ in range(8):
            if p is None:
                return None
            if p.op == "constant" and _INT_CONST.match(p.shape):
                value = p.args.strip()
                return int(value) if value.lstrip("-").isdigit() else None
            if p.op not in ("copy", "bitcast", "convert") or not p.operands:
                return None
            p = self.producer(p, p.operands[0])
        return None

    def _loop_counter(self, loop: Instr, cond: Computation) -> int | None:
        """``ceil((N - start) / step)`` of a loop whose condition is ``i < N`` on one element
        of the loop tuple; None where the loop does not read that way."""
        compare = cond.root
        if compare is None or compare.op != "compare" or "direction=LT" not in compare.attrs:
            return None
        if len(compare.operands) != 2:
            return None
        counter = self.producer(compare, compare.operands[0])
        limit = self._constant(compare, compare.operands[1])
        index = re.search(r"\bindex=(\d+)", counter.attrs) if counter is not None else None
        if counter is None or counter.op != "get-tuple-element" or limit is None or not index:
            return None
        k = int(index.group(1))
        start = 0
        init = self.producer(loop, loop.operands[0]) if loop.operands else None
        if init is not None and init.op == "tuple" and k < len(init.operands):
            start = self._constant(init, init.operands[k]) or 0
        step = 1
        body = self.comps.get(_attr(loop.attrs, "body") or "")
        root = body.root if body is not None else None
        if root is not None and root.op == "tuple" and k < len(root.operands):
            update = self.producer(root, root.operands[k])
            if update is not None and update.op == "add" and len(update.operands) == 2:
                values = [self._constant(update, o) for o in update.operands]
                step = next((v for v in values if v is not None and v > 0), 1)
        return max(0, -(-(limit - start) // step))

    def counts(self) -> tuple[dict[str, float], set[str]]:
        """Executions of every computation per module execution; the set of fusion bodies."""
        calls: dict[str, list[tuple[str, float]]] = {}
        fusion_bodies: set[str] = set()
        for c in self.comps.values():
            for i in c.instrs:
                targets: list[tuple[str, float]] = []
                if i.op == "while":
                    n = self.trip_count(i)
                    targets += [
                        (_attr(i.attrs, "body") or "", n),
                        (_attr(i.attrs, "condition") or "", n + 1),
                    ]
                elif i.op == "fusion":
                    body = _attr(i.attrs, "calls") or ""
                    fusion_bodies.add(body)
                    targets.append((body, 1))
                elif i.op in ("call", "call-start", "async-start"):
                    targets += [(x, 1) for x in re.findall(r"\bcalls=%?([\w.\-]+)", i.attrs)]
                elif i.op == "conditional":
                    b = re.search(r"branch_computations=\{([^}]*)\}", i.attrs)
                    names = _NAME.findall(b.group(1)) if b else []
                    names += [
                        x
                        for k in ("true_computation", "false_computation")
                        if (x := _attr(i.attrs, k))
                    ]
                    targets += [(x, 1) for x in names]
                calls.setdefault(c.name, []).extend(targets)
        counts: dict[str, float] = {}

        def visit(name: str, times: float, depth: int = 0) -> None:
            if name not in self.comps or depth > 64:
                return
            counts[name] = counts.get(name, 0.0) + times
            for callee, n in calls.get(name, []):
                visit(callee, times * n, depth + 1)

        visit(self.entry, 1.0)
        return counts, fusion_bodies

    # -- Element-wise work ---------------------------------------------------------------------
    def element_ops(self, body: str, depth: int = 0) -> dict[tuple[str, str, str], float]:
        """``{(opcode, result dtype, first operand's dtype): elements}`` that the computation
        ``body`` (a fusion body, nested fusions included) computes once; a ``reduce`` is its
        reducer's ops, each over the reduced operands' elements."""
        if body in self._element_memo:
            return self._element_memo[body]
        out: dict[tuple[str, str, str], float] = {}

        def add(ops: dict[tuple[str, str, str], float], scale: float = 1.0) -> None:
            for key, n in ops.items():
                out[key] = out.get(key, 0.0) + n * scale

        comp = self.comps.get(body)
        for i in comp.instrs if comp is not None and depth < 8 else []:
            if i.op == "fusion":
                add(self.element_ops(_attr(i.attrs, "calls") or "", depth + 1))
                continue
            if i.op in _MOVES or i.op in ("dot", "convolution", "custom-call"):
                continue
            result = _ARRAY.search(i.shape)
            operand = _ARRAY.search(self.shape(i, i.operands[0])) if i.operands else None
            if result is None:
                continue
            if i.op == "reduce" and operand is not None:
                reducer = _attr(i.attrs, "to_apply") or ""
                inputs = math.prod(int(x) for x in operand.group(2).split(",") if x)
                add(self.element_ops(reducer, depth + 1), inputs)
                continue
            elements = math.prod(int(x) for x in result.group(2).split(",") if x)
            key = (i.op, result.group(1), operand.group(1) if operand else "")
            out[key] = out.get(key, 0.0) + elements
        self._element_memo[body] = out
        return out

    # -- FLOPs ---------------------------------------------------------------------------------
    def flops(self, instr: Instr) -> float:
        out = arrays(instr.shape)
        if instr.op == "dot" and out and instr.operands:
            lhs = arrays(self.shape(instr, instr.operands[0]))
            if not lhs:
                return 0.0
            k = math.prod(lhs[0][0][d] for d in _dims(instr.attrs, "lhs_contracting_dims"))
            return 2.0 * math.prod(out[0][0]) * k
        if instr.op == "convolution" and out and len(instr.operands) > 1:
            return self.convolution_flops(instr, out[0][0])
        if instr.op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
            target = target.group(1) if target else ""
            if target in _GEMM_TARGETS and out and instr.operands:
                lhs = arrays(self.shape(instr, instr.operands[0]))
                m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.attrs)
                if lhs and m:
                    dims = [int(x.strip().strip('"')) for x in m.group(1).split(",") if x.strip()]
                    return 2.0 * math.prod(out[0][0]) * math.prod(lhs[0][0][d] for d in dims)
            estimate = re.search(r'"flops"\s*:\s*"?(\d+)', instr.attrs)
            if estimate:
                return float(estimate.group(1))
            return self.flash_flops(instr)
        return 0.0

    def convolution_flops(self, instr: Instr, out_dims: list[int]) -> float:
        """2 x output batch x output features x input features (per group) x, per spatial
        dimension, the (output, kernel) position pairs that land on an input element. TPU writes
        batched matmuls as convolutions whose batch dimensions are dilated spatial ones, where
        one kernel position per output position is valid."""
        lhs = arrays(self.shape(instr, instr.operands[0]))
        rhs = arrays(self.shape(instr, instr.operands[1]))
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
        if not lhs or not rhs or not labels:
            return 0.0
        lhs_l, rhs_l, out_l = labels.groups()
        lhs_d, rhs_d = lhs[0][0], rhs[0][0]
        if len(lhs_l) != len(lhs_d) or len(rhs_l) != len(rhs_d) or len(out_l) != len(out_dims):
            return 0.0
        window = re.search(r"window=\{([^}]*)\}", instr.attrs)
        fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}

        def per_dim(key: str, n: int, default: int) -> list[int]:
            if key not in fields:
                return [default] * n
            return [int(x.split("_")[0]) for x in fields[key].split("x")]

        spatial = sorted(c for c in out_l if c.isdigit())
        n = len(spatial)
        stride, lhs_dil, rhs_dil = (
            per_dim(k, n, 1) for k in ("stride", "lhs_dilate", "rhs_dilate")
        )
        pad_low = per_dim("pad", n, 0)
        pairs = 1
        for j, c in enumerate(spatial):
            size_in = lhs_d[lhs_l.index(c)]
            size_k = rhs_d[rhs_l.index(c)]
            size_out = out_dims[out_l.index(c)]
            pairs *= _valid_pairs(
                size_in, size_k, size_out, stride[j], pad_low[j], lhs_dil[j], rhs_dil[j]
            )
        batch = out_dims[out_l.index("b")]
        features_out = out_dims[out_l.index("f")]
        features_in = rhs_d[rhs_l.index("i")]
        return 2.0 * batch * features_out * features_in * pairs

    def flash_flops(self, instr: Instr) -> float:
        """This package's flash-attention kernels (`xar_jax.flash_attention`), from q's shape
        (B, T, N, H): forward 4 B N T^2 H (scores and values), the dK/dV kernel 8 (scores
        recomputed, dP, dV, dK), the dQ kernel 6 (scores, dP, dQ); dense, as if no block were
        skipped (the mask is not in the text)."""
        kernel, elements, h = self.flash_scores(instr)
        return _FLASH_UNITS[kernel] * elements * h if kernel else 0.0

    def flash_scores(self, instr: Instr) -> tuple[str, float, int]:
        """``(kernel, score elements, head dim)`` of a flash-attention kernel: kernel is 'fwd',
        'dkdv' or 'dq' ('' for any other op), score elements B N T S (dense), from q (B, T, N, H)
        and k (B, S, N, H), the first two 4-D operands."""
        kernel = _FLASH.search(instr.attrs) if instr.op == "custom-call" else None
        if not kernel:
            return "", 0.0, 0
        dims = [a[0][0] for o in instr.operands if len(a := arrays(self.shape(instr, o))) == 1]
        dims = [d for d in dims if len(d) == 4]
        if not dims:
            return "", 0.0, 0
        b, t, n, h = dims[0]
        s = dims[1][1] if len(dims) > 1 else t
        return kernel.group(1), float(b * n * t * s), h

    def is_opaque_kernel(self, instr: Instr) -> bool:
        if instr.op != "custom-call":
            return False
        target = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
        target = target.group(1) if target else ""
        return (
            target not in _GEMM_TARGETS
            and target != "AllocateBuffer"
            and not re.search(r'"flops"\s*:', instr.attrs)
            and not _FLASH.search(instr.attrs)
            and ("triton" in target or "tpu_custom_call" in target or "mosaic" in target)
        )

    # -- HBM bytes -----------------------------------------------------------------------------
    def _param_reads(self, body: Computation, depth: int = 0) -> dict[int, float | None]:
        """Per fusion parameter: bytes read when the body only slices it (directly or through a
        nested fusion that does), or None (all of it)."""
        key = body.name
        if key in self._reads_memo:
            return self._reads_memo[key]
        users: dict[str, list[Instr]] = {}
        for i in body.instrs:
            for o in i.operands:
                users.setdefault(o, []).append(i)
        out: dict[int, float | None] = {}
        for p in body.instrs:
            if p.op != "parameter":
                continue
            if not p.args.strip().isdigit():
                continue
            index = int(p.args)
            total, frontier, ok = 0.0, [p.name], True
            while frontier and ok:
                name = frontier.pop()
                for u in users.get(name, []):
                    if u.op in ("bitcast", "reshape") and len(u.operands) == 1:
                        frontier.append(u.name)
                    elif u.op in _SLICERS and u.operands[0] == name:
                        total += hbm_bytes(u.shape) or sum(b for _, b, _ in arrays(u.shape))
                    elif u.op == "dynamic-update-slice" and u.operands[0] == name:
                        pass  # The buffer updated in place: not read.
                    elif (
                        u.op == "fusion"
                        and depth < 8
                        and (nested := self.comps.get(_attr(u.attrs, "calls") or ""))
                    ):
                        inner = self._param_reads(nested, depth + 1)
                        for k, o in enumerate(u.operands):
                            if o == name:
                                if inner.get(k) is None:
                                    ok = False
                                    break
                                total += inner[k]
                        if not ok:
                            break
                    else:
                        ok = False
                        break
            out[index] = total if ok else None
        self._reads_memo[key] = out
        return out

    def _writes(self, body: Computation, result_shape: str) -> float:
        """Bytes a fusion writes: in-place updates count their update only."""
        root = body.root
        result = arrays(result_shape)
        if root is None:
            return hbm_bytes(result_shape)
        elements = [self.producer(root, o) for o in root.operands] if root.op == "tuple" else [root]
        if len(elements) != len(result):
            return hbm_bytes(result_shape)
        total = 0.0
        for e, (_, b, hbm) in zip(elements, result, strict=True):
            if not hbm:
                continue
            while e is not None and e.op == "bitcast" and e.operands:
                e = self.producer(e, e.operands[0])
            if e is not None and e.op == "dynamic-update-slice" and len(e.operands) > 1:
                total += sum(x for _, x, _ in arrays(self.shape(e, e.operands[1])))
            else:
                total += b
        return total

    def bytes(self, instr: Instr) -> float:
        op = instr.op
        if op in _FREE:
            return 0.0
        operand_shapes = [self.shape(instr, o) for o in instr.operands]
        if op == "copy-start":
            dest = arrays(instr.shape)
            written = dest[0][1] if dest and dest[0][2] else 0.0
            return hbm_bytes(operand_shapes[0] if operand_shapes else "") + written
        if op == "slice-start" and operand_shapes:
            # An asynchronous slice, ((operand), result, context): TPU prefetches an array into
            # VMEM in chunks this way. It reads its result's bytes of the operand, not the whole.
            parts = arrays(instr.shape)
            if len(parts) > 1:
                _, size, to_hbm = parts[1]
                from_hbm = any(hbm for _, _, hbm in arrays(operand_shapes[0]))
                return size * from_hbm + size * to_hbm
        if op == "custom-call" and 'custom_call_target="AllocateBuffer"' in instr.attrs:
            return 0.0  # An uninitialised buffer: nothing is written.
        if op == "dynamic-update-slice" and len(operand_shapes) > 1:
            return 2.0 * hbm_bytes(operand_shapes[1])
        if op in _SLICERS:
            return 2.0 * hbm_bytes(instr.shape)
        if op == "async-start" and _attr(instr.attrs, "calls"):
            # A wrapped op run asynchronously: its computation's ops are counted where that
            # computation runs (`counts`); the start moves nothing of its own.
            return 0.0
        if op.endswith("-start"):
            # Async collectives return (operands, results, contexts): the results once.
            res = [b for _, b, hbm in arrays(instr.shape) if hbm and b > 4]
            read = sum(hbm_bytes(s) for s in operand_shapes)
            return read + float(sum(res[len(res) // 2 :]))
        if op == "fusion":
            body = self.comps.get(_attr(instr.attrs, "calls") or "")
            if body is not None:
                reads = self._param_reads(body)
                total = 0.0
                for k, s in enumerate(operand_shapes):
                    sliced = reads.get(k)
                    full = hbm_bytes(s)
                    total += full if sliced is None else min(sliced, full)
                return total + self._writes(body, instr.shape)
        return sum(hbm_bytes(s) for s in operand_shapes) + hbm_bytes(instr.shape)


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def replica_group(attrs: str, num_devices: int) -> list[int]:
    """Device ids of one (the first) replica group of a collective; all devices when none.

    Reads the three forms XLA prints: explicit ``{{0,1},{2,3}}``, iota ``[G,N]<=[dims]T(perm)``
    and named ``mesh['axis_0'=4,'axis_1'=2] {'axis_0'}``; ``source_target_pairs`` (a
    collective-permute) give the pair of the first entry.
    """
    pairs = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", attrs)
    if pairs:
        return [int(pairs.group(1)), int(pairs.group(2))]
    named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if named:
        axes = re.findall(r"'([^']+)'=(\d+)", named.group(1))
        sizes = [int(n) for _, n in axes]
        chosen = set(re.findall(r"'([^']+)'", named.group(2)))
        strides = [math.prod(sizes[k + 1 :]) for k in range(len(sizes))]
        ids = [0]
        for (name, _), size, stride in zip(axes, sizes, strides, strict=True):
            if name in chosen:
                ids = [i + j * stride for i in ids for j in range(size)]
        return sorted(ids)
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if iota:
        size = int(iota.group(2))
        dims = [int(x) for x in iota.group(3).split(",")]
        perm = (
            [int(x) for x in iota.group(4).split(",")] if iota.group(4) else list(range(len(dims)))
        )
        # Device ids = iota(dims) transposed by perm, flattened, cut into groups of `size`.
        total = math.prod(dims)
        strides = [math.prod(dims[k + 1 :]) for k in range(len(dims))]
        tdims = [dims[p] for p in perm]
        out = []
        for flat in range(min(size, total)):
            rem, idx = flat, 0
            for k in reversed(range(len(tdims))):
                coord = rem % tdims[k]
                rem //= tdims[k]
                idx += coord * strides[perm[k]]
            out.append(idx)
        return out
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if explicit:
        return [int(x) for x in explicit.group(1).split(",") if x]
    return list(range(num_devices))


@dataclasses.dataclass
class Op:
    """A top-level op's work per execution, and how often it runs."""

    op: str
    flops: float
    bytes: float
    times: float
    collective: str = ""  # One of COLLECTIVES, or "".
    result_bytes: float = 0.0  # A collective's result on one chip (hlo_stats' convention).
    group: tuple[int, ...] = ()  # A collective's first replica group (device ids).
    slices: int = 0  # > 1: a collective between slices (multi-slice "megascale" transfer).
    name: str = ""  # The instruction's name (profiles name kernels after it).
    kernel: str = ""  # 'flash_fwd' | 'flash_dkdv' | 'flash_dq': a flash-attention kernel.
    elements: float = 0.0  # A flash-attention kernel's score elements computed (B N T S).
    # A fusion's element-wise work per execution: ((opcode, dtype, operand dtype, elements), ...).
    element_ops: tuple[tuple[str, str, str, float], ...] = ()
    reduction: bool = False  # A reduction kernel: XLA's input fusion (``kind=kInput``).
    source: str = ""  # The JAX op it came from (the HLO metadata's op_name), for reports.


def module_ops(
    hlo_text: str, num_devices: int = 1, num_slices: int = 1, flash_tile_fraction: float = 1.0
) -> tuple[list[Op], dict[str, Any]]:
    """Every op outside fusion bodies with its FLOPs (its fusion body's included), HBM bytes and
    executions per module execution; plus ``{'opaque_kernels', 'unknown_trip_counts'}``.

    ``flash_tile_fraction``: the fraction of (query block, key block) tiles the flash-attention
    kernels compute (they skip fully masked tiles; the mask is a constant the text elides), which
    scales their FLOPs and score elements; 1 = dense.

    A program for several slices is compiled per slice (its replica groups stay inside one);
    what crosses slices is a ``send`` to the multi-slice runtime marked with the collective it
    implements (``_xla_megascale_transfer_type``): counted as that collective over
    ``num_slices`` members, of the bytes sent."""
    m = _Module(hlo_text)
    counts, fusion_bodies = m.counts()
    body_flops: dict[str, float] = {}

    def fused_flops(name: str, depth: int = 0) -> float:
        if name not in body_flops:
            total = 0.0
            for i in m.comps[name].instrs if name in m.comps else []:
                total += m.flops(i)
                if i.op == "fusion" and depth < 8:
                    total += fused_flops(_attr(i.attrs, "calls") or "", depth + 1)
            body_flops[name] = total
        return body_flops[name]

    ops: list[Op] = []
    opaque = 0
    for name, times in counts.items():
        if name in fusion_bodies:
            continue
        for i in m.comps[name].instrs:
            source = _OP_NAME.search(i.attrs)
            source = source.group(1) if source else ""
            if m.is_opaque_kernel(i):
                opaque += int(times)
            megascale = _MEGASCALE.search(i.attrs) if i.op == "send" else None
            if megascale:
                kind = megascale.group(1).lower().replace("_", "-")
                sent = float(sum(b for _, b, _ in arrays(m.shape(i, i.operands[0]))))
                if kind in COLLECTIVES:
                    ops.append(Op(i.op, 0.0, sent, times, kind, sent, (), num_slices, source))
                continue
            flops = m.flops(i)
            callee = _attr(i.attrs, "calls") or ""
            if callee.startswith(REDUCE_SCATTER_FUSION) and callee in m.comps:
                # TPU's reduce-scatter (see `hlo_stats`): the shard is the fusion's result.
                inner = next(
                    (j for j in m.comps[callee].instrs if j.op.startswith("all-reduce")), None
                )
                group = replica_group(inner.attrs if inner else "", num_devices)
                ops.append(
                    Op(
                        i.op,
                        0.0,
                        m.bytes(i),
                        times,
                        "reduce-scatter",
                        float(sum(b for _, b, _ in arrays(i.shape))),
                        tuple(group),
                        source=source,
                    )
                )
                continue
            if i.op == "fusion":
                flops += fused_flops(callee)
            kind = i.op[: -len("-start")] if i.op.endswith("-start") else i.op
            if kind in COLLECTIVES:
                res = [b for _, b, _ in arrays(i.shape)]
                if i.op.endswith("-start") and len(res) > 1:
                    res = [b for b in res if b > 4] or res
                    res = res[len(res) // 2 :]
                ops.append(
                    Op(
                        i.op,
                        0.0,
                        m.bytes(i),
                        times,
                        kind,
                        float(sum(res)),
                        tuple(replica_group(i.attrs, num_devices)),
                        source=source,
                    )
                )
                continue
            b = m.bytes(i)
            flash, elements, _ = m.flash_scores(i)
            if flash:
                flops *= flash_tile_fraction
                elements *= flash_tile_fraction
            element_ops = ()
            if i.op == "fusion" and not flops:
                element_ops = tuple((*k, n) for k, n in m.element_ops(callee).items())
            if flops or b:
                ops.append(
                    Op(
                        i.op,
                        flops,
                        b,
                        times,
                        name=i.name,
                        kernel=f"flash_{flash}" if flash else "",
                        elements=elements,
                        element_ops=element_ops,
                        reduction=i.op == "fusion" and _attr(i.attrs, "kind") == "kInput",
                        source=source,
                    )
                )
    return ops, {"opaque_kernels": opaque, "unknown_trip_counts": m.unknown_trips}


def loop_trip_counts(hlo_text: str) -> dict[str, int]:
    """``{condition computation: trip count}`` of every ``while`` whose count is known or read
    from the loop (`_Module.trip_count`); loops it cannot read are left out."""
    m = _Module(hlo_text)
    out = {}
    for c in m.comps.values():
        for i in c.instrs:
            if i.op == "while" and (cond := _attr(i.attrs, "condition")):
                unknown = len(m.unknown_trips)
                n = m.trip_count(i)
                if len(m.unknown_trips) == unknown:
                    out[cond] = n
    return out


def module_cost(hlo_text: str) -> dict[str, Any]:
    """``{'flops', 'bytes', 'opaque_kernels', 'unknown_trip_counts'}`` of one execution."""
    ops, notes = module_ops(hlo_text)
    return {
        "flops": sum(o.flops * o.times for o in ops),
        "bytes": sum(o.bytes * o.times for o in ops),
        **notes,
    }


def backend_config(instr_attrs: str) -> dict[str, Any] | None:
    m = re.search(r"backend_config=(\{.*\})", instr_attrs)
    if not m:
        return None
    try:
        return json.loads(m.group(1))
    except ValueError:
        return None
