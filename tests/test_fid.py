"""FID / IS arithmetic (`xar_jax.evaluation.fid`) and the streamed statistics commands."""

import json
import os

import numpy as np
import pytest
import scipy.linalg

from xar_jax.evaluation import evaluate, fid, image_sources, reference_stats
from xar_jax.evaluation.npz_io import write_npz_streaming

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "inception_fid_golden.npz")


def scipy_frechet_distance(mu1, sigma1, mu2, sigma2):
    """The original FID formula with SciPy's general matrix square root, in float64."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def gaussian_sample(seed, n=400, dim=24):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((n, dim)) @ mixing + rng.standard_normal(dim)


def mean_cov(x):
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_frechet_distance_of_two_gaussian_samples_matches_scipy():
    a, b = mean_cov(gaussian_sample(0)), mean_cov(gaussian_sample(1))
    want = scipy_frechet_distance(*a, *b)
    assert want > 1.0
    np.testing.assert_allclose(fid.frechet_distance(*a, *b), want, rtol=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    for n in (400, 10):  # 10 samples in 24 dimensions: a singular covariance
        mu, sigma = mean_cov(gaussian_sample(2, n=n))
        assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_rejects_mismatched_statistics():
    mu, sigma = mean_cov(gaussian_sample(0))
    with pytest.raises(ValueError, match="Feature dimensions differ"):
        fid.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(ValueError, match="mu must be \\(D,\\) and sigma \\(D, D\\)"):
        fid.frechet_distance(mu, sigma[:3], mu, sigma)


def test_streamed_statistics_equal_numpy_over_all_rows_and_merge_exactly():
    x = gaussian_sample(3, n=103) + 1e4  # a large offset: naive sums would lose digits
    mu, sigma = mean_cov(x)
    first, second = fid.FeatureStatistics(24), fid.FeatureStatistics(24)
    for chunk in np.array_split(x[:50], 3):
        first.add(chunk.astype(np.float32).astype(np.float64))
    for chunk in np.array_split(x[50:], 4):
        second.add(chunk)
    first.add(np.zeros((0, 24)))
    # Only x[:50] went through float32; compare against numpy on the same values.
    x_seen = np.concatenate([x[:50].astype(np.float32).astype(np.float64), x[50:]])
    merged = first.merge(second)
    assert merged.count == 103
    np.testing.assert_allclose(merged.mu, x_seen.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(merged.sigma, np.cov(x_seen, rowvar=False), rtol=1e-9, atol=1e-9)
    assert np.abs(merged.sigma - sigma).max() < 1e-2  # and the float32 rounding is all that differs


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    classes, n = 5, 200  # every split of 20 holds each class 4 times
    logits = np.full((n, 1008), -60.0)
    logits[np.arange(n), np.tile(np.arange(classes), n // classes)] = 0.0
    mean, std = fid.inception_score(logits, splits=10, shuffle=False)
    assert mean == pytest.approx(classes, rel=1e-9) and std < 1e-9
    mean_shuffled, _ = fid.inception_score(logits)  # torch-fidelity's default shuffle
    assert 4.5 < mean_shuffled <= classes


def test_inception_score_of_soft_predictions_with_uniform_marginal():
    # Each row puts 0.6 on its class and 0.1 on each of 4 others, classes balanced: the
    # marginal is uniform over 5 classes, so IS = exp(log 5 - H(row)).
    probs = np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    logits = np.stack([np.log(np.roll(probs, k)) for k in range(5)] * 20)
    entropy = -np.sum(probs * np.log(probs))
    mean, _ = fid.inception_score(logits, splits=4, shuffle=False)
    assert mean == pytest.approx(5 * np.exp(-entropy), rel=1e-12)
    assert fid.inception_score(np.zeros((20, 7)), splits=2)[0] == pytest.approx(1.0)


def test_reference_stats_files_round_trip_and_accept_adm_reference_batches(tmp_path):
    mu, sigma = mean_cov(gaussian_sample(4))
    path = tmp_path / "stats.npz"
    fid.save_reference_stats(path, mu, sigma)
    loaded = fid.load_reference_stats(path)
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)
    with pytest.raises(FileExistsError):
        fid.save_reference_stats(path, mu, sigma)
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu.astype(np.float32), sigma=sigma)
    assert fid.load_reference_stats(adm)[0].dtype == np.float64
    images_only = tmp_path / "images.npz"
    np.savez(images_only, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"no \['mu', 'sigma'\].*holds \['arr_0'\]"):
        fid.load_reference_stats(images_only)


@pytest.fixture(scope="module")
def golden_inception(tmp_path_factory):
    """The golden Inception weights as a torch-named .npz (the CLIs accept it like the .pth), and
    11 images whose features torch-fidelity computed: the 3 golden 64x80 images, repeated."""
    from conftest import rebuild_golden_state_dict

    with np.load(GOLDEN) as golden:
        state, _ = rebuild_golden_state_dict(golden)
        tile = np.arange(11) % 3
        images = np.transpose(golden["images_a_uint8"], (0, 2, 3, 1))[tile]
        pool3, logits = golden["pool3_a"][tile], golden["logits_unbiased_a"][tile]
    directory = tmp_path_factory.mktemp("golden_inception")
    np.savez(directory / "weights.npz", **state)
    write_npz_streaming(directory / "samples.npz", "arr_0", images.shape, np.uint8, [images])
    return str(directory / "weights.npz"), str(directory / "samples.npz"), pool3, logits


@pytest.fixture()
def single_blas_thread():
    """The suite runs two workers on two cores: oversubscribed BLAS threads make the 2048x2048
    eigendecompositions of FID several times slower, so each test uses one."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.mark.usefixtures("single_blas_thread")
