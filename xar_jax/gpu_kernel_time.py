"""GPU kernel time beyond matmul FLOPs and HBM bytes: element work on the CUDA cores, launches.

`xar_jax.step_estimate` times an op as ``max(FLOPs / peak, bytes / HBM bandwidth)``. On a GPU
that misses three things, modelled here:

1. The work this package's flash-attention kernels (`xar_jax.flash_attention`, Triton on a GPU)
   do per score element on the SM's CUDA cores and special-function units: the softmax (scale,
   mask, running max, ``exp2``, row sums), the dropout hash (MurmurHash3's finaliser of the
   element's coordinates) and the bf16 conversions for the next matmul. On an H200 that work
   takes longer than the kernels' tensor-core matmuls (`FLASH_INSTRUCTIONS`, below).
2. The element-wise work of XLA's own fusions (`fusion_seconds`): the dropout hash of the
   projections and MLP, GELU's ``erf``, normalisation, conversions. The HLO names every op of a
   fusion body and its element count (`xar_jax.hlo_cost.Op.element_ops`); `hlo_op_instructions`
   gives the instructions per element XLA's GPU emitter produces for each op. How that time
   combines with the fusion's bytes (overlapped in loop kernels, added in reductions) is
   `xar_jax.step_estimate`'s.
3. Launches: every kernel costs `KERNEL_LAUNCH_S` beyond its work (the launch and the drain
   before the next one), the figure XLA's GPU cost model uses (``kKernelLaunchOverhead`` in
   ``xla/service/gpu/model/gpu_performance_model_base.h``). A train step launches 2,000-5,000.

**Flash-attention kernels.**

**Counts.** `FLASH_INSTRUCTIONS` gives, per score element and kernel, the instructions of the
kernels' inner loops by unit, read from the SASS that ptxas writes for sm_90a from the Triton
kernels of the shipped tiles (64 x 64, 4 warps, head dim 64), grouped as the CUDA C++
Programming Guide's arithmetic-instruction throughput table groups them. Where they come from in
the kernel source (forward; the backward kernels rebuild the same probabilities and mask):

* ``qk * scale``, ``exp2(qk - max)`` with the range scaling of a non-flush-to-zero ``ex2``
  (two multiplies, a compare), the row sum, ``o * correction`` (one per (row, d) element:
  one per score element with d = block): FP32 add/multiply.
* the dropout hash: the counter ``q * 2^16 + k``, ``^ stream``, fmix32 (3 shifts, 3 xors,
  2 multiplies), the keep test (a shift, a compare) and its select; the mask byte's extract,
  compare and select; the running max; index arithmetic: 32-bit integer, logic, compare,
  min/max and select instructions.
* ``exp2``: one MUFU.EX2; the f32 -> bf16 conversions of P (and dS): F2FP; the int8 mask's
  shared-memory loads.

The dK/dV kernel adds dP's dropout select and scaling, ``P (dP - delta)``, and two conversions;
the dQ kernel the same without P's conversion.

**Rates** (`CC90_RATES`, results per clock per SM, compute capability 9.0, from the guide's
table "Throughput of Native Arithmetic Instructions"): FP32 add/multiply/FMA 128; 32-bit integer
add, multiply, shift, bitwise, compare and min/max 64 (selects and byte permutes, which the
table does not list, are counted with these); ``exp2`` (MUFU) 16; type conversions 16; shared
memory loads and warp shuffles 32 (one warp-wide access per clock: 32 banks).

**Combination.** The element work takes ``sum(count / rate) x elements / (SMs x clock)``: each
unit's instructions in turn, none overlapped with another's (the kernels keep one or two warps
per scheduler: 128-216 registers per thread, 4 warps per program). Inside the kernel that time
adds to the matmul time: a Triton FA2-style kernel issues its ``wgmma``s from the same warps
that then wait on them for the softmax, so tensor cores and CUDA cores take turns. On the H200
profile of xAR-B (`docs/tpu.md`), the forward kernel took 262 us per call against 294 us for the
sum and 253 us for the larger of the two; dQ 290 us against 281 (sum) and 220 (max); dK/dV
444 us against 347 and 266 (ptxas reports its ``wgmma``s serialised). The sum is the model.
"""

from __future__ import annotations

# Results per clock per SM, compute capability 9.0 (CUDA C++ Programming Guide, "Throughput of
# Native Arithmetic Instructions").
CC90_RATES = {
    "fp32": 128.0,  # FP32 add, multiply, multiply-add.
    "int": 64.0,  # 32-bit integer add/multiply/shift/logic, compare, min/max (and selects).
    "mufu": 16.0,  # exp2 (and reciprocal, log2, sin, cos).
    "cvt": 16.0,  # Type conversions (f32 -> bf16).
    "lsu": 32.0,  # Shared-memory loads, warp shuffles.
}

# Instructions per score element of each kernel's inner loop, by unit (see the module docstring).
FLASH_INSTRUCTIONS = {
    "flash_fwd": {"fp32": 6.38, "int": 20.22, "mufu": 1.06, "cvt": 1.0, "lsu": 0.97},
    "flash_dkdv": {"fp32": 8.0, "int": 20.66, "mufu": 1.0, "cvt": 1.0, "lsu": 1.34},
    "flash_dq": {"fp32": 7.0, "int": 18.28, "mufu": 1.0, "cvt": 0.5, "lsu": 0.72},
}


