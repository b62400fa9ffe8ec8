# shellcheck shell=bash
# Shared code of the launch/*.sh scripts; they source it and call `xar_init "$@"` first.
#
# Conventions every script follows:
#   * Settings come from environment variables, optionally from a file given with `--env FILE`
#     (plain `NAME=value` lines; values in the file win over the environment).
#   * `--dry-run` (or DRY_RUN=1) prints every gcloud / git command on stdout, one per
#     line, shell-quoted, and runs none of them. Lines starting with `#` are step headers, so the
#     whole output reads (and runs) as a shell script. Without --dry-run each command is echoed
#     to stderr as `+ command` and then executed.
#   * A missing or malformed setting stops the script before any command, with a message naming
#     the variable and the allowed values (exit status 2).
#
# Settings shared by the scripts (defaults in brackets):
#   PROJECT            Google Cloud project id [required]
#   ACCELERATOR_TYPE   TPU slice, <family>-<size>, family in v4, v5p, v5litepod, v6e [v5p-64]
#   ZONE               zone of the slice [v4: us-central2-b, v5p: us-east5-a, v6e: us-east5-b,
#                      v5litepod: us-west4-a]
#   RUNTIME_VERSION    TPU software version [v4: tpu-ubuntu2204-base, v5p: v2-alpha-tpuv5,
#                      v6e: v2-alpha-tpuv6e, v5litepod: v2-alpha-tpuv5-lite]
#   TPU_NAME           name of the TPU VM (node) [xar-<ACCELERATOR_TYPE>]
#   QUEUED_RESOURCE    1: request the slice as a queued resource; 0: plain `tpu-vm create` [1]
#   QR_ID              queued-resource id [<TPU_NAME>-qr]
#   NUM_SLICES         slices of ACCELERATOR_TYPE joined over the data-center network [1]; 2 or
#                      more need QUEUED_RESOURCE=1 and make one queued resource whose nodes are
#                      <TPU_NAME>-0, <TPU_NAME>-1, ...; the trainer gets --config.mesh.num_slices
#   INTERNAL_IP        1: ssh / scp reach the workers by their internal IP (for slices created
#                      with CREATE_FLAGS=--internal-ips, from a machine in the same network) [0]
#   SPOT / PREEMPTIBLE / RESERVED   capacity kind, 0 or 1, at most one set [all 0: on-demand]
#   BUCKET             GCS bucket (name only, no gs://) holding runs, data, weights [required]
#   CONFIG             config file, relative to the repository root or absolute
#                      [configs/xar_h.py]; `file.py:arg` passes arg to get_config
#   RUN_NAME           name of the run [config file name without .py]
#   WORKDIR            checkpoints, metrics, logs; must be gs:// [gs://BUCKET/runs/RUN_NAME]
#   DATA_SOURCE        latents | digits [latents] (the trainer reads ImageNet only as cached
#                      latents: launch/prepare_data.sh cache makes them)
#   DATA_DIR           TFDS data dir with imagenet2012 (prepare_data.sh) [gs://BUCKET/tfds]
#   LATENT_DIR         cached VAE latents [gs://BUCKET/latents]
#   CONFIG_OVERRIDES   extra `--config.x=y` flags, space-separated (no spaces inside a value) []
#   MAIN_FLAGS         other flags of xar_jax.main, e.g. --distributed=auto []; without a
#                      --distributed flag here the scripts pass --distributed=on (every job
#                      runs on Cloud TPU VMs, where JAX finds the hosts in the VM metadata)
#   WEIGHTS_GCS        converted weights, synced to ~/xar_weights on every worker by install.sh
#                      [gs://BUCKET/weights]
#   PYTHON_VERSION     Python of the worker virtualenv [3.12]
#   JAX_SPEC           pip requirement for JAX on TPU ["jax[tpu]"]
#   SYNC_REF           git commit/branch whose tree install.sh ships [HEAD]
#   ALLOW_DIRTY        1: ship uncommitted changes of tracked files too [0]

