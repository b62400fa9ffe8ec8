#!/usr/bin/env bash
# Ships the code to every worker of the slice and installs it with JAX for TPU.
#
#   launch/install.sh [--dry-run] [--env FILE]
#
# The code travels as a tarball of the git tree at SYNC_REF (HEAD), made with `git archive` on
# this machine and copied with `gcloud compute tpus tpu-vm scp --worker=all` (with several slices
# `gcloud compute tpus queued-resources scp --node=all --worker=all`): the workers need no
# access to the repository, and every worker runs exactly the same commit (recorded in
# ~/xar-jax/.xar_commit and at the top of each log). Uncommitted changes stop the script unless
# ALLOW_DIRTY=1; CODE_TARBALL=path ships a tarball you made yourself instead.
# Then, on every worker: ~/xar_venv (Python PYTHON_VERSION via uv), `pip install -e "$HOME/xar-jax[gcs]"
# "$JAX_SPEC"`, and converted weights from WEIGHTS_GCS to ~/xar_weights.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
xar_init "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument(s): ${ARGS[*]} (see --help)"
load_tpu_settings
load_run_settings

install_code
say "next: launch/start.sh"
