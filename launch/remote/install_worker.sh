#!/usr/bin/env bash
# Runs ON A TPU WORKER from the freshly unpacked tree ~/xar-jax.new (launch/install.sh does
# the unpacking on all workers at once):
#
#   install_worker.sh --commit=ID --python=3.12 --jax='jax[tpu]' [--weights=gs://.../weights]
#
# 1. refuses while an xar-* job runs (stop it first: launch/stop.sh);
# 2. makes sure tmux is there (the detached sessions);
# 3. swaps ~/xar-jax.new into ~/xar-jax (the old tree is removed only after the move);
# 4. creates ~/xar_venv with `uv` for the requested Python (the TPU images ship Ubuntu 22.04's
#    Python 3.10, older than the project needs; uv fetches a standalone CPython) and installs
#    the project editable with its [gcs] extra (gs:// workdirs and caches) together with JAX for
#    TPU in one resolver run, so the versions agree with setup.cfg;
# 5. syncs converted weights from --weights to ~/xar_weights (skipped if nothing is there yet).
set -euo pipefail

staging="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
target="${HOME}/xar-jax"
venv="${HOME}/xar_venv"
host="$(hostname)"
commit="" python_version="" jax_spec="" weights=""

say() { printf '[%s] %s\n' "${host}" "$*"; }
fail() {
  printf '[%s] error: %s\n' "${host}" "$*" >&2
  exit 1
}

for arg in "$@"; do
  case "${arg}" in
    --commit=*) commit="${arg#*=}" ;;
    --python=*) python_version="${arg#*=}" ;;
    --jax=*) jax_spec="${arg#*=}" ;;
    --weights=*) weights="${arg#*=}" ;;
    *) fail "unknown argument '${arg}'" ;;
  esac
done
[[ -n ${commit} && -n ${python_version} && -n ${jax_spec} ]] \
  || fail "usage: install_worker.sh --commit=ID --python=3.12 --jax='jax[tpu]' [--weights=gs://...]"
[[ ${staging} == "${target}.new" ]] || fail "run me from ${target}.new, not ${staging}"

if command -v tmux >/dev/null; then
  busy="$(tmux list-sessions -F '#{session_name}' 2>/dev/null | grep '^xar-' || true)"
  [[ -z ${busy} ]] || fail "job(s) $(echo "${busy}" | tr '\n' ' ')running; stop them first (launch/stop.sh)"
else
  say "installing tmux"
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux
fi

rm -rf "${target}.old"
if [[ -d ${target} ]]; then
  mv "${target}" "${target}.old"
fi
mv "${staging}" "${target}"
rm -rf "${target}.old"
echo "${commit}" >"${target}/.xar_commit"

export PATH="${HOME}/.local/bin:${PATH}"
if ! command -v uv >/dev/null; then
  say "installing uv"
  python3 -m pip install --user --quiet uv \
    || python3 -m pip install --user --quiet --break-system-packages uv
fi
current=""
if [[ -x ${venv}/bin/python ]]; then
  current="$("${venv}/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
fi
if [[ ${current} != "${python_version}" ]]; then
  say "creating ${venv} with Python ${python_version}"
  rm -rf "${venv}"
  uv venv --quiet --python "${python_version}" "${venv}"
fi
say "installing xar-jax (${commit}) and ${jax_spec}"
uv pip install --quiet --python "${venv}/bin/python" -e "${target}[gcs]" "${jax_spec}"
# Import only: initialising the TPU backend here would wait for the other hosts of the slice.
"${venv}/bin/python" -c 'import jax, jaxlib, xar_jax; print("jax", jax.__version__, "jaxlib", jaxlib.__version__)'

if [[ -n ${weights} ]]; then
  mkdir -p "${HOME}/xar_weights"
  if gcloud storage ls "${weights}" >/dev/null 2>&1; then
    gcloud storage rsync -r "${weights}" "${HOME}/xar_weights"
    say "weights synced from ${weights} to ~/xar_weights"
  else
    say "no weights at ${weights} yet; skipped (launch/convert_weights.sh puts them there)"
  fi
fi
say "installed ${commit}"
