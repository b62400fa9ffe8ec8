"""The step-time estimate's HLO walk and time model, on hand-written HLO (no compile)."""

import pytest

from xar_jax import hlo_cost, hlo_stats, step_estimate

# A scan of 4 iterations over a stacked f32[4,1024] buffer: each iteration slices one row of a
# stacked input (a fusion that only dynamic-slices its operand), multiplies it by a matrix, and
# writes its row of the stacked output in place; a prefetch into on-chip memory (S(1)) and an
# all-reduce over 4 devices in the entry.
LOOP = """HloModule m

%slice_body (p0: f32[4,1024], p1: s32[]) -> f32[1,1024] {
  %p0 = f32[4,1024]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,1024]{1,0} dynamic-slice(%p0, %p1, %z), dynamic_slice_sizes={1,1024}
}

%dot_body (a: f32[1,1024], w: f32[1024,1024]) -> f32[1,1024] {
  %a = f32[1,1024]{1,0} parameter(0)
  %w = f32[1024,1024]{1,0} parameter(1)
  ROOT %d = f32[1,1024]{1,0} dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%update_body (buf: f32[4,1024], row: f32[1,1024], i: s32[]) -> f32[4,1024] {
  %buf = f32[4,1024]{1,0} parameter(0)
  %row = f32[1,1024]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[4,1024]{1,0} dynamic-update-slice(%buf, %row, %i, %z)
}

%body (t: (s32[], f32[4,1024], f32[4,1024], f32[1024,1024])) -> (s32[], f32[4,1024], f32[4,1024], f32[1024,1024]) {
  %t = (s32[], f32[4,1024]{1,0}, f32[4,1024]{1,0}, f32[1024,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %xs = f32[4,1024]{1,0} get-tuple-element(%t), index=1
  %ys = f32[4,1024]{1,0} get-tuple-element(%t), index=2
  %w = f32[1024,1024]{1,0} get-tuple-element(%t), index=3
  %x = f32[1,1024]{1,0} fusion(%xs, %i), kind=kLoop, calls=%slice_body
  %y = f32[1,1024]{1,0} fusion(%x, %w), kind=kOutput, calls=%dot_body, metadata={op_name="jit(step)/transpose(jvp(XAR))/blocks/attn/bthd,bshd->bhts/dot_general"}
  %ys2 = f32[4,1024]{1,0} fusion(%ys, %y, %i), kind=kLoop, calls=%update_body
  %one = s32[] constant(1)
  %i2 = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[4,1024]{1,0}, f32[4,1024]{1,0}, f32[1024,1024]{1,0}) tuple(%i2, %xs, %ys2, %w)
}

%cond (t: (s32[], f32[4,1024], f32[4,1024], f32[1024,1024])) -> pred[] {
  %t = (s32[], f32[4,1024]{1,0}, f32[4,1024]{1,0}, f32[1024,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (xs: f32[4,1024], w: f32[1024,1024]) -> f32[4,1024] {
  %xs = f32[4,1024]{1,0} parameter(0)
  %w = f32[1024,1024]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = f32[4,1024]{1,0} parameter(2)
  %t = (s32[], f32[4,1024]{1,0}, f32[4,1024]{1,0}, f32[1024,1024]{1,0}) tuple(%zero, %xs, %init, %w)
  %loop = (s32[], f32[4,1024]{1,0}, f32[4,1024]{1,0}, f32[1024,1024]{1,0}) while(%t), condition=%cond, body=%body
  %ys = f32[4,1024]{1,0} get-tuple-element(%loop), index=2
  %pre = (f32[4,1024]{1,0:S(1)}, f32[4,1024]{1,0}, u32[]) copy-start(%ys)
  %vm = f32[4,1024]{1,0:S(1)} copy-done(%pre)
  ROOT %r = f32[4,1024]{1,0} all-reduce(%vm), replica_groups=[1,4]<=[4], to_apply=%add
}
"""

ROW, MATRIX, STACK = 1024 * 4, 1024 * 1024 * 4, 4 * 1024 * 4