def test_reference_stats_and_evaluate_commands_match_torch_fidelity_features(
    golden_inception, tmp_path
):
    weights, samples, pool3, logits = golden_inception
    stats_path, metrics_path = tmp_path / "stats.npz", tmp_path / "metrics.json"
    common = ["--images", samples, "--inception", weights, "--batch_size", "4"]  # 4 + 4 + 3 padded
    reference_stats.main([*common, "--out", str(stats_path)])
    mu, sigma = fid.load_reference_stats(stats_path)
    want_mu, want_sigma = mean_cov(pool3.astype(np.float64))
    np.testing.assert_allclose(mu, want_mu, rtol=1e-4, atol=1e-6 * np.abs(want_mu).max())
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-3, atol=1e-4 * np.abs(want_sigma).max())

    metrics = evaluate.main([*common, "--reference", str(stats_path), "--out", str(metrics_path)])
    assert metrics["num_images"] == 11
    assert abs(metrics["fid"]) < 1e-9 * np.trace(sigma)  # the set against its own statistics
    assert metrics["inception_score"] == pytest.approx(fid.inception_score(logits)[0], rel=1e-4)
    assert json.loads(metrics_path.read_text()) == metrics


def test_reference_stats_command_refuses_an_existing_output(tmp_path, capsys):
    out = tmp_path / "stats.npz"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit):
        reference_stats.main(["--images", str(tmp_path), "--inception", "x", "--out", str(out)])
    assert "never overwritten" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_directory_source_center_crops_and_reads_ranges(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(6)
    for i, size in enumerate([(40, 30), (30, 50), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    source = image_sources.open_images(str(tmp_path), center_crop=16)
    assert len(source) == 3 and source.read(1, 3).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="pass center_crop"):
        image_sources.open_images(str(tmp_path)).read(0, 3)
    big = Image.fromarray(np.full((64, 96, 3), 200, np.uint8))
    assert image_sources.adm_center_crop(big, 16).shape == (16, 16, 3)


def test_tfds_source_reads_and_center_crops_a_split():
    tfds = pytest.importorskip("tensorflow_datasets")  # a runtime dependency of xar-jax

    with tfds.testing.mock_data(num_examples=3):
        source = image_sources.TfdsImages("imagenet2012", "validation", center_crop=8)
        assert len(source) == 3
        batch = source.read(1, 5)
    assert batch.shape == (2, 8, 8, 3) and batch.dtype == np.uint8


def test_process_batches_split_images_without_gaps_and_in_step():
    class Counting:
        def __len__(self):
            return 11

        def read(self, start, stop):
            return np.arange(start, stop, dtype=np.uint8)[:, None, None, None].repeat(3, -1)

    seen, lengths = [], []
    for p in range(3):
        batches = list(image_sources.iter_process_batches(Counting(), 2, p, 3))
        lengths.append(len(batches))
        seen += [int(v) for b in batches if b is not None for v in b[:, 0, 0, 0]]
    assert seen == list(range(11))
    assert lengths == [image_sources.num_process_batches(11, 2, 3)] * 3 == [2, 2, 2]
