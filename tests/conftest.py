"""Shared fixtures: golden vectors, the converted tiny reference model (loaded once), and a GCS
bucket on a local emulator (`gcs_bucket`, tests/gcs_emulator.py)."""

import json
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


# The fast paths of the golden model: a layer scan of two blocks per iteration and the MLP padded
# to 128 (both exact: the padding units stay zero); the kernel is the fixture's choice.
FAST_PATH_SETTINGS = dict(scan_layers=True, scan_unroll=2, mlp_multiple=128)


@pytest.fixture(scope="session")
def golden_model_with(xar_golden_state_dict):
    """``(model, params)`` of the golden weights built with the given model settings, cached."""
    from xar_jax.convert.xar import xar_from_torch

    built = {}

    def build(**settings):
        key = tuple(sorted(settings.items()))
        if key not in built:
            built[key] = xar_from_torch(xar_golden_state_dict, **settings)
        return built[key]

    return build


@pytest.fixture(scope="session")
def golden_model(golden_model_with):
    return golden_model_with()


@pytest.fixture(scope="session")
def optimized_golden_model(golden_model_with):
    """The golden model on the fast paths that run on CPU: jax.nn.dot_product_attention (cuDNN on
    GPU, its XLA form here), with `FAST_PATH_SETTINGS`."""
    return golden_model_with(attention_impl="dot_product", **FAST_PATH_SETTINGS)


def event_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the TensorBoard event files in ``workdir`` (read without
    TensorFlow); image summaries appear with no values."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord framing: length, crc, payload, crc.
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            for v in event.summary.value:
                values = scalars.setdefault(v.tag, [])
                if v.HasField("simple_value"):
                    values.append((event.step, v.simple_value))
            i += 12 + n + 4
    return scalars


def event_tags(workdir) -> set[str]:
    """Scalar/image tags in the TensorBoard event files of ``workdir``."""
    return set(event_scalars(workdir))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")


# LLVM optimisation level 0 compiles the tests' small programs in about half the CPU time (the
# tiny train step: 8 s instead of 13). Its arithmetic differs from level 2 by rounding only, so a
# subprocess run is compared only with runs made under the same flags (all through `main_env`).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


# The tests in this process compile at that level too (set before JAX creates its CPU backend,
# which reads XLA_FLAGS once): test_sampling.py's parity tests took 89 -> 67 s, and their
# tolerances are far above rounding. A level given in XLA_FLAGS by the caller wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()


