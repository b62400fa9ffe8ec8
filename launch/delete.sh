#!/usr/bin/env bash
# Deletes the slice (the queued resource with its node, or the TPU VM). Asks for confirmation
# unless YES=1. Data, checkpoints and logs in GCS stay.
#
#   launch/delete.sh [--dry-run] [--env FILE]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
xar_init "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument(s): ${ARGS[*]} (see --help)"
load_tpu_settings
YES="${YES:-0}"
check_bool YES

delete_slice "${YES}"
