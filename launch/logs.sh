#!/usr/bin/env bash
# Shows the log of a job: the last LOG_LINES (100) lines of worker WORKER's log (0; a worker
# index or "all"), following it while FOLLOW=1 (the default for a single worker). With
# NUM_SLICES >= 2, SLICE (0; a slice index or "all") picks the slice.
# With --upload every worker copies its log to WORKDIR/logs/ instead (needs BUCKET).
#
#   launch/logs.sh [--dry-run] [--env FILE] [--upload]
#
# MODE (train; sample, eval, or cache for prepare_data.sh cache) picks the job (tmux session
# xar-MODE); the job also uploads its log by itself every few minutes.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
xar_init "$@"
UPLOAD=0
for arg in "${ARGS[@]}"; do
  case "${arg}" in
    --upload) UPLOAD=1 ;;
    *) die "unexpected argument '${arg}' (see --help)" ;;
  esac
done
load_tpu_settings
MODE="${MODE:-train}"
check_choice MODE train sample eval cache

if [[ ${UPLOAD} == 1 ]]; then
  load_run_settings
  step "every worker copies its ${MODE} log to ${WORKDIR}/logs/"
  tpu_ssh all "$(worker_cmd upload-log "${MODE}" "${WORKDIR}/logs")"
  exit 0
fi
WORKER="${WORKER:-0}"
[[ ${WORKER} =~ ^(all|[0-9]+)$ ]] || die "WORKER='${WORKER}' is not allowed; use a worker index (e.g. 3) or all"
SLICE="${SLICE:-0}"
[[ ${SLICE} =~ ^(all|[0-9]+)$ ]] || die "SLICE='${SLICE}' is not allowed; use a slice index (e.g. 1) or all"
if [[ ${SLICE} != all ]] && ((SLICE >= NUM_SLICES)); then
  die "SLICE=${SLICE} is not allowed with NUM_SLICES=${NUM_SLICES}; use 0 to $((NUM_SLICES - 1)) or all"
fi
LOG_LINES="${LOG_LINES:-100}"
[[ ${LOG_LINES} =~ ^[0-9]+$ ]] || die "LOG_LINES='${LOG_LINES}' must be a number"
if [[ ${WORKER} =~ ^[0-9]+$ && (${SLICE} != all || ${NUM_SLICES} == 1) ]]; then
  FOLLOW="${FOLLOW:-1}"
else
  FOLLOW="${FOLLOW:-0}"  # following several workers interleaves their lines
fi
check_bool FOLLOW
tpu_ssh "${WORKER}" "$(worker_cmd log "${MODE}" "${LOG_LINES}" "${FOLLOW}")" "${SLICE}"
