#!/usr/bin/env bash
# Runs ON THE DATA-PREPARATION VM (a plain CPU VM; launch/prepare_data.sh build starts it there
# in tmux session xar-build-imagenet):
#
#   build_imagenet.sh --tars=gs://B/imagenet_manual --data-dir=gs://B/tfds [--tfds=REQUIREMENT]
#
# Builds TFDS `imagenet2012` in the ArrayRecord format that `tfds.data_source` reads, from the
# two archives of ImageNet's manual download (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar,
# which you upload to --tars yourself: ImageNet's licence forbids fetching them for you).
# Building needs TensorFlow, so it happens here, in its own virtualenv, never on the TPU workers.
# The result is uploaded to <data-dir>/imagenet2012/ and the marker _XAR_BUILD_COMPLETE is
# written last; a rerun after an interruption skips what is already done.
set -euo pipefail

tars="" data_dir="" tfds_spec="tensorflow-datasets>=4.9.9,<5"
for arg in "$@"; do
  case "${arg}" in
    --tars=*) tars="${arg#*=}" ;;
    --data-dir=*) data_dir="${arg#*=}" ;;
    --tfds=*) tfds_spec="${arg#*=}" ;;
    *) echo "error: unknown argument '${arg}'" >&2; exit 2 ;;
  esac
done
[[ -n ${tars} && -n ${data_dir} ]] || { echo "usage: build_imagenet.sh --tars=gs://... --data-dir=gs://..." >&2; exit 2; }

mkdir -p "${HOME}/xar_logs"
exec > >(tee -a "${HOME}/xar_logs/build_imagenet.log") 2>&1
marker="${data_dir}/imagenet2012/_XAR_BUILD_COMPLETE"
echo "=== $(date -u +%FT%TZ) build imagenet2012 from ${tars} into ${data_dir}"
if gcloud storage ls "${marker}" >/dev/null 2>&1; then
  echo "${marker} exists: already built"
  exit 0
fi

if [[ ! -x ${HOME}/tfds_venv/bin/tfds ]]; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
  python3 -m venv "${HOME}/tfds_venv"
  "${HOME}/tfds_venv/bin/pip" install --quiet --upgrade pip
  "${HOME}/tfds_venv/bin/pip" install --quiet tensorflow-cpu "${tfds_spec}" array-record
fi

manual="${HOME}/imagenet_manual"
mkdir -p "${manual}"
for archive in ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar; do
  if [[ ! -f ${manual}/${archive} ]]; then  # copy under a temporary name: no half archive
    gcloud storage cp "${tars}/${archive}" "${manual}/${archive}.partial"
    mv "${manual}/${archive}.partial" "${manual}/${archive}"
  fi
done

"${HOME}/tfds_venv/bin/tfds" build imagenet2012 --data_dir="${HOME}/tfds_local" \
  --manual_dir="${manual}" --file_format=array_record
gcloud storage rsync -r "${HOME}/tfds_local/imagenet2012" "${data_dir}/imagenet2012"
date -u +%FT%TZ >"${HOME}/_XAR_BUILD_COMPLETE"
gcloud storage cp "${HOME}/_XAR_BUILD_COMPLETE" "${marker}"
echo "=== $(date -u +%FT%TZ) done: ${data_dir}/imagenet2012 (delete this VM: launch/prepare_data.sh cleanup)"
