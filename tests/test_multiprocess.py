"""Multi-process training, simulated on one machine: two `python -m xar_jax.main` processes joined by
`jax.distributed` over localhost (one CPU device each, gloo collectives) train configs/tiny.py.

What is checked: both exit 0; one collective checkpoint (one step directory, a data-iterator file
per process); only process 0 writes metrics; the final params equal those of a single process
with two devices that is fed the same global batches. "The same global batches" needs care: each
process keeps every second example of the global stream (``[process_index::process_count]``), so
a step's global batch is the single-process batch reordered (process 0's share, then process
1's), and per-example noise and dropout follow the row. A plain single-process run therefore
differs by design; the reference run below is fed the reordered batches (which
`test_global_batch_is_the_single_process_batch_reordered` pins down).

Also: `initialize_distributed` checks its environment before JAX starts; and two
`python -m xar_jax.main --mode=sample` processes write one ADM sample set to gs:// (the GCS
emulator) without a shared mount, survive a kill and equal a one-process run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from xar_jax.main import _looks_multiprocess, initialize_distributed
from xar_jax.train_config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
STEPS = 4  # configs/tiny.py checkpoints every 4 steps: exactly one checkpoint, at step 4.
OVERRIDES = (f"--config.train.num_steps={STEPS}", f"--config.log.sample_every_steps={STEPS}")
TIMEOUT_S = 300

# The single-process reference: the trainer with its data iterator replaced by one that feeds the
# two processes' shares, concatenated in process order, to a (data=2) mesh over 2 CPU devices.
REFERENCE_DRIVER = """
import json
import logging
import sys
import numpy as np
from xar_jax import sharding, train
from xar_jax.data import device, pipeline
from xar_jax.train_config import load_config_file

config_path, workdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = load_config_file(config_path)
config.train.num_steps = steps
config.log.sample_every_steps = 0
logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)


class ProcessOrderBatches:
    def __init__(self, config, mesh):
        self._shares = [
            pipeline.make_train_iterator(
                config.data, global_batch_size=config.train.global_batch_size,
                process_index=p, process_count=2, seed=config.seed)
            for p in range(2)
        ]
        self._sharding = sharding.batch_sharding(mesh)

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self._shares]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return device.to_global_batch(batch, self._sharding)

    # Grain's checkpoint handler stores a non-Grain iterator's state as bytes.
    def get_state(self):
        return json.dumps([it.get_state() for it in self._shares]).encode()

    def set_state(self, state):
        for it, s in zip(self._shares, json.loads(state)):
            it.set_state(s)

    def start_prefetch(self):
        pass