def test_loops_count_their_trip_count_and_stacked_buffers_only_the_rows_moved():
    ops, notes = hlo_cost.module_ops(LOOP, num_devices=4)
    assert notes == {"opaque_kernels": 0, "unknown_trip_counts": []}
    cost = hlo_cost.module_cost(LOOP)
    # The matmul: 2 x 1024 outputs x 1024 contracted, 4 iterations.
    assert cost["flops"] == 4 * 2 * 1024 * 1024
    # Per iteration: the slice reads one row (and the index) and writes it; the dot reads the
    # row and the matrix and writes a row; the update reads its row and writes it in place
    # (not the stacked buffer); the counter's add and the loop condition's compare (5 times)
    # move their scalars. Then the prefetch reads the stack (its VMEM copy is not HBM), and the
    # all-reduce reads the VMEM copy and writes the stack to HBM.
    per_iteration = (2 * ROW + 4) + (2 * ROW + MATRIX) + (2 * ROW + 4) + 12
    assert cost["bytes"] == 4 * per_iteration + 5 * 9 + STACK + STACK
    reduce = next(o for o in ops if o.collective)
    assert (reduce.collective, reduce.result_bytes, reduce.group) == (
        "all-reduce",
        STACK,
        (0, 1, 2, 3),
    )


def test_per_op_roofline_and_ring_collectives_make_the_step():
    ops, _ = hlo_cost.module_ops(LOOP, num_devices=4)
    est = step_estimate.estimate(
        ops, peak_tflops=1.0, hbm_gbps=1.0, chips_per_slice=4, ici_gbps=2.0, dcn_gbits=8.0
    )
    flops_s = 2 * 1024 * 1024 / 1e12
    dot_s = max(flops_s, (2 * ROW + MATRIX) / 1e9)
    assert dot_s > flops_s  # Memory-bound at these rates: per op, the larger term counts.
    assert est["est_compute_s"] == pytest.approx(4 * flops_s)
    rest = 4 * (2 * ROW + 4 + 2 * ROW + 4 + 12) + 5 * 9 + STACK  # All memory-bound.
    assert est["est_compute_memory_s"] == pytest.approx(4 * dot_s + rest / 1e9)
    assert est["est_memory_s"] == pytest.approx((4 * (2 * ROW + MATRIX) + rest) / 1e9)
    # All-reduce over 4 chips in one slice: 2 B (n-1)/n over half the bidirectional ICI.
    assert est["est_ici_s"] == pytest.approx(2 * STACK * 3 / 4 / 1e9)
    assert est["est_dcn_s"] == 0
    assert est["est_step_s"] == max(est["est_compute_memory_s"], est["est_collective_s"])


@pytest.mark.parametrize(
    "attrs,group",
    [
        ("replica_groups={{0,2},{1,3}}", [0, 2]),
        ("replica_groups=[2,2]<=[4]", [0, 1]),
        ("replica_groups=[2,2]<=[2,2]T(1,0)", [0, 2]),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", [0, 4]),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", [0, 1, 2, 3]),
        ("source_target_pairs={{0,1},{1,0}}", [0, 1]),
        ("replica_groups={}", [0, 1, 2, 3, 4, 5, 6, 7]),
    ],
)
def test_replica_groups_are_read_in_every_printed_form(attrs, group):
    assert hlo_cost.replica_group(attrs, 8) == group


def test_cross_slice_groups_go_over_dcn():
    # An all-reduce of 1 GB over the same chip of 2 slices (4 chips each): DCN only.
    ici, dcn = step_estimate.collective_seconds(
        "all-reduce", 1e9, [0, 4], chips_per_slice=4, ici_gbps=1200, dcn_gbits=50
    )
    assert ici == 0 and dcn == pytest.approx(2 * 1e9 * 1 / 2 / (50 / 8 * 1e9))
    # Over all 8 chips: the ring inside each slice on ICI, the slices' share over DCN.
    ici, dcn = step_estimate.collective_seconds(
        "all-reduce", 1e9, range(8), chips_per_slice=4, ici_gbps=1200, dcn_gbits=50
    )
    assert ici == pytest.approx(2 * 1e9 * 3 / 4 / 600e9)
    assert dcn == pytest.approx(2 * (1e9 * 2 / 8) * 1 / 2 / (50 / 8 * 1e9))


