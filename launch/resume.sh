#!/usr/bin/env bash
# Brings a training run back after a preemption (or any stop): looks at the slice and the job,
# and does only what is missing. Resumption itself is the trainer's: it restores the latest
# checkpoint in WORKDIR, so the job is restarted with the same WORKDIR and config.
#
#   launch/resume.sh [--dry-run] [--env FILE] [--watch] [--config.field=value ...]
#
#   slice absent                               -> create, wait, install, start
#   PREEMPTED / TERMINATED node (of any slice), or queued
#   resource SUSPENDED / FAILED                -> delete, create, wait, install, start
#   queued resource still provisioning         -> wait, install, start
#   node READY, job running on every worker    -> nothing
#   node READY, job finished (exit 0)          -> nothing (with --watch: stop watching)
#   node READY, job missing on some worker     -> stop it everywhere, start again
#
# --watch repeats the check every WATCH_SECONDS (600) until the job finishes; after
# MAX_RESTARTS (5) restarts of a job that keeps failing on a healthy slice it gives up.
# Settings as for create.sh, install.sh and start.sh (launch/common.sh). In a dry run the
# states are taken from DRY_RUN_QR_STATE (ACTIVE), DRY_RUN_TPU_STATE (READY) and
# DRY_RUN_JOB (absent; or running, finished, failed:1; a comma list gives one state per
# worker) and the loop runs once.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
xar_init "$@"
WATCH=0
OVERRIDES=()
for arg in "${ARGS[@]}"; do
  case "${arg}" in
    --watch) WATCH=1 ;;
    --config.*=*) OVERRIDES+=("${arg}") ;;
    *) die "unexpected argument '${arg}' (see --help)" ;;
  esac
done
load_tpu_settings
load_run_settings
readonly MODE=train
WATCH_SECONDS="${WATCH_SECONDS:-600}"
MAX_RESTARTS="${MAX_RESTARTS:-5}"
[[ ${WATCH_SECONDS} =~ ^[0-9]+$ ]] || die "WATCH_SECONDS='${WATCH_SECONDS}' must be a number of seconds"
[[ ${MAX_RESTARTS} =~ ^[0-9]+$ ]] || die "MAX_RESTARTS='${MAX_RESTARTS}' must be a number"

# One word for the whole slice from the per-worker lines '<host> <state>' of `worker.sh status`:
# running (everywhere), finished (everywhere), or the first other state seen.
job_state() {
  local lines line state first="" n=0 running=0 finished=0 fake="" i=0
  for state in ${DRY_RUN_JOB//,/ }; do  # dry run: one fake status line per listed state
    fake+="worker-${i} ${state}"$'\n'
    i=$((i + 1))
  done
  ssh_command all "$(worker_cmd status "${MODE}")"
  lines="$(capture "${fake:-worker-0 absent}" "${SSH_CMD[@]}")" || true
  while read -r line; do
    # Only the status lines count; anything else ssh prints is ignored.
    [[ ${line} =~ ^[^[:space:]]+\ (running|finished|failed:[0-9]+|absent)$ ]] || continue
    state="${BASH_REMATCH[1]}"
    n=$((n + 1))
    case "${state}" in
      running) running=$((running + 1)) ;;
      finished) finished=$((finished + 1)) ;;
      *) first="${first:-${state}}" ;;
    esac
  done <<<"${lines}"
  if ((n == 0)); then
    echo unreachable
  elif ((running == n)); then
    echo running
  elif ((finished == n)); then
    echo finished
  else
    echo "${first:-partial}"
  fi
}

fresh_slice() {  # create (after deleting what is left), wait, install, start
  [[ $1 == delete ]] && delete_slice 1
  create_slice
  wait_until_ready
  install_code
  start_job "${MODE}" "${OVERRIDES[@]}"
}

restart_job() {
  stop_job "${MODE}"
  start_job "${MODE}" "${OVERRIDES[@]}"
}

# Decides from the current states and acts; sets OUTCOME to ok, finished, restarted or recreated.
resume_once() {
  local qr="" node name out job
  if [[ ${QUEUED_RESOURCE} == 1 ]]; then
    qr="$(qr_state)"
    case "${qr}" in
      ABSENT) say "queued resource ${QR_ID} is absent"; fresh_slice create; OUTCOME=recreated; return ;;
      SUSPENDING | SUSPENDED | FAILED)
        say "queued resource ${QR_ID} is ${qr}"; fresh_slice delete; OUTCOME=recreated; return ;;
      WAITING_FOR_RESOURCES | ACCEPTED | PROVISIONING | CREATING)
        say "queued resource ${QR_ID} is ${qr}"
        wait_until_ready; install_code; start_job "${MODE}" "${OVERRIDES[@]}"
        OUTCOME=recreated; return ;;
      ACTIVE) ;;
      *) die "queued resource ${QR_ID} is in state ${qr}, which this script does not handle; look at it with: gcloud compute tpus queued-resources describe ${QR_ID} --zone=${ZONE} --project=${PROJECT}" ;;
    esac
  fi
  out="$(node_state)"
  read -r node name <<<"${out}"
  case "${node}" in
    READY) ;;
    ABSENT)  # with a queued resource, the ACTIVE resource lost its node: replace both
      say "TPU ${name} is absent"
      if [[ ${QUEUED_RESOURCE} == 1 ]]; then
        fresh_slice delete
      else
        fresh_slice create
      fi
      OUTCOME=recreated; return ;;
    PREEMPTED | TERMINATED)
      say "TPU ${name} is ${node}"; fresh_slice delete; OUTCOME=recreated; return ;;
    CREATING | STARTING | RESTARTING | REPAIRING)
      say "TPU ${name} is ${node}"; wait_until_ready ;;
    *) die "TPU ${name} is in state ${node}, which this script does not handle; look at it with: gcloud compute tpus tpu-vm describe ${name} --zone=${ZONE} --project=${PROJECT}" ;;
  esac
  job="$(job_state)"
  if [[ ${job} != running && ${job} != finished && ${DRY_RUN} == 0 ]]; then
    sleep 30  # a single unreachable worker must not cost a healthy job a restart: ask twice
    job="$(job_state)"
  fi
  case "${job}" in
    running) say "the ${MODE} job runs on every worker"; OUTCOME=ok ;;
    finished) say "the ${MODE} job finished (exit status 0 on every worker)"; OUTCOME=finished ;;
    *) say "the ${MODE} job's state is ${job}; restarting it from the latest checkpoint in ${WORKDIR}"
      restart_job; OUTCOME=restarted ;;
  esac
}

restarts=0
while :; do
  OUTCOME=""
  resume_once
  case "${OUTCOME}" in
    restarted) restarts=$((restarts + 1)) ;;
    ok | recreated) restarts=0 ;;
  esac
  if [[ ${WATCH} == 0 || ${DRY_RUN} == 1 || ${OUTCOME} == finished ]]; then
    break
  fi
  if ((restarts > MAX_RESTARTS)); then
    die "the job failed ${restarts} times in a row on a healthy slice; not restarting again (look at: launch/logs.sh)"
  fi
  say "next check in ${WATCH_SECONDS}s"
  sleep "${WATCH_SECONDS}"
done
