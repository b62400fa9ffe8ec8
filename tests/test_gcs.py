"""xar-jax's file I/O on gs:// against a local GCS emulator (tests/gcs_emulator.py).

Each client library has its own switch (xar_jax/gcs_env.py); these tests go through all of them:
etils epath/gcsfs (files, atomic writes), tensorstore (Orbax arrays), google-cloud-storage
(tensorboardX event files) and array_record (latent-cache shards, read natively from gs://).
"""

import os
import re
import subprocess
import sys
import uuid

import jax
import numpy as np
import pytest
from conftest import REPO, event_tags
from etils import epath
from latent_cache_fakes import BATCH, SHARD_SIZE, digits_cfg, fake_encode, latents_cfg

from xar_jax import checkpointing, fileio, gcs_env, metrics
from xar_jax.data import latent_cache, latent_format, pipeline


@pytest.fixture
def gcs_dir(gcs_bucket) -> epath.Path:
    """A fresh directory in the emulator's bucket for one test."""
    return epath.Path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}")


def _cache(out_dir, **kwargs):
    return latent_cache.cache_latents(
        digits_cfg(), fake_encode, str(out_dir), batch_size=BATCH, shard_size=SHARD_SIZE,
        process_index=0, process_count=1, **kwargs,
    )  # fmt: skip


def test_docs_list_every_emulator_variable():
    doc = (epath.Path(REPO) / "docs" / "tpu.md").read_text()
    section = doc[doc.index("Testing against a local GCS emulator\n") :]
    for name in gcs_env.emulator_environment("127.0.0.1:1"):
        assert f"`{name}`" in section, f"docs/tpu.md's emulator section lacks {name}"


def test_epath_writes_replaces_and_lists_objects(gcs_dir):
    target = gcs_dir / "sub" / "a.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("old")
    tmp = gcs_dir / "sub" / "a.txt.tmp"
    tmp.write_text("new")
    with pytest.raises(FileExistsError):  # rename never overwrites; replace does
        tmp.rename(target)
    tmp.replace(target)
    assert target.read_text() == "new" and not tmp.exists()
    assert [p.name for p in (gcs_dir / "sub").iterdir()] == ["a.txt"]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_atomic_write_replaces_the_target_and_leaves_no_temporary(where, tmp_path, gcs_dir):
    directory = epath.Path(tmp_path) if where == "local" else gcs_dir
    fileio.makedirs(directory / "d")
    target = directory / "d" / "settings.json"
    assert not fileio.exists(target)
    fileio.write_text(target, "first")
    fileio.write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    local = tmp_path / "shard.bin"
    local.write_bytes(b"\x00" * 3_000_000)  # more than one upload chunk
    fileio.upload_file(local, directory / "d" / "shard.bin")
    assert (directory / "d" / "shard.bin").read_bytes() == local.read_bytes()
    assert sorted(p.name for p in (directory / "d").iterdir()) == ["settings.json", "shard.bin"]


def test_checkpointer_saves_and_restores_state_and_iterator_on_gcs(gcs_dir):
    import grain

    state = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, "step": np.int32(7)}
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(it), next(it)
    ckpt = checkpointing.Checkpointer(str(gcs_dir / "checkpoints"), every_steps=1, max_to_keep=2)
    ckpt.save(7, state, it)
    ckpt.close()

    again = checkpointing.Checkpointer(str(gcs_dir / "checkpoints"), every_steps=1, max_to_keep=2)
    fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, step = again.restore_latest(abstract, fresh)
    again.close()
    assert step == 7 and next(fresh) == 2
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert int(restored["step"]) == 7


def test_tensorboard_events_are_written_to_gcs(gcs_dir):
    writer = metrics.TensorBoardWriter(str(gcs_dir / "tb"))
    writer.write_scalars(1, {"loss": 0.5})
    writer.write_images(1, {"samples": np.zeros((2, 4, 4, 3), np.float32)})
    writer.flush()
    writer.write_scalars(2, {"loss": 0.25})
    writer.close()
    assert event_tags(gcs_dir / "tb") == {"loss", "samples"}


