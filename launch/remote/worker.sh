#!/usr/bin/env bash
# Runs ON A TPU WORKER (launch/*.sh call it through `gcloud compute tpus tpu-vm ssh --worker=all`,
# or `gcloud compute tpus queued-resources ssh --node=all --worker=all` with several slices).
# Manages one detached job per mode in tmux session xar-MODE; logs live in ~/xar_logs/.
#
#   worker.sh start MODE LOG_GCS ARGS...   start `python -m xar_jax.main ARGS...` in xar-MODE
#                                         (MODE cache: `python -m xar_jax.data.latent_cache`;
#                                         refused while any xar-* session runs on this worker);
#                                         LOG_GCS ('' for none) receives the log every few minutes
#   worker.sh stop MODE TIMEOUT            SIGTERM the job, SIGKILL after TIMEOUT s, end the session
#   worker.sh status MODE                  prints '<hostname> running|finished|failed:RC|absent'
#   worker.sh log MODE LINES FOLLOW(0|1)   the last LINES lines of this worker's log
#   worker.sh upload-log MODE GCS_DIR      copy this worker's log to GCS_DIR/
#   worker.sh convert KIND SRC_GCS OUT_GCS `python -m xar_jax.convert KIND` of SRC_GCS into
#                                         OUT_GCS/<file name without extension>/
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly HERE
readonly LOG_DIR="${HOME}/xar_logs"
HOST="$(hostname)"
readonly HOST

fail() {
  printf '[%s] error: %s\n' "${HOST}" "$*" >&2
  exit 1
}

check_mode() {  # the jobs run_main.sh knows
  [[ $1 =~ ^(train|sample|eval|cache)$ ]] || fail "mode '$1' is not one of train, sample, eval, cache"
}

log_file() { printf '%s/%s_%s.log' "${LOG_DIR}" "$1" "${HOST}"; }

running_sessions() {  # names of xar-* tmux sessions on this worker, one per line
  tmux list-sessions -F '#{session_name}' 2>/dev/null | grep '^xar-' || true
}