def main_env(devices: int = 1, **extra) -> dict:
    """The environment of a `python -m xar_jax.main` subprocess on ``devices`` CPU devices."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    flags = [FAST_COMPILE_FLAGS]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(extra)
    return env


def run_main(workdir, *flags, config=TINY_CONFIG, devices=1, timeout=600, **env):
    """Runs the real entry point; returns the CompletedProcess (output captured as text).

    ``env``: further environment variables (`main_env`'s ``extra``)."""
    import subprocess
    import sys

    args = [
        sys.executable,
        "-m",
        "xar_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *flags,
    ]
    return subprocess.run(
        args,
        env=main_env(devices, **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_release_like_xar(path, num_classes: int = 10):
    """The golden xAR (the authors' network at a small width, on the real 16x16x16 latent grid)
    as the authors' state dict, its class table cut to ``num_classes`` (+ the null class)."""
    with np.load(golden_path("xar_tiny_golden.npz")) as z:
        state = {k[len("param/") :]: z[k] for k in z.files if k.startswith("param/")}
    table = state["class_emb.weight"]  # (1000 + 1, D): the last row is the null class.
    state["class_emb.weight"] = np.concatenate([table[:num_classes], table[-1:]])
    np.savez(path, **state)


# configs/xar_b.py shrunk to the golden xAR's sizes (the paper's layout flags stay: scanned blocks,
# MLP padded to 128, so converted weights are re-laid out on load), for sample and eval runs of
# `write_release_like_xar` weights.
RELEASE_CONFIG = os.path.join(REPO, "configs", "xar_b.py")
RELEASE_MODEL_FLAGS = (
    "--config.model.preset=",
    "--config.model.width=64",
    "--config.model.encoder_depth=2",
    "--config.model.decoder_depth=2",
    "--config.model.num_heads=4",
    "--config.model.dtype=float32",
    "--config.sample.num_steps=2",
)


def golden_sample_error(model, params, g) -> float:
    """Relative L2 distance of ``model``'s samples from the release's golden ones (same noise)."""
    from xar_jax import sampling

    out = sampling.sample(
        model,
        params,
        g["smp/labels"],
        num_steps=int(g["smp/num_steps"]),
        cfg=float(g["smp/cfg"]),
        noise={"init": g["smp/init_noise"], "steps": g["smp/eps"]},
    )
    assert out.shape == (2, 16, 16, 16)
    expected = g["smp/tokens_nchw"].transpose(0, 2, 3, 1)
    return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))


def run_json_script(script: str, timeout: int = 300) -> dict:
    """Runs a Python ``script`` on the CPU in a subprocess (its own device count, set by the
    script) and returns the JSON object its last output line prints."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def tree_digest(root) -> dict:
    """``{relative path: sha256}`` of every file under ``root`` (byte-identity checks)."""
    import hashlib
    import pathlib

    root = pathlib.Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def perturbed_tiny_xar(layout, depth=1, in_channels=2, **settings):
    """A tiny XAR (width 32, ``depth`` blocks per stack, 2 heads, 10 classes) and its params,
    perturbed so that the zero-initialised biases and adaLN outputs carry signal on every path."""
    import jax

    from xar_jax import model as xar_model

    model = xar_model.XAR(
        layout, 32, depth, depth, 2, 2, in_channels=in_channels, num_classes=10, **settings
    )
    params = model.init(jax.random.key(1), *xar_model.example_inputs(model))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(kk, x.shape) for x, kk in zip(leaves, keys, strict=True)]
    return model, jax.tree.unflatten(tree, leaves)


def inception_golden_state_dict(golden) -> tuple[dict, str]:
    """The golden Inception network's torch-named weights, rebuilt from ``recipe_json``
    (tests/golden/README.md), and the SHA-256 of their bytes."""
    import hashlib

    recipe = json.loads(str(golden["recipe_json"]))
    state, digest = {}, hashlib.sha256()
    for i, (name, shape) in enumerate(zip(recipe["keys"], recipe["shapes"], strict=True)):
        z = np.random.default_rng(recipe["seed_base"] + i).standard_normal(shape, dtype=np.float32)
        z = np.abs(z) if recipe["abs"][i] else z
        w = (recipe["offset"][i] + recipe["scale"][i] * z).astype(np.float32)
        state[name] = w
        digest.update(w.tobytes())
    return state, digest.hexdigest()


def converted_golden_weights(directory) -> tuple[str, str]:
    """The golden VAE (ch=32) and Inception weights converted into ``directory`` by the
    converters; returns the VAE and Inception directories."""
    from xar_jax.convert import inception as inception_convert
    from xar_jax.convert import vae as vae_convert

    with np.load(golden_path("vae_ch32_golden.npz")) as z:
        np.savez(directory / "vae.npz", **{k[6:]: z[k] for k in z.files if k.startswith("param/")})
    vae_convert.convert_file(str(directory / "vae.npz"), str(directory / "vae"))
    with np.load(golden_path("inception_fid_golden.npz")) as z:
        state, _ = inception_golden_state_dict(z)
    np.savez(directory / "inception.npz", **state)
    inception_convert.convert_file(str(directory / "inception.npz"), str(directory / "inception"))
    return str(directory / "vae"), str(directory / "inception")


@pytest.fixture(scope="module")
def guard_bin(tmp_path_factory):
    """gcloud/gsutil stand-ins that record the call and fail: the launch scripts' dry runs must
    not reach them (tests/launch_sandbox.py's `run_script` reports any call)."""
    bin_dir = tmp_path_factory.mktemp("guard_bin")
    for tool in ("gcloud", "gsutil"):
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{bin_dir}/called"\nexit 99\n')
        path.chmod(0o755)
    return bin_dir


def import_torch():
    """torch, for the tests that read .pth files. Without the `torch` extra they skip, saying
    why; under CI (.ci/run installs torch) they always run."""
    if os.environ.get("CI"):
        import torch

        return torch
    return pytest.importorskip(
        "torch", reason="needs the 'torch' extra (reads .pth files): pip install -e '.[torch]'"
    )


TINY_RUN_STEPS = 12  # Checkpoints at 4, 8, 12 (configs/tiny.py: every 4 steps, keep 5).
TINY_RUN_FLAGS = (f"--config.train.num_steps={TINY_RUN_STEPS}", "--config.log.sample_every_steps=4")
TINY_RUN_DEVICES = 2


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A workdir trained by ``python -m xar_jax.main`` on configs/tiny.py for 12 steps on two CPU
    devices (journeys, the resume tests and the gs:// journey compare against it; tests change
    only copies).

    Trained once per test run: under pytest-xdist each worker has its own session, so the first
    worker to ask trains it in the run's shared temporary directory while the others wait.
    """
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # The directory of this run, above every worker's own.
    workdir, done = root / "tiny_run" / "run", root / "tiny_run.done"
    with open(root / "tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # A failed attempt of another worker.
            workdir.parent.mkdir(exist_ok=True)
            proc = run_main(workdir, *TINY_RUN_FLAGS, devices=TINY_RUN_DEVICES)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert (workdir / "samples" / f"step_{TINY_RUN_STEPS:08d}.png").exists()
            done.touch()
    return workdir


def train_state_params(workdir, step):
    """The params of the checkpoint at ``step`` (the newest) of a configs/tiny.py workdir."""
    import jax

    from xar_jax import experiment
    from xar_jax.train_config import load_config_file

    config = load_config_file(TINY_CONFIG)
    config.train.num_steps = step
    state, restored_step = experiment.restore_train_state(config, str(workdir))
    assert restored_step == step
    return jax.device_get(state.params)


def pytest_terminal_summary(terminalreporter):
    """Prints the lines tests recorded as ``record_property("summary", line)`` (the fault matrix's
    counts) at the end of the run; xdist carries them from its workers in the test reports."""
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, value in getattr(report, "user_properties", ()):
                if name == "summary":
                    terminalreporter.write_line(value)
