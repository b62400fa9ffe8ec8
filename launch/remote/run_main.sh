#!/usr/bin/env bash
# Runs ON A TPU WORKER inside tmux session xar-MODE (started by `worker.sh start`):
#
#   run_main.sh MODE LOG_GCS ARGS...
#
# Activates ~/xar_venv and runs, from the installed repository, `python -m xar_jax.main ARGS...`
# for MODE train, sample or eval, or `python -m xar_jax.data.latent_cache ARGS...` for MODE cache.
# Output goes to the tmux pane and to ~/xar_logs/MODE_<hostname>.log; the python pid is kept in
# ~/xar_logs/MODE.pid while it runs (for `worker.sh stop`) and its exit status in
# ~/xar_logs/MODE.exit afterwards. If LOG_GCS is not empty the log is copied there every
# XAR_LOG_SYNC_SECONDS (300) and at the end, so it survives a preempted VM.
set -uo pipefail  # no -e: the exit status of python is recorded, not fatal here

(($# >= 2)) || { echo "usage: run_main.sh MODE LOG_GCS ARGS..." >&2; exit 2; }
mode=$1
log_gcs=$2
shift 2
case "${mode}" in
  train | sample | eval) module=xar_jax.main ;;
  cache) module=xar_jax.data.latent_cache ;;
  *) echo "error: MODE '${mode}' is not one of train, sample, eval, cache" >&2; exit 2 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
logs="${HOME}/xar_logs"
host="$(hostname)"
log="${logs}/${mode}_${host}.log"
pid_file="${logs}/${mode}.pid"
exit_file="${logs}/${mode}.exit"
sync_seconds="${XAR_LOG_SYNC_SECONDS:-300}"
mkdir -p "${logs}"
rm -f "${exit_file}"

upload_log() {
  [[ -n ${log_gcs} ]] || return 0
  gcloud storage cp "${log}" "${log_gcs}/" >/dev/null 2>&1 || true
}

# shellcheck source=/dev/null
source "${HOME}/xar_venv/bin/activate" || { echo "no ~/xar_venv; run launch/install.sh" | tee -a "${log}"; echo 2 >"${exit_file}"; exit 2; }
cd "${repo}" || exit 2
{
  echo "=== $(date -u +%FT%TZ) ${host} code $(cat .xar_commit 2>/dev/null || echo unknown)"
  echo "=== python -m ${module} $*"
} >>"${log}"

# The subshell records its pid and becomes python (exec), so the pid file names python itself;
# waiting for the whole pipeline (tee included) gets every line into the log before the end
# line, and with pipefail its status is python's.
(
  echo "${BASHPID}" >"${pid_file}"
  exec python -m "${module}" "$@"
) 2>&1 | tee -a "${log}" &
job=$!

syncer=""
if [[ -n ${log_gcs} ]]; then
  (
    nap=""
    trap '[[ -n ${nap} ]] && kill "${nap}" 2>/dev/null; exit 0' TERM
    while kill -0 "${job}" 2>/dev/null; do
      sleep "${sync_seconds}" &
      nap=$!
      wait "${nap}"
      upload_log
    done
  ) &
  syncer=$!
fi

wait "${job}"
rc=$?
echo "=== $(date -u +%FT%TZ) exit status ${rc}" >>"${log}"
echo "${rc}" >"${exit_file}"
rm -f "${pid_file}"
[[ -n ${syncer} ]] && kill "${syncer}" 2>/dev/null
upload_log
exit "${rc}"
