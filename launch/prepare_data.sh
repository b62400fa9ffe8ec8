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
#   cache    on the TPU slice (installed, with the converted VAE on every worker): run
#            `python -m xar_jax.data.latent_cache --multihost` on every worker, detached in
#            tmux session xar-cache (follow with MODE=cache launch/logs.sh), reading split
#            CACHE_SPLIT of DATA_DIR and writing VAE moments to LATENT_DIR/CACHE_SPLIT/. Shard s
#            is encoded by worker s % number of workers, on its own chips; rerunning after an
#            interruption keeps the finished shards. Run it once per split (train, validation).
#
# IMAGENET_TARS      gs:// folder with the two ImageNet archives [gs://BUCKET/imagenet_manual]
# PREP_VM            name of the CPU VM [xar-prep]
# PREP_ZONE          its zone; keep it in the bucket's region [ZONE]
# PREP_MACHINE_TYPE  [n2-standard-32]     PREP_DISK_GB  boot disk, archives + output [500]
# TFDS_SPEC          pip requirement for tensorflow-datasets on the VM ["tensorflow-datasets>=4.9.9,<5"]
# cache only:
# VAE_DIR            the converted KL-16 VAE on every worker, absolute path, e.g.
#                    /home/USER/xar_weights/kl16 (convert_weights.sh, then install.sh) [required]
# CACHE_SPLIT        train | validation [train]      IMAGE_SIZE  256 | 512 (ADM crop) [256]
# CACHE_BATCH_SIZE   images per encoder call per worker, a multiple of its chips [256]
# CACHE_SHARD_SIZE   examples per shard [1000]       CACHE_READ_WORKERS  decoding processes [16]
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
    if run gcloud storage ls "${MARKER}"; then
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
    require_var VAE_DIR "the converted KL-16 VAE on the workers, e.g. /home/USER/xar_weights/kl16"
    [[ ${VAE_DIR} == /* ]] || die "VAE_DIR='${VAE_DIR}' must be an absolute path on the workers"
    CACHE_SPLIT="${CACHE_SPLIT:-train}"
    check_choice CACHE_SPLIT train validation
    IMAGE_SIZE="${IMAGE_SIZE:-256}"
    check_choice IMAGE_SIZE 256 512
    CACHE_BATCH_SIZE="${CACHE_BATCH_SIZE:-256}"
    CACHE_SHARD_SIZE="${CACHE_SHARD_SIZE:-1000}"
    CACHE_READ_WORKERS="${CACHE_READ_WORKERS:-16}"
    for name in CACHE_BATCH_SIZE CACHE_SHARD_SIZE CACHE_READ_WORKERS; do
      [[ ${!name} =~ ^[0-9]+$ ]] || die "${name}='${!name}' must be a number"
    done
    # Every worker runs the same command: --multihost initialises jax.distributed, which gives
    # each process its index, and the cache assigns shard s to process s % process_count.
    cache_args=(--source=imagenet --data_dir="${DATA_DIR}" --split="${CACHE_SPLIT}"
      --image_size="${IMAGE_SIZE}" --out_dir="${LATENT_DIR}"
      --encoder=xar_jax.data.latent_cache:converted_vae_encoder --encoder_arg="${VAE_DIR}"
      --batch_size="${CACHE_BATCH_SIZE}" --shard_size="${CACHE_SHARD_SIZE}"
      --num_workers="${CACHE_READ_WORKERS}" --multihost)
    step "start python -m xar_jax.data.latent_cache on every worker (tmux session xar-cache)"
    tpu_ssh all "$(worker_cmd start cache "${WORKDIR}/logs" "${cache_args[@]}")"
    say "started; follow with: MODE=cache launch/logs.sh"
    ;;
esac
