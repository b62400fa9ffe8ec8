"""The launch scripts in a sandbox: a git copy of launch/ with placeholder configs, and a runner
that executes a script with fake `gcloud`/`gsutil` first on PATH (the `guard_bin` fixture of
conftest.py) and fails the test if a dry run called them."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
CONFIGS = ("demo", "xar_b", "xar_l", "xar_h")
BASE_ENV = {"PROJECT": "my-proj", "BUCKET": "my-bkt"}
WORKDIR = "gs://my-bkt/runs/xar_h"


def git(repo: Path, *args: str) -> str:
    ident = ["-c", "user.email=t@example.com", "-c", "user.name=t"]
    return subprocess.check_output(["git", "-C", str(repo), *ident, *args], text=True).strip()


def make_sandbox(root: Path) -> Path:
    """A git repository holding launch/ and placeholder configs (the scripts only copy them)."""
    repo = root / "repo"
    shutil.copytree(LAUNCH, repo / "launch", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "configs").mkdir(parents=True)
    for name in CONFIGS:
        (repo / "configs" / f"{name}.py").write_text("# placeholder config for the launch tests\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "sandbox")
    return repo


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def commands(self) -> list[list[str]]:
        """The printed commands (step headers, starting with '#', left out), split by shlex."""
        lines = [ln for ln in self.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
        return [shlex.split(ln) for ln in lines]

    def find(self, *words: str) -> list[list[str]]:
        """Commands containing every word as an argument, in order of appearance."""
        return [c for c in self.commands if all(w in c for w in words)]

    def one(self, *words: str) -> list[str]:
        found = self.find(*words)
        assert len(found) == 1, f"expected one command with {words}, got {found}\n{self.stdout}"
        return found[0]


def run_script(
    repo: Path, guard: Path, script: str, *args: str, dry: bool = True, **env: str
) -> Result:
    full_env = {"PATH": f"{guard}:{os.environ['PATH']}", "HOME": str(guard), "LC_ALL": "C"}
    full_env.update(BASE_ENV)
    full_env.update(env)
    full_env = {k: v for k, v in full_env.items() if v is not None}
    argv = ["bash", str(repo / "launch" / script), *(["--dry-run"] if dry else []), *args]
    proc = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=60)
    called = guard / "called"
    if called.exists():  # report once, and leave the guard clean for the next test
        calls = called.read_text()
        called.unlink()
        pytest.fail(f"a dry run executed cloud commands:\n{calls}")
    return Result(proc)


def flag(cmd: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} in {cmd}"
    return values[0]
