"""Resumable class-balanced sample writing (`xar_jax.evaluation.sample_writer`) and `npz_io`."""

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from xar_jax.evaluation import npz_io, sample_writer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 30 images of 3 classes in batches of 7: five batches, the last one holding 2 real images.
PLAN = dict(num_images=30, num_classes=3, batch_size=7, seed=11)


def fake_generator(labels, key):
    """Random 4x4 RGB images that depend on the key; pixel (0, 0, 0) carries the label."""
    images = jax.random.randint(key, (len(labels), 4, 4, 3), 0, 250, dtype=jnp.int32)
    return np.asarray(images.at[:, 0, 0, 0].set(jnp.asarray(labels)), np.uint8)


class CountingGenerator:
    """Wraps `fake_generator`; counts calls and can fail on a given call."""

    def __init__(self, fail_on_call=None, kill=False):
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.kill = kill

    def __call__(self, labels, key):
        self.calls += 1
        if self.calls == self.fail_on_call:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("simulated preemption")
        return fake_generator(labels, key)


def load_samples(path):
    with np.load(path) as data:
        return data["arr_0"], data["labels"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run: (images, labels)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    path = sample_writer.write_samples(fake_generator, str(out), progress=False, **PLAN)
    return load_samples(path)


def test_balanced_labels_have_exact_counts_in_a_seeded_order():
    labels = sample_writer.balanced_labels(50_000, 1000, seed=0)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels, minlength=1000), np.full(1000, 50))
    np.testing.assert_array_equal(labels, sample_writer.balanced_labels(50_000, 1000, seed=0))
    assert not np.array_equal(labels, sample_writer.balanced_labels(50_000, 1000, seed=1))
    assert not np.all(labels[:-1] <= labels[1:])  # shuffled, so batches mix classes


def test_balanced_labels_refuse_uneven_counts_unless_allowed():
    with pytest.raises(ValueError, match="num_images=10 is not a multiple of num_classes=3"):
        sample_writer.balanced_labels(10, 3, seed=0)
    counts = np.bincount(sample_writer.balanced_labels(10, 3, seed=0, allow_uneven=True))
    np.testing.assert_array_equal(counts, [4, 3, 3])


def test_uninterrupted_run_writes_a_complete_balanced_adm_npz(reference):
    images, labels = reference
    assert images.shape == (30, 4, 4, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [10, 10, 10])
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels)  # image i was generated for label i
    assert len({images[i].tobytes() for i in range(30)}) == 30  # no duplicated batch
    np.testing.assert_array_equal(labels, sample_writer.balanced_labels(30, 3, seed=11))