# TPU's form of a reduce-scatter: a fusion around an all-reduce and this chip's dynamic-slice.
FUSED_REDUCE_SCATTER = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input: f32[1024,256]) -> f32[256,256] {
  %input = f32[1024,256]{1,0} parameter(0)
  %ar = f32[1024,256]{1,0} all-reduce(%input), replica_groups={{0,1,2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  %c = u32[] constant(256)
  %off = u32[] multiply(%pid, %c)
  %z = u32[] constant(0)
  ROOT %ds = f32[256,256]{1,0} dynamic-slice(%ar, %off, %z), dynamic_slice_sizes={256,256}
}

ENTRY %main (g: f32[1024,256]) -> f32[256,256] {
  %g = f32[1024,256]{1,0} parameter(0)
  ROOT %rs = f32[256,256]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
}
"""


def test_tpu_fused_reduce_scatter_counts_as_a_reduce_scatter_of_the_shard():
    c = hlo_stats.collectives(FUSED_REDUCE_SCATTER)
    shard = 256 * 256 * 4
    assert c["reduce-scatter"] == {"count": 1, "bytes": shard}
    assert c["all-reduce"] == {"count": 0, "bytes": 0}
    ops, _ = hlo_cost.module_ops(FUSED_REDUCE_SCATTER, num_devices=4)
    (rs,) = [o for o in ops if o.collective]
    assert (rs.collective, rs.result_bytes, rs.group) == ("reduce-scatter", shard, (0, 1, 2, 3))
    # Ring reduce-scatter: (n - 1) shards cross each chip's links, half of an all-reduce's.
    ici, _ = step_estimate.collective_seconds(
        "reduce-scatter", shard, rs.group, chips_per_slice=4, ici_gbps=2.0, dcn_gbits=1.0
    )
    all_reduce, _ = step_estimate.collective_seconds(
        "all-reduce", 4 * shard, rs.group, chips_per_slice=4, ici_gbps=2.0, dcn_gbits=1.0
    )
    assert ici == pytest.approx(3 * shard / 1e9) and all_reduce == pytest.approx(2 * ici)


def test_a_collective_permute_uses_one_link():
    # v5p: 1,200 GB/s both ways over 6 ports, so 100 GB/s one way per link.
    ici, dcn = step_estimate.collective_seconds(
        "collective-permute",
        1e9,
        [0, 1],
        chips_per_slice=4,
        ici_gbps=1200,
        dcn_gbits=50,
        ici_links=6,
    )
    assert ici == pytest.approx(1e9 / 100e9) and dcn == 0


def test_batched_matmul_written_as_a_dilated_convolution_counts_its_products_once():
    # TPU's form of softmax(..) @ V for 8 examples x 12 heads: the batch and heads are spatial
    # dimensions of a convolution, dilated so that one kernel position meets each output.
    text = """HloModule m

ENTRY %main (p: bf16[8,256,12,64], s: bf16[8,12,256,256]) -> bf16[8,12,64,256] {
  %p = bf16[8,256,12,64]{1,3,2,0} parameter(0)
  %s = bf16[8,12,256,256]{2,3,1,0} parameter(1)
  ROOT %c = bf16[8,12,64,256]{3,2,1,0} convolution(%p, %s), window={size=8x12 stride=7x11 lhs_dilate=8x12}, dim_labels=0f1b_01oi->01bf
}
"""
    assert hlo_cost.module_cost(text)["flops"] == 2 * 8 * 12 * 64 * 256 * 256


def test_a_stacked_operand_sliced_inside_a_nested_fusion_is_charged_its_slice():
    text = """HloModule m

%inner (a: f32[20,1024], i: s32[]) -> f32[1,1024] {
  %a = f32[20,1024]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,1024]{1,0} dynamic-slice(%a, %i, %z), dynamic_slice_sizes={1,1024}
}

%outer (stack: f32[20,1024], i: s32[]) -> f32[1,1024] {
  %stack = f32[20,1024]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %row = f32[1,1024]{1,0} fusion(%stack, %i), kind=kLoop, calls=%inner
  ROOT %neg = f32[1,1024]{1,0} negate(%row)
}

ENTRY %main (stack: f32[20,1024], i: s32[]) -> f32[1,1024] {
  %stack = f32[20,1024]{1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %f = f32[1,1024]{1,0} fusion(%stack, %i), kind=kLoop, calls=%outer
}
"""
    # The row read, the index read, the row written: not the 20-row stack.
    assert hlo_cost.module_cost(text)["bytes"] == ROW + 4 + ROW


# A flash-attention forward kernel as the GPU program calls it: q, k, v (B=2, T=S=128, N=4, H=64).
FLASH = """HloModule m

ENTRY %main (q: bf16[2,128,4,64], k: bf16[2,128,4,64], v: bf16[2,128,4,64]) -> bf16[2,128,4,64] {
  %q = bf16[2,128,4,64]{3,2,1,0} parameter(0)
  %k = bf16[2,128,4,64]{3,2,1,0} parameter(1)
  %v = bf16[2,128,4,64]{3,2,1,0} parameter(2)
  %call = (bf16[2,128,4,64]{3,2,1,0}, f32[2,4,128]{2,1,0}) custom-call(%q, %k, %v), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/attn/flash_attention_dropout_fwd/pallas_call"}
  ROOT %out = bf16[2,128,4,64]{3,2,1,0} get-tuple-element(%call), index=0
}
"""


def test_flash_kernels_add_their_element_work_to_their_matmuls_on_a_gpu_only():
    ops, _ = hlo_cost.module_ops(FLASH, flash_tile_fraction=0.5)
    (op,) = ops
    elements = 0.5 * 2 * 4 * 128 * 128  # Half the tiles computed.
    assert (op.kernel, op.elements) == ("flash_fwd", elements)
    assert op.flops == 4 * elements * 64
    matmul_s, bytes_s = op.flops / 1e12, op.bytes / 1e12
    tpu = step_estimate.estimate(ops, peak_tflops=1.0, hbm_gbps=1000.0)
    assert tpu["est_element_work_s"] == 0
    assert tpu["est_compute_memory_s"] == pytest.approx(max(matmul_s, bytes_s))
    gpu = step_estimate.estimate(
        ops, peak_tflops=1.0, hbm_gbps=1000.0, sm_count=2, sm_clock_ghz=1.0
    )
    # Per element: 6.38 FP32 / 128 + 20.22 integer / 64 + exp2 1.06 / 16 + 1 conversion / 16 +
    # 0.97 shared loads / 32 cycles of one SM (the forward kernel's counts).
    cycles = 6.38 / 128 + 20.22 / 64 + 1.06 / 16 + 1.0 / 16 + 0.97 / 32
    work_s = elements * cycles / (2 * 1e9)
    assert gpu["est_element_work_s"] == pytest.approx(work_s)
    assert work_s > bytes_s  # The sum, not the larger, of matmul and element work.
    assert gpu["est_launch_s"] == 1e-6  # One kernel launched.
    assert gpu["est_compute_memory_s"] == pytest.approx(matmul_s + work_s + 1e-6)


def test_the_computed_tile_fraction_follows_the_kernels_block_skipping():
    import numpy as np

    from xar_jax.flash_attention import BlockSizes, computed_tile_fraction

    entities = np.tril(np.ones((4, 4), bool)).repeat(64, 0).repeat(64, 1)  # 4 entities of 64.
    assert computed_tile_fraction(entities) == 10 / 16
    assert computed_tile_fraction(entities, BlockSizes(128, 128, 128, 128)) == 3 / 4
    assert computed_tile_fraction(np.ones((100, 100), bool)) == 1.0


def test_a_chunked_prefetch_into_vmem_is_charged_its_chunks_not_the_array_each_time():
    # TPU v6e's memory-space assignment: an array evicted to HBM is brought back into VMEM (S(1))
    # in chunks by asynchronous slices of a byte view of it, then joined in VMEM. Each
    # slice-start's shape is ((operand), chunk, context); its slice-done is the chunk. An empty
    # buffer (AllocateBuffer) moves nothing.
    text = """HloModule m

ENTRY %main (p: f32[8,256,1024]) -> f32[8,256,1024] {
  %p = f32[8,256,1024]{2,1,0:T(8,128)} parameter(0)
  %bytes = s8[8388608]{0:T(1024)(128)(4,1)} bitcast(%p)
  %s0 = ((s8[8388608]{0:T(1024)(128)(4,1)}), s8[4194304]{0:T(1024)(128)(4,1)S(1)}, s32[]{:S(2)}) slice-start(%bytes), slice={[0:4194304]}
  %s1 = ((s8[8388608]{0:T(1024)(128)(4,1)}), s8[4194304]{0:T(1024)(128)(4,1)S(1)}, s32[]{:S(2)}) slice-start(%bytes), slice={[4194304:8388608]}
  %d0 = s8[4194304]{0:T(1024)(128)(4,1)S(1)} slice-done(%s0)
  %d1 = s8[4194304]{0:T(1024)(128)(4,1)S(1)} slice-done(%s1)
  %v = f32[8,256,1024]{2,1,0:T(8,128)S(1)} custom-call(%d0, %d1), custom_call_target="ConcatBitcast"
  %e = f32[8,256,1024]{2,1,0:T(8,128)} custom-call(), custom_call_target="AllocateBuffer"
  ROOT %n = f32[8,256,1024]{2,1,0:T(8,128)} negate(%v)
}
"""
    array = 8 * 256 * 1024 * 4
    # The two chunks read from HBM (together the array, once), the negation's result written.
    assert hlo_cost.module_cost(text)["bytes"] == array + array


# XLA's windowed einsum (a collective matmul over 8 chips, both ring directions): its loop
# counts i = 0, 2 while i < 4, two shards per iteration; the start is a copy of a constant.
WINDOWED = """HloModule m

%body (t: (u32[], f32[128,256], f32[256,256])) -> (u32[], f32[128,256], f32[256,256]) {
  %t = (u32[], f32[128,256]{1,0}, f32[256,256]{1,0}) parameter(0)
  %i = u32[] get-tuple-element(%t), index=0
  %x = f32[128,256]{1,0} get-tuple-element(%t), index=1
  %w = f32[256,256]{1,0} get-tuple-element(%t), index=2
  %y = f32[128,256]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %cp = f32[128,256]{1,0} collective-permute(%y), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7},{7,0}}
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  ROOT %out = (u32[], f32[128,256]{1,0}, f32[256,256]{1,0}) tuple(%next, %cp, %w)
}

