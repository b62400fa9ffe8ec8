"""Shared fixtures: golden vectors, the converted tiny reference model (loaded once), and a GCS
bucket on a local emulator (`gcs_bucket`, tests/gcs_emulator.py)."""

import os

import numpy as np
import pytest
from gcs_emulator import gcs_bucket  # noqa: F401  (the session fixture: a bucket on an emulator)

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, name)


@pytest.fixture(scope="session")
def xar_golden():
    with np.load(golden_path("xar_tiny_golden.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def xar_golden_state_dict(xar_golden):
    return {k[len("param/") :]: v for k, v in xar_golden.items() if k.startswith("param/")}


@pytest.fixture(scope="session")
def golden_model(xar_golden_state_dict):
    from xar_jax.convert.xar import xar_from_torch

    return xar_from_torch(xar_golden_state_dict)


@pytest.fixture(scope="session")
def optimized_golden_model(xar_golden_state_dict):
    """The golden model on the fast paths that run on CPU: jax.nn.dot_product_attention (cuDNN on
    GPU, its XLA form here), a layer scan of two blocks per iteration, MLP padded to 128."""
    from xar_jax.convert.xar import xar_from_torch

    return xar_from_torch(
        xar_golden_state_dict,
        attention_impl="dot_product",
        scan_layers=True,
        scan_unroll=2,
        mlp_multiple=128,
    )


def event_tags(workdir) -> set[str]:
    """Scalar/image tags in the TensorBoard event files of ``workdir`` (read without TensorFlow)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in workdir.glob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord framing: length, crc, payload, crc.
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            tags.update(v.tag for v in event.summary.value)
            i += 12 + n + 4
    return tags
