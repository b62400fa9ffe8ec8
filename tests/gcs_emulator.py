"""A local GCS emulator for the tests: `xar_jax.gcs_emulator` (fake-gcs-server on 127.0.0.1, the
same command a user runs by hand).

`gcs_bucket` (session scope, re-exported by conftest.py) starts it at a free port, creates a
bucket, exports `xar_jax.gcs_env.emulator_environment` into ``os.environ`` (subprocesses such as
``python -m xar_jax.main`` inherit it) and stops the server at the end of the session.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from xar_jax import gcs_emulator, gcs_env


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory) -> Iterator[str]:
    """``"gs://xar-test"``: a bucket on a local emulator; every GCS client of xar-jax points there."""
    began = time.perf_counter()
    emulator = gcs_emulator.start(tmp_path_factory.mktemp("gcs"))
    env = emulator.environment()
    saved = {name: os.environ.get(name) for name in env}
    gcs_env.apply_in_process(env)
    print(f"\nGCS emulator at {emulator.url} up in {time.perf_counter() - began:.2f} s")
    try:
        yield f"gs://{emulator.bucket}"
    finally:
        emulator.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
