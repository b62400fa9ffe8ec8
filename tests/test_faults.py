"""The faults a long run meets, through the real entry points: stop signals, kills, damaged files.

Expected for every fault: nothing committed is lost (a checkpoint or shard once complete stays
readable), and the next start either resumes or refuses in at most four lines that name the file
and the remedy (exit 2), never with a traceback. Each fault tried is recorded in the module's
matrix; the last test prints its counts (faults tried / survived).

Cheap by construction: every training fault starts from a copy of conftest's `tiny_run` (its
compilation cache included, so no start compiles the train step again), the signal faults run in
a row on one workdir (each start resumes from the previous stop), and the refusals, which end
before any compilation, run side by side.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import (
    RELEASE_CONFIG,
    RELEASE_MODEL_FLAGS,
    REPO,
    TINY_CONFIG,
    TINY_RUN_DEVICES,
    TINY_RUN_STEPS,
    converted_golden_weights,
    main_env,
    write_release_like_xar,
)

from xar_jax.convert import xar as xar_convert
from xar_jax.data import config as data_config
from xar_jax.data import latent_cache
from xar_jax.evaluation import fid

MATRIX: dict[str, bool] = {}  # fault -> survived, in the order tried
CPU_SECONDS = {"subprocesses": 0.0, "pytest": 0.0}  # Spent in the tests' bodies.
# The tiny workdir's flags for a long run that saves only when told to (or when stopped).
LONG_RUN = (
    "--config.train.num_steps=100000",
    "--config.checkpoint.every_steps=100000",
    "--config.log.sample_every_steps=0",
)


def _cpu() -> tuple[float, float]:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return children.ru_utime + children.ru_stime, me.ru_utime + me.ru_stime


@pytest.fixture(autouse=True)
def _count_cpu():
    """CPU seconds of each test's body (after the fixtures: `tiny_run` is shared with other
    modules), so the module's cost on a loaded machine can still be told."""
    before = _cpu()
    yield
    after = _cpu()
    CPU_SECONDS["subprocesses"] += after[0] - before[0]
    CPU_SECONDS["pytest"] += after[1] - before[1]


