#!/usr/bin/env bash
# Converts the authors' released PyTorch weights on worker 0 and stores the converted Orbax
# directories in WEIGHTS_GCS/<name>/ (name = source file name without extension), from where
# install.sh syncs them to ~/xar_weights/<name>/ on every worker. Upload the originals to GCS
# first; nothing is downloaded from the internet except the CPU build of torch for reading them.
#
#   launch/convert_weights.sh [--dry-run] [--env FILE]
#
# XAR_PTH        released xAR checkpoint, e.g. gs://BUCKET/weights_src/xar_h.pth        [optional]
# VAE_CKPT       MAR's KL-16 VAE, e.g. gs://BUCKET/weights_src/kl16.ckpt                [optional]
# INCEPTION_PTH  torch-fidelity's weights-inception-2015-12-05-6726825d.pth             [optional]
# (at least one of the three). Needs an installed slice (install.sh). Then run install.sh again,
# or sync by hand, so that every worker has the converted weights.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
xar_init "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument(s): ${ARGS[*]} (see --help)"
load_tpu_settings
load_run_settings

declare -A SOURCES=([xar]="${XAR_PTH:-}" [vae]="${VAE_CKPT:-}" [inception]="${INCEPTION_PTH:-}")
declare -A NAMES=([xar]=XAR_PTH [vae]=VAE_CKPT [inception]=INCEPTION_PTH)
converted=0
for kind in xar vae inception; do
  src="${SOURCES[${kind}]}"
  [[ -n ${src} ]] || continue
  check_gcs "${NAMES[${kind}]}"
  step "convert ${src} (${kind}) on worker 0 into ${WEIGHTS_GCS}/"
  tpu_ssh 0 "$(worker_cmd convert "${kind}" "${src}" "${WEIGHTS_GCS}")"
  converted=$((converted + 1))
done
((converted > 0)) || die "nothing to convert: set at least one of XAR_PTH, VAE_CKPT, INCEPTION_PTH (gs:// paths of the released files)"
say "next: launch/install.sh (syncs ${WEIGHTS_GCS} to ~/xar_weights on every worker)"
