"""Cloud TPU names -> libtpu topologies and per-chip facts, for compiling without a TPU.

Cloud names count differently by generation: ``v4-N`` and ``v5p-N`` count TensorCores (2 per chip,
used as one "megacore" device), ``v5litepod-N`` (alias ``v5e-N``) and ``v6e-N`` count chips (one
core each). `parse` maps a name to the chip grid that
``jax.experimental.topologies.get_topology_desc(platform='tpu', topology_name=...)`` takes:

=============  ==========  =================  ============  ============  ==============
cloud name     chips       topology_name      HBM / chip    peak bf16     chips per host
=============  ==========  =================  ============  ============  ==============
v4-8           4           v4:2x2x1           32 GiB        275 TFLOP/s   4 (2x2x1)
v4-16 / -32    8 / 16      v4:2x2x2 / 2x2x4   32 GiB        275 TFLOP/s   4
v4-64 / -128   32 / 64     v4:2x4x4 / 4x4x4   32 GiB        275 TFLOP/s   4
v5p-8          4           v5p:2x2x1          95 GiB        459 TFLOP/s   4 (2x2x1)
v5p-16 / -32   8 / 16      v5p:2x2x2 / 2x2x4  95 GiB        459 TFLOP/s   4
v5p-64 / -128  32 / 64     v5p:2x4x4 / 4x4x4  95 GiB        459 TFLOP/s   4
v5e-1 / -4     1 / 4       v5e:1x1 / 2x2      16 GiB        197 TFLOP/s   1 / 4
v5e-8          8           v5e:2x4            16 GiB        197 TFLOP/s   8 (one host)
v5e-16 .. 256  16 .. 256   v5e:4x4 .. 16x16   16 GiB        197 TFLOP/s   4 (2x2x1)
v6e-1 / -4     1 / 4       v6e:1x1 / 2x2      32 GiB        918 TFLOP/s   1 / 4
v6e-8          8           v6e:2x4            32 GiB        918 TFLOP/s   8 (one host)
v6e-16 .. 256  16 .. 256   v6e:4x4 .. 16x16   32 GiB        918 TFLOP/s   4 (2x2x1)
=============  ==========  =================  ============  ============  ==============

Larger power-of-two slices follow the same rule (the cloud's shapes): starting from 2x2x1
(v4/v5p) or 2x2 (v5e/v6e), each doubling doubles the right-most of the smallest sides
(2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> 4x4x8; 2x4 -> 4x4 -> 4x8 -> 8x8). 3-D slices of 4x4x4
chips and more are tori (wrap-around links), as are the 16-chip sides of v5e/v6e. Other
shapes can be given directly in libtpu's form (``v5p:4x4x12``).

Chip figures (`GENERATIONS`, and `H200` for the one GPU this project measures on) are what the
step-time estimate (`xar_jax.step_estimate`) divides by. Sources: the Cloud TPU docs' page per
generation (docs.cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e; read 2026-12), NVIDIA's H200
datasheet:

=====  =========  ==========  ============  =================  ======  =================
chip   bf16 peak  HBM         HBM GB/s      ICI GB/s (bidir.)  links   DCN Gbit/s / chip
=====  =========  ==========  ============  =================  ======  =================
v4     275        32 GiB      1228          537 (a)            6       25 (c)
v5p    459        95 GiB      2765          1200               6       50
v5e    197        16 GiB      819           400                4       25 (b)
v6e    918        32 GiB      1640          800                4       25 (c)
H200   989 (d)    141 GB      4800 (d)      --                 --      --
=====  =========  ==========  ============  =================  ======  =================

(a) v4's page gives no per-chip ICI figure; 537 = 2 x its "all-reduce bandwidth per Pod"
(1.1 PB/s) / 4096 chips, the same relation the v5e (51.2 TB/s / 256 = 400 / 2) and v6e
(102.4 TB/s / 256 = 800 / 2) pages' figures obey. (b) v5e's "data center network bandwidth per
Pod", 6.4 Tbit/s / 256 chips. (c) Not on the page; assumed equal to v5e's. (d) Datasheet (dense
bf16 989 TFLOP/s, 4.8 TB/s); measured ceilings on this project's H200 are lower (~790 TFLOP/s
bf16 matmul, ~4.3 TB/s copy: `H200_MEASURED`). (e) `Gpu.sm_count` and `sm_clock_ghz`: the H200's 132 SMs (GH100, as the H100 SXM5:
NVIDIA's Hopper architecture whitepaper) at 1.98 GHz, the GPU's maximum SM clock (the device
description XLA compiles for, `benchmarks.gpu_compile_only.H200_TARGET`): the rate of the
flash-attention kernels' CUDA-core work (`xar_jax.gpu_kernel_time`). The datasheet's bf16 peak
is 132 SMs x 4,096 FLOP per clock at 1.83 GHz.
"""

from __future__ import annotations

import dataclasses
import math
import re

