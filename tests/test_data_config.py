"""The data config: defaults that validate; errors name the field and the allowed values."""

import pytest

from xar_jax.data import config as config_lib


@pytest.mark.parametrize("source", config_lib.SOURCES)
def test_defaults_of_every_source_validate(source):
    cfg = config_lib.get_data_config(source)
    if source == "latents":
        cfg.cache_dir = "/some/cache"
    config_lib.validate_data_config(cfg)
    assert cfg.source == source
    assert cfg.random_flip == (source != "digits")


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("source", "cifar", "digits | imagenet | latents"),
        ("split", "test", "train | heldout | all"),
        ("image_size", 250, "multiple of 16"),
        ("image_decoder", "cv2", "pil | tfds"),
        ("latent_sampling", "both", "device | host"),
        ("cache_dtype", "bfloat16", "float32 | float16"),
        ("num_workers", -1, "integer >= 0"),
        ("shuffle_seed", 2**40, r"\[0, 2\*\*32\)"),
        ("shuffle_seed", -2, r"-1 \(the run's seed\) or an integer in \[0, 2\*\*32\)"),
        ("device_prefetch", -1, "integer >= 0"),
    ],
)
def test_a_bad_value_is_reported_with_its_field_and_the_allowed_values(field, value, allowed):
    cfg = config_lib.get_data_config("digits")
    with cfg.unlocked():
        cfg[field] = value
    with pytest.raises(ValueError, match=rf"'{field}'={value!r}.*allowed: .*{allowed}"):
        config_lib.validate_data_config(cfg)


def test_latents_without_a_cache_dir_say_how_to_make_one():
    with pytest.raises(ValueError, match="'cache_dir'.*python -m xar_jax.data.latent_cache"):
        config_lib.validate_data_config(config_lib.get_data_config("latents"))


def test_unknown_source_for_defaults_is_refused():
    with pytest.raises(ValueError, match="source='cifar'"):
        config_lib.get_data_config("cifar")
