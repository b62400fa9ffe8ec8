#!/usr/bin/env bash
# Runs the FID evaluation of the run in WORKDIR on every worker (--mode=eval: the trainer loads
# the latest checkpoint there, samples 50,000 images, decodes them with the VAE and computes FID
# against REFERENCE_STATS). Detached like start.sh, in tmux session xar-eval; follow it with
# `MODE=eval launch/logs.sh`. A running training job must be stopped first (one process per TPU).
#
#   launch/eval.sh [--dry-run] [--env FILE] [--config.field=value ...]
#
# REFERENCE_STATS  reference statistics (ADM's VIRTUAL_imagenet256_labeled.npz or a mu/sigma
#                  .npz), gs:// or a path on the workers [required]
# SAMPLES_DIR      where the samples go: gs:// (every worker writes its own shards there, worker 0
#                  assembles samples.npz; no mount needed) or a directory all workers share
#                  [WORKDIR/generated, the trainer's default]
# VAE_DIR          converted KL-16 VAE on every worker (install.sh syncs WEIGHTS_GCS to
#                  ~/xar_weights), as an absolute path [required]
# INCEPTION_DIR    converted Inception weights on every worker, absolute path [required]
# Other settings as for start.sh (launch/common.sh).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
xar_init "$@"
for arg in "${ARGS[@]}"; do
  [[ ${arg} == --config.*=* ]] || die "unexpected argument '${arg}'; only --config.field=value overrides are passed on (see --help)"
done
load_tpu_settings
load_run_settings
require_var REFERENCE_STATS "the FID reference statistics, e.g. gs://${BUCKET}/fid/VIRTUAL_imagenet256_labeled.npz"
require_var VAE_DIR "the converted VAE on the workers, e.g. /home/USER/xar_weights/kl16"
require_var INCEPTION_DIR "the converted Inception on the workers, e.g. /home/USER/xar_weights/inception"

EVAL_FLAGS=()
if [[ -n ${SAMPLES_DIR:-} ]]; then
  EVAL_FLAGS+=("--config.sample.out_dir=${SAMPLES_DIR}")
fi
EVAL_FLAGS+=("--config.latent.vae_checkpoint=${VAE_DIR}"
  "--config.eval.inception_checkpoint=${INCEPTION_DIR}"
  "--config.eval.reference_stats=${REFERENCE_STATS}")
start_job eval "${EVAL_FLAGS[@]}" "${ARGS[@]}"