ACCEPTED_FORMS = (
    "v5p-N or v4-N (N TensorCores: 8, 16, 32, ..., 2 per chip), v5litepod-N / v5e-N or v6e-N "
    "(N chips: 1, 4, 8, 16, ..., 256), or a libtpu chip grid such as v5p:2x2x4, v4:2x2x1, "
    "v5e:2x4, v6e:4x4"
)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation's facts."""

    name: str  # libtpu's prefix: v4 | v5p | v5e | v6e
    counts_cores: bool  # The cloud name counts TensorCores (2 per chip), not chips.
    dims: int  # 3 (v4, v5p: 3-D torus) or 2 (v5e, v6e)
    chip_config: str  # libtpu chip_config_name: 'megacore' fuses a chip's 2 cores into 1 device.
    hbm_gib: float  # HBM per chip.
    peak_bf16_tflops: float  # Dense bf16 peak per chip.
    hbm_gbps: float  # HBM bandwidth per chip, GB/s (the estimate's memory term).
    max_chips: int
    ici_gbps: float  # Inter-chip interconnect per chip, GB/s, both directions of all links.
    ici_links: int  # ICI ports per chip.
    dcn_gbits: float  # Data-centre network per chip, Gbit/s (between slices).


GENERATIONS = {
    "v4": Generation("v4", True, 3, "megacore", 32.0, 275.0, 1228.0, 4096, 537.0, 6, 25.0),
    "v5p": Generation("v5p", True, 3, "megacore", 95.0, 459.0, 2765.0, 8960, 1200.0, 6, 50.0),
    "v5e": Generation("v5e", False, 2, "default", 16.0, 197.0, 819.0, 256, 400.0, 4, 25.0),
    "v6e": Generation("v6e", False, 2, "default", 32.0, 918.0, 1640.0, 256, 800.0, 4, 25.0),
}


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU's figures for the same estimate (one device: no interconnect term)."""

    name: str
    hbm_gib: float
    peak_bf16_tflops: float
    hbm_gbps: float
    sm_count: int = 0  # Streaming multiprocessors.
    sm_clock_ghz: float = 0.0  # SM clock the CUDA-core work runs at (see the table's (e)).


H200 = Gpu("H200", 131.1, 989.0, 4800.0, 132, 1.98)  # Datasheet: 141 GB = 131.1 GiB.
H200_MEASURED = Gpu("H200 (measured ceilings)", 131.1, 790.0, 4300.0, 132, 1.98)
_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as libtpu describes it."""

    name: str  # As given (cloud or libtpu form).
    generation: Generation
    grid: tuple[int, ...]  # Chips along each side.
    wrap: tuple[bool, bool, bool]
    chips_per_host: tuple[int, int, int]

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def topology_name(self) -> str:
        return f"{self.generation.name}:{'x'.join(map(str, self.grid))}"

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host)

    def describe(self, num_slices: int = 1) -> dict:
        """get_topology_desc's keyword arguments for ``num_slices`` copies of this slice."""
        return dict(
            platform="tpu",
            topology_name=self.topology_name,
            chip_config_name=self.generation.chip_config,
            chips_per_host_bounds=self.chips_per_host,
            num_slices=num_slices,
            wrap=self.wrap,
        )


def _grid_for(chips: int, dims: int) -> tuple[int, ...] | None:
    """The cloud's chip grid for a power-of-two chip count (None if there is none)."""
    if chips == 1 and dims == 2:
        return (1, 1)
    if chips < 4 or chips & (chips - 1):
        return None
    grid = [2, 2, 1] if dims == 3 else [2, 2]
    while math.prod(grid) < chips:
        if dims == 3 and grid[2] == 1:
            grid[2] = 2
            continue
        smallest = min(grid)
        i = max(j for j, g in enumerate(grid) if g == smallest)
        grid[i] *= 2
    return tuple(grid)


def _host_bounds(gen: Generation, grid: tuple[int, ...]) -> tuple[int, int, int]:
    chips = math.prod(grid)
    if gen.dims == 2 and chips in (1, 8):
        return (1, 1, 1) if chips == 1 else (2, 4, 1)  # v5e-8 / v6e-8: one 8-chip host.
    return (2, 2, 1)


def _wrap(gen: Generation, grid: tuple[int, ...]) -> tuple[bool, bool, bool]:
    if gen.dims == 3:
        torus = min(grid) >= 4
        return (torus, torus, torus)
    return (grid[0] >= 16, grid[1] >= 16, False)


def parse(name: str) -> Topology:
    """A cloud TPU name (``v5p-128``, ``v6e-8``) or libtpu grid (``v5p:4x4x4``) -> `Topology`.

    Raises:
      ValueError (one line) listing the accepted forms.
    """
    text = name.strip().lower()
    grid = None
    cloud = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    libtpu = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e):(\d+(?:x\d+){1,2})", text)
    gen = None
    if cloud:
        gen = GENERATIONS[_ALIASES.get(cloud.group(1), cloud.group(1))]
        n = int(cloud.group(2))
        if not gen.counts_cores or n % 2 == 0:
            chips = n // 2 if gen.counts_cores else n
            if chips <= gen.max_chips:
                grid = _grid_for(chips, gen.dims)
    elif libtpu:
        gen = GENERATIONS[_ALIASES.get(libtpu.group(1), libtpu.group(1))]
        sides = tuple(int(s) for s in libtpu.group(2).split("x"))
        if len(sides) == gen.dims and all(s >= 1 for s in sides):
            grid = sides
    if gen is None or grid is None:
        raise ValueError(
            f"--topology={name!r} is not a TPU slice this tool knows; allowed: {ACCEPTED_FORMS}."
        )
    return Topology(
        name=name,
        generation=gen,
        grid=grid,
        wrap=_wrap(gen, grid),
        chips_per_host=_host_bounds(gen, grid),
    )