# A kernel launch and its drain (XLA's GpuPerformanceModelBase::kKernelLaunchOverhead).
KERNEL_LAUNCH_S = 1e-6

_FLOATS = ("f64", "f32", "bf16", "f16")
_ONE_INT = {
    "and",
    "or",
    "xor",
    "not",
    "shift-left",
    "shift-right-logical",
    "shift-right-arithmetic",
    "compare",
    "select",
    "maximum",
    "minimum",
    "negate",
    "abs",
    "sign",
    "popcnt",
    "count-leading-zeros",
    "is-finite",
}
# f32 division as NVPTX emits ``div.rn.f32``: a reciprocal on the MUFU, a Newton step and the
# correctly rounded quotient (four FMAs).
_DIVIDE = {"mufu": 1.0, "fp32": 4.0}
# Instructions per element of XLA's expansions of the transcendental HLO ops (f32), by unit:
# ``exp``/``log`` scale into ``ex2``/``lg2`` (MUFU) and back; ``erf`` clamps x to +-c, takes
# x^2, evaluates two degree-6 polynomials by FMA (7 coefficients each), multiplies by x and
# divides; ``tanh`` the same shape with degree-6 and degree-3 polynomials and a small-x select;
# ``logistic`` is 1 / (1 + exp(-x)); ``power`` exp(y log x).
_TRANSCENDENTAL = {
    "exponential": {"mufu": 1.0, "fp32": 2.0},
    "exponential-minus-one": {"mufu": 1.0, "fp32": 3.0},
    "log": {"mufu": 1.0, "fp32": 2.0},
    "log-plus-one": {"mufu": 1.0, "fp32": 3.0},
    "rsqrt": {"mufu": 1.0, "fp32": 1.0},
    "sqrt": {"mufu": 1.0, "fp32": 1.0},
    "cbrt": {"mufu": 2.0, "fp32": 2.0},
    "erf": {"int": 2.0, "fp32": 1 + 6 + 6 + 1 + _DIVIDE["fp32"], "mufu": _DIVIDE["mufu"]},
    "tanh": {"int": 4.0, "fp32": 1 + 6 + 1 + 3 + _DIVIDE["fp32"], "mufu": _DIVIDE["mufu"]},
    "logistic": {"mufu": 1.0 + _DIVIDE["mufu"], "fp32": 3.0 + _DIVIDE["fp32"]},
    "power": {"mufu": 2.0, "fp32": 5.0},
}


def hlo_op_instructions(opcode: str, dtype: str, operand_dtype: str) -> dict[str, float]:
    """Instructions per element, by unit of `CC90_RATES`, of one element-wise HLO op as XLA's
    GPU emitter lowers it.

    Add, subtract and multiply are one instruction (FP32 for floating types: sm_90 has bf16
    arithmetic; integer otherwise); logic, shifts, compares, selects, min/max one integer-unit
    instruction; ``convert`` one conversion (F2F/F2FP/I2F), except bf16 -> f32 (the bf16 bits
    are the f32's top half: one shift) and to or from ``pred`` (a select); a floating divide
    `_DIVIDE`; an integer divide or remainder 20 (a software sequence); transcendental ops
    `_TRANSCENDENTAL`; anything else one integer-unit instruction."""
    floating = dtype in _FLOATS
    if opcode in ("add", "subtract", "multiply"):
        return {"fp32" if floating else "int": 1.0}
    if opcode in _ONE_INT:
        return {"int": 1.0}
    if opcode == "clamp":
        return {"int": 2.0}
    if opcode == "convert":
        if (operand_dtype, dtype) == ("bf16", "f32") or "pred" in (operand_dtype, dtype):
            return {"int": 1.0}
        return {"cvt": 1.0}
    if opcode in ("divide", "remainder"):
        return dict(_DIVIDE) if floating and opcode == "divide" else {"int": 20.0}
    return dict(_TRANSCENDENTAL.get(opcode, {"int": 1.0}))


def fusion_seconds(
    element_ops, *, sm_count: int, sm_clock_ghz: float, rates: dict[str, float] = CC90_RATES
) -> float:
    """Seconds of a fusion's element work over all SMs: ``element_ops`` as in
    `xar_jax.hlo_cost.Op.element_ops` (``(opcode, dtype, operand dtype, elements)``)."""
    if not sm_count or not sm_clock_ghz:
        return 0.0
    cycles = 0.0
    for opcode, dtype, operand_dtype, elements in element_ops:
        per_element = hlo_op_instructions(opcode, dtype, operand_dtype)
        cycles += elements * sum(n / rates[unit] for unit, n in per_element.items())
    return cycles / (sm_count * sm_clock_ghz * 1e9)


def cycles_per_element(kernel: str, rates: dict[str, float] = CC90_RATES) -> float:
    """SM clock cycles per score element of a flash-attention kernel's element work."""
    return sum(n / rates[unit] for unit, n in FLASH_INSTRUCTIONS[kernel].items())


def element_seconds(kernel: str, elements: float, *, sm_count: int, sm_clock_ghz: float) -> float:
    """Seconds of the element work of ``elements`` score elements over all SMs."""
    if kernel not in FLASH_INSTRUCTIONS or not sm_count or not sm_clock_ghz:
        return 0.0
    return elements * cycles_per_element(kernel) / (sm_count * sm_clock_ghz * 1e9)
