"""The trainer's configuration: every field with its default and meaning, and its validation.

``configs/*.py`` start from `base_config()` and change what differs (the paper's recipe for
xar_b/l/h, a small CPU model for the demo). `validate_config` runs before any compilation or data
loading and raises ValueError naming ``section.field`` and the allowed values. Unknown field names
are rejected by ml_collections itself (configs are locked by ``config_flags``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from xar_jax import attention, entities, flow, sharding
from xar_jax.data.config import get_data_config, validate_data_config
from xar_jax.dropout import DROPOUT_IMPLS
from xar_jax.errors import ConfigError
from xar_jax.model import DTYPES, PRESETS, REMAT_POLICIES
from xar_jax.sampling import CFG_SCHEDULES, SAMPLERS, SOLVERS
from xar_jax.train_state import NAN_POLICIES

ATTENTION_IMPLS = attention.ATTENTION_IMPLS
IMAGENET_TRAIN_SIZE = 1_281_167
TOKENIZERS = ("identity", "kl16")
SAMPLE_FORMATS = ("adm", "grid")
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config([arg])`` of a config file, as ``--config=path[:arg]`` would give (unlocked)."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"xar_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def config_field(cfg: ml_collections.ConfigDict, field: str) -> Any:
    """The value of a dotted config path, e.g. ``config_field(cfg, "model.width")``."""
    node = cfg
    for part in field.split("."):
        node = node[part]
    return node


def base_config() -> ml_collections.ConfigDict:
    """Every field of a training config, with the paper's recipe where one exists."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seed of params init and of the per-step RNG (fold_in(key, step)).
    # JAX's PRNG behind every key of the run (init, noise, flow times, labels dropped, dropout):
    # threefry2x32 (JAX's default) | rbg | unsafe_rbg. Its key size is part of the train state, so a
    # run keeps the one it started with (recorded in run.json unless threefry2x32).
    c.prng_impl = "threefry2x32"
    # --mode=sample / eval only: a converted released xAR (`python -m xar_jax.convert xar --src
    # xAR-H.pth --out DIR`) to sample instead of the workdir's checkpoints; '' = the workdir's
    # newest checkpoint. The model fields must describe the same network (configs/xar_{b,l,h}.py).
    c.weights = ""

    # JAX's persistent compilation cache, so that a restarted job (preemption, resume.sh) loads
    # its compiled programs instead of compiling them again: '' = <workdir>/compile_cache (on a
    # gs:// workdir a gs:// directory that every host reads; process 0 writes), 'none' = off,
    # anything else = that directory (local or gs://). Shared by runs of the same code and
    # config; entries are keyed by program, compiler version and devices, so a stale one is
    # never used, only missed.
    c.compile_cache_dir = ""
    # Programs that compiled faster than this are not written to the cache (JAX's default is 1 s;
    # 0 caches every program, which is what a small CPU config needs to gain anything).
    c.compile_cache_min_compile_secs = 0.0

    c.data = get_data_config("digits")  # Input pipeline; see xar_jax/data/config.py.

    c.latent = ml_collections.ConfigDict()
    # How an example becomes the latent grid the model sees. 'identity': the example's image is
    # the grid (embedded digits: 8x8x1). 'kl16': MAR's KL-16 VAE (cached moments, 16x16x16).
    c.latent.tokenizer = "identity"
    c.latent.grid_size = 8  # Side of the square latent grid (H = W): 16 for ImageNet 256 + KL-16.
    c.latent.channels = 1  # Latent channels C: 16 for KL-16, 1 for digits.
    c.latent.scale = 0.2325  # Latent scale of KL-16 (z = sample * scale; decode z / scale).
    # Classes of the dataset (labels 0..num_classes-1); label num_classes is the null class.
    c.latent.num_classes = 10
    # 'kl16' only: Orbax params directory of the KL-16 VAE (`python -m xar_jax.convert vae`),
    # used to decode samples into images; '' writes latents only.
    c.latent.vae_checkpoint = ""

    c.entity = ml_collections.ConfigDict()
    c.entity.kind = "cell"  # Prediction unit: token | cell | subsample | scale | image.
    c.entity.cell_size = 8  # k of 'cell' (k x k tokens per entity); the paper's best is 8 on 16x16.
    c.entity.subsample_factor = 2  # s of 'subsample' (s*s entities of strided tokens).
    c.entity.scale_sizes = (1, 2, 4, 8, 16)  # Sizes of 'scale', coarse to fine, last = grid.

    c.model = ml_collections.ConfigDict()
    # 'xar_b' | 'xar_l' | 'xar_h' (the published sizes), or '' to use the four fields below.
    c.model.preset = ""
    c.model.width = 128  # Model width D (ignored with a preset).
    c.model.encoder_depth = 2  # Encoder blocks (ignored with a preset).
    c.model.decoder_depth = 2  # Decoder blocks (ignored with a preset).
    c.model.num_heads = 4  # Attention heads; D / heads a multiple of 4 (ignored with a preset).
    c.model.mlp_multiple = 1  # Pad the MLP hidden width to this multiple (exact; 128 helps TPUs).
    c.model.dropout = 0.1  # Dropout after attention proj and in the MLP (paper: 0.1).
    c.model.attn_dropout = 0.1  # Dropout on attention probabilities (paper: 0.1).
    c.model.dtype = "float32"  # Compute dtype: float32 | bfloat16 | float16 (params stay float32).
    # auto | xla (supports attn dropout) | dot_product | cudnn | pallas (fused kernel with attn
    # dropout, GPU). auto is resolved once when the model is built: on a GPU, pallas if
    # attn_dropout > 0 (the paper's recipe, exact and fast), else cudnn (dot_product in float32);
    # on TPU/CPU, xla. cudnn needs attn_dropout=0.0 for training; sampling has no dropout: cudnn
    # and pallas sample with the cached-attention kernel on GPUs (xar_jax/cached_attention.py).
    # pallas draws its own dropout masks (docs/training.md).
    c.model.attention_impl = "xla"
    # Dropout after attention proj and in the MLP, and on the 'xla' kernel's attention
    # probabilities: rng (nn.Dropout, threefry bits from the dropout PRNG) | hash (a counter hash
    # fused into the neighbouring kernels; same rate, other masks). With hash the probabilities'
    # mask is the 'pallas' kernel's, so 'xla' (TPU, CPU) and 'pallas' (GPU) drop the same ones.
    c.model.dropout_impl = "rng"
    # Layer scan: True (scan over blocks: compile time flat in depth, params stacked) | False
    # (unrolled blocks) | 'auto'. 'auto' and remat='auto' are resolved once, when the experiment is
    # built (`xar_jax.model.resolve_layers`): training on a GPU, a preset takes its fastest
    # measured layers (B unrolled without remat, L scan + 'dots', H scan + 'matmuls'); on TPU and
    # CPU, for a custom size, and for sampling, the scan with 'dots_no_batch'. A workdir's run
    # keeps its recorded layout (the checkpoints hold the params in it). --print_config,
    # config.json and run.json show the resolved values.
    c.model.scan_layers = ml_collections.config_dict.placeholder(object)
    c.model.scan_layers = False
    c.model.scan_unroll = 1  # Blocks per layer-scan iteration (same params; no gain on an H200).
    # Rematerialisation per block: none | full | dots | dots_no_batch | matmuls (keep matmul and
    # attention outputs) | auto (see scan_layers).
    c.model.remat = "none"

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 2048  # Examples per optimizer step over all hosts (paper: 2048).
    c.train.num_epochs = 800.0  # Length of the run in epochs (paper: 800).
    c.train.num_steps = -1  # If > 0, overrides num_epochs: stop after this many steps.
    c.train.dataset_size = -1  # Examples per epoch; -1 = the source's size (ImageNet: 1,281,167).
    c.train.objective = "ncl"  # ncl (Noisy Context Learning, the paper) | teacher_forcing.
    c.train.label_drop_prob = 0.1  # Probability that a label becomes the null class (paper: 0.1).
    c.train.grad_accum_steps = 1  # Microbatches per step (large global batches on few chips).
    # A plan of mesh, accumulation, remat and layer scan for this slice (docs/tpu.md, section 5):
    # '' = none; a JSON file from `python -m xar_jax.aot --plan --json=FILE` (its overrides are
    # applied before validation; a plan for another model, global batch or slice is refused);
    # 'auto' = run that search for this run's TPU devices first (TPU only; reports cached).
    c.train.plan = ""
    c.train.nan_policy = "stop"  # Non-finite loss/grad: stop (error naming the step) | skip.
    # 'skip' only: stop (without saving) after this many non-finite steps in a row, so a diverged
    # run cannot rotate its good checkpoints out.
    c.train.max_consecutive_skips = 10

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 4e-4  # Peak learning rate (paper: 5e-5 * batch / 256 = 4e-4).
    c.optim.end_lr = 1e-5  # Learning rate at the end of the cosine decay (paper: 1e-5).
    c.optim.warmup_epochs = 100.0  # Linear warmup from 0 (paper: 100 epochs).
    c.optim.decay_start_epoch = 600.0  # Constant until here, then cosine to end_lr (paper: 600).
    c.optim.b1 = 0.9  # AdamW beta1 (paper: 0.9).
    c.optim.b2 = 0.96  # AdamW beta2 (paper: 0.96).
    c.optim.weight_decay = 0.02  # On params of (unstacked) rank >= 2 only (paper: 0.02).
    c.optim.clip_norm = 1.0  # Global gradient-norm clip; <= 0 disables (paper: 1.0).
    c.optim.ema_decay = 0.9999  # EMA of params, used for sampling (paper: 0.9999).

    c.mesh = ml_collections.ConfigDict()
    # TPU slices joined over the data-centre network (DCN): the batch is split across them, params
    # are replicated on each (only gradients cross DCN). The axes below are those inside a slice.
    c.mesh.num_slices = 1
    c.mesh.data = -1  # Pure data-parallel axis size; -1 = the slice's devices not used by others.
    c.mesh.fsdp = 1  # Fully sharded data parallel (params sharded along the width).
    c.mesh.tensor = 1  # Tensor parallel (heads and MLP units split).

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 5000  # Save every N steps (and at the end, and on preemption).
    c.checkpoint.max_to_keep = 3  # Keep the newest K checkpoints...
    c.checkpoint.keep_period = 100_000  # ...and every multiple of this step (0 = none).
    c.checkpoint.async_save = True  # Write in the background while training continues.

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 100  # Console + TensorBoard scalars every N steps.
    c.log.sample_every_steps = 50_000  # EMA sample grid (PNG + TensorBoard) every N steps; 0 = off.
    c.log.num_samples = 16  # Images in a periodic sample grid.
    # A jax.profiler trace of log.profile_num_steps steps from this step on (0 = off), written
    # under workdir/plugins/profile for TensorBoard's profile plugin.
    c.log.profile_start_step = 0
    c.log.profile_num_steps = 5

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 50  # Flow steps per entity (paper: 40 for B, 50 for L/H).
    c.sample.cfg = 2.2  # Guidance scale (paper: 2.7 B, 2.3 L, 2.2 H); 1.0 = no guidance.
    c.sample.cfg_schedule = "linear"  # linear over entities (the release) | constant.
    # sde (Euler-Maruyama, the release) | ode (Euler) | heun (2nd-order ODE, 2 evaluations/step).
    c.sample.sampler = "sde"
    # What --mode=sample writes. 'adm': num_images class-balanced images (to within one image:
    # the first num_images % latent.num_classes classes get one more), resumable, every device
    # of every host, into
    # <out_dir>/step_<S>-<settings>/samples.npz (arr_0 uint8 (N, H, W, 3), labels) -- ADM's
    # format, what --mode=eval scores. 'grid': the demo's workdir/samples.png (one column per
    # class) + samples.npz (float images, latents, labels) from one process.
    c.sample.format = "adm"
    c.sample.num_images = 50_000  # Images written by --mode=sample (paper: 50 per class).
    # Images per sampling step over all processes ('adm': a multiple of the device count).
    c.sample.batch_size = 1024
    c.sample.seed = 0  # Seed of the labels' order and of the sampling noise.
    c.sample.use_ema = True  # Sample from EMA params (as the release does).
    c.sample.write_png = False  # 'adm': also write every image as png/<index>.png.
    # 'adm': where the sampling runs go (default '' = workdir/generated); gs:// (every host
    # writes its own shards there, process 0 publishes samples.npz) or a local path, which all
    # hosts of a multi-host run must share.
    c.sample.out_dir = ""

    c.eval = ml_collections.ConfigDict()
    # Images sampled and scored by --mode=eval (paper: 50,000, 50 per class). Any count: classes
    # are balanced to within one image (the first num_images % num_classes get one more), so a
    # smoke test can score 20 images of 1,000 classes; an FID of fewer than 50,000 images is
    # recorded as not comparable to the paper's.
    c.eval.num_images = 50_000
    # ImageNet: FID reference statistics .npz (mu, sigma), local or gs://: ADM's
    # VIRTUAL_imagenet256_labeled.npz or `python -m xar_jax.evaluation.reference_stats`.
    c.eval.reference_stats = ""
    # ImageNet: the FID Inception weights converted with `python -m xar_jax.convert inception`.
    c.eval.inception_checkpoint = ""
    c.eval.batch_size = 200  # Images per process per Inception step (a multiple of its devices).
    return c