%cond (t: (u32[], f32[128,256], f32[256,256])) -> pred[] {
  %t = (u32[], f32[128,256]{1,0}, f32[256,256]{1,0}) parameter(0)
  %i = u32[] get-tuple-element(%t), index=0
  %n = u32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[128,256], w: f32[256,256]) -> f32[128,256] {
  %x = f32[128,256]{1,0} parameter(0)
  %w = f32[256,256]{1,0} parameter(1)
  %zero = u32[] constant(0)
  %start = u32[] copy(%zero)
  %t = (u32[], f32[128,256]{1,0}, f32[256,256]{1,0}) tuple(%start, %x, %w)
  %loop = (u32[], f32[128,256]{1,0}, f32[256,256]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %r = f32[128,256]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_a_loop_whose_counter_steps_by_two_runs_half_its_bound():
    assert hlo_cost.module_cost(WINDOWED)["flops"] == 2 * (2 * 128 * 256 * 256)
    stats = hlo_stats.collectives(WINDOWED)
    assert stats["collective-permute"] == {"count": 2, "bytes": 2 * 128 * 256 * 4}
    assert hlo_cost.loop_trip_counts(WINDOWED) == {"cond": 2}
    # A loop from 1 by 1 (the start read from the initial tuple) runs bound - 1 times.
    from_one = WINDOWED.replace("%two = u32[] constant(2)", "%two = u32[] constant(1)")
    from_one = from_one.replace("%zero = u32[] constant(0)", "%zero = u32[] constant(1)")
    assert hlo_cost.loop_trip_counts(from_one) == {"cond": 3}


def test_breakdown_sums_the_per_op_terms_by_the_part_they_came_from():
    ops, _ = hlo_cost.module_ops(LOOP, num_devices=4)
    rows = step_estimate.breakdown(ops, peak_tflops=1.0, hbm_gbps=1.0)
    est = step_estimate.estimate(
        ops, peak_tflops=1.0, hbm_gbps=1.0, chips_per_slice=4, ici_gbps=2.0
    )
    by_part = {r["part"]: r for r in rows}
    # The matmul carries its JAX op name: the backward pass of the attention's logits.
    dot = by_part["backward attention core"]
    assert (dot["ops"], dot["flops"]) == (4, 4 * 2 * 1024 * 1024)
    assert dot["est_s"] == pytest.approx(4 * (2 * ROW + MATRIX) / 1e9)
    assert rows[0] is dot  # Slowest first.
    assert sum(r["est_s"] for r in rows) == pytest.approx(est["est_compute_memory_s"])
    assert by_part["collectives"]["est_s"] == 0.0 and by_part["collectives"]["ops"] == 1
    assert step_estimate.part("jit(f)/jvp(XAR)/blocks/mlp/fc1/dot_general") == "forward mlp"
    assert step_estimate.part("x/rematted_computation/blocks/attn/qkv/add") == (
        "remat attention qkv"
    )


def test_tuple_element_operands_and_async_wrapped_fusions_are_charged_what_they_move():
    # Newer XLA prints element k of a tuple-shaped value as `%name#k`, and runs some fusions
    # through `async-start` of a computation: the element's bytes count, not the whole tuple,
    # and the wrapped fusion is charged once, where its computation runs.
    text = """HloModule m

%neg_body (a: f32[256,1024]) -> f32[256,1024] {
  %a = f32[256,1024]{1,0} parameter(0)
  ROOT %n = f32[256,1024]{1,0} negate(%a)
}

%wrapped (p: f32[256,1024]) -> f32[256,1024] {
  %p = f32[256,1024]{1,0} parameter(0)
  ROOT %f = f32[256,1024]{1,0} fusion(%p), kind=kLoop, calls=%neg_body
}

ENTRY %main (t: (f32[64,1024], f32[256,1024], f32[4096,1024])) -> f32[256,1024] {
  %t = (f32[64,1024]{1,0}, f32[256,1024]{1,0}, f32[4096,1024]{1,0}) parameter(0)
  %s = ((f32[256,1024]{1,0}), f32[256,1024]{1,0}, u32[]) async-start(%t#1), calls=%wrapped
  ROOT %d = f32[256,1024]{1,0} async-done(%s)
}
"""
    array = 256 * 1024 * 4
    # The wrapped negation reads element 1 and writes its result; the tuple's other (larger)
    # elements are not read, and the async pair moves nothing itself.
    assert hlo_cost.module_cost(text)["bytes"] == 2 * array


# XLA fusions of a GPU program: a dropout-like loop fusion (an integer hash of the index, a
# compare, a select of the bf16 input scaled) and a reduction fusion (f32 row sums of a bf16
# input, padded by a pad that only moves elements), over N = 1024 x 1024 elements.
FUSIONS = """HloModule m

%hash_select (x: bf16[1024,1024]) -> bf16[1024,1024] {
  %x = bf16[1024,1024]{1,0} parameter(0)
  %i = s32[1024,1024]{1,0} iota(), iota_dimension=1
  %c = s32[] constant(-2048144789)
  %cb = s32[1024,1024]{1,0} broadcast(%c), dimensions={}
  %m = s32[1024,1024]{1,0} multiply(%i, %cb)
  %s = s32[1024,1024]{1,0} shift-right-logical(%m, %cb)
  %h = s32[1024,1024]{1,0} xor(%m, %s)
  %keep = pred[1024,1024]{1,0} compare(%h, %cb), direction=GE
  %two = bf16[] constant(2)
  %twob = bf16[1024,1024]{1,0} broadcast(%two), dimensions={}
  %scaled = bf16[1024,1024]{1,0} multiply(%x, %twob)
  %zero = bf16[1024,1024]{1,0} broadcast(%two), dimensions={}
  ROOT %out = bf16[1024,1024]{1,0} select(%keep, %scaled, %zero)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%row_sums (x: bf16[1024,1024]) -> f32[1024] {
  %x = bf16[1024,1024]{1,0} parameter(0)
  %zero = bf16[] constant(0)
  %padded = bf16[1024,1024]{1,0} pad(%x, %zero), padding=0_0x0_0
  %wide = f32[1024,1024]{1,0} convert(%padded)
  %z = f32[] constant(0)
  ROOT %r = f32[1024]{0} reduce(%wide, %z), dimensions={1}, to_apply=%add
}

ENTRY %main (x: bf16[1024,1024]) -> (bf16[1024,1024], f32[1024]) {
  %x = bf16[1024,1024]{1,0} parameter(0)
  %dropped = bf16[1024,1024]{1,0} fusion(%x), kind=kLoop, calls=%hash_select
  %sums = f32[1024]{0} fusion(%x), kind=kInput, calls=%row_sums
  ROOT %t = (bf16[1024,1024]{1,0}, f32[1024]{0}) tuple(%dropped, %sums)
}
"""


def test_fusions_count_the_elements_of_each_arithmetic_op_and_not_of_moves():
    ops, _ = hlo_cost.module_ops(FUSIONS)
    dropped, sums = ops
    n = 1024 * 1024.0
    assert sorted(dropped.element_ops) == sorted(
        [
            ("multiply", "s32", "s32", n),
            ("shift-right-logical", "s32", "s32", n),
            ("xor", "s32", "s32", n),
            ("compare", "pred", "s32", n),
            ("multiply", "bf16", "bf16", n),
            ("select", "bf16", "pred", n),
        ]
    )  # iota, broadcasts, parameters and constants compute nothing per element.
    # The reducer's add once per input element; the pad moves elements only.
    assert sorted(sums.element_ops) == [("add", "f32", "f32", n), ("convert", "f32", "bf16", n)]
    assert (dropped.reduction, sums.reduction) == (False, True)


def test_gpu_fusions_overlap_element_work_with_bytes_but_reductions_add_them():
    ops, _ = hlo_cost.module_ops(FUSIONS)
    dropped, sums = ops
    n = 1024 * 1024.0
    sms, ghz, bw = 1, 1.0, 100.0  # A one-SM GPU, so that the element work matters.
    # Per element: the hash's multiply, shift, xor, compare and the select on the integer unit
    # (64 per clock per SM), bf16's multiply on the FP32 unit (128); the row sums: bf16 -> f32 is
    # one shift (integer unit), the add FP32.
    hash_s = n * (5 / 64 + 1 / 128) / (sms * ghz * 1e9)
    sums_s = n * (1 / 64 + 1 / 128) / (sms * ghz * 1e9)
    gpu = dict(peak_tflops=1.0, hbm_gbps=bw, sm_count=sms, sm_clock_ghz=ghz)
    assert step_estimate.estimate([dropped], **gpu)["est_element_work_s"] == pytest.approx(hash_s)
    assert hash_s > dropped.bytes / (bw * 1e9)  # Bound by its element work...
    assert step_estimate.estimate([dropped], **gpu)["est_compute_memory_s"] == pytest.approx(
        hash_s + 1e-6
    )  # ...which hides its bytes; plus a launch.
    assert step_estimate.estimate([sums], **gpu)["est_compute_memory_s"] == pytest.approx(
        sums.bytes / (bw * 1e9) + sums_s + 1e-6
    )
    # A TPU estimate (no SM count) keeps the bytes alone, with no launches.
    tpu = step_estimate.estimate(ops, peak_tflops=1.0, hbm_gbps=bw)
    assert tpu["est_element_work_s"] == tpu["est_launch_s"] == 0
    assert tpu["est_compute_memory_s"] == pytest.approx((dropped.bytes + sums.bytes) / (bw * 1e9))