train.make_data_iterator = ProcessOrderBatches
train.train_and_evaluate(config, workdir)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(num_devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    # LLVM optimisation level 0: compiles in about half the CPU time, same arithmetic.
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={num_devices} --xla_backend_optimization_level=0"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _start(args, env, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _wait_all(procs, timeout_s):
    """Exit codes of all processes; kills every one still running on timeout or error."""
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        return [p.returncode for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _start_two_trainers(workdir, log_dir):
    """Two `python -m xar_jax.main` trainers on ``workdir``, joined by jax.distributed."""
    coordinator = f"127.0.0.1:{_free_port()}"
    cli = [
        sys.executable,
        "-m",
        "xar_jax.main",
        f"--config={TINY}",
        f"--workdir={workdir}",
        "--mode=train",
        *OVERRIDES,
    ]
    procs, logs = [], []
    for index in range(2):
        env = _env(
            1, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index)
        )
        logs.append(log_dir / f"process_{index}.log")
        procs.append(_start(cli, env, logs[-1]))
    return procs, logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process run and the single-process reference, started together."""
    root = tmp_path_factory.mktemp("multiprocess")
    multi, single = root / "two_processes", root / "reference"
    procs, logs = _start_two_trainers(multi, root)
    logs.append(root / "reference.log")
    procs.append(
        _start(
            [sys.executable, "-c", REFERENCE_DRIVER, TINY, str(single), str(STEPS)],
            _env(2),
            logs[-1],
        )
    )
    codes = _wait_all(procs, TIMEOUT_S)
    return {
        "codes": codes,
        "logs": [p.read_text() for p in logs],
        "multi": multi,
        "single": single,
    }


def _tail(text: str) -> str:
    return text[-3000:]


def test_two_processes_train_and_write_one_collective_checkpoint(runs):
    for index, (code, log) in enumerate(zip(runs["codes"][:2], runs["logs"][:2], strict=True)):
        assert code == 0, f"process {index} exited {code}:\n{_tail(log)}"
    checkpoints = runs["multi"] / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [str(STEPS)]
    data = checkpoints / str(STEPS) / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    # One program over both processes' devices.
    assert "mesh {'dcn': 1, 'data': 2, 'fsdp': 1, 'tensor': 1}" in runs["logs"][0]


def test_only_process_0_writes_metrics_and_images(runs):
    events = sorted(runs["multi"].glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one writer: process 0's
    assert b"loss" in events[0].read_bytes()
    process_0, process_1 = runs["logs"][:2]
    assert f"step {STEPS} | loss" in process_0
    assert "| loss" not in process_1
    # The final step's sample grid: sampled on both processes' devices, written once by process 0.
    pngs = list(runs["multi"].rglob("*.png"))
    assert len(pngs) == 1, pngs


def _final_params(workdir):
    from xar_jax import experiment

    config = load_config_file(TINY)
    config.train.num_steps = STEPS
    state, step = experiment.restore_train_state(config, str(workdir))
    return jax.device_get(state.params), step


def test_final_params_equal_single_process_run_on_the_same_global_batches(runs):
    code, log = runs["codes"][2], runs["logs"][2]
    assert code == 0, f"the reference run exited {code}:\n{_tail(log)}"
    assert all(c == 0 for c in runs["codes"][:2])
    multi, multi_step = _final_params(runs["multi"])
    single, single_step = _final_params(runs["single"])
    assert multi_step == single_step == STEPS
    leaves = list(zip(jax.tree.leaves(multi), jax.tree.leaves(single), strict=True))
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _logged_steps(log: str) -> dict[int, dict[str, float]]:
    """``{step: {'loss': .., 'grad_norm': .., 'lr': ..}}`` from the console metric lines."""
    steps = {}
    for match in re.finditer(r"step (\d+) \| loss (\S+) \| grad_norm (\S+) \| lr (\S+)", log):
        step, loss, grad_norm, lr = match.groups()
        steps[int(step)] = {"loss": float(loss), "grad_norm": float(grad_norm), "lr": float(lr)}
    return steps


def test_every_logged_step_matches_the_reference_and_updates_the_params(runs):
    multi, single = _logged_steps(runs["logs"][0]), _logged_steps(runs["logs"][2])
    assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
    for step in multi:  # Printed to 4 significant digits.
        for name in ("loss", "grad_norm"):
            assert multi[step][name] == pytest.approx(single[step][name], rel=2e-3), (step, name)
        # A non-zero gradient and learning rate: the params equality above is not vacuous.
        assert multi[step]["grad_norm"] > 0 and multi[step]["lr"] > 0


def test_global_batch_is_the_single_process_batch_reordered():
    from xar_jax.data import pipeline

    config = load_config_file(TINY)
    batch = config.train.global_batch_size

    def iterator(index, count):
        return pipeline.make_train_iterator(
            config.data,
            global_batch_size=batch,
            process_index=index,
            process_count=count,
            seed=config.seed,
        )

    single, shares = iterator(0, 1), [iterator(p, 2) for p in range(2)]
    # Process p holds global positions p, p + 2, ...: rows [0, 2, 4, 6, 1, 3, 5, 7] of a step.
    order = np.concatenate([np.arange(0, batch, 2), np.arange(1, batch, 2)])
    for _ in range(3):
        expected = next(single)
        parts = [next(s) for s in shares]
        for key, value in expected.items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value[order])


# ----------------------------------------------------------------------------------------------
# initialize_distributed: decisions and errors that come before JAX starts.
JAX_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in JAX_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"JAX_NUM_PROCESSES": "1"}, False),
        ({"TPU_WORKER_HOSTNAMES": "w-0"}, False),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, True),
        ({"JAX_NUM_PROCESSES": "4"}, True),
        ({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}, True),
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.2:8476,10.0.0.3:8476"}, True),
    ],
)
def test_auto_mode_reads_the_process_count_from_the_environment(clean_env, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert _looks_multiprocess() is expected


def test_off_and_single_process_auto_do_not_initialise(clean_env):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
    assert initialize_distributed("off") is False
    clean_env.delenv("JAX_COORDINATOR_ADDRESS")
    assert initialize_distributed("auto") is False


@pytest.mark.parametrize(
    "mode, env, message",
    [
        ("yes", {}, "distributed mode='yes' is not allowed; allowed: 'auto', 'on', 'off'"),
        ("auto", {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
        (
            "auto",
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES set but JAX_PROCESS_ID not",
        ),
        (
            "on",
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
            r"JAX_PROCESS_ID=2 must lie in \[0, JAX_NUM_PROCESSES=2\)",
        ),
    ],
)
def test_bad_distributed_settings_fail_before_jax_starts(clean_env, mode, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        initialize_distributed(mode)


def test_a_refused_lock_stops_every_process(tmp_path):
    # Another trainer (this live test process, on this host) holds the workdir: process 0 refuses,
    # and process 1 must stop too rather than wait for process 0 at the first collective.
    workdir = tmp_path / "held"
    workdir.mkdir()
    now = time.time()
    holder = (
        f'{{"host": "{socket.gethostname()}", "pid": {os.getpid()}, '
        f'"started": {now}, "heartbeat": {now}}}'
    )
    (workdir / "train.lock").write_text(holder)
    procs, logs = _start_two_trainers(workdir, tmp_path)
    codes = _wait_all(procs, TIMEOUT_S)
    texts = [p.read_text() for p in logs]
    assert codes == [2, 2], [_tail(t) for t in texts]
    assert "is in use by a trainer" in texts[0]
    assert "process 0 could not take the workdir's lock" in texts[1]
    assert (workdir / "train.lock").read_text() == holder  # The holder's lock is untouched.
    assert not (workdir / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# Sampling to gs:// from two processes: no shared mount, a killed process, a rerun.
SAMPLE_IMAGES = 20  # 10 classes; 2 images per generator call: 10 batches, 5 per process.


def _sample_cli(workdir, out_dir, global_batch):
    return [
        sys.executable,
        "-m",
        "xar_jax.main",
        f"--config={TINY}",
        f"--workdir={workdir}",
        "--mode=sample",
        "--config.sample.format=adm",
        f"--config.sample.num_images={SAMPLE_IMAGES}",
        f"--config.sample.batch_size={global_batch}",
        f"--config.sample.out_dir={out_dir}",
    ]


def _start_two_samplers(workdir, out_dir, log_dir, tag):
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for index in range(2):
        env = _env(
            1, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index)
        )
        logs.append(log_dir / f"sample_{tag}_{index}.log")
        procs.append(_start(_sample_cli(workdir, out_dir, 4), env, logs[-1]))
    return procs, logs


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _run_dir(out_dir):
    from xar_jax import fileio

    fileio.forget_listings(out_dir)
    (name,) = fileio.list_names(out_dir)  # One sampling run: step_00000012-...-n20.
    return f"{out_dir}/{name}"


def _finished(shards):
    """The finished shards' names (not the temporaries of a write cut short)."""
    from xar_jax import fileio

    fileio.forget_listings(shards)
    return sorted(n for n in fileio.list_names(shards) if n.endswith(".npz"))


def _read_samples(run_dir):
    from xar_jax import fileio

    with fileio.as_path(f"{run_dir}/samples.npz").open("rb") as f, np.load(f) as data:
        return data["arr_0"], data["labels"]


def test_two_processes_sample_to_gs_and_a_killed_one_resumes_to_the_one_process_result(
    tiny_run, gcs_bucket, tmp_path
):
    """Every process writes its own shards to a gs:// sample.out_dir (no mount); process 1 is
    killed in the middle of a batch, process 0 once its shards exist; the rerun generates only
    what is missing and process 0 assembles samples.npz, equal to a one-process run's."""
    import shutil
    import uuid

    from xar_jax import fileio

    workdir = tmp_path / "run"  # Read only (the runs share it).
    shutil.copytree(tiny_run, workdir)
    root = f"{gcs_bucket}/multihost-{uuid.uuid4().hex[:8]}"
    two = f"{root}/two"
    # The one-process reference runs beside the two processes (most of their time is waiting).
    reference = _start(_sample_cli(workdir, f"{root}/one", 2), _env(1), tmp_path / "one.log")
    procs, logs = _start_two_samplers(workdir, two, tmp_path, "killed")
    try:
        # Process 1 is inside its first batch (compiling or sampling it) once it says so.
        _wait_for(
            lambda: f"Sampling {SAMPLE_IMAGES} images" in logs[1].read_text(),
            TIMEOUT_S,
            "process 1 to start sampling",
        )
        procs[1].kill()
        shards = f"{_run_dir(two)}/shards"

        def process_0_done():
            return procs[0].poll() is not None or len(_finished(shards)) >= 5

        _wait_for(process_0_done, TIMEOUT_S, "process 0's shards")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    left = _finished(shards)
    assert left and all(int(n[6:12]) % 2 == 0 for n in left), left  # Process 0's batches only.
    assert not fileio.exists(f"{_run_dir(two)}/samples.npz")

    procs, logs = _start_two_samplers(workdir, two, tmp_path, "rerun")
    codes = _wait_all([*procs, reference], TIMEOUT_S)
    texts = [p.read_text() for p in [*logs, tmp_path / "one.log"]]
    assert codes == [0, 0, 0], [_tail(t) for t in texts]
    assert f"Process 0: {len(left)} of its 5 batches finished earlier" in texts[0]
    assert "Process 1: 0 of its 5 batches finished earlier; 5 to generate" in texts[1]

    images, labels = _read_samples(_run_dir(two))
    expected_images, expected_labels = _read_samples(_run_dir(f"{root}/one"))
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, SAMPLE_IMAGES // 10))
    np.testing.assert_array_equal(images, expected_images)
    assert images.shape == (SAMPLE_IMAGES, 8, 8, 1)
    fileio.forget_listings(_run_dir(two))
    assert sorted(fileio.list_names(_run_dir(two))) == ["plan.json", "samples.npz", "settings.json"]
