#!/usr/bin/env bash
# Prepares the training data in GCS: the TFDS ImageNet dataset, then the cached VAE latents.
#
#   launch/prepare_data.sh [--dry-run] [--env FILE] build|status|cleanup|cache
#
#   build    create the CPU VM PREP_VM and start remote/build_imagenet.sh on it, detached: it
#            copies ILSVRC2012_img_{train,val}.tar from IMAGENET_TARS, runs `tfds build
#            imagenet2012 --file_format=array_record` (needs TensorFlow, so not on the TPU) and
#            uploads the result to DATA_DIR/imagenet2012/ (takes hours)
#   status   the end of the build log, and whether DATA_DIR holds the finished dataset
#   cleanup  delete PREP_VM (asks unless YES=1)
#   cache    on the TPU slice (installed, with the converted VAE in your config): run
#            `python -m xar_jax.main --mode=cache_latents` on every worker, reading
#            DATA_DIR and writing latent shards to LATENT_DIR (restartable: finished shards
#            are kept)
#
# IMAGENET_TARS      gs:// folder with the two ImageNet archives [gs://BUCKET/imagenet_manual]
# PREP_VM            name of the CPU VM [xar-prep]
# PREP_ZONE          its zone; keep it in the bucket's region [ZONE]
# PREP_MACHINE_TYPE  [n2-standard-32]     PREP_DISK_GB  boot disk, archives + output [500]
# TFDS_SPEC          pip requirement for tensorflow-datasets on the VM ["tensorflow-datasets>=4.9.9,<5"]
# DATA_DIR, LATENT_DIR, CONFIG, WORKDIR and the TPU settings as in launch/common.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
xar_init "$@"
((${#ARGS[@]} == 1)) || die "give exactly one action: build, status, cleanup or cache (see --help)"
ACTION="${ARGS[0]}"
check_choice ACTION build status cleanup cache
load_tpu_settings
load_run_settings
IMAGENET_TARS="${IMAGENET_TARS:-gs://${BUCKET}/imagenet_manual}"
check_gcs IMAGENET_TARS
PREP_VM="${PREP_VM:-xar-prep}"
[[ ${PREP_VM} =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || die "PREP_VM='${PREP_VM}' is not a valid VM name"
PREP_ZONE="${PREP_ZONE:-${ZONE}}"
PREP_MACHINE_TYPE="${PREP_MACHINE_TYPE:-n2-standard-32}"
PREP_DISK_GB="${PREP_DISK_GB:-500}"
[[ ${PREP_DISK_GB} =~ ^[0-9]+$ ]] || die "PREP_DISK_GB='${PREP_DISK_GB}' must be a number of GB"
TFDS_SPEC="${TFDS_SPEC:-tensorflow-datasets>=4.9.9,<5}"
VM_FLAGS=(--zone="${PREP_ZONE}" --project="${PROJECT}")
MARKER="${DATA_DIR}/imagenet2012/_XAR_BUILD_COMPLETE"

case "${ACTION}" in
  build)
    step "create the CPU VM ${PREP_VM} (${PREP_MACHINE_TYPE}, ${PREP_DISK_GB} GB disk)"
    run gcloud compute instances create "${PREP_VM}" "${VM_FLAGS[@]}" \
      --machine-type="${PREP_MACHINE_TYPE}" --boot-disk-size="${PREP_DISK_GB}GB" \
      --boot-disk-type=pd-balanced --image-family=ubuntu-2204-lts \
      --image-project=ubuntu-os-cloud --scopes=cloud-platform
    step "copy the build script (retried while the VM boots)"
    attempt=1
    until run gcloud compute scp "${XAR_LAUNCH_DIR}/remote/build_imagenet.sh" \
      "${PREP_VM}:build_imagenet.sh" "${VM_FLAGS[@]}"; do
      ((attempt < 10)) || die "could not reach ${PREP_VM} by ssh"
      attempt=$((attempt + 1))
      sleep 20
    done
    step "start the build, detached (tmux session xar-build-imagenet)"
    inner="$(join_quoted bash build_imagenet.sh --tars="${IMAGENET_TARS}" \
      --data-dir="${DATA_DIR}" --tfds="${TFDS_SPEC}")"
    run gcloud compute ssh "${PREP_VM}" "${VM_FLAGS[@]}" \
      --command="$(join_quoted tmux new-session -d -s xar-build-imagenet "${inner}")"
    say "follow with: launch/prepare_data.sh status"
    ;;
  status)
    step "end of the build log on ${PREP_VM}"
    run gcloud compute ssh "${PREP_VM}" "${VM_FLAGS[@]}" \
      --command="tail -n 30 xar_logs/build_imagenet.log"
    step "is the dataset complete in ${DATA_DIR}?"
    if run gsutil -q stat "${MARKER}"; then
      [[ ${DRY_RUN} == 1 ]] || say "yes: ${MARKER} exists"
    else
      say "not yet: ${MARKER} is missing"
    fi
    ;;
  cleanup)
    YES="${YES:-0}"
    check_bool YES
    quiet=()
    [[ ${YES} == 1 ]] && quiet=(--quiet)
    step "delete the CPU VM ${PREP_VM}"
    run gcloud compute instances delete "${PREP_VM}" "${VM_FLAGS[@]}" "${quiet[@]}"
    ;;
  cache)
    DATA_SOURCE=imagenet  # the encoder reads images; training later reads the latents
    start_job cache_latents "--config.data.cache_dir=${LATENT_DIR}"
    ;;
esac
