"""The input-pipeline configuration: every field, its default, and the checks run before reading.

The trainer's config holds this as ``config.data``; ``configs/demo.py`` uses the defaults (digits),
ImageNet configs start from ``get_data_config('latents')`` (the paper's way: cached VAE moments) or
``get_data_config('imagenet')`` (raw images, e.g. for caching or for models without a VAE).
"""

from __future__ import annotations

import ml_collections

from xar_jax.errors import ConfigError

SOURCES = ("digits", "imagenet", "latents")
IMAGE_DECODERS = ("pil", "tfds")
LATENT_SAMPLING = ("device", "host")
CACHE_DTYPES = ("float32", "float16")
# `shuffle_seed` value meaning "the run's seed" (see get_data_config).
FOLLOW_RUN_SEED = -1
DIGITS_SPLITS = ("train", "heldout", "all")

_DEFAULT_SPLITS = {
    "digits": ("train", "heldout"),
    "imagenet": ("train", "validation"),
    "latents": ("train", "validation"),
}


def get_data_config(source: str = "digits") -> ml_collections.ConfigDict:
    """The data config with defaults suited to ``source`` ('digits' | 'imagenet' | 'latents')."""
    if source not in SOURCES:
        raise ConfigError(
            f"get_data_config: source={source!r} is not allowed; choose one of {SOURCES}."
        )
    train_split, eval_split = _DEFAULT_SPLITS[source]
    c = ml_collections.ConfigDict()
    # Where examples come from: 'digits' (8x8 digits shipped with scikit-learn, no download),
    # 'imagenet' (TFDS imagenet2012 prepared as ArrayRecord) or 'latents' (VAE moments cached by
    # `python -m xar_jax.data.latent_cache`). Only the source differs; the Grain pipeline is shared.
    c.source = source
    # Training split. digits: 'train' | 'heldout' | 'all'; imagenet: any TFDS split ('train',
    # 'train[:99%]'); latents: the split that was cached (a sub-directory of cache_dir).
    c.split = train_split
    # Held-out split read by make_eval_iterator (single pass, no shuffle, no flip).
    c.eval_split = eval_split
    # TFDS data directory holding imagenet2012/<version>/ ('' = $TFDS_DATA_DIR or
    # ~/tensorflow_datasets). On pods: a gcsfuse mount of the bucket (see docs/data.md).
    c.data_dir = ""
    # TFDS dataset name, optionally with version ('imagenet2012:5.1.0').
    c.tfds_name = "imagenet2012"
    # JPEG decoding: 'pil' decodes the raw JPEG bytes with PIL exactly as the reference (ADM)
    # does; 'tfds' lets TFDS decode (OpenCV when installed: faster, may differ by JPEG rounding).
    c.image_decoder = "pil"
    # Side of the square training image (ADM center crop): 256 or 512 for ImageNet. A multiple of
    # 16 (the VAE's downsampling). Ignored by 'digits' (always 8x8) and 'latents' (cached).
    c.image_size = 256
    # Root of the latent cache: shards of split S live in <cache_dir>/<S>/. Needed for 'latents'.
    c.cache_dir = ""
    # Element type written when caching latents: 'float32' (exact) or 'float16' (half the disk).
    c.cache_dtype = "float32"
    # Where the latent z = (mean + exp(logvar/2) * n) * 0.2325 is drawn: 'device' (batches carry
    # 'moments'; the train step samples, see xar_jax.data.latents.sample_latents) or 'host'
    # (batches carry 'latents', drawn by the input workers).
    c.latent_sampling = "device"
    # Random horizontal flip with probability 1/2 (latents: picks the moments of the flipped image).
    # Off for digits: a mirrored digit is not the same digit.
    c.random_flip = source != "digits"
    # Seed of the global shuffle (reshuffled every epoch), the flips and host-side latent noise.
    # -1: the run's top-level `seed` (what train.py passes to the pipeline as `seed`; 0 without
    # one), so changing the run seed changes the data order too. >= 0: this seed, whatever the
    # run seed (e.g. fixed data order across init seeds). The same on every host.
    c.shuffle_seed = FOLLOW_RUN_SEED
    # Grain worker processes per host (0 = decode in the training process's threads).
    c.num_workers = 0
    # Batches each worker process prepares ahead.
    c.worker_buffer_size = 2
    # Threads that assemble batches inside each process (Grain ReadOptions.num_threads).
    c.read_threads = 4
    # Batches kept ready per process (Grain ReadOptions.prefetch_buffer_size).
    c.prefetch_buffer = 4
    # Batches placed on device ahead of the train step by a background thread, when the iterator
    # is given a sharding; 0 = placed by the caller's next(), between the steps' dispatches (host
    # batches are still prepared ahead). 0 by default: copies at random moments land inside the
    # device memory the step just freed and fragment it, until a step cannot allocate its
    # temporaries (xAR-B at batch 256 on an 80 GB GPU).
    c.device_prefetch = 0
    # A corrupt record is an error naming its shard and index. If True, it is replaced by the
    # next readable record instead and counted in the batch field 'skipped_records'.
    c.allow_corrupt_records = False
    return c