def test_run_interrupted_by_an_error_resumes_to_the_identical_file(reference, tmp_path):
    failing = CountingGenerator(fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        sample_writer.write_samples(failing, str(tmp_path), progress=False, **PLAN)
    assert not os.path.exists(tmp_path / "samples.npz")
    assert len(os.listdir(tmp_path / "shards")) == 2

    resumed = CountingGenerator()
    path = sample_writer.write_samples(resumed, str(tmp_path), progress=False, **PLAN)
    assert resumed.calls == 3  # only the unfinished batches ran again
    for got, want in zip(load_samples(path), reference, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not os.path.exists(tmp_path / "shards")


def test_run_killed_with_sigkill_resumes_to_the_identical_file(reference, tmp_path):
    script = (
        "import sys; sys.path[:0] = [{root!r}, {tests!r}]\n"
        "import test_sample_writer as t\n"
        "from xar_jax.evaluation import sample_writer\n"
        "sample_writer.write_samples(t.CountingGenerator(fail_on_call=4, kill=True), {out!r},"
        " progress=False, **t.PLAN)\n"
    ).format(root=REPO_ROOT, tests=os.path.join(REPO_ROOT, "tests"), out=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert sorted(os.listdir(tmp_path / "shards")) == [f"batch_00000{i}.npz" for i in range(3)]
    # A write cut short by the kill leaves only a temporary file, which must not count as a batch.
    (tmp_path / "shards" / "batch_000003.npz.tmp-host-123-abc").write_bytes(b"partial")

    path = sample_writer.write_samples(fake_generator, str(tmp_path), progress=False, **PLAN)
    for got, want in zip(load_samples(path), reference, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not any(".tmp-" in p.name for p in tmp_path.rglob("*"))


def test_two_processes_together_write_the_single_process_file(reference, tmp_path):
    calls = {0: CountingGenerator(), 1: CountingGenerator()}
    common = dict(process_count=2, barrier=lambda: None, progress=False, **PLAN)
    out = str(tmp_path)
    assert sample_writer.write_samples(calls[1], out, process_index=1, **common) is None
    assert not os.path.exists(tmp_path / "samples.npz")  # only process 0 assembles
    path = sample_writer.write_samples(calls[0], out, process_index=0, **common)
    assert (calls[0].calls, calls[1].calls) == (3, 2)  # batches 0, 2, 4 and 1, 3
    for got, want in zip(load_samples(path), reference, strict=True):
        np.testing.assert_array_equal(got, want)


def test_two_processes_write_to_gs_and_the_interrupted_one_resumes(reference, gcs_bucket):
    """Shards and samples.npz on gs:// (the GCS emulator): process 1 fails in its second batch, a
    cut-short write leaves a temporary object, and the rerun generates only what is missing."""
    import uuid

    from xar_jax import fileio

    out = f"{gcs_bucket}/writer-{uuid.uuid4().hex[:8]}"
    common = dict(process_count=2, barrier=lambda: None, progress=False, **PLAN)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        sample_writer.write_samples(
            CountingGenerator(fail_on_call=2), out, process_index=1, **common
        )
    fileio.write_bytes(f"{out}/shards/batch_000003.npz.tmp-host-123-abc", b"partial")
    first = CountingGenerator()
    with pytest.raises(RuntimeError, match="1 batch shards are missing \\(first: \\[3\\]\\)"):
        sample_writer.write_samples(first, out, process_index=0, **common)
    rerun, last = CountingGenerator(), CountingGenerator()
    assert sample_writer.write_samples(rerun, out, process_index=1, **common) is None
    path = sample_writer.write_samples(last, out, process_index=0, **common)
    assert (first.calls, rerun.calls, last.calls) == (3, 1, 0)  # 0, 2, 4; then only 3; none
    assert path == f"{out}/samples.npz"
    with fileio.as_path(path).open("rb") as f, np.load(f) as data:
        np.testing.assert_array_equal(data["arr_0"], reference[0])
        np.testing.assert_array_equal(data["labels"], reference[1])
    fileio.forget_listings(out)
    assert sorted(fileio.list_names(out)) == ["plan.json", "samples.npz"]  # shards, tmp: gone


def test_restart_with_a_different_plan_is_refused_before_generating(tmp_path):
    sample_writer.write_samples(fake_generator, str(tmp_path), progress=False, **PLAN)
    generator = CountingGenerator()
    with pytest.raises(ValueError, match="different plan.*seed"):
        sample_writer.write_samples(
            generator, str(tmp_path), progress=False, **{**PLAN, "seed": 12}
        )
    with pytest.raises(ValueError, match="different plan.*key_data"):
        key = jax.random.key(5)
        sample_writer.write_samples(generator, str(tmp_path), key=key, progress=False, **PLAN)
    assert generator.calls == 0


def test_generator_output_of_the_wrong_kind_is_named_in_the_error(tmp_path):
    def float_generator(labels, key):
        return np.zeros((len(labels), 4, 4, 3), np.float32)

    with pytest.raises(ValueError, match="must return uint8 images of shape \\(7, H, W, 3\\)"):
        sample_writer.write_samples(float_generator, str(tmp_path), progress=False, **PLAN)


def test_png_dump_holds_the_same_images(reference, tmp_path):
    png_dir = tmp_path / "png"
    sample_writer.write_samples(
        fake_generator, str(tmp_path / "run"), png_dir=str(png_dir), progress=False, **PLAN
    )
    names = sorted(os.listdir(png_dir))
    assert names == [f"{i:06d}.png" for i in range(30)]
    np.testing.assert_array_equal(np.asarray(Image.open(png_dir / names[29])), reference[0][29])


def test_to_uint8_rounds_and_clips():
    x = np.array([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0])
    np.testing.assert_array_equal(sample_writer.to_uint8(x), [0, 0, 128, 255, 255, 255])


def test_npz_reader_reads_row_ranges_of_streamed_and_numpy_files(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (10, 3, 2, 3), dtype=np.uint8)
    streamed, saved = tmp_path / "streamed.npz", tmp_path / "saved.npz"
    chunks = [data[:4], data[4:9], data[9:]]
    npz_io.write_npz_streaming(
        streamed, "arr_0", data.shape, np.uint8, chunks, {"labels": data[:, 0, 0, 0]}
    )
    np.savez_compressed(saved, arr_0=data)
    with np.load(streamed) as loaded:
        np.testing.assert_array_equal(loaded["arr_0"], data)
        np.testing.assert_array_equal(loaded["labels"], data[:, 0, 0, 0])
    for path in (streamed, saved):
        with npz_io.NpzArrayReader(path) as reader:
            assert len(reader) == 10
            np.testing.assert_array_equal(reader.read(2, 5), data[2:5])
            np.testing.assert_array_equal(reader.read(8, 99), data[8:])
            np.testing.assert_array_equal(reader.read(0, 1), data[:1])  # seeking backwards


def test_npz_writer_with_missing_rows_leaves_no_file(tmp_path):
    path = tmp_path / "out.npz"
    with pytest.raises(ValueError, match="hold 4 rows, expected 5"):
        npz_io.write_npz_streaming(path, "arr_0", (5, 2), np.uint8, [np.zeros((4, 2), np.uint8)])
    assert os.listdir(tmp_path) == []
