"""The Grain pipeline: shapes, process sharding, shuffling, determinism and exact resumption."""

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xar_jax.data import config as config_lib
from xar_jax.data import device, digits, pipeline


class IndexedRecords:
    """N examples whose label is their index and whose image is left-right asymmetric."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = np.zeros((8, 8, 1), np.float32)
        image[:, 0] = (
            i + 1
        ) / self.n  # the left column identifies the example; flips move it right
        return {"images": image, "labels": np.int32(i)}


def _cfg(**overrides):
    cfg = config_lib.get_data_config("digits")
    cfg.update(overrides)
    return cfg


def _take(it, k):
    return [next(it) for _ in range(k)]


def _labels(batches):
    return np.concatenate([b["labels"] for b in batches])


def test_digits_train_batches_have_the_contract_shapes_and_range():
    batch = next(
        pipeline.make_train_iterator(_cfg(), global_batch_size=32, process_index=0, process_count=1)
    )
    assert set(batch) == {"images", "labels"}
    assert batch["images"].shape == (32, 8, 8, 1) and batch["images"].dtype == np.float32
    assert batch["labels"].shape == (32,) and batch["labels"].dtype == np.int32
    assert batch["images"].min() >= -1.0 and batch["images"].max() <= 1.0
    # The embedded dataset ships inside scikit-learn: both splits exist, disjoint, ten classes.
    assert pipeline.dataset_size(_cfg()) + pipeline.dataset_size(_cfg(), "heldout") == 1797
    assert set(digits.load_digits_split("heldout")[1]) == set(range(10))


def test_two_processes_read_disjoint_shares_whose_union_is_the_dataset():
    n, global_batch = 100, 20
    records = IndexedRecords(n)
    shares = [
        _labels(
            _take(
                pipeline.make_train_iterator(
                    _cfg(),
                    global_batch_size=global_batch,
                    process_index=p,
                    process_count=2,
                    seed=7,
                    records=records,
                ),
                n // global_batch,
            )
        )
        for p in (0, 1)
    ]
    assert all(len(s) == n // 2 for s in shares)
    assert not set(shares[0]) & set(shares[1])
    assert sorted(np.concatenate(shares)) == list(range(n))
    # Eval: process i reads i, i+2, ...; both yield the same number of (padded) batches.
    evals = [
        list(
            pipeline.make_eval_iterator(
                _cfg(),
                global_batch_size=16,
                process_index=p,
                process_count=2,
                records=IndexedRecords(45),
            )
        )
        for p in (0, 1)
    ]
    assert len(evals[0]) == len(evals[1]) == 3  # ceil(ceil(45 / 2) / 8)
    real = [_labels(e)[np.concatenate([b["mask"] for b in e])] for e in evals]
    np.testing.assert_array_equal(real[0], np.arange(0, 45, 2))
    np.testing.assert_array_equal(real[1], np.arange(1, 45, 2))


def test_every_epoch_is_a_fresh_global_permutation_and_the_seed_fixes_it():
    n = 64
    make = lambda seed: pipeline.make_train_iterator(
        _cfg(),
        global_batch_size=16,
        process_index=0,
        process_count=1,
        seed=seed,
        records=IndexedRecords(n),
    )
    epochs = _labels(_take(make(3), 2 * n // 16)).reshape(2, n)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(n))
    np.testing.assert_array_equal(_labels(_take(make(3), n // 16)), epochs[0])
    assert not np.array_equal(_labels(_take(make(4), n // 16)), epochs[0])


def test_data_shuffle_seed_orders_the_data_and_minus_one_follows_the_run_seed():
    n = 64

    def first_epoch(run_seed, **overrides):
        it = pipeline.make_train_iterator(
            _cfg(**overrides),
            global_batch_size=16,
            process_index=0,
            process_count=1,
            seed=run_seed,
            records=IndexedRecords(n),
        )
        return _labels(_take(it, n // 16))

    assert _cfg().shuffle_seed == config_lib.FOLLOW_RUN_SEED == -1
    by_shuffle_seed = first_epoch(3, shuffle_seed=11)
    # data.shuffle_seed decides the order, whatever the run's seed; a different one reorders.
    np.testing.assert_array_equal(first_epoch(4, shuffle_seed=11), by_shuffle_seed)
    np.testing.assert_array_equal(first_epoch(None, shuffle_seed=11), by_shuffle_seed)
    assert not np.array_equal(first_epoch(3, shuffle_seed=12), by_shuffle_seed)
    # -1 (the default): the run's seed decides, 0 without one.
    np.testing.assert_array_equal(first_epoch(11), by_shuffle_seed)
    assert not np.array_equal(first_epoch(3), by_shuffle_seed)
    np.testing.assert_array_equal(first_epoch(None), first_epoch(7, shuffle_seed=0))


def test_random_flip_mirrors_about_half_of_the_images():
    n = 200
    batches = _take(
        pipeline.make_train_iterator(
            _cfg(random_flip=True),
            global_batch_size=50,
            process_index=0,
            process_count=1,
            records=IndexedRecords(n),
        ),
        4,
    )
    images, labels = np.concatenate([b["images"] for b in batches]), _labels(batches)
    flipped = images[:, 0, -1, 0] != 0
    value = ((labels + 1) / n).astype(np.float32)[:, None]
    np.testing.assert_array_equal(images[~flipped][:, :, 0, 0], np.repeat(value[~flipped], 8, 1))
    np.testing.assert_array_equal(images[flipped][:, :, -1, 0], np.repeat(value[flipped], 8, 1))
    assert 60 < flipped.sum() < 140


def _save_and_restore(tmp_path, make_iterator, k):
    """Saves after k batches as the trainer does, restores into a fresh iterator.

    Returns the k consumed batches, then the next batch of the original and of the restored one.
    """
    it = make_iterator()
    consumed = _take(it, k)
    state = {"step": np.asarray(k, np.int32)}
    with ocp.CheckpointManager(
        tmp_path, options=ocp.CheckpointManagerOptions(max_to_keep=2)
    ) as mngr:
        mngr.save(
            k,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)
            ),
        )
        mngr.wait_until_finished()
        expected = next(it)
        resumed = make_iterator()
        restored = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state),
                data=grain.checkpoint.CheckpointRestore(resumed),
            ),
        )
    assert int(restored["state"]["step"]) == k
    return consumed, expected, next(resumed)


def _assert_same_batch(a, b):
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_restored_iterator_yields_exactly_the_next_batch(tmp_path):
    # 50 batches of 32 cross the first epoch (1437 examples): the reshuffle is restored too.
    make = lambda: pipeline.make_train_iterator(
        _cfg(random_flip=True), global_batch_size=32, seed=1
    )
    _, expected, resumed = _save_and_restore(tmp_path, make, 50)
    _assert_same_batch(expected, resumed)


def test_worker_processes_give_the_same_batches_and_resume_exactly(tmp_path):
    reference = _take(
        pipeline.make_train_iterator(_cfg(random_flip=True), global_batch_size=32, seed=1), 6
    )
    cfg = _cfg(random_flip=True, num_workers=2, worker_buffer_size=1)
    make = lambda: pipeline.make_train_iterator(cfg, global_batch_size=32, seed=1)
    consumed, expected, resumed = _save_and_restore(tmp_path, make, 5)
    for a, b in zip(consumed + [expected, resumed], reference + reference[-1:], strict=True):
        _assert_same_batch(a, b)


def test_device_prefetch_yields_global_arrays_and_checkpoints_the_consumed_position(tmp_path):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batch = 8 * len(jax.devices())
    host = _take(pipeline.make_train_iterator(_cfg(), global_batch_size=batch, seed=2), 4)
    make = lambda: pipeline.make_train_iterator(
        _cfg(device_prefetch=2), global_batch_size=batch, seed=2, sharding=sharding
    )
    on_device = _take(make(), 2)
    assert isinstance(on_device[0]["images"], jax.Array)
    assert on_device[0]["images"].sharding.is_equivalent_to(sharding, 4)
    _assert_same_batch(on_device[1], host[1])
    # The prefetch thread runs ahead, but the saved position is that of the consumed batches.
    _, expected, resumed = _save_and_restore(tmp_path, make, 3)
    _assert_same_batch(expected, host[3])
    _assert_same_batch(resumed, host[3])
    global_batch = device.to_global_batch(host[0], sharding)
    np.testing.assert_array_equal(np.asarray(global_batch["labels"]), host[0]["labels"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(global_batch_size=30, process_count=4, process_index=0),
            "divisible by process_count=4",
        ),
        (dict(global_batch_size=32, process_count=2, process_index=2), r"process_index=2 must lie"),
        (dict(global_batch_size=4096), "fewer than global_batch_size=4096"),
    ],
)
def test_bad_batch_or_process_arguments_fail_before_reading(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipeline.make_train_iterator(_cfg(), **kwargs)