class Fault:
    """Records ``name`` in the matrix as tried, and as survived when the block ends normally."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        MATRIX[self.name] = False

    def __exit__(self, kind, *_):
        MATRIX[self.name] = kind is None


class Run:
    """A CLI subprocess whose output (stdout and stderr) is collected line by line as it runs."""

    def __init__(self, args, env=None):
        # A child started from a background job inherits SIGINT ignored; the trainer installs its
        # own SIGINT handler, so a Ctrl-C reaches it all the same.
        self.proc = subprocess.Popen(
            args,
            env=env or main_env(TINY_RUN_DEVICES),
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output, re.MULTILINE):
            assert self.proc.poll() is None, f"ended before {pattern!r}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.output[-3000:]}"
            time.sleep(0.02)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code


def _main(workdir, *flags, config=TINY_CONFIG, env=None) -> Run:
    return Run(
        [
            sys.executable,
            "-m",
            "xar_jax.main",
            f"--config={config}",
            f"--workdir={workdir}",
            *flags,
        ],
        env,
    )


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _one_stop_line(run: Run, signame: str) -> str:
    lines = [line for line in run.lines if f"Stopped by {signame}" in line]
    assert len(lines) == 1, run.output[-3000:]
    assert "Traceback" not in run.output, run.output[-3000:]
    return lines[0]


def _damage(path, how: str) -> None:
    """Truncates to half, or flips bits all over (not in the first and last tenth), every file
    under ``path``."""
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    for f in files:
        data = bytearray(f.read_bytes())
        if how == "truncate":
            data = data[: len(data) // 2]
        else:
            for i in range(len(data) // 10, 9 * len(data) // 10, 61):
                data[i] ^= 0x55
        f.write_bytes(bytes(data))


def test_stops_and_kills_in_a_row_lose_nothing_committed(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)

    with Fault("SIGTERM mid-step, twice (the second during the save)"):
        run = _main(workdir, *LONG_RUN)
        run.wait_for(rf"step {TINY_RUN_STEPS + 4} \|")
        run.proc.send_signal(signal.SIGTERM)
        run.wait_for(r"SIGTERM: finishing the step in flight")
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish() == 0, run.output[-3000:]
        stopped = _steps(workdir)[-1]
        # A signal landing between step 16's log line and the loop's check after it stops at 16.
        assert stopped >= TINY_RUN_STEPS + 4  # Past the last periodic checkpoint (12).
        line = _one_stop_line(run, "SIGTERM")
        assert f"after step {stopped}: checkpoint {stopped} (with the data iterator)" in line
        assert "SIGTERM again: already stopping" in run.output
        assert list((workdir / "checkpoints" / str(stopped) / "data").iterdir())

    with Fault("SIGINT (Ctrl-C) mid-step"):
        run = _main(workdir, *LONG_RUN)
        run.wait_for(rf"step {stopped + 3} \|")
        run.proc.send_signal(signal.SIGINT)
        assert run.finish() == 130, run.output[-3000:]
        assert f"Resumed from checkpoint step {stopped}" in run.output  # The SIGTERM's.
        interrupted = _steps(workdir)[-1]
        assert interrupted >= stopped + 3
        assert f"checkpoint {interrupted}" in _one_stop_line(run, "SIGINT")

    with Fault("SIGKILL mid-save (a save every step)"):
        run = _main(workdir, *LONG_RUN, "--config.checkpoint.every_steps=1")
        run.wait_for(rf"step {interrupted + 6} \|")
        run.proc.send_signal(signal.SIGKILL)
        assert run.finish() == -signal.SIGKILL
        assert f"Resumed from checkpoint step {interrupted}" in run.output  # The SIGINT's.
        steps = _steps(workdir)
        assert steps[-1] > interrupted + 1, steps  # Saves are asynchronous: a few lag behind.
        for step in steps:  # Only complete checkpoints carry a step's name.
            assert (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists()

    with Fault("truncated newest checkpoint"), Fault("bit-flipped config.json"):
        newest, previous = steps[-1], steps[-2]
        _damage(workdir / "checkpoints" / str(newest) / "state", "truncate")
        _damage(workdir / "config.json", "flip")
        run = _main(
            workdir, f"--config.train.num_steps={newest + 1}", "--config.log.sample_every_steps=0"
        )
        assert run.finish() == 0, run.output[-3000:]
        assert f"Checkpoint step {newest} in" in run.output and "unreadable" in run.output
        assert f"Resumed from checkpoint step {previous}" in run.output
        assert [p.name.split("_")[0] for p in (workdir / "checkpoints_unreadable").iterdir()] == [
            str(newest)
        ]  # Set aside, not deleted.
        assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == (
            newest + 1
        )  # Rewritten by the start.
        assert _steps(workdir)[-1] == newest + 1
        # A save the SIGKILL cut short left at most a temporary directory, now cleaned up.
        assert {p.name for p in (workdir / "checkpoints").iterdir()} == {
            str(s) for s in _steps(workdir)
        }


def test_sigterm_mid_sample_shard_stops_at_a_shard_boundary_and_eval_resumes(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    flags = ("--mode=eval", "--config.eval.num_images=1000", "--config.sample.batch_size=10")
    with Fault("SIGTERM mid-sample-shard (--mode=eval)"):
        run = _main(workdir, *flags)
        shards = workdir / "generated"
        deadline = time.monotonic() + 300
        while len(list(shards.glob("*/shards/batch_*.npz"))) < 3:
            assert run.proc.poll() is None and time.monotonic() < deadline, run.output[-3000:]
            time.sleep(0.02)
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish() == 0, run.output[-3000:]
        [run_dir] = shards.iterdir()
        done = len(list((run_dir / "shards").glob("batch_*.npz")))
        assert 3 <= done < 100 and not (run_dir / "samples.npz").exists()
        assert f"{done} finished batch shards are in" in _one_stop_line(run, "SIGTERM")
        assert not (workdir / "eval.json").exists()

        again = _main(workdir, *flags)
        assert again.finish() == 0, again.output[-3000:]
        [record] = json.loads((workdir / "eval.json").read_text())
        assert 0 <= record["class_accuracy"] <= 1
        with np.load(run_dir / "samples.npz") as z:
            assert z["arr_0"].shape == (1000, 8, 8, 1)


# ----------------------------------------------------------------------------------------------
# Damaged inputs: each start refuses before any compilation.
def _encode_for_cache(images):
    """A stand-in VAE encoder: (b, 8, 8, 1) digits -> moments (b, 4, 4, 8) (mean, logvar)."""
    b, h, w, c = images.shape
    mean = np.repeat(images.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4)), 4, -1)
    return np.concatenate([mean, np.full_like(mean, -2.0)], -1).astype(np.float32)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good stand-ins of every input file a run reads besides its workdir."""
    root = tmp_path_factory.mktemp("inputs")
    write_release_like_xar(root / "xar.npz")
    xar_convert.convert_file(str(root / "xar.npz"), str(root / "xar"))
    vae, inception = converted_golden_weights(root)
    fid.save_reference_stats(root / "stats.npz", np.zeros(4), np.eye(4))
    cfg = data_config.get_data_config("digits")
    cfg.split = "heldout"  # 360 images, one shard.
    latent_cache.cache_latents(
        cfg,
        _encode_for_cache,
        str(root / "cache"),
        batch_size=120,
        shard_size=1000,
        process_index=0,
        process_count=1,
    )
    return {
        "xar": root / "xar",
        "vae": root / "vae",
        "inception": root / "inception",
        "stats": root / "stats.npz",
        "cache": root / "cache",
    }


