#!/usr/bin/env bash
# Per-kernel device time of the trainer's step on one GPU, with the optimised HLO of the same
# compile, for the estimator's check (`python -m benchmarks.gpu_compile_only --from_hlo $OUT
# --profile $OUT`). Per model (configs' defaults, batch 256 / 128 / 64):
#   $OUT/prof_<b|l|h>.json  every kernel's time per step (benchmarks/profile_kernels.py --json)
#   $OUT/hlo_<b|l|h>.txt.gz the largest optimised module XLA dumped: the train step
#
#   OUT=/tmp/prof bash benchmarks/gpu_profile.sh
#   MODELS="xar_b" OUT=/tmp/prof bash benchmarks/gpu_profile.sh
#   MODELS=tiny BATCHES="tiny=8" OUT=/tmp/prof bash benchmarks/gpu_profile.sh   # a CPU smoke run
# Other programs of the same models: OVERRIDES (config flags) and TAG (appended to the names):
#   MODELS=xar_b TAG=_scan OVERRIDES="--config.model.scan_layers=True --config.model.remat=dots" \
#     OUT=/tmp/prof bash benchmarks/gpu_profile.sh        # $OUT/prof_b_scan.json, hlo_b_scan.txt.gz
set -uo pipefail
export PYTHONUNBUFFERED=1
MODELS=${MODELS-"xar_b xar_l xar_h"}
LIMIT=${LIMIT:-200}  # seconds per model
declare -A BATCH=([xar_b]=256 [xar_l]=128 [xar_h]=64)
[ -n "${BATCHES:-}" ] && for kv in $BATCHES; do BATCH[${kv%=*}]=${kv#*=}; done
mkdir -p "$OUT"
for m in $MODELS; do
  s=${m#xar_}
  dump=$(mktemp -d)
  XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$dump --xla_dump_hlo_as_text" \
    timeout "$LIMIT" python3 -m benchmarks.profile_kernels --what=train --config="configs/$m.py" \
    --config.train.global_batch_size="${BATCH[$m]}" ${OVERRIDES:-} --json="$OUT/prof_$s${TAG:-}.json" 2>&1 \
    | grep -v Pallas | tail -12
  hlo=$(find "$dump" -name "*after_optimizations.txt" -printf "%s %p\n" | sort -rn | head -1 \
    | cut -d" " -f2-)
  [ -n "$hlo" ] && gzip -c "$hlo" > "$OUT/hlo_$s${TAG:-}.txt.gz"
  rm -rf "$dump"
done
ls -la "$OUT"
