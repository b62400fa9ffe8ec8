#!/usr/bin/env bash
# The device calls of issue 16, round 3 (one H200). Usage, on the device machine, from the repo
# root with $OUT set by the device tool:  bash benchmarks/h200_issue16.sh call1
# Each stage merges its rows into $OUT/bench.json (a copy of docs/benchmarks.json), which is
# merged back into docs/benchmarks.json here; text outputs land beside it.
set -uo pipefail
export PYTHONUNBUFFERED=1 XAR_BENCH_JSON=$OUT/bench.json
[ -f "$OUT/bench.json" ] || cp docs/benchmarks.json "$OUT/bench.json"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

call1() {
  # Where the paper-recipe train step of xAR-B spends its time, and XLA's layouts for it.
  XLA_FLAGS="--xla_dump_to=/tmp/dump_train --xla_dump_hlo_module_re=.*train_step.* --xla_dump_hlo_pass_re=layout-assignment" \
    python3 benchmarks/profile_kernels.py --what train --model xar_b --recipe paper --top 45 \
    2>&1 | grep -v Pallas | tee "$OUT/prof_train_b.txt"
  tar czf "$OUT/dump_train.tgz" -C /tmp dump_train
  # The sampler (unit-guidance skip on) and its kernels.
  XLA_FLAGS="--xla_dump_to=/tmp/dump_sample --xla_dump_hlo_module_re=.*generate.*" \
    python3 benchmarks/profile_kernels.py --what sample --model xar_b --num_steps 8 --top 35 \
    2>&1 | tee "$OUT/prof_sample_b.txt"
  tar czf "$OUT/dump_sample.tgz" -C /tmp dump_sample
  python3 benchmarks/sample.py --models xar_b,xar_l,xar_h --repeats 2 --tag _skip_r3c1
  XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL \
    python3 benchmarks/sample.py --models xar_b --repeats 2 --tag _skip_cmdbuf_r3c1
}

call2() {
  # A/B in one call: BASE = the tree before the (B, T, D) block change, carried in .devcarry_base.
  local P="--recipe paper --repeats 3"
  (cd .devcarry_base && python3 benchmarks/train_step.py --models xar_b $P --tag _base_r3c2) 2>&1 | grep -v Pallas
  python3 benchmarks/train_step.py --models xar_b,xar_l,xar_h $P --tag _btd_r3c2 2>&1 | grep -v Pallas
  python3 benchmarks/sample.py --models xar_b,xar_l,xar_h --repeats 2 --tag _hoist_btd_r3c2
  python3 benchmarks/profile_kernels.py --what train --model xar_b --recipe paper --top 30 \
    2>&1 | grep -v Pallas | tee "$OUT/prof_train_b_btd.txt"
}

call3() {
  # A/B in one call. BASE (.devcarry_base) = 9fe6c50: hash dropout storing its mask, sampler
  # attention over the concatenated cache prefix; HEAD: rehashing VJP, in-place cached kernel.
  local P="--recipe paper --repeats 2"
  python3 benchmarks/sample.py --models xar_b,xar_l,xar_h --repeats 2 --tag _kernel_r3c3 2>&1 | grep -v Pallas
  (cd .devcarry_base && python3 benchmarks/sample.py --models xar_b --repeats 2 --tag _concat_r3c3) 2>&1 | grep -v Pallas
  python3 -m pytest -q -p no:cacheprovider tests/test_cached_attention.py -k kernel 2>&1 | tail -3
  (cd .devcarry_base && python3 benchmarks/train_step.py --models xar_b $P --tag _base_r3c3) 2>&1 | grep -v Pallas
  python3 benchmarks/train_step.py --models xar_b $P --tag _vjp_r3c3 2>&1 | grep -v Pallas
  python3 benchmarks/train_step.py --models xar_l,xar_h $P --tag _vjp_r3c3 2>&1 | grep -v Pallas
  (cd .devcarry_base && python3 benchmarks/train_step.py --models xar_l,xar_h $P --tag _base_r3c3) 2>&1 | grep -v Pallas
}

