#!/usr/bin/env bash
# The benchmarks on one GPU. Train throughput, the benchmark against the user's command, per model:
#   1. python -m benchmarks.train_step: the trainer's step on synthetic batches (config defaults);
#   2. python -m xar_jax.main: the trainer itself, config defaults, on a latent cache in the
#      trainer's format (made first by benchmarks/synthetic_latents.py), its logged img/s after
#      the compile (the last logged interval);
#   3. for the models in PRNG_AB, the benchmark again with --config.prng_impl=rbg;
# then, for the models in SAMPLE, the sampler (python -m benchmarks.sample, batch 256).
# Both runs share one compilation cache: the trainer's "Compiled the train step in N s" shows
# whether it compiled the benchmark's program. Prints a table last; rows go to $OUT/train_gpu.json
# and the benchmarks' rows to $OUT/bench.json (a copy of docs/benchmarks.json).
#
#   OUT=/tmp/out bash benchmarks/gpu.sh                  # train B, L, H at batch 256 / 128 / 64
#   MODELS="xar_b" STEPS=300 PRNG_AB="xar_b" OUT=/tmp/out bash benchmarks/gpu.sh
#   MODELS= SAMPLE="xar_b xar_l" OUT=/tmp/out bash benchmarks/gpu.sh      # the sampler only
# EXTRA adds --config.X=... flags to every run (the CPU smoke run shrinks the network with it).
set -uo pipefail
export PYTHONUNBUFFERED=1 XAR_BENCH_JSON=$OUT/bench.json
MODELS=${MODELS-"xar_b xar_l xar_h"}
STEPS=${STEPS:-200}          # trainer steps (logged every log.every_steps, the config's 100)
PRNG_AB=${PRNG_AB:-}         # models whose benchmark runs again with the rbg PRNG
SAMPLE=${SAMPLE:-}           # models whose sampler is timed
DEADLINE=${DEADLINE:-100000} # seconds into the script after which no new run starts
EXTRA=${EXTRA:-}
LIMIT=${LIMIT:-240}          # seconds per run, so that the table is always printed
WORK=${WORK:-/tmp/xar_gpu_train}
declare -A BATCH=([xar_b]=256 [xar_l]=128 [xar_h]=64)
[ -n "${BATCHES:-}" ] && for kv in $BATCHES; do BATCH[${kv%=*}]=${kv#*=}; done
mkdir -p "$OUT" "$WORK"
[ -f "$OUT/bench.json" ] || cp docs/benchmarks.json "$OUT/bench.json"
ROWS=$OUT/train_gpu.jsonl
: > "$ROWS"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

CACHE=$WORK/latents
if [ -n "$MODELS" ] && [ ! -f "$CACHE/train/cache_spec.json" ]; then
  python3 -m benchmarks.synthetic_latents --out_dir="$CACHE" --num_examples=4096 2>&1 | tail -1
fi

row() {  # model what img_per_s compile_s
  python3 -c "import json,sys; m,w,i,c=sys.argv[1:]; print(json.dumps({'model': m, 'run': w, \
'img_per_s': float(i) if i else None, 'compile_s': float(c) if c else None}))" "$@" >> "$ROWS"
}

bench() {  # model tag [flags...]: one benchmark run; its row from the JSON it merged into
  local m=$1 tag=$2; shift 2
  timeout "$LIMIT" python3 -m benchmarks.train_step --config=configs/$m.py --config.train.global_batch_size=${BATCH[$m]} \
    --config.data.cache_dir="$CACHE" --config.compile_cache_dir="$WORK/compile_cache" \
    --steps=10 --repeats=3 --tag="$tag" $EXTRA "$@" 2>&1 | grep -v Pallas | tee "$WORK/bench_$m$tag.log" | tail -3
  python3 - "$m" "$tag" "$ROWS" "$OUT/bench.json" <<'PY'
import json, sys
m, tag, rows, bench = sys.argv[1:]
data = json.load(open(bench))["train"]
key = next((k for k in (m + tag, "custom" + tag) if k in data), None)
r = data.get(key, {}) if key else {}
with open(rows, "a") as f:
    f.write(json.dumps({"model": m, "run": "benchmark" + tag, "img_per_s": r.get("img_per_s"),
                        "compile_s": r.get("compile_s"), "scan_layers": r.get("scan_layers"),
                        "remat": r.get("remat"), "prng_impl": r.get("prng_impl")}) + "\n")
PY
}

trainer() {  # model [run name]: the user's command, config defaults, STEPS steps
  local m=$1 name=${2:-trainer} wd=$WORK/workdir_$1
  rm -rf "$wd"
  timeout "$LIMIT" python3 -m xar_jax.main --config=configs/$m.py --workdir="$wd" --config.data.source=latents \
    --config.data.cache_dir="$CACHE" --config.train.global_batch_size=${BATCH[$m]} \
    --config.train.num_steps="$STEPS" --config.compile_cache_dir="$WORK/compile_cache" \
    --config.log.sample_every_steps=0 $EXTRA > "$WORK/train_$m.log" 2>&1
  local rc=$?
  grep -E "Compiled the train step|images_per_sec_per_device" "$WORK/train_$m.log" | cut -c1-220
  [ $rc -ne 0 ] && tail -5 "$WORK/train_$m.log"
  local ips comp
  ips=$(grep -oE "images_per_sec_per_device[ =:]+[0-9.e+]+" "$WORK/train_$m.log" | tail -1 | grep -oE "[0-9.e+]+$")
  comp=$(grep -oE "Compiled the train step in [0-9.]+" "$WORK/train_$m.log" | grep -oE "[0-9.]+$")
  row "$m" "$name" "$ips" "$comp"
  cp "$WORK/train_$m.log" "$OUT/${name}_$m.log" 2>/dev/null
  [ -n "$ips" ]
}

late() { [ "$SECONDS" -gt "$DEADLINE" ] && echo "skipped $*: past DEADLINE=$DEADLINE s"; }
for m in $MODELS; do
  late bench "$m" || bench "$m" _defaults
  # A run that logged no rate (e.g. out of device memory) is tried once on CUDA's async allocator.
  late trainer "$m" || trainer "$m" || late trainer "$m" \
    || TF_GPU_ALLOCATOR=cuda_malloc_async trainer "$m" trainer_cuda_malloc_async
done
for m in $PRNG_AB; do
  late bench "$m" rbg || bench "$m" _rbg --config.prng_impl=rbg
done
for m in $SAMPLE; do
  late sample "$m" || timeout "$LIMIT" python3 -m benchmarks.sample --config=configs/$m.py \
    --config.sample.batch_size=256 --repeats=2 $EXTRA 2>&1 | grep -v Pallas | tail -3
done

python3 - "$ROWS" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
json.dump(rows, open(sys.argv[1].replace(".jsonl", ".json"), "w"), indent=1)
print("\nmodel | benchmark img/s | trainer img/s | trainer/benchmark | rbg img/s | compile s (bench, trainer)")
for m in dict.fromkeys(r["model"] for r in rows):
    get = lambda run, k="img_per_s": next((r.get(k) for r in rows if r["model"] == m and r["run"] == run), None)
    b, g = get("benchmark_defaults"), get("benchmark_rbg")
    t = get("trainer") or get("trainer_cuda_malloc_async")
    ratio = f"{t / b:.3f}" if b and t else "-"
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else "-"
    print(f"{m} | {fmt(b)} | {fmt(t)} | {ratio} | {fmt(g)} | "
          f"{fmt(get('benchmark_defaults', 'compile_s'))}, {fmt(get('trainer', 'compile_s'))}")
PY
rm -f "$ROWS"
