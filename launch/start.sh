#!/usr/bin/env bash
# Starts `python -m xar_jax.main` on every worker (of every slice) at once, detached in tmux
# session xar-MODE, one log per worker in ~/xar_logs/MODE_<hostname>.log (also copied to
# WORKDIR/logs/). The trainer resumes from the latest checkpoint in WORKDIR by itself, so
# starting again with the same WORKDIR continues the run.
#
#   launch/start.sh [--dry-run] [--env FILE] [--config.field=value ...]
#
# MODE (train | sample | eval) [train]; CONFIG, WORKDIR, DATA_SOURCE, DATA_DIR,
# LATENT_DIR, CONFIG_OVERRIDES as in launch/common.sh. Arguments of the form
# --config.field=value are passed on to xar_jax.main after the overrides from the environment.
# The local CONFIG file is copied to every worker first, so edits need no reinstall.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
xar_init "$@"
for arg in "${ARGS[@]}"; do
  [[ ${arg} == --config.*=* ]] || die "unexpected argument '${arg}'; only --config.field=value overrides are passed on (see --help)"
done
load_tpu_settings
load_run_settings
MODE="${MODE:-train}"
check_choice MODE train sample eval

start_job "${MODE}" "${ARGS[@]}"