cmd_start() {
  (($# >= 2)) || fail "usage: worker.sh start MODE LOG_GCS ARGS..."
  local mode=$1 log_gcs=$2
  shift 2
  check_mode "${mode}"
  command -v tmux >/dev/null || fail "tmux is not installed; run launch/install.sh first"
  local busy
  busy="$(running_sessions)"
  # A TPU belongs to one process at a time: a second job would fail to open the chips.
  [[ -z ${busy} ]] || fail "tmux session(s) $(echo "${busy}" | tr '\n' ' ')already running; stop them first (launch/stop.sh)"
  mkdir -p "${LOG_DIR}"
  local cmd
  cmd="$(printf '%q ' bash "${HERE}/run_main.sh" "${mode}" "${log_gcs}" "$@")"
  tmux new-session -d -s "xar-${mode}" "${cmd}"
  printf '[%s] started xar-%s, log %s\n' "${HOST}" "${mode}" "$(log_file "${mode}")"
}

# Only signal a pid that is still our job (pids are reused after a reboot).
job_pid() {
  local pidfile="${LOG_DIR}/$1.pid" pid
  [[ -f ${pidfile} ]] || return 1
  pid="$(cat "${pidfile}")"
  [[ ${pid} =~ ^[0-9]+$ ]] || return 1
  kill -0 "${pid}" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -q -E -- '-m xar_jax\.(main|data\.latent_cache)' || return 1
  printf '%s' "${pid}"
}

cmd_stop() {
  (($# == 2)) || fail "usage: worker.sh stop MODE TIMEOUT"
  local mode=$1 timeout=$2 pid waited=0
  check_mode "${mode}"
  [[ ${timeout} =~ ^[0-9]+$ ]] || fail "TIMEOUT '${timeout}' must be a number of seconds"
  if pid="$(job_pid "${mode}")"; then
    kill -TERM "${pid}"
    while kill -0 "${pid}" 2>/dev/null && ((waited < timeout)); do
      sleep 1
      waited=$((waited + 1))
    done
    if kill -0 "${pid}" 2>/dev/null; then
      kill -KILL "${pid}" 2>/dev/null || true
      printf '[%s] xar-%s did not exit within %ss: killed\n' "${HOST}" "${mode}" "${timeout}"
    else
      printf '[%s] xar-%s stopped after %ss\n' "${HOST}" "${mode}" "${waited}"
    fi
  else
    printf '[%s] no running xar-%s job\n' "${HOST}" "${mode}"
  fi
  # Let run_main.sh record the exit status and close the session itself (up to 10 s).
  local tries=0
  while tmux has-session -t "xar-${mode}" 2>/dev/null && ((tries < 50)); do
    sleep 0.2
    tries=$((tries + 1))
  done
  tmux kill-session -t "xar-${mode}" 2>/dev/null || true
}

cmd_status() {
  (($# == 1)) || fail "usage: worker.sh status MODE"
  local mode=$1 state exit_file="${LOG_DIR}/$1.exit"
  check_mode "${mode}"
  if tmux has-session -t "xar-${mode}" 2>/dev/null; then
    state=running
  elif [[ -f ${exit_file} ]]; then
    state="$(cat "${exit_file}")"
    [[ ${state} == 0 ]] && state=finished || state="failed:${state}"
  else
    state=absent
  fi
  printf '%s %s\n' "${HOST}" "${state}"
}

cmd_log() {
  (($# == 3)) || fail "usage: worker.sh log MODE LINES FOLLOW"
  local mode=$1 lines=$2 follow=$3 file
  check_mode "${mode}"
  [[ ${lines} =~ ^[0-9]+$ ]] || fail "LINES '${lines}' must be a number"
  file="$(log_file "${mode}")"
  [[ -f ${file} ]] || fail "no log ${file} yet"
  if [[ ${follow} == 1 ]]; then
    tail -n "${lines}" -F "${file}"
  else
    tail -n "${lines}" "${file}"
  fi
}

cmd_upload_log() {
  (($# == 2)) || fail "usage: worker.sh upload-log MODE GCS_DIR"
  local file
  check_mode "$1"
  file="$(log_file "$1")"
  [[ -f ${file} ]] || fail "no log ${file}"
  gcloud storage cp "${file}" "$2/"
  printf '[%s] %s -> %s/\n' "${HOST}" "${file}" "$2"
}

cmd_convert() {
  (($# == 3)) || fail "usage: worker.sh convert xar|vae|inception SRC_GCS OUT_GCS"
  local kind=$1 src=$2 out=$3 name tmp
  [[ ${kind} =~ ^(xar|vae|inception)$ ]] || fail "kind '${kind}' must be xar, vae or inception"
  name="$(basename "${src}")"
  name="${name%.*}"
  # shellcheck source=/dev/null
  source "${HOME}/xar_venv/bin/activate" || fail "no ~/xar_venv; run launch/install.sh first"
  if ! python -c 'import torch' 2>/dev/null; then  # only the converters read .pth files
    "${HOME}/.local/bin/uv" pip install --quiet --python "$(command -v python)" torch \
      --index-url https://download.pytorch.org/whl/cpu
  fi
  tmp="$(mktemp -d)"
  gcloud storage cp "${src}" "${tmp}/"
  python -m xar_jax.convert "${kind}" --src "${tmp}/$(basename "${src}")" --out "${tmp}/${name}"
  # metadata.json goes last: a directory without it is not loadable, so an interrupted upload
  # can never pass for a complete one.
  gcloud storage rsync -r --exclude='metadata\.json$' "${tmp}/${name}" "${out}/${name}"
  gcloud storage cp "${tmp}/${name}/metadata.json" "${out}/${name}/metadata.json"
  rm -rf "${tmp}"
  printf '[%s] %s -> %s/%s\n' "${HOST}" "${src}" "${out}" "${name}"
}

main() {
  (($# >= 1)) || fail "usage: worker.sh start|stop|status|log|upload-log|convert ..."
  local sub=$1
  shift
  case "${sub}" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    log) cmd_log "$@" ;;
    upload-log) cmd_upload_log "$@" ;;
    convert) cmd_convert "$@" ;;
    *) fail "unknown subcommand '${sub}'; use start, stop, status, log, upload-log or convert" ;;
  esac
}

main "$@"