def _release_run(tmp, paths, mode):
    flags = [
        f"--config.weights={paths['xar']}",
        f"--config.latent.vae_checkpoint={paths['vae']}",
        f"--config.eval.inception_checkpoint={paths['inception']}",
        f"--config.eval.reference_stats={paths['stats']}",
        *RELEASE_MODEL_FLAGS,
        "--config.latent.num_classes=10",
        "--config.sample.batch_size=10",
        "--config.sample.num_images=10",
        "--config.eval.num_images=10",
    ]
    return _main(
        tmp / f"{mode}_work", f"--mode={mode}", *flags, config=RELEASE_CONFIG, env=main_env()
    )


def test_damaged_inputs_are_refused_in_a_few_lines_naming_file_and_remedy(
    tiny_run, inputs, tmp_path
):
    def damaged(name, how):
        copy = tmp_path / f"{name}_{how}"
        (shutil.copytree if inputs[name].is_dir() else shutil.copy)(inputs[name], copy)
        target = copy / "params" if name in ("xar", "vae", "inception") else copy
        if name == "cache":
            target = next(copy.rglob("*.array_record"))
        _damage(target, how)
        return {**inputs, name: copy}

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    _damage(workdir / "run.json", "truncate")
    bad_cache = damaged("cache", "flip")["cache"]
    latents = (
        "--config.data.source=latents",
        f"--config.data.cache_dir={bad_cache}",
        "--config.data.split=heldout",
        "--config.latent.tokenizer=kl16",
        "--config.latent.grid_size=4",
        "--config.latent.channels=4",
        "--config.entity.cell_size=2",
    )
    evaluate = [
        sys.executable,
        "-m",
        "xar_jax.evaluation.evaluate",
        "--images",
        str(tmp_path / "missing.npz"),
        "--reference",
        str(inputs["stats"]),
        "--inception",
        str(inputs["inception"]),
    ]
    # fault: (run, the file the refusal names, a piece of its remedy)
    cases = {
        "truncated run.json": (_main(workdir), workdir / "run.json", "move it away"),
        "bit-flipped latent-cache shard": (
            _main(tmp_path / "latents_work", *latents, env=main_env()),
            next(bad_cache.rglob("*.array_record")),
            "--config.data.allow_corrupt_records=True",
        ),
        "truncated converted xAR dir": (
            _release_run(tmp_path / "x", damaged("xar", "truncate"), "sample"),
            "xar_truncate",
            "convert it again",
        ),
        "truncated converted VAE dir": (
            _release_run(tmp_path / "v", damaged("vae", "truncate"), "sample"),
            "vae_truncate",
            "convert it again",
        ),
        "bit-flipped converted Inception dir": (
            _release_run(tmp_path / "i", damaged("inception", "flip"), "eval"),
            "inception_flip",
            "convert it again",
        ),
        "truncated reference statistics": (
            _release_run(tmp_path / "s", damaged("stats", "truncate"), "eval"),
            "stats_truncate",
            "VIRTUAL_imagenet256_labeled.npz",
        ),
        "evaluate CLI with a missing --images": (
            Run(evaluate, main_env()),
            "missing.npz",
            "no such file",
        ),
    }
    failures = []
    for name, (run, path, remedy) in cases.items():
        code = run.finish()
        error = run.output[run.output.find("error: ") :] if "error: " in run.output else ""
        MATRIX[name] = (
            code == 2
            and "Traceback" not in run.output
            and 0 < len(error.splitlines()) <= 4
            and str(path) in error
            and remedy.lower() in error.lower()
        )
        if not MATRIX[name]:
            failures.append(f"{name}: exit {code}\n{run.output[-2000:]}")
    assert not failures, "\n\n".join(failures)
    assert not (tmp_path / "x" / "sample_work" / "generated").exists()  # Refused before sampling.


def test_fault_matrix_counts(record_property):
    """Every fault tried must be survived; the counts go to the end of pytest's output (conftest's
    `pytest_terminal_summary`), the per-fault table to the captured output (-rA shows it)."""
    if not MATRIX:
        pytest.skip("the matrix is filled by this module's other tests; run the whole module")
    survived = sum(MATRIX.values())
    counts = (
        f"fault matrix: {len(MATRIX)} faults tried, {survived} survived "
        f"(CPU: {CPU_SECONDS['subprocesses']:.0f} s in the CLI runs, "
        f"{CPU_SECONDS['pytest']:.0f} s in pytest)"
    )
    record_property("summary", counts)
    print("\n" + counts)
    for name, ok in MATRIX.items():
        print(f"  {'survived' if ok else 'FAILED  '}  {name}")
    assert len(MATRIX) >= 12 and survived == len(MATRIX)
