"""GPU kernel time beyond matmul FLOPs and HBM bytes: the flash-attention kernels' element work.

`xar_jax.step_estimate` times an op as ``max(FLOPs / peak, bytes / HBM bandwidth)``. That misses
the work this package's flash-attention kernels (`xar_jax.flash_attention`, Triton on a GPU) do
per score element on the SM's CUDA cores and special-function units: the softmax (scale, mask,
running max, ``exp2``, row sums), the dropout hash (MurmurHash3's finaliser of the element's
coordinates) and the bf16 conversions for the next matmul. On an H200 that work takes longer
than the kernels' tensor-core matmuls.

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


def cycles_per_element(kernel: str, rates: dict[str, float] = CC90_RATES) -> float:
    """SM clock cycles per score element of a flash-attention kernel's element work."""
    return sum(n / rates[unit] for unit, n in FLASH_INSTRUCTIONS[kernel].items())


def element_seconds(kernel: str, elements: float, *, sm_count: int, sm_clock_ghz: float) -> float:
    """Seconds of the element work of ``elements`` score elements over all SMs."""
    if kernel not in FLASH_INSTRUCTIONS or not sm_count or not sm_clock_ghz:
        return 0.0
    return elements * cycles_per_element(kernel) / (sm_count * sm_clock_ghz * 1e9)
