"""Latent caching: record format, crash-safe resumable writing, multi-host shards, reading."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from conftest import REPO
from latent_cache_fakes import BATCH, SHARD_SIZE, digits_cfg, fake_encode, latents_cfg

from xar_jax.data import device, latent_cache, latent_format, latents, pipeline, sources
from xar_jax.data.sources import CorruptRecordError


def _cache(out, *, shard_size=SHARD_SIZE, process_index=0, process_count=1):
    """Caches the digits 'heldout' split with `fake_encode` into ``out``; returns the summary."""
    return latent_cache.cache_latents(
        digits_cfg(),
        fake_encode,
        str(out),
        batch_size=BATCH,
        shard_size=shard_size,
        process_index=process_index,
        process_count=process_count,
    )


def _all_records(split_directory):
    records = []
    for name in sorted(n for n in os.listdir(split_directory) if n.endswith(".array_record")):
        reader = ArrayRecordReader(os.path.join(split_directory, name))
        records += reader.read_all()
        reader.close()
    return records


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    """An uninterrupted single-process caching run."""
    out = tmp_path_factory.mktemp("reference")
    summary = _cache(out)
    assert summary["written"] == [0, 1, 2, 3]
    return out


def test_record_round_trip_and_damage_detection():
    moments = np.random.default_rng(0).standard_normal((4, 4, 8), dtype=np.float32)
    record = latent_format.encode_record(moments, 7, mirrored=True)
    decoded = latent_format.decode_record(record, mirrored=True)
    np.testing.assert_array_equal(decoded["moments"], moments)
    assert decoded["moments"].dtype == np.float32
    assert decoded["labels"] == 7 and decoded["labels"].dtype == np.int32
    half = latent_format.decode_record(
        latent_format.encode_record(moments, 7, mirrored=False, dtype="float16")
    )
    np.testing.assert_allclose(half["moments"], moments, rtol=1e-3, atol=1e-3)
    assert half["moments"].dtype == np.float32
    damaged = bytearray(record)
    damaged[-5] ^= 1
    for bad, reason in [
        (bytes(damaged), "checksum"),
        (record[:-4], "payload"),
        (b"XY" + record[2:], "magic"),
        (record[:10], "shorter"),
    ]:
        with pytest.raises(latent_format.RecordFormatError, match=reason):
            latent_format.decode_record(bad)
    with pytest.raises(latent_format.RecordFormatError, match="mirrored=True, expected False"):
        latent_format.decode_record(record, mirrored=False)


def test_cache_killed_midway_resumes_to_exactly_the_uninterrupted_result(tmp_path, reference_cache):
    out = tmp_path / "cache"
    # 2 encoder calls per batch, 4 batches in shard 0: the 11th encoder call dies inside shard 1.
    command = [
        sys.executable,
        "-m",
        "xar_jax.data.latent_cache",
        "--source=digits",
        "--split=heldout",
        f"--out_dir={out}",
        "--encoder=latent_cache_fakes:fake_encoder_factory",
        "--encoder_arg=exit_after=11",
        f"--batch_size={BATCH}",
        f"--shard_size={SHARD_SIZE}",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    assert subprocess.run(command, env=env, cwd=REPO, capture_output=True).returncode == 17

    directory = latent_format.split_dir(str(out), "heldout")
    names = sorted(os.listdir(directory))
    assert names == [
        "cache_spec.json",
        "latents-00000-of-00004.array_record",
        "latents-00001-of-00004.array_record.incomplete",
    ]
    with pytest.raises(FileNotFoundError, match=r"3 of 4 shards missing.*\n.*latent_cache"):
        next(pipeline.make_train_iterator(latents_cfg(out), global_batch_size=8))

    finished = os.stat(os.path.join(directory, names[1]))
    summary = _cache(out)
    assert summary["kept"] == [0] and summary["written"] == [1, 2, 3]
    again = os.stat(os.path.join(directory, names[1]))
    assert (again.st_ino, again.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)
    assert not any(n.endswith(".incomplete") for n in os.listdir(directory))
    reference = latent_format.split_dir(str(reference_cache), "heldout")
    assert _all_records(directory) == _all_records(reference)


def test_two_hosts_write_interleaved_shards_that_together_equal_one_host(tmp_path, reference_cache):
    for process_index in (0, 1):
        summary = _cache(tmp_path, process_index=process_index, process_count=2)
        assert summary["written"] == [process_index, process_index + 2]
    assert _all_records(latent_format.split_dir(str(tmp_path), "heldout")) == _all_records(
        latent_format.split_dir(str(reference_cache), "heldout")
    )


def test_resuming_with_other_settings_is_refused(reference_cache):
    with pytest.raises(ValueError, match="shard_size"):
        _cache(reference_cache, shard_size=50)


def test_cached_moments_are_read_back_with_a_random_flip_choice(reference_cache):
    images = sources.build_reader(digits_cfg(), "heldout")
    n = len(images)
    expected = {}
    for i in range(n):
        image = images.read(i)["images"][None]
        expected[fake_encode(image)[0].tobytes()] = (i, False)
        expected[fake_encode(image[:, :, ::-1])[0].tobytes()] = (i, True)
    it = pipeline.make_train_iterator(
        latents_cfg(reference_cache), global_batch_size=40, process_index=0, process_count=1
    )
    batches = [next(it) for _ in range(n // 40)]
    assert set(batches[0]) == {"moments", "labels"}
    assert (
        batches[0]["moments"].shape == (40, 4, 4, 8) and batches[0]["moments"].dtype == np.float32
    )
    seen = [expected[m.tobytes()] for b in batches for m in b["moments"]]
    assert sorted(i for i, _ in seen) == list(range(n))
    assert 0.4 < np.mean([flip for _, flip in seen]) < 0.6
    labels = np.concatenate([b["labels"] for b in batches])
    np.testing.assert_array_equal(labels, [images.read(i)["labels"] for i, _ in seen])


def test_host_sampled_latents_follow_the_cached_posterior(reference_cache):
    cfg = latents_cfg(reference_cache, latent_sampling="host")
    first = list(
        pipeline.make_eval_iterator(cfg, global_batch_size=40, process_index=0, process_count=1)
    )
    again = list(
        pipeline.make_eval_iterator(cfg, global_batch_size=40, process_index=0, process_count=1)
    )
    z = np.concatenate([b["latents"] for b in first])
    np.testing.assert_array_equal(z, np.concatenate([b["latents"] for b in again]))
    records = _all_records(latent_format.split_dir(str(reference_cache), "heldout"))[
        ::2
    ]  # unmirrored
    moments = np.stack([latent_format.decode_record(r, mirrored=False)["moments"] for r in records])
    mean, logvar = moments[..., :4], moments[..., 4:]
    noise = (z / latents.LATENT_SCALE - mean) / np.exp(0.5 * logvar)
    assert z.shape == (360, 4, 4, 4)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def test_device_sampling_matches_the_reference_formula_with_clamped_logvar():
    moments = np.concatenate([np.full((2, 2, 2, 3), 0.5), np.full((2, 2, 2, 3), 100.0)], -1)
    key = jax.random.key(0)
    z = latents.sample_latents(moments, key)
    noise = jax.random.normal(key, (2, 2, 2, 3), np.float32)
    np.testing.assert_allclose(z, (0.5 + np.exp(10.0) * noise) * 0.2325, rtol=1e-6)


def _rewrite_with_garbage(path, position):
    reader = ArrayRecordReader(path)
    records = reader.read_all()
    reader.close()
    records[position] = b"not a latent record " * 4
    writer = ArrayRecordWriter(path, latent_format.WRITER_OPTIONS)
    for record in records:
        writer.write(record)
    writer.close()


def test_corrupt_record_names_its_shard_and_index_or_is_skipped_and_counted(tmp_path):
    _cache(tmp_path)
    directory = latent_format.split_dir(str(tmp_path), "heldout")
    # Example 205 is example 5 of shard 2: records 10 (image) and 11 (mirror image).
    _rewrite_with_garbage(os.path.join(directory, "latents-00002-of-00004.array_record"), 10)
    with pytest.raises(
        CorruptRecordError,
        match=r"latents-00002-of-00004.array_record record 10 "
        r"\(example 205, mirrored=False\).*bad magic",
    ):
        list(
            pipeline.make_eval_iterator(
                latents_cfg(tmp_path), global_batch_size=40, process_index=0, process_count=1
            )
        )
    cfg = latents_cfg(tmp_path, allow_corrupt_records=True)
    batches = list(
        pipeline.make_eval_iterator(cfg, global_batch_size=40, process_index=0, process_count=1)
    )
    skipped = np.concatenate([b["skipped_records"] for b in batches])
    assert skipped.sum() == 1 and skipped[205] == 1
    moments = np.concatenate([b["moments"] for b in batches])
    np.testing.assert_array_equal(moments[205], moments[206])


def test_missing_cache_names_the_path_and_the_caching_command(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"No latent cache at .*heldout.*\n.*"
        r"python -m xar_jax.data.latent_cache --split=heldout",
    ):
        pipeline.make_train_iterator(latents_cfg(tmp_path), global_batch_size=8)


def test_local_data_parallel_runs_the_encoder_over_local_devices():
    shape = (2 * jax.local_device_count(), 8, 8, 1)
    images = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    encode = device.local_data_parallel(lambda x: x.reshape(x.shape[0], 4, 2, 4, 2, 1).mean((2, 4)))
    pooled = encode(images)
    assert isinstance(pooled, np.ndarray)
    np.testing.assert_allclose(pooled, fake_encode(images)[..., :1], rtol=1e-5, atol=1e-7)
