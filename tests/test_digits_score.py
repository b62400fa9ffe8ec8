"""The download-free digits quality score (`xar_jax.evaluation.digits_score`)."""

import numpy as np
import pytest

from xar_jax.data.digits import load_digits_split
from xar_jax.evaluation import digits_score


@pytest.fixture(scope="module")
def real_digits():
    """300 training digits: real images the scorer's classifier never saw (it trains on heldout)."""
    images, labels = load_digits_split("train")
    index = np.random.default_rng(0).permutation(len(labels))[:300]
    return images[index], labels[index]


def test_real_digits_score_high_accuracy_and_a_small_distance(real_digits):
    scores = digits_score.digits_quality(*real_digits)
    assert scores["class_accuracy"] > 0.85
    assert 0 <= scores["frechet_distance"] < 2.0


def test_noise_scores_chance_accuracy_and_a_large_distance(real_digits):
    noise = np.random.default_rng(1).uniform(-1, 1, real_digits[0].shape)
    scores = digits_score.digits_quality(noise, real_digits[1])
    assert scores["class_accuracy"] < 0.3
    assert scores["frechet_distance"] > 50.0


def test_scores_improve_monotonically_with_image_quality(real_digits):
    images, labels = real_digits
    noise = np.random.default_rng(2).standard_normal(images.shape)
    scores = [digits_score.digits_quality(images + std * noise, labels) for std in (0.0, 0.5, 1.0)]
    accuracy = [s["class_accuracy"] for s in scores]
    distance = [s["frechet_distance"] for s in scores]
    assert accuracy[0] > accuracy[1] > accuracy[2]
    assert distance[0] < distance[1] < distance[2]


def test_samples_of_the_wrong_class_lose_accuracy_but_not_distance(real_digits):
    images, labels = real_digits
    right = digits_score.digits_quality(images, labels)
    wrong = digits_score.digits_quality(images, (labels + 1) % 10)
    assert wrong["class_accuracy"] < 0.1
    assert wrong["frechet_distance"] == pytest.approx(right["frechet_distance"])


def test_scorer_training_is_deterministic():
    first = digits_score.get_scorer()
    digits_score.get_scorer.cache_clear()
    second = digits_score.get_scorer()
    np.testing.assert_array_equal(first.hidden_w, second.hidden_w)
    np.testing.assert_array_equal(first.ref_sigma, second.ref_sigma)


def test_bad_inputs_are_named(real_digits):
    images, labels = real_digits
    with pytest.raises(ValueError, match=r"samples must be \(B >= 2, 8, 8, 1\)"):
        digits_score.digits_quality(images[:, :4], labels)
    with pytest.raises(ValueError, match="labels must be in \\[0, 10\\)"):
        digits_score.digits_quality(images, labels + 5)
    with pytest.raises(ValueError, match="labels must be integers of shape \\(300,\\)"):
        digits_score.digits_quality(images, labels[:10])
    with pytest.raises(ValueError, match="NaN"):
        digits_score.digits_quality(np.full_like(images, np.nan), labels)
