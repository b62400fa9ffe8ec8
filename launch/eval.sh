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

start_job eval "--config.eval.reference_stats=${REFERENCE_STATS}" "${ARGS[@]}"