# ----------------------------------------------------------------------------------------------
def _fail(field: str, value, allowed: str) -> None:
    raise ConfigError(f"config.{field}={value!r} is not allowed; allowed: {allowed}.")


def _check_choice(cfg, field: str, choices) -> None:
    value = config_field(cfg, field)
    if value not in choices:
        _fail(field, value, " | ".join(map(str, choices)))


def _check_number(cfg, field: str, low=None, high=None, *, integer=False, low_open=False) -> None:
    value = config_field(cfg, field)
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = []
        if low is not None:
            bound.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bound.append(f"<= {high}")
        kind_name = "an integer" if integer else "a number"
        _fail(field, value, f"{kind_name} {' and '.join(bound)}".strip())


@dataclasses.dataclass(frozen=True)
class Checked:
    """What `validate_config` built to check a config, kept so that nothing builds it again.

    Attributes:
      layout: the entity layout of ``config.entity`` on the latent grid.
      mesh_shape: ``(data, fsdp, tensor)`` of one slice with -1 resolved, or None when no device
        count was given.
    """

    layout: entities.EntityLayout
    mesh_shape: tuple[int, int, int] | None


def validate_config(
    cfg: ml_collections.ConfigDict, num_devices: int | None = None, *, training: bool = True
) -> Checked:
    """Checks every field that can be checked without data or compilation.

    Args:
      cfg: a training config (`base_config()` with changes).
      num_devices: if given, also checks the mesh and that the batch splits over it.
      training: the run trains; False (sample / eval) skips what only training needs, such as
        the fused attention kernels' lack of attention dropout.

    Returns:
      The entity layout and the mesh shape the checks resolved.

    Raises:
      ValueError naming ``config.<section>.<field>``, its value and what is allowed.
    """
    _check_choice(cfg, "prng_impl", PRNG_IMPLS)
    _check_choice(cfg, "latent.tokenizer", TOKENIZERS)
    _check_number(cfg, "latent.grid_size", 1, integer=True)
    _check_number(cfg, "latent.channels", 1, integer=True)
    _check_number(cfg, "latent.scale", 0, low_open=True)
    _check_number(cfg, "latent.num_classes", 1, integer=True)
    if not isinstance(cfg.weights, str):
        _fail("weights", cfg.weights, "a converted xAR directory or ''")
    if training and cfg.weights:
        _fail(
            "weights",
            cfg.weights,
            "'' for --mode=train (converted weights are for --mode=sample and --mode=eval)",
        )
    value = cfg.compile_cache_dir
    if not isinstance(value, str) or value != value.strip():
        _fail(
            "compile_cache_dir",
            value,
            "'' (<workdir>/compile_cache), 'none' (off) or a directory (local or gs://)",
        )
    _check_number(cfg, "compile_cache_min_compile_secs", 0.0)
    if not isinstance(cfg.latent.vae_checkpoint, str):
        _fail("latent.vae_checkpoint", cfg.latent.vae_checkpoint, "a directory path or ''")
    try:
        layout = entities.layout_from_config(cfg.entity, cfg.latent.grid_size)
    except ValueError as e:
        raise ConfigError(f"config.entity: {e}") from None

    if cfg.model.preset:
        _check_choice(cfg, "model.preset", tuple(PRESETS) + ("",))
    else:
        _check_number(cfg, "model.width", 4, integer=True)
        _check_number(cfg, "model.encoder_depth", 1, integer=True)
        _check_number(cfg, "model.decoder_depth", 1, integer=True)
        _check_number(cfg, "model.num_heads", 1, integer=True)
        w, h = cfg.model.width, cfg.model.num_heads
        if w % h or (w // h) % 4:
            _fail(
                "model.num_heads",
                h,
                f"a divisor of model.width={w} leaving a head size divisible by 4",
            )
    _check_number(cfg, "model.mlp_multiple", 1, integer=True)
    _check_number(cfg, "model.dropout", 0.0, 1.0)
    _check_number(cfg, "model.attn_dropout", 0.0, 1.0)
    _check_choice(cfg, "model.dtype", tuple(DTYPES))
    _check_choice(cfg, "model.attention_impl", ATTENTION_IMPLS)
    _check_choice(cfg, "model.dropout_impl", DROPOUT_IMPLS)
    if not (
        cfg.model.scan_layers is True
        or cfg.model.scan_layers is False
        or cfg.model.scan_layers == "auto"
    ):
        _fail("model.scan_layers", cfg.model.scan_layers, "True | False | 'auto'")
    _check_number(cfg, "model.scan_unroll", 1, integer=True)
    _check_choice(cfg, "model.remat", (*REMAT_POLICIES, "auto"))
    impl = cfg.model.attention_impl
    if training and cfg.model.attn_dropout > 0 and not attention.supports_dropout(impl):
        *some, last = [repr(k) for k in ATTENTION_IMPLS if attention.supports_dropout(k)]
        _fail(
            "model.attn_dropout",
            cfg.model.attn_dropout,
            f"0.0 unless model.attention_impl is {', '.join(some)} or {last} ({impl!r} has no "
            "attention dropout)",
        )

    _check_number(cfg, "train.global_batch_size", 1, integer=True)
    _check_number(cfg, "train.num_epochs", 0, low_open=True)
    _check_number(cfg, "train.num_steps", -1, integer=True)
    if cfg.train.num_steps == 0:
        _fail("train.num_steps", 0, "-1 (use num_epochs) or a positive integer")
    _check_number(cfg, "train.dataset_size", -1, integer=True)
    _check_choice(cfg, "train.objective", flow.OBJECTIVES)
    _check_number(cfg, "train.label_drop_prob", 0.0, 1.0)
    _check_number(cfg, "train.grad_accum_steps", 1, integer=True)
    _check_choice(cfg, "train.nan_policy", NAN_POLICIES)
    _check_number(cfg, "train.max_consecutive_skips", 1, integer=True)
    if cfg.train.global_batch_size % cfg.train.grad_accum_steps:
        _fail(
            "train.grad_accum_steps",
            cfg.train.grad_accum_steps,
            f"a divisor of train.global_batch_size={cfg.train.global_batch_size}",
        )

    _check_number(cfg, "optim.lr", 0, low_open=True)
    _check_number(cfg, "optim.end_lr", 0)
    _check_number(cfg, "optim.warmup_epochs", 0)
    _check_number(cfg, "optim.decay_start_epoch", 0)
    if not cfg.optim.warmup_epochs <= cfg.optim.decay_start_epoch <= cfg.train.num_epochs:
        _fail(
            "optim.decay_start_epoch",
            cfg.optim.decay_start_epoch,
            f"between optim.warmup_epochs={cfg.optim.warmup_epochs} and "
            f"train.num_epochs={cfg.train.num_epochs}",
        )
    _check_number(cfg, "optim.b1", 0.0, 1.0)
    _check_number(cfg, "optim.b2", 0.0, 1.0)
    _check_number(cfg, "optim.weight_decay", 0.0)
    _check_number(cfg, "optim.clip_norm", None)
    _check_number(cfg, "optim.ema_decay", 0.0, 1.0)

    for axis in ("data", "fsdp", "tensor"):
        _check_number(cfg, f"mesh.{axis}", -1, integer=True)
    _check_number(cfg, "mesh.num_slices", 1, integer=True)
    shape = None
    if num_devices is not None:
        slices = cfg.mesh.num_slices
        if num_devices % slices:
            _fail("mesh.num_slices", slices, f"a divisor of the {num_devices} devices")
        try:
            shape = sharding.resolve_mesh_shape(
                cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, num_devices // slices
            )
        except ValueError as e:
            raise ConfigError(f"config.{e}") from None
        shards = slices * shape[0] * shape[1]
        if cfg.train.global_batch_size % (shards * cfg.train.grad_accum_steps):
            _fail(
                "train.global_batch_size",
                cfg.train.global_batch_size,
                f"a multiple of num_slices x data x fsdp shards ({shards}) x grad_accum_steps "
                f"({cfg.train.grad_accum_steps})",
            )

    _check_number(cfg, "checkpoint.every_steps", 1, integer=True)
    _check_number(cfg, "checkpoint.max_to_keep", 1, integer=True)
    _check_number(cfg, "checkpoint.keep_period", 0, integer=True)
    _check_choice(cfg, "checkpoint.async_save", (True, False))
    _check_number(cfg, "log.every_steps", 1, integer=True)
    _check_number(cfg, "log.sample_every_steps", 0, integer=True)
    _check_number(cfg, "log.num_samples", 1, integer=True)
    _check_number(cfg, "log.profile_start_step", 0, integer=True)
    _check_number(cfg, "log.profile_num_steps", 1, integer=True)

    _check_choice(cfg, "sample.sampler", SAMPLERS)
    min_steps = SOLVERS[cfg.sample.sampler].min_steps
    _check_number(cfg, "sample.num_steps", min_steps, integer=True)
    _check_number(cfg, "sample.cfg", 0.0)
    _check_choice(cfg, "sample.cfg_schedule", CFG_SCHEDULES)
    _check_number(cfg, "sample.num_images", 1, integer=True)
    _check_number(cfg, "sample.batch_size", 1, integer=True)
    _check_number(cfg, "sample.seed", 0, integer=True)
    _check_choice(cfg, "sample.use_ema", (True, False))
    _check_choice(cfg, "sample.format", SAMPLE_FORMATS)
    _check_choice(cfg, "sample.write_png", (True, False))
    if not isinstance(cfg.sample.out_dir, str):
        _fail(
            "sample.out_dir",
            cfg.sample.out_dir,
            "'' (workdir/generated), a path shared by all hosts, or gs:// (one process)",
        )
    _check_number(cfg, "eval.num_images", 1, integer=True)
    for field in ("eval.reference_stats", "eval.inception_checkpoint"):
        if not isinstance(config_field(cfg, field), str):
            _fail(field, config_field(cfg, field), "a path or ''")
    _check_number(cfg, "eval.batch_size", 1, integer=True)

    _validate_data(cfg, training)
    _validate_balance(cfg, num_devices)
    return Checked(layout=layout, mesh_shape=shape)


def _validate_balance(cfg, num_devices: int | None) -> None:
    """Sample batches that split over the devices; enough images for the Inception Score."""
    if cfg.sample.format == "adm" and num_devices and cfg.sample.batch_size % num_devices:
        _fail(
            "sample.batch_size",
            cfg.sample.batch_size,
            f"a multiple of the {num_devices} devices (sample.format='adm')",
        )
    if cfg.data.source != "digits" and cfg.eval.num_images < 10:
        _fail("eval.num_images", cfg.eval.num_images, ">= 10 (the Inception Score's splits)")


def _validate_data(cfg, training: bool) -> None:
    """The data section (its own validator if present) and its fit with the latent settings."""
    validate_data_config(cfg.data, training=training)
    source = cfg.data.source
    if source == "digits":
        lat = cfg.latent
        if lat.tokenizer != "identity" or lat.grid_size != 8 or lat.channels != 1:
            raise ConfigError(
                "config.data.source='digits' needs latent.tokenizer='identity', "
                "latent.grid_size=8, "
                f"latent.channels=1 (got {cfg.latent.tokenizer!r}, {cfg.latent.grid_size}, "
                f"{cfg.latent.channels})."
            )
        if cfg.latent.num_classes != 10:
            _fail("latent.num_classes", cfg.latent.num_classes, "10 for data.source='digits'")
    elif source == "latents":
        if cfg.latent.tokenizer != "kl16":
            _fail("latent.tokenizer", cfg.latent.tokenizer, "'kl16' for data.source='latents'")
    elif source == "imagenet":
        raise ConfigError(
            "config.data.source='imagenet' (raw images) needs on-device VAE encoding, which the "
            "trainer does not do yet; cache latents first and use data.source='latents'."
        )
    else:
        _fail("data.source", source, "digits | latents")


# ----------------------------------------------------------------------------------------------
def paper_config(preset: str, sample_steps: int, cfg_scale: float):
    """xAR on cached KL-16 latents of ImageNet 256 (16x16x16 grid), the paper's training recipe.

    Args:
      preset: 'xar_b' | 'xar_l' | 'xar_h' (sizes in xar_jax.model.PRESETS).
      sample_steps: published flow steps per entity for sampling.
      cfg_scale: published guidance scale.
    """
    c = base_config()
    c.data = get_data_config("latents")  # Cached VAE moments: set --config.data.cache_dir.
    c.latent.tokenizer = "kl16"
    c.latent.grid_size = 16
    c.latent.channels = 16
    c.latent.num_classes = 1000
    c.entity.kind = "cell"  # The released entity: 8x8 cells on the 16x16 grid (4 steps).
    c.entity.cell_size = 8
    c.model.preset = preset
    c.model.dtype = "bfloat16"  # bf16 compute, float32 params (paper: mixed precision).
    # GPU: the fused Pallas kernel with the paper's attention dropout; TPU/CPU: xla.
    c.model.attention_impl = "auto"
    # Fused hash dropout after proj and in the MLP: +4% on xAR-B/L on an H200 (docs/benchmarks.md).
    c.model.dropout_impl = "hash"
    # The fastest measured layers for the preset and the backend (base_config's comment).
    c.model.scan_layers = "auto"
    c.model.remat = "auto"
    c.model.mlp_multiple = 128
    c.train.global_batch_size = 2048
    c.train.num_epochs = 800.0
    c.train.dataset_size = IMAGENET_TRAIN_SIZE
    c.optim.lr = 4e-4
    c.optim.end_lr = 1e-5
    c.optim.warmup_epochs = 100.0
    c.optim.decay_start_epoch = 600.0
    c.optim.ema_decay = 0.9999
    c.mesh.data = 1  # All chips on the fsdp axis: params and optimizer state fully sharded.
    c.mesh.fsdp = -1
    c.checkpoint.every_steps = 2500
    c.checkpoint.keep_period = 50_000
    c.log.every_steps = 100
    c.log.sample_every_steps = 25_000
    c.sample.num_steps = sample_steps
    c.sample.cfg = cfg_scale
    return c