set -euo pipefail

XAR_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
XAR_REPO_ROOT="$(cd "${XAR_LAUNCH_DIR}/.." && pwd)"
readonly XAR_LAUNCH_DIR XAR_REPO_ROOT
# Paths on the workers, relative to the home directory (where `tpu-vm ssh --command` starts).
readonly REMOTE_REPO="xar-jax"
readonly REMOTE_WORKER="${REMOTE_REPO}/launch/remote/worker.sh"

DRY_RUN="${DRY_RUN:-0}"
ARGS=()  # command-line arguments left after the common options, for the calling script

# ---------------------------------------------------------------------------------------------
# Messages, quoting, running.

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

say() {  # progress for humans: stderr, in both modes, so stdout stays pure commands
  printf '%s\n' "$*" >&2
}

# Prints one argument so that a POSIX shell reads it back unchanged (plain if it is safe).
quote_arg() {
  local arg=$1 safe='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ -n ${arg} && ${arg} =~ ${safe} ]]; then
    printf '%s' "${arg}"
  elif [[ ${arg} =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value': quote the value only
    printf '%s' "${BASH_REMATCH[1]}"
    quote_arg "${BASH_REMATCH[2]}"
  elif [[ ${arg} == *\'* && ${arg} != *[\"\$\`\\!]* ]]; then  # holds ' but nothing " expands
    printf '"%s"' "${arg}"
  else
    printf "'%s'" "${arg//\'/\'\\\'\'}"
  fi
}

join_quoted() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote_arg "${arg}")"
  done
  printf '%s' "${out}"
}

# `run CMD ARGS...`: print (dry run) or echo and execute. Commands print to fd 3, the script's
# stdout, so that `run` inside $(...) still shows them.
run() {
  if [[ ${DRY_RUN} == 1 ]]; then
    printf '%s\n' "$(join_quoted "$@")" >&3
    return 0
  fi
  say "+ $(join_quoted "$@")"
  "$@"
}

# `capture FAKE CMD ARGS...`: prints CMD's stdout; in a dry run prints the command and FAKE.
capture() {
  local fake=$1
  shift
  if [[ ${DRY_RUN} == 1 ]]; then
    printf '%s\n' "$(join_quoted "$@")" >&3
    printf '%s\n' "${fake}"
    return 0
  fi
  say "+ $(join_quoted "$@")"
  "$@"
}

step() {  # a step header: `# text` among the dry-run commands, `== text` live
  if [[ ${DRY_RUN} == 1 ]]; then
    printf '# %s\n' "$*" >&3
  else
    say "== $*"
  fi
}

# ---------------------------------------------------------------------------------------------
# Arguments and settings.

usage() {  # the script's header comment, without the leading '# '
  sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$0"
}

# Parses the options every script accepts and leaves the rest in ARGS.
xar_init() {
  exec 3>&1
  while (($# > 0)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --env) (($# >= 2)) || die "--env needs a file argument"; load_env_file "$2"; shift ;;
      --env=*) load_env_file "${1#--env=}" ;;
      -h | --help) usage; exit 0 ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  check_bool DRY_RUN
}

load_env_file() {
  local file=$1
  [[ -f ${file} ]] || die "--env file '${file}' does not exist"
  # shellcheck source=/dev/null
  source "${file}"
}

# Fails unless the named variable is set and not empty; $2 says what it is.
require_var() {
  local name=$1 what=$2
  [[ -n ${!name:-} ]] || die "${name} is not set: ${what}. Export it or put ${name}=... in a file passed with --env."
}

check_bool() {
  local name=$1
  [[ ${!name} == 0 || ${!name} == 1 ]] || die "${name}='${!name}' is not allowed; use 0 or 1"
}

check_choice() {  # check_choice NAME ALLOWED...
  local name=$1 allowed
  shift
  for allowed in "$@"; do
    [[ ${!name} == "${allowed}" ]] && return 0
  done
  die "${name}='${!name}' is not allowed; use one of: $*"
}

check_gcs() {  # the value must be a gs:// URL: multi-host jobs and preempted VMs need shared storage
  local name=$1
  [[ ${!name} =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/.*)?$ ]] \
    || die "${name}='${!name}' must be a gs://bucket/path URL (every worker and every restart must see it)"
}

# Settings of the TPU slice: PROJECT, ACCELERATOR_TYPE, ZONE, RUNTIME_VERSION, names, capacity.
load_tpu_settings() {
  require_var PROJECT "the Google Cloud project id (gcloud --project)"
  ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-64}"
  [[ ${ACCELERATOR_TYPE} =~ ^(v4|v5p|v5litepod|v6e)-([0-9]+)$ ]] \
    || die "ACCELERATOR_TYPE='${ACCELERATOR_TYPE}' is not allowed; use <family>-<size> with family one of v4, v5p, v5litepod, v6e (e.g. v5p-64, v6e-32, v4-128)"
  TPU_FAMILY="${BASH_REMATCH[1]}"
  local zone runtime
  case "${TPU_FAMILY}" in
    v4) zone=us-central2-b; runtime=tpu-ubuntu2204-base ;;
    v5p) zone=us-east5-a; runtime=v2-alpha-tpuv5 ;;
    v5litepod) zone=us-west4-a; runtime=v2-alpha-tpuv5-lite ;;
    v6e) zone=us-east5-b; runtime=v2-alpha-tpuv6e ;;
  esac
  ZONE="${ZONE:-${zone}}"
  RUNTIME_VERSION="${RUNTIME_VERSION:-${runtime}}"
  TPU_NAME="${TPU_NAME:-xar-${ACCELERATOR_TYPE}}"
  [[ ${TPU_NAME} =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
    || die "TPU_NAME='${TPU_NAME}' is not a valid name; use lower-case letters, digits and '-', starting with a letter"
  QUEUED_RESOURCE="${QUEUED_RESOURCE:-1}"
  QR_ID="${QR_ID:-${TPU_NAME}-qr}"
  SPOT="${SPOT:-0}"
  PREEMPTIBLE="${PREEMPTIBLE:-0}"
  RESERVED="${RESERVED:-0}"
  check_bool QUEUED_RESOURCE
  check_bool SPOT
  check_bool PREEMPTIBLE
  check_bool RESERVED
  ((SPOT + PREEMPTIBLE + RESERVED <= 1)) \
    || die "set at most one of SPOT, PREEMPTIBLE, RESERVED to 1 (got SPOT=${SPOT} PREEMPTIBLE=${PREEMPTIBLE} RESERVED=${RESERVED})"
  if [[ ${QUEUED_RESOURCE} == 1 && ${PREEMPTIBLE} == 1 ]]; then
    die "PREEMPTIBLE=1 needs QUEUED_RESOURCE=0 (queued resources take SPOT=1 instead)"
  fi
  NUM_SLICES="${NUM_SLICES:-1}"
  [[ ${NUM_SLICES} =~ ^[1-9][0-9]{0,2}$ ]] \
    || die "NUM_SLICES='${NUM_SLICES}' is not allowed; use a whole number of slices, 1 or more (e.g. 2)"
  if ((NUM_SLICES > 1)) && [[ ${QUEUED_RESOURCE} != 1 ]]; then
    die "NUM_SLICES=${NUM_SLICES} needs QUEUED_RESOURCE=1 (Cloud TPU makes several slices only as one queued resource)"
  fi
  # The nodes: one named TPU_NAME, or with several slices <TPU_NAME>-0, <TPU_NAME>-1, ... (the
  # queued resource names the nodes of --node-prefix=P as P-0, P-1, ...).
  NODE_NAMES=("${TPU_NAME}")
  if ((NUM_SLICES > 1)); then
    local i
    NODE_NAMES=()
    for ((i = 0; i < NUM_SLICES; i++)); do
      NODE_NAMES+=("${TPU_NAME}-${i}")
    done
  fi
  INTERNAL_IP="${INTERNAL_IP:-0}"
  check_bool INTERNAL_IP
  # Flags common to every `gcloud compute tpus ...` call.
  GCLOUD_TPU_FLAGS=(--zone="${ZONE}" --project="${PROJECT}")
}

# Settings of the run: BUCKET, CONFIG, WORKDIR, data locations, overrides.
load_run_settings() {
  require_var BUCKET "the GCS bucket name (no gs://) that holds runs, data and weights"
  [[ ${BUCKET} =~ ^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$ ]] \
    || die "BUCKET='${BUCKET}' is not a bucket name; give the bare name, e.g. BUCKET=my-xar-bucket"
  CONFIG="${CONFIG:-configs/xar_h.py}"
  CONFIG_FILE="${CONFIG%%:*}"  # `file.py:arg` -> file.py
  local config_path="${CONFIG_FILE}"
  [[ ${config_path} == /* ]] || config_path="${XAR_REPO_ROOT}/${config_path}"
  if [[ ! -f ${config_path} ]]; then
    local known="" file
    for file in "${XAR_REPO_ROOT}"/configs/*.py; do
      [[ -f ${file} ]] && known+="${known:+ }configs/$(basename "${file}")"
    done
    die "CONFIG='${CONFIG}': no file ${config_path}; give a path relative to the repository root or an absolute path (repository configs: ${known:-none found})"
  fi
  CONFIG_LOCAL_PATH="${config_path}"
  local default_name
  default_name="$(basename "${CONFIG_FILE}" .py)"
  [[ ${CONFIG} == *:* ]] && default_name+="_${CONFIG#*:}"
  RUN_NAME="${RUN_NAME:-${default_name}}"
  [[ ${RUN_NAME} =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] \
    || die "RUN_NAME='${RUN_NAME}' may only hold letters, digits, '_', '.', '-'"
  WORKDIR="${WORKDIR:-gs://${BUCKET}/runs/${RUN_NAME}}"
  check_gcs WORKDIR
  DATA_SOURCE="${DATA_SOURCE:-latents}"
  [[ ${DATA_SOURCE} != imagenet ]] \
    || die "DATA_SOURCE=imagenet: the trainer reads ImageNet only as cached VAE latents; make them with launch/prepare_data.sh cache and use DATA_SOURCE=latents"
  check_choice DATA_SOURCE latents digits
  DATA_DIR="${DATA_DIR:-gs://${BUCKET}/tfds}"
  LATENT_DIR="${LATENT_DIR:-gs://${BUCKET}/latents}"
  check_gcs DATA_DIR
  check_gcs LATENT_DIR
  WEIGHTS_GCS="${WEIGHTS_GCS:-gs://${BUCKET}/weights}"
  check_gcs WEIGHTS_GCS
  CONFIG_OVERRIDES="${CONFIG_OVERRIDES:-}"
  local flag
  read -r -a OVERRIDE_FLAGS <<<"${CONFIG_OVERRIDES}"
  for flag in "${OVERRIDE_FLAGS[@]}"; do
    [[ ${flag} == --config.*=* ]] \
      || die "CONFIG_OVERRIDES holds '${flag}'; each entry must look like --config.field=value"
  done
  for flag in "${OVERRIDE_FLAGS[@]}" "${ARGS[@]}"; do
    [[ ${flag} != --config.mesh.num_slices=* ]] \
      || die "'${flag}': set NUM_SLICES instead (the scripts pass --config.mesh.num_slices=NUM_SLICES, so that the mesh matches the slices they create)"
  done
  MAIN_FLAGS="${MAIN_FLAGS:-}"
  read -r -a MAIN_FLAG_LIST <<<"${MAIN_FLAGS}"
  for flag in "${MAIN_FLAG_LIST[@]}"; do
    [[ ${flag} == --?* && ${flag} != --config* && ${flag} != --workdir* && ${flag} != --mode* ]] \
      || die "MAIN_FLAGS holds '${flag}'; give --flag=value entries other than --config, --workdir, --mode (the scripts set those; config fields go into CONFIG_OVERRIDES)"
  done
}

# The config path as the workers see it: repository configs keep their path; a file outside
# the repository is copied to configs/launched/ by copy_config.
remote_config_path() {
  local rel
  case "${CONFIG_LOCAL_PATH}" in
    "${XAR_REPO_ROOT}"/*) rel="${CONFIG_LOCAL_PATH#"${XAR_REPO_ROOT}"/}" ;;
    *) rel="configs/launched/$(basename "${CONFIG_LOCAL_PATH}")" ;;
  esac
  printf '%s' "${rel}"
}

remote_config_flag() {  # --config=<remote path>[:arg]
  local flag
  flag="--config=$(remote_config_path)"
  [[ ${CONFIG} == *:* ]] && flag+=":${CONFIG#*:}"
  printf '%s' "${flag}"
}

# `main_args MODE EXTRA...`: the arguments of `python -m xar_jax.main` for MODE, one per line.
main_args() {
  local mode=$1
  shift
  printf '%s\n' "$(remote_config_flag)" "--workdir=${WORKDIR}" "--mode=${mode}"
  # GCE TPU VMs export no variable that shows several hosts, so `--distributed=auto` cannot see
  # a multi-host slice; JAX's initialize() reads the workers from the VM metadata instead. On a
  # single-host VM it makes a one-process "cluster", which also lets Orbax see preemption notices.
  if [[ " ${MAIN_FLAG_LIST[*]} " != *" --distributed="* ]]; then
    printf '%s\n' "--distributed=on"
  fi
  if ((${#MAIN_FLAG_LIST[@]} > 0)); then
    printf '%s\n' "${MAIN_FLAG_LIST[@]}"
  fi
  printf '%s\n' "--config.mesh.num_slices=${NUM_SLICES}"  # the dcn mesh axis = slices created
  case "${DATA_SOURCE}" in
    latents)
      printf '%s\n' "--config.data.source=latents" "--config.data.cache_dir=${LATENT_DIR}" ;;
    digits) ;;  # the embedded dataset needs no location
  esac
  if ((${#OVERRIDE_FLAGS[@]} > 0)); then
    printf '%s\n' "${OVERRIDE_FLAGS[@]}"
  fi
  if (($# > 0)); then
    printf '%s\n' "$@"
  fi
}

# ---------------------------------------------------------------------------------------------
# Talking to the slice.

# `ssh_command WORKER COMMAND_STRING [NODE]`: sets SSH_CMD to the gcloud command that runs
# COMMAND_STRING on WORKER (an index or all) of the slice; with several slices, of node NODE (an
# index or all; default: all for WORKER=all, else 0).
ssh_command() {
  local worker=$1 command=$2 node=${3:-}
  if ((NUM_SLICES > 1)); then
    [[ -n ${node} ]] || { [[ ${worker} == all ]] && node=all || node=0; }
    SSH_CMD=(gcloud compute tpus queued-resources ssh "${QR_ID}" "${GCLOUD_TPU_FLAGS[@]}"
      --node="${node}" --worker="${worker}")
  else
    SSH_CMD=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_TPU_FLAGS[@]}"
      --worker="${worker}")
  fi
  [[ ${INTERNAL_IP} == 1 ]] && SSH_CMD+=(--internal-ip)
  SSH_CMD+=(--command="${command}")
}

tpu_ssh() {  # tpu_ssh WORKER COMMAND_STRING [NODE]
  ssh_command "$@"
  run "${SSH_CMD[@]}"
}

tpu_scp() {  # tpu_scp all SRC... REMOTE_DEST: to every worker (of every slice)
  local worker=$1
  shift
  local args=("$@") extra=()
  local dest="${args[-1]}"
  unset 'args[-1]'
  [[ ${INTERNAL_IP} == 1 ]] && extra=(--internal-ip)
  if ((NUM_SLICES > 1)); then
    run gcloud compute tpus queued-resources scp "${args[@]}" "${QR_ID}:${dest}" \
      "${GCLOUD_TPU_FLAGS[@]}" --node=all --worker="${worker}" "${extra[@]}"
  else
    run gcloud compute tpus tpu-vm scp "${args[@]}" "${TPU_NAME}:${dest}" "${GCLOUD_TPU_FLAGS[@]}" \
      --worker="${worker}" "${extra[@]}"
  fi
}

worker_cmd() {  # worker_cmd SUBCOMMAND ARGS...: a command line for launch/remote/worker.sh
  printf 'bash %s %s' "${REMOTE_WORKER}" "$(join_quoted "$@")"
}

# Prints a resource's state, or ABSENT when gcloud says it does not exist.
# `describe_state FAKE gcloud ... describe NAME ... --format=value(...)`
describe_state() {
  local fake=$1
  shift
  if [[ ${DRY_RUN} == 1 ]]; then
    capture "${fake}" "$@"
    return 0
  fi
  local err out
  err="$(mktemp)"
  say "+ $(join_quoted "$@")"
  if out="$("$@" 2>"${err}")"; then
    rm -f "${err}"
    printf '%s\n' "${out:-UNKNOWN}"
  elif grep -q -i -E 'NOT_FOUND|not found' "${err}"; then
    rm -f "${err}"
    printf 'ABSENT\n'
  else
    cat "${err}" >&2
    rm -f "${err}"
    die "could not read the state with: $(join_quoted "$@")"
  fi
}

# The state of the slice's node, or with several slices the first state of a node that is not
# READY (READY when all are); NODE_STATE_NAME is set to the node it describes.
node_state() {
  local name state
  for name in "${NODE_NAMES[@]}"; do
    state="$(describe_state "${DRY_RUN_TPU_STATE:-READY}" gcloud compute tpus tpu-vm describe \
      "${name}" "${GCLOUD_TPU_FLAGS[@]}" --format='value(state)')"
    if [[ ${state} != READY ]]; then
      printf '%s %s\n' "${state}" "${name}"
      return 0
    fi
  done
  printf 'READY %s\n' "${NODE_NAMES[0]}"
}

qr_state() {
  describe_state "${DRY_RUN_QR_STATE:-ACTIVE}" \
    gcloud compute tpus queued-resources describe "${QR_ID}" "${GCLOUD_TPU_FLAGS[@]}" \
    --format='value(state.state)'
}

capacity_flags() {  # the spot / preemptible / reserved flag, if any
  [[ ${SPOT} == 1 ]] && printf '%s\n' --spot
  [[ ${PREEMPTIBLE} == 1 ]] && printf '%s\n' --preemptible
  [[ ${RESERVED} == 1 ]] && printf '%s\n' --reserved
  return 0
}

create_slice() {
  local capacity extra=()
  mapfile -t capacity < <(capacity_flags)
  if [[ -n ${CREATE_FLAGS:-} ]]; then
    read -r -a extra <<<"${CREATE_FLAGS}"
  fi
  if ((NUM_SLICES > 1)); then
    step "request ${NUM_SLICES} slices of ${ACCELERATOR_TYPE} as queued resource ${QR_ID} (nodes ${NODE_NAMES[*]})"
    run gcloud compute tpus queued-resources create "${QR_ID}" "${GCLOUD_TPU_FLAGS[@]}" \
      --node-count="${NUM_SLICES}" --node-prefix="${TPU_NAME}" \
      --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" \
      "${capacity[@]}" "${extra[@]}"
  elif [[ ${QUEUED_RESOURCE} == 1 ]]; then
    step "request ${ACCELERATOR_TYPE} as queued resource ${QR_ID} (node ${TPU_NAME})"
    run gcloud compute tpus queued-resources create "${QR_ID}" "${GCLOUD_TPU_FLAGS[@]}" \
      --node-id="${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
      --runtime-version="${RUNTIME_VERSION}" "${capacity[@]}" "${extra[@]}"
  else
    step "create TPU VM ${TPU_NAME} (${ACCELERATOR_TYPE})"
    run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_TPU_FLAGS[@]}" \
      --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" \
      "${capacity[@]}" "${extra[@]}"
  fi
}

delete_slice() {  # delete_slice QUIET(0|1)
  local quiet=()
  [[ $1 == 1 ]] && quiet=(--quiet)
  if [[ ${QUEUED_RESOURCE} == 1 ]]; then
    step "delete queued resource ${QR_ID} and its node(s) ${NODE_NAMES[*]}"
    run gcloud compute tpus queued-resources delete "${QR_ID}" "${GCLOUD_TPU_FLAGS[@]}" --force \
      "${quiet[@]}"
  else
    step "delete TPU VM ${TPU_NAME}"
    run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${GCLOUD_TPU_FLAGS[@]}" "${quiet[@]}"
  fi
}

# Polls until the slice is usable: the queued resource ACTIVE (if used) and the node READY.
wait_until_ready() {
  local poll="${POLL_SECONDS:-60}" state
  [[ ${poll} =~ ^[0-9]+$ ]] || die "POLL_SECONDS='${poll}' must be a number of seconds"
  step "wait until ${NODE_NAMES[*]} READY (polling every ${poll}s)"
  if [[ ${DRY_RUN} == 1 ]]; then  # show the polling commands once; assume the slice came up
    [[ ${QUEUED_RESOURCE} == 1 ]] && DRY_RUN_QR_STATE=ACTIVE qr_state >/dev/null
    DRY_RUN_TPU_STATE=READY node_state >/dev/null
    return 0
  fi
  if [[ ${QUEUED_RESOURCE} == 1 ]]; then
    while :; do
      state="$(qr_state)"
      case "${state}" in
        ACTIVE) break ;;
        FAILED | SUSPENDED | ABSENT) die "queued resource ${QR_ID} is ${state}; see: gcloud compute tpus queued-resources describe ${QR_ID} --zone=${ZONE} --project=${PROJECT}" ;;
        *) say "queued resource ${QR_ID}: ${state}"; sleep "${poll}" ;;
      esac
    done
  fi
  local name out
  while :; do
    out="$(node_state)"
    read -r state name <<<"${out}"
    case "${state}" in
      READY) return 0 ;;
      PREEMPTED | TERMINATED | ABSENT) die "TPU ${name} is ${state} while waiting for it" ;;
      *) say "TPU ${name}: ${state}"; sleep "${poll}" ;;
    esac
  done
}

# ---------------------------------------------------------------------------------------------
# Code, config, jobs.

# Packs the code (git tree of SYNC_REF) and installs it with its dependencies on every worker.
install_code() {
  local tarball commit ref
  SYNC_REF="${SYNC_REF:-HEAD}"
  ALLOW_DIRTY="${ALLOW_DIRTY:-0}"
  check_bool ALLOW_DIRTY
  PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
  [[ ${PYTHON_VERSION} =~ ^3\.[0-9]+$ ]] || die "PYTHON_VERSION='${PYTHON_VERSION}' must look like 3.12"
  JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
  if [[ -n ${CODE_TARBALL:-} ]]; then
    [[ -f ${CODE_TARBALL} ]] || die "CODE_TARBALL='${CODE_TARBALL}' does not exist"
    tarball="${CODE_TARBALL}"
    commit="tarball:$(basename "${tarball}")"
  else
    git -C "${XAR_REPO_ROOT}" rev-parse --git-dir >/dev/null 2>&1 \
      || die "${XAR_REPO_ROOT} is not a git checkout; build a tarball of the repository yourself and set CODE_TARBALL=path/to/xar-jax.tar.gz"
    ref="$(git -C "${XAR_REPO_ROOT}" rev-parse --verify --quiet "${SYNC_REF}^{commit}")" \
      || die "SYNC_REF='${SYNC_REF}' is not a commit of ${XAR_REPO_ROOT}"
    if [[ ${SYNC_REF} == HEAD && -n "$(git -C "${XAR_REPO_ROOT}" status --porcelain --untracked-files=no)" ]]; then
      [[ ${ALLOW_DIRTY} == 1 ]] \
        || die "the checkout has uncommitted changes that would not be shipped; commit them, or set ALLOW_DIRTY=1 to ship the working tree of tracked files"
      ref="$(git -C "${XAR_REPO_ROOT}" stash create)"
    fi
    commit="$(git -C "${XAR_REPO_ROOT}" rev-parse --short=12 "${ref}")"
    tarball="${TMPDIR:-/tmp}/xar-jax-${commit}.tar.gz"
    step "pack the code at ${commit}"
    run git -C "${XAR_REPO_ROOT}" archive --format=tar.gz -o "${tarball}" "${ref}"
  fi
  step "copy the code to every worker"
  tpu_scp all "${tarball}" "xar-jax.tar.gz"
  step "unpack and install on every worker (virtualenv ~/xar_venv, Python ${PYTHON_VERSION}, ${JAX_SPEC})"
  local installer=(--commit="${commit}" --python="${PYTHON_VERSION}" --jax="${JAX_SPEC}"
    --weights="${WEIGHTS_GCS}")
  tpu_ssh all "rm -rf ${REMOTE_REPO}.new && mkdir ${REMOTE_REPO}.new && tar -xzf xar-jax.tar.gz -C ${REMOTE_REPO}.new && bash ${REMOTE_REPO}.new/launch/remote/install_worker.sh $(join_quoted "${installer[@]}")"
}

# Copies the local config file to every worker (and a dated copy into WORKDIR/launch/).
copy_config() {
  local dest stamp
  dest="${REMOTE_REPO}/$(remote_config_path)"
  stamp="$(date -u +%Y%m%dT%H%M%SZ)"
  step "copy ${CONFIG_FILE} to every worker and keep a copy in the workdir"
  tpu_ssh all "mkdir -p $(quote_arg "$(dirname "${dest}")")"
  tpu_scp all "${CONFIG_LOCAL_PATH}" "${dest}"
  run gcloud storage cp "${CONFIG_LOCAL_PATH}" "${WORKDIR}/launch/${stamp}-$(basename "${CONFIG_LOCAL_PATH}")"
}

# `start_job MODE EXTRA_FLAGS...`: python -m xar_jax.main on all workers at once, detached in
# tmux session xar-MODE, logging to ~/xar_logs/MODE_<hostname>.log (synced to WORKDIR/logs/).
start_job() {
  local mode=$1 args
  shift
  mapfile -t args < <(main_args "${mode}" "$@")
  copy_config
  step "start python -m xar_jax.main --mode=${mode} on every worker (tmux session xar-${mode})"
  tpu_ssh all "$(worker_cmd start "${mode}" "${WORKDIR}/logs" "${args[@]}")"
  say "started; follow with: launch/logs.sh   (MODE=${mode})"
}

stop_job() {  # stop_job MODE
  local timeout="${STOP_TIMEOUT:-120}"
  [[ ${timeout} =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT='${timeout}' must be a number of seconds"
  step "stop xar-$1 on every worker (SIGTERM, SIGKILL after ${timeout}s)"
  tpu_ssh all "$(worker_cmd stop "$1" "${timeout}")"
}
