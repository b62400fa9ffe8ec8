#!/usr/bin/env bash
# Creates the TPU slice: a queued resource (QUEUED_RESOURCE=1, the default) or a plain TPU VM,
# then waits until it is READY (WAIT=0 returns right after the request). NUM_SLICES=N (2 or more)
# requests N slices as one queued resource (nodes TPU_NAME-0 ... TPU_NAME-<N-1>).
#
#   launch/create.sh [--dry-run] [--env FILE]
#
# Uses PROJECT, ACCELERATOR_TYPE, ZONE, RUNTIME_VERSION, TPU_NAME, QUEUED_RESOURCE, QR_ID,
# NUM_SLICES, SPOT / PREEMPTIBLE / RESERVED, CREATE_FLAGS (extra gcloud flags, e.g.
# --network=... or --service-account=...), WAIT (1), POLL_SECONDS (60). See launch/common.sh for
# defaults.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
xar_init "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument(s): ${ARGS[*]} (see --help)"
load_tpu_settings
WAIT="${WAIT:-1}"
check_bool WAIT

create_slice
if [[ ${WAIT} == 1 ]]; then
  wait_until_ready
fi
say "next: launch/install.sh"