def _require(cond: bool, field: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(
            f"data config field '{field}'={value!r} is not allowed; allowed: {allowed}."
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_data_config(cfg: ml_collections.ConfigDict, *, training: bool = True) -> None:
    """Raises ValueError naming the field and its allowed values; reads no data and no files.

    ``training=False`` (sampling, evaluation) does not ask for the training data's location.
    """
    missing = [k for k in get_data_config().keys() if k not in cfg]
    if missing:
        raise ConfigError(f"data config lacks fields {missing}; start from get_data_config().")
    _require(cfg.source in SOURCES, "source", cfg.source, " | ".join(SOURCES))
    for field in ("split", "eval_split"):
        value = cfg[field]
        if cfg.source == "digits":
            _require(value in DIGITS_SPLITS, field, value, " | ".join(DIGITS_SPLITS) + " (digits)")
        else:
            _require(isinstance(value, str) and value != "", field, value, "a non-empty split name")
    _require(
        cfg.image_decoder in IMAGE_DECODERS,
        "image_decoder",
        cfg.image_decoder,
        " | ".join(IMAGE_DECODERS),
    )
    _require(
        _is_int(cfg.image_size) and cfg.image_size >= 16 and cfg.image_size % 16 == 0,
        "image_size",
        cfg.image_size,
        "a positive multiple of 16 (256 or 512 for ImageNet)",
    )
    _require(
        cfg.latent_sampling in LATENT_SAMPLING,
        "latent_sampling",
        cfg.latent_sampling,
        " | ".join(LATENT_SAMPLING),
    )
    _require(
        cfg.cache_dtype in CACHE_DTYPES, "cache_dtype", cfg.cache_dtype, " | ".join(CACHE_DTYPES)
    )
    if cfg.source == "latents" and training:
        _require(
            isinstance(cfg.cache_dir, str) and cfg.cache_dir != "",
            "cache_dir",
            cfg.cache_dir,
            "the latent cache root (made by `python -m xar_jax.data.latent_cache`)",
        )
    if cfg.source == "imagenet":
        _require(
            isinstance(cfg.tfds_name, str) and cfg.tfds_name != "",
            "tfds_name",
            cfg.tfds_name,
            "a TFDS name such as 'imagenet2012'",
        )
    _require(
        isinstance(cfg.data_dir, str), "data_dir", cfg.data_dir, "a path string ('' = default)"
    )
    for field in ("random_flip", "allow_corrupt_records"):
        _require(isinstance(cfg[field], bool), field, cfg[field], "True | False")
    _require(
        _is_int(cfg.shuffle_seed)
        and (cfg.shuffle_seed == FOLLOW_RUN_SEED or 0 <= cfg.shuffle_seed < 2**32),
        "shuffle_seed",
        cfg.shuffle_seed,
        f"{FOLLOW_RUN_SEED} (the run's seed) or an integer in [0, 2**32)",
    )
    for field, low in (
        ("num_workers", 0),
        ("worker_buffer_size", 1),
        ("read_threads", 0),
        ("prefetch_buffer", 0),
        ("device_prefetch", 0),
    ):
        _require(
            _is_int(cfg[field]) and cfg[field] >= low, field, cfg[field], f"an integer >= {low}"
        )