call4() {
  # Session 2. The in-place cached attention with the layer scan's invariant check off
  # (check_constancy_invariants=False): its tests on the GPU, then the sampler through it.
  timeout 200 python3 -m pytest -q -x --tb=short -p no:cacheprovider tests/test_cached_attention.py \
    2>&1 | tail -25
  python3 benchmarks/sample.py --models xar_b,xar_l,xar_h --repeats 2 --tag _kernel_r3c4 2>&1 | grep -v Pallas
  python3 benchmarks/sample.py --models xar_b --repeats 2 --unrolled --tag _kernel_unrolled_r3c4 \
    2>&1 | grep -v Pallas
  # Train B with XLA's Triton GEMM fusions widened (transposes/converts fused into GEMM operands).
  XLA_FLAGS=--xla_gpu_triton_gemm_any=true python3 benchmarks/train_step.py --models xar_b \
    --recipe paper --repeats 2 --tag _tritonany_r3c4 2>&1 | grep -v Pallas
}

call5() {
  # A/B in one call. BASE (.devcarry_base) = 5ecd0ae: delta as an XLA reduce before the
  # backward kernels; HEAD: delta written by the dQ kernel. Then the kernels' GPU tests.
  local P="--recipe paper --repeats 3"
  (cd .devcarry_base && timeout 110 python3 benchmarks/train_step.py --models xar_b $P --tag _base_r3c5) 2>&1 | grep -v Pallas
  timeout 110 python3 benchmarks/train_step.py --models xar_b $P --tag _delta_r3c5 2>&1 | grep -v Pallas
  timeout 170 python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_attention_dropout.py \
    "tests/test_cached_attention.py::test_sampler_through_the_kernel_matches_the_reference" 2>&1 | tail -8
  timeout 90 python3 benchmarks/train_step.py --models xar_l $P --tag _delta_r3c5 2>&1 | grep -v Pallas
  timeout 90 python3 benchmarks/train_step.py --models xar_h $P --tag _delta_r3c5 2>&1 | grep -v Pallas
}

call6() {
  # Train B (paper recipe) under XLA flags, same call: base, Triton GEMM fusions widened (a GEMM
  # can take a transpose/convert producer as its operand), cuBLASLt (bias/activation epilogues).
  local P="--recipe paper --repeats 3"
  timeout 170 python3 benchmarks/train_step.py --models xar_b $P --tag _base_r3c6 2>&1 | grep -v Pallas
  XLA_FLAGS=--xla_gpu_triton_gemm_any=true timeout 170 python3 benchmarks/train_step.py \
    --models xar_b $P --tag _tritonany_r3c6 2>&1 | grep -v Pallas
  XLA_FLAGS=--xla_gpu_enable_cublaslt=true timeout 140 python3 benchmarks/train_step.py \
    --models xar_b $P --tag _cublaslt_r3c6 2>&1 | grep -v Pallas
}

call7() {
  # Train B (paper recipe): kernel profile and XLA's optimised HLO of the step, gzipped.
  XLA_FLAGS="--xla_dump_to=/tmp/dt --xla_dump_hlo_module_re=.*train_step.* --xla_dump_hlo_as_text" \
    timeout 170 python3 benchmarks/profile_kernels.py --what train --model xar_b --recipe paper \
    --calls 2 --top 60 2>&1 | grep -v "Pallas\|return rule" | tee "$OUT/train_b_paper_r3c7.txt"
  gzip -c "$(ls /tmp/dt/*train_step*after_optimizations.txt | head -1)" > "$OUT/train_b_after_opt.txt.gz"
}

call8() {
  # Session 3. A/B in one call. BASE (.devcarry_base) = 54be181; HEAD: the position embeddings'
  # gradient summed over the batch by a matmul (`layers.broadcast_over_batch`) instead of a
  # reduce, which had made XLA's layout assignment put the residual stream batch-minor in the
  # unrolled B step (found by compiling for an H200 without one: docs/benchmarks.md). Setup,
  # in the session's checkout before the call:
  #   rm -rf .devcarry_base && mkdir .devcarry_base && git archive 54be181 | tar -x -C .devcarry_base
  # then run `bash benchmarks/h200_issue16.sh call8` with carry [".devcarry_base"].
  local P="--recipe paper --repeats 3"
  (cd .devcarry_base && timeout 170 python3 benchmarks/train_step.py --models xar_b $P --tag _base_r3c8) 2>&1 | grep -v Pallas
  timeout 130 python3 benchmarks/train_step.py --models xar_b $P --tag _posmm_r3c8 2>&1 | grep -v Pallas
  timeout 200 python3 benchmarks/train_step.py --models xar_l,xar_h $P --tag _posmm_r3c8 2>&1 | grep -v Pallas
}