def _batches(cache_dir, n=4):
    it = pipeline.make_train_iterator(
        latents_cfg(cache_dir), global_batch_size=40, process_index=0, process_count=1
    )
    return [next(it) for _ in range(n)]


def test_latent_cache_on_gcs_trains_like_a_local_one(tmp_path, gcs_dir):
    local, remote = tmp_path / "cache", gcs_dir / "cache"
    _cache(local)
    assert _cache(remote)["written"] == [0, 1, 2, 3]
    split = epath.Path(latent_format.split_dir(str(remote), "heldout"))
    assert sorted(p.name for p in split.iterdir()) == [
        "cache_spec.json",
        *(latent_format.shard_name(s, 4) for s in range(4)),
    ]
    for a, b in zip(_batches(local), _batches(remote), strict=True):
        np.testing.assert_array_equal(a["moments"], b["moments"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert _cache(remote)["kept"] == [0, 1, 2, 3]  # nothing redone


def test_latent_cache_killed_midway_on_gcs_resumes_to_the_complete_cache(tmp_path, gcs_dir):
    remote = gcs_dir / "killed"
    command = [
        sys.executable, "-m", "xar_jax.data.latent_cache", "--source=digits", "--split=heldout",
        f"--out_dir={remote}", "--encoder=latent_cache_fakes:fake_encoder_factory",
        "--encoder_arg=exit_after=11", f"--batch_size={BATCH}", f"--shard_size={SHARD_SIZE}",
    ]  # fmt: skip
    # The subprocess reaches the emulator through the variables the fixture exported.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    killed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == 17, killed.stderr[-2000:]
    split = epath.Path(latent_format.split_dir(str(remote), "heldout"))
    # Shard 1 died on local disk: nothing of it reached the bucket.
    names = sorted(p.name for p in split.iterdir())
    assert names == ["cache_spec.json", latent_format.shard_name(0, 4)]
    with pytest.raises(FileNotFoundError, match=r"3 of 4 shards missing"):
        latent_format.LatentCacheRecords(str(remote), "heldout")
    # A stray temporary object (an upload cut short before its move) is cleared on resume.
    (split / f"{latent_format.shard_name(1, 4)}.tmp-host-1-abc").write_bytes(b"partial")
    summary = _cache(remote)
    assert summary["kept"] == [0] and summary["written"] == [1, 2, 3]
    assert not any(re.search(r"\.tmp-|incomplete", p.name) for p in split.iterdir())
    local = tmp_path / "reference"
    _cache(local)
    reference = latent_format.LatentCacheRecords(str(local), "heldout")
    resumed = latent_format.LatentCacheRecords(str(remote), "heldout")
    for i in (0, 99, 100, 250, 359):
        for mirrored in (False, True):
            np.testing.assert_array_equal(
                resumed.read(i, mirrored)["moments"], reference.read(i, mirrored)["moments"]
            )


def test_missing_gcs_cache_names_the_path_and_the_caching_command(gcs_dir):
    with pytest.raises(FileNotFoundError, match=r"No latent cache at gs://.*heldout.*\n.*--split"):
        pipeline.make_train_iterator(latents_cfg(gcs_dir / "nothing"), global_batch_size=8)


_COMPILE_CACHE_SCRIPT = """
import sys
import jax, jax.numpy as jnp
from xar_jax.compile_cache import enable as enable_compile_cache
from xar_jax.train_config import base_config
config = base_config()
config.compile_cache_dir = sys.argv[1]
enable_compile_cache(config, "/unused")
print(float(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(4.0)).sum()))
"""


def test_compilation_cache_on_gcs_is_written_then_hit_by_the_next_process(gcs_dir):
    # A preempted job restarts on another VM: the cache must live in the bucket.
    runs = [
        subprocess.run(
            [sys.executable, "-c", _COMPILE_CACHE_SCRIPT, str(gcs_dir)],
            cwd=REPO,
            env={**os.environ, "JAX_LOG_COMPILES": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        for _ in range(2)
    ]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert runs[0].stdout == runs[1].stdout
    hit = "Persistent compilation cache hit for 'jit__lambda'"
    assert hit not in runs[0].stderr and hit in runs[1].stderr
    assert any(p.name.startswith("jit__lambda-") for p in gcs_dir.iterdir())
