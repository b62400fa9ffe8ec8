#!/usr/bin/env bash
# Stops the job of MODE (train; sample, eval, or cache for prepare_data.sh cache) on every
# worker: SIGTERM to the python process, SIGKILL after STOP_TIMEOUT seconds (120), then the tmux
# session xar-MODE is closed. On SIGTERM the trainer finishes the step in flight, saves a
# checkpoint of it (with the data iterator) at a step all workers agree on and exits 0; sample and
# eval jobs finish their batch shard in flight (xar_jax/stop_signal.py). The slice keeps running
# (and billing) until launch/delete.sh. Checkpoints already in WORKDIR are untouched.
#
#   launch/stop.sh [--dry-run] [--env FILE]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
xar_init "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument(s): ${ARGS[*]} (see --help)"
load_tpu_settings
MODE="${MODE:-train}"
check_choice MODE train sample eval cache

stop_job "${MODE}"