call9() {
  # Same code, same call: the layer scans' stacked outputs zero-filled (jax's default) or left
  # uninitialised (xar_jax.scan_buffers, the trainer's). L and H only: B runs unrolled.
  local P="--recipe paper --repeats 3"
  python3 -c "import jax; from xar_jax import scan_buffers as s; print('jax', jax.__version__, 'swap supported:', s.swap_supported())"
  for m in xar_l xar_h; do
    timeout 110 python3 benchmarks/train_step.py --models $m $P --scan_outputs zeroed --tag _zeroed_r3c9 2>&1 | grep -v Pallas
    timeout 110 python3 benchmarks/train_step.py --models $m $P --tag _noinit_r3c9 2>&1 | grep -v Pallas
  done
}

call10() {
  # Are the uninitialised scan outputs ever read before written? Same seed, same steps: with
  # GEMM autotuning off (fixed algorithms) the two programs must reach the same final loss
  # bit for bit. A repeat of the zeroed run with autotuning on shows the run-to-run spread.
  local P="--recipe paper --repeats 1 --steps 5"
  for mode in zeroed uninitialised; do
    XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 100 python3 benchmarks/train_step.py --models xar_l \
      $P --scan_outputs $mode --tag _${mode}_autotune0_r3c10 2>&1 | grep -v Pallas | tail -2
  done
  for i in 1 2; do
    timeout 100 python3 benchmarks/train_step.py --models xar_l $P --scan_outputs zeroed \
      --tag _zeroed_rep${i}_r3c10 2>&1 | grep -v Pallas | tail -2
  done
}

call11() {
  # The final code. (1) No slot of a scan output is read before it is written on the GPU
  # either: with the stacked outputs filled with NaN the loss stays finite. (2) The headline
  # train rows for B, L, H (paper recipe), same call.
  timeout 100 python3 benchmarks/train_step.py --models xar_l --recipe paper --repeats 1 --steps 5 \
    --scan_outputs nan --tag _nan_r3c11 2>&1 | grep -v Pallas | tail -2
  local P="--recipe paper --repeats 3"
  timeout 120 python3 benchmarks/train_step.py --models xar_b $P --tag _final_r3c11 2>&1 | grep -v Pallas
  timeout 160 python3 benchmarks/train_step.py --models xar_l,xar_h $P --tag _final_r3c11 2>&1 | grep -v Pallas
}

call12() {
  # With the zero fill gone, do L and H still want their remat policies? 'none' stores more
  # residuals, which the fill used to make costlier. Same call: the current choice, then 'none'.
  local P="--recipe paper --repeats 3"
  timeout 100 python3 benchmarks/train_step.py --models xar_l $P --tag _final2_r3c12 2>&1 | grep -v Pallas | tail -1
  timeout 100 python3 benchmarks/train_step.py --models xar_h $P --tag _final2_r3c12 2>&1 | grep -v Pallas | tail -1
  timeout 100 python3 benchmarks/train_step.py --models xar_l $P --recipe flags --attention_impl auto --dropout_impl hash --prng rbg --remat none --tag _none_r3c12 2>&1 | grep -v Pallas | tail -1
  timeout 100 python3 benchmarks/train_step.py --models xar_h $P --recipe flags --attention_impl auto --dropout_impl hash --prng rbg --remat none --tag _none_r3c12 2>&1 | grep -v Pallas | tail -1
}

call13() {
  # L, the one model still at its target's edge: two blocks per scan iteration, and 'matmuls'.
  local F="--repeats 3 --recipe flags --attention_impl auto --dropout_impl hash --prng rbg"
  timeout 110 python3 benchmarks/train_step.py --models xar_l $F --remat dots --scan_unroll 2 --tag _unroll2_r3c13 2>&1 | grep -v Pallas | tail -1
  timeout 100 python3 benchmarks/train_step.py --models xar_l $F --remat matmuls --tag _matmuls_r3c13 2>&1 | grep -v Pallas | tail -1
}

