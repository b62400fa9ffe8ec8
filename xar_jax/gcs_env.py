"""The environment that points every Cloud Storage client of xar-jax at a local GCS emulator.

Four libraries talk to ``gs://`` in a run, each with its own switch:

- google-cloud-storage (tensorboardX's event files) and gcsfs (etils ``epath`` through fsspec):
  ``STORAGE_EMULATOR_HOST``;
- tensorstore (Orbax's array writes): ``TENSORSTORE_GCS_HTTP_URL``;
- array_record (reading latent-cache shards; google-cloud-cpp underneath):
  ``CLOUD_STORAGE_EMULATOR_ENDPOINT``.

The rest keeps the clients off real credentials and off the network beyond the emulator (see
`emulator_environment`). docs/tpu.md ("Testing against a local GCS emulator") lists the same
variables; tests/gcs_emulator.py starts the emulator and exports them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# Where a stray metadata-server or credentials probe goes instead of Google's: a closed port on
# loopback, so it fails at once and never leaves the machine.
_NOWHERE = "127.0.0.1:9"


def emulator_environment(host_port: str) -> dict[str, str]:
    """Environment variables that route all of xar-jax's GCS clients to an emulator.

    Args:
      host_port: the emulator's HTTP address, ``"127.0.0.1:PORT"``.

    Returns:
      ``{name: value}`` to put into ``os.environ`` before the clients are imported (subprocesses
      inherit it); `apply_in_process` also refreshes clients this process already imported.
    """
    url = f"http://{host_port}"
    return {
        # google-cloud-storage and gcsfs; with it google-cloud-storage uses anonymous credentials.
        "STORAGE_EMULATOR_HOST": url,
        # tensorstore's gcs kvstore driver (Orbax writes array data through it).
        "TENSORSTORE_GCS_HTTP_URL": url,
        # tensorstore: a fixed bearer token instead of searching for credentials (the emulator
        # ignores it); without it tensorstore looks for gcloud files and the metadata server.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # array_record's reader (google-cloud-cpp); it then uses insecure (no) credentials.
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        # gcsfs >= 2025.x defaults to its "extended" file system, which first asks the Storage
        # Control API (gRPC) for the bucket's layout; an emulator has no such API, and the probe
        # retries ~60 s per bucket before falling back. "false" selects the plain JSON-API client.
        # gcsfs reads it when imported.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # fsspec config for protocol "gs" (epath opens fsspec.filesystem("gcs")): token="anon",
        # i.e. no credential search. fsspec reads FSSPEC_* when imported.
        "FSSPEC_GS_TOKEN": "anon",
        # gcsfs's credential search skips the GCE metadata server.
        "NO_GCE_CHECK": "true",
        # google-auth (GCE_METADATA_HOST/_IP) and tensorstore (GCE_METADATA_ROOT) metadata servers.
        "GCE_METADATA_HOST": _NOWHERE,
        "GCE_METADATA_IP": _NOWHERE,
        "GCE_METADATA_ROOT": _NOWHERE,
        # A project id, so google-cloud-storage never asks the environment for one.
        "GOOGLE_CLOUD_PROJECT": "xar-emulator",
    }


def apply_in_process(env: Mapping[str, str]) -> None:
    """Puts ``env`` into ``os.environ`` and into clients this process has already imported.

    fsspec reads its ``FSSPEC_*`` config and gcsfs its file-system switch at import time; epath
    caches its fsspec file systems. All three are refreshed here, so a test process that imported
    them before the emulator started still reaches it.
    """
    os.environ.update(env)
    if "fsspec" in sys.modules:
        import fsspec.config

        fsspec.config.set_conf_env(fsspec.config.conf)
    if "gcsfs" in sys.modules:
        import fsspec
        import gcsfs
        import gcsfs.core

        if env.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT") == "false":
            for protocol in ("gs", "gcs"):
                fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
        for cls in {gcsfs.GCSFileSystem, gcsfs.core.GCSFileSystem}:
            cls.clear_instance_cache()  # instances made with the old settings
    if "etils.epath" in sys.modules:
        from etils.epath import backend

        backend.fsspec_backend._get_filesystem.cache_clear()
