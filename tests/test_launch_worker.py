"""The worker side of the launch scripts (launch/remote/) and the runbook's tables.

The worker scripts run for real on this machine (tmux sessions, signals, a fake virtualenv whose
`python` is a shell script); the runbook's tables must be the projection script's output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_sandbox import LAUNCH, REPO, make_sandbox


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    return make_sandbox(tmp_path_factory.mktemp("launch_worker"))


# ---- the worker side ------------------------------------------------------------------------
FAKE_PYTHON = """#!/usr/bin/env bash
echo "fake python: $*"
for a in "$@"; do [[ $a == --exit-now ]] && exit 0; done
if [[ " $* " == *" --ignore-term "* ]]; then
  trap '' TERM
else
  trap 'echo "got TERM"; exit 143' TERM
fi
while :; do sleep 0.1; done
"""


# Under CI (where .ci/run installs tmux) a missing tmux fails the tests instead of skipping them.
needs_tmux = pytest.mark.skipif(
    shutil.which("tmux") is None and not os.environ.get("CI"),
    reason="tmux is not installed here (.ci/run installs it; the TPU workers get it too)",
)


@pytest.fixture
def worker_home(tmp_path, sandbox):
    assert shutil.which("tmux"), "tmux is not installed; .ci/run installs it"
    home = tmp_path / "home"
    venv_bin = home / "xar_venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text('PATH="$HOME/xar_venv/bin:$PATH"\n')
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "TMUX_TMPDIR": str(tmp_path)}
    script = str(sandbox / "launch/remote/worker.sh")

    def worker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        run = dict(env=env, capture_output=True, text=True, timeout=30)
        proc = subprocess.run(["bash", script, *args], **run)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    yield home, worker
    subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@needs_tmux
def test_worker_runs_one_detached_job_logs_it_and_stops_it_by_pid(worker_home):
    home, worker = worker_home
    worker("start", "train", "", "--config=configs/xar_h.py", "--mode=train")
    log = home / "xar_logs" / f"train_{os.uname().nodename}.log"
    _wait_for(lambda: log.exists() and "fake python" in log.read_text())
    assert "fake python: -m xar_jax.main --config=configs/xar_h.py --mode=train" in log.read_text()
    assert worker("status", "train").stdout.split()[-1] == "running"
    second = worker("start", "eval", "", "--mode=eval", check=False)
    assert second.returncode == 1 and "already running" in second.stderr
    assert "stopped" in worker("stop", "train", "10").stdout
    _wait_for(lambda: (home / "xar_logs" / "train.exit").exists())
    assert worker("status", "train").stdout.split()[-1] == "failed:143"
    assert "got TERM" in log.read_text() and "exit status 143" in log.read_text()
    assert not (home / "xar_logs" / "train.pid").exists()


@needs_tmux
def test_worker_runs_the_cache_job_as_the_latent_cache_module_and_stops_it(worker_home):
    home, worker = worker_home
    worker("start", "cache", "", "--out_dir=gs://b/latents", "--multihost")
    log = home / "xar_logs" / f"cache_{os.uname().nodename}.log"
    _wait_for(lambda: log.exists() and "fake python" in log.read_text())
    assert "fake python: -m xar_jax.data.latent_cache --out_dir=gs://b/latents" in log.read_text()
    assert "stopped" in worker("stop", "cache", "10").stdout  # its pid is recognised as ours
    refused = worker("start", "cache_latents", "", check=False)
    assert refused.returncode == 1 and "not one of train, sample, eval, cache" in refused.stderr


@needs_tmux
def test_worker_kills_a_job_that_ignores_sigterm_after_the_timeout(worker_home):
    home, worker = worker_home
    worker("start", "train", "", "--ignore-term")
    _wait_for(lambda: (home / "xar_logs" / "train.pid").exists())
    assert "did not exit within 1s: killed" in worker("stop", "train", "1").stdout
    _wait_for(lambda: worker("status", "train").stdout.split()[-1] != "running")
    assert worker("status", "train").stdout.split()[-1] == "failed:137"


@needs_tmux
def test_worker_reports_a_finished_job_and_shows_its_log(worker_home):
    home, worker = worker_home
    worker("start", "train", "", "--exit-now")
    _wait_for(lambda: worker("status", "train").stdout.split()[-1] == "finished")
    assert "exit status 0" in worker("log", "train", "5", "0").stdout
    assert "no running xar-train job" in worker("stop", "train", "1").stdout


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def installer(tmp_path, sandbox):
    """A worker home with an installed old tree and a freshly unpacked new one; uv, tmux and
    gcloud are stand-ins that log their arguments (the real ones need the network or a TPU)."""
    home, fake_bin = tmp_path / "home", tmp_path / "bin"
    (home / "xar-jax").mkdir(parents=True)
    (home / "xar-jax" / "old-file").write_text("from the previous install\n")
    shutil.copytree(sandbox, home / "xar-jax.new", ignore=shutil.ignore_patterns(".git"))
    fake_bin.mkdir()
    log = tmp_path / "calls"
    tools = {  # venv-python: what `uv venv` puts in the virtualenv (answers the version query)
        "venv-python": 'for a in "$@"; do [[ $a == *version_info* ]] && { echo 3.12; exit 0; }; '
        f'done; echo "python $*" >> "{log}"',
        "uv": f'echo "uv $*" >> "{log}"; [[ $1 != venv ]] || {{ mkdir -p "${{@: -1}}/bin" && '
        'cp "$(dirname "$0")/venv-python" "${@: -1}/bin/python"; }',
        "tmux": 'printf "%s" "${FAKE_TMUX_SESSIONS:-}"',
        "gcloud": f'echo "gcloud $*" >> "{log}"; exit 1',
    }
    for name, body in tools.items():
        _fake_tool(fake_bin, name, body + "\n")
    env = {"HOME": str(home), "PATH": f"{fake_bin}:{os.environ['PATH']}", "LC_ALL": "C"}

    def install(**extra: str) -> subprocess.CompletedProcess:
        script = home / "xar-jax.new/launch/remote/install_worker.sh"
        flags = "--commit=0123abcd --python=3.12 --jax=jax[tpu] --weights=gs://b/w".split()
        run = dict(env={**env, **extra}, capture_output=True, text=True, timeout=30)
        return subprocess.run(["bash", str(script), *flags], **run)

    return home, log, install


def test_worker_install_swaps_in_the_new_tree_and_installs_it_with_jax(installer):
    home, log, install = installer
    proc = install()
    assert proc.returncode == 0, proc.stderr
    assert (home / "xar-jax" / "launch" / "remote" / "worker.sh").exists()
    assert not (home / "xar-jax" / "old-file").exists()
    assert not (home / "xar-jax.new").exists() and not (home / "xar-jax.old").exists()
    assert (home / "xar-jax" / ".xar_commit").read_text().strip() == "0123abcd"
    calls = log.read_text().splitlines()
    assert f"uv venv --quiet --python 3.12 {home}/xar_venv" in calls
    assert (
        f"uv pip install --quiet --python {home}/xar_venv/bin/python -e {home}/xar-jax[gcs] "
        "jax[tpu]"
    ) in calls
    assert "gcloud storage ls gs://b/w" in calls and "no weights at gs://b/w" in proc.stdout


def test_worker_install_refuses_while_a_job_runs_and_keeps_the_old_tree(installer):
    home, log, install = installer
    proc = install(FAKE_TMUX_SESSIONS="xar-train\n")
    assert proc.returncode == 1 and "xar-train" in proc.stderr and "stop" in proc.stderr
    assert (home / "xar-jax" / "old-file").exists()
    assert not log.exists()  # nothing installed


# ---- the runbook ----------------------------------------------------------------------------
def _projections():
    spec = importlib.util.spec_from_file_location("projections", LAUNCH / "projections.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("projections", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_projection_formulas_reproduce_the_published_parameter_counts():
    _projections().check_param_counts()


def test_runbook_tables_are_the_projection_script_output():
    p = _projections()
    doc = (REPO / "docs" / "tpu.md").read_text()
    tables = (p.model_table, p.training_table, p.caching_table, p.eval_table)
    for table in (make() for make in tables):
        for line in table.splitlines():
            assert line in doc, f"docs/tpu.md lacks (run python launch/projections.py): {line}"


def test_runbook_compiled_table_is_generated_from_the_aot_records():
    spec = importlib.util.spec_from_file_location("aot_table", LAUNCH / "aot_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records = json.loads((REPO / "docs" / "tpu_aot.json").read_text())
    assert {r["topology"] for r in records} and all(r["libtpu"] for r in records)
    expected = module.provenance(records) + "\n\n" + module.table(records)
    doc = (REPO / "docs" / "tpu.md").read_text()
    block = doc.split(module.BEGIN + "\n", 1)[1].split("\n" + module.END, 1)[0]
    assert block == expected, "run: python launch/aot_table.py --update docs/tpu.md"


def test_runbook_time_to_train_table_is_generated_from_the_plans():
    sys.path.insert(0, str(LAUNCH))  # time_to_train imports its neighbour projections.py
    try:
        spec = importlib.util.spec_from_file_location("time_to_train", LAUNCH / "time_to_train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(LAUNCH))
    doc = (REPO / "docs" / "tpu.md").read_text()
    block = doc.split(module.BEGIN + "\n", 1)[1].split("\n" + module.END, 1)[0]
    assert block == module.table(module.load()), (
        "run: python launch/time_to_train.py --update docs/tpu.md"
    )