call14() {
  # Session 4. L's MLP hidden width 2730 is padded to 2816 (multiple of 128): 3.1% more MLP
  # FLOPs than the model's. A multiple of 64 (2752) or 16 (2736) keeps the rows aligned for the
  # tensor cores' copies; same call: 128 (the base), 64, 16.
  local P="--recipe paper --repeats 5"
  for m in 128 64 16; do
    timeout 110 python3 benchmarks/train_step.py --models xar_l $P --mlp_multiple $m --tag _mlp${m}_r4c14 2>&1 | grep -v Pallas | tail -1
  done
  # Where L's step spends its time (the trainer's program, scan outputs uninitialised), with
  # XLA's optimised program to map fusion names to operations.
  XLA_FLAGS="--xla_dump_to=/tmp/dump_l --xla_dump_hlo_module_re=.*train_step.* --xla_dump_hlo_as_text" \
    timeout 120 python3 benchmarks/profile_kernels.py --what train --model xar_l --recipe paper --top 60 \
    2>&1 | grep -v Pallas | tee "$OUT/prof_train_l.txt"
  (cd /tmp/dump_l && tar czf "$OUT/dump_l.tgz" ./*after_optimizations.txt)
}

call15() {
  # Call 14's profile: memcpy128 x320 = 14.0 ms of L's 247 ms, the nine residuals each forward
  # layer copies into its stacked buffer (dynamic-update-slice as an async copy after the GEMM
  # wrote them to a temporary). XLA's dynamic-slice fusion lets a cuBLAS GEMM write straight into
  # the slot. Same call: without, with; L then H.
  local P="--recipe paper --repeats 5" D="--xla_option xla_gpu_enable_dynamic_slice_fusion=true"
  for m in xar_l xar_h; do
    timeout 100 python3 benchmarks/train_step.py --models $m $P --tag _base_r4c15 2>&1 | grep -v Pallas | tail -1
    timeout 100 python3 benchmarks/train_step.py --models $m $P $D --tag _dsf_r4c15 2>&1 | grep -v Pallas | tail -3
  done
  XLA_FLAGS="--xla_dump_to=/tmp/dump_dsf --xla_dump_hlo_module_re=.*train_step.* --xla_dump_hlo_as_text" \
    timeout 100 python3 benchmarks/train_step.py --models xar_l $P $D --repeats 1 --no_json 2>&1 | tail -1
  (cd /tmp/dump_dsf && tar czf "$OUT/dump_l_dsf.tgz" ./*after_optimizations.txt)
}

call16() {
  # Session 4's headline rows: the code on main (no model change since session 3), train B, L, H
  # on the paper recipe with five timed chunks each, then the sampler, all in one call.
  local P="--recipe paper --repeats 5"
  timeout 150 python3 benchmarks/train_step.py --models xar_b $P --tag _final_r4c16 2>&1 | grep -v Pallas | tail -1
  timeout 110 python3 benchmarks/train_step.py --models xar_l $P --tag _final_r4c16 2>&1 | grep -v Pallas | tail -1
  timeout 100 python3 benchmarks/train_step.py --models xar_h $P --tag _final_r4c16 2>&1 | grep -v Pallas | tail -1
  timeout 200 python3 benchmarks/sample.py --models xar_b,xar_l,xar_h --repeats 2 --tag _final_r4c16 2>&1 | grep -v Pallas | tail -5
}

call17() {
  # A/B in one call. BASE (.devcarry_base) = main before this change; HEAD: hash dropout's mask
  # from one hash per pair of elements (16 bits each). Call 14's profile put the hash at about
  # 5% of L's step (the backward's mask-only fusion: 4.7 ms for 92M elements per layer x 32);
  # the H200 PTX of the MLP fusion drops from 285 to 230 instructions per thread.
  local P="--recipe paper --repeats 5"
  for m in xar_l xar_h; do
    (cd .devcarry_base && timeout 100 python3 benchmarks/train_step.py --models $m $P --tag _base_r4c17) 2>&1 | grep -v Pallas | tail -1
    timeout 100 python3 benchmarks/train_step.py --models $m $P --tag _pairhash_r4c17 2>&1 | grep -v Pallas | tail -1
  done
  (cd .devcarry_base && timeout 130 python3 benchmarks/train_step.py --models xar_b $P --tag _base_r4c17) 2>&1 | grep -v Pallas | tail -1
  timeout 130 python3 benchmarks/train_step.py --models xar_b $P --tag _pairhash_r4c17 2>&1 | grep -v Pallas | tail -1
}

"$@"
