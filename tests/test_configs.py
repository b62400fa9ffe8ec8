"""Config files: they validate, xar_b/l/h build with the published parameter counts, command-line
overrides apply, and wrong names or impossible values fail with a message naming the field."""

import os

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from xar_jax import experiment, sharding, workdir
from xar_jax.entities import layout_from_config
from xar_jax.model import (
    PRESETS,
    abstract_params,
    build_model,
    config_signature,
    count_params,
    model_signature,
)
from xar_jax.train_config import load_config_file, validate_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load(name):
    return load_config_file(os.path.join(CONFIGS, f"{name}.py"))


@pytest.mark.parametrize("name", ["demo", "tiny", "xar_b", "xar_l", "xar_h"])
def test_config_validates(name):
    config = load(name)
    if name.startswith("xar_"):
        with pytest.raises(ValueError, match="cache_dir"):  # Must be given on the command line.
            validate_config(config, num_devices=256)
        config.data.cache_dir = "/data/latent_cache"
    validate_config(config, num_devices=1 if name in ("demo", "tiny") else 256)


@pytest.mark.parametrize("name", ["xar_b", "xar_l", "xar_h"])
def test_paper_configs_build_with_published_param_counts(name):
    config = load(name)
    assert config.train.global_batch_size == 2048
    assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.9, 0.96, 0.02)
    assert (config.optim.lr, config.optim.end_lr, config.optim.clip_norm) == (4e-4, 1e-5, 1.0)
    assert (config.optim.warmup_epochs, config.optim.decay_start_epoch) == (100, 600)
    assert (config.train.num_epochs, config.optim.ema_decay) == (800, 0.9999)
    assert (config.train.label_drop_prob, config.model.dropout, config.model.dtype) == (
        0.1,
        0.1,
        "bfloat16",
    )
    assert (config.entity.kind, config.entity.cell_size, config.latent.grid_size) == ("cell", 8, 16)
    layout = layout_from_config(config.entity, config.latent.grid_size)
    resolved = experiment.resolve_config(config, jax.default_backend())  # As build does.
    settings = experiment.resolve_model_settings(resolved.model, jax.default_backend())
    model = build_model(
        resolved.model, layout, settings, in_channels=config.latent.channels, num_classes=1000
    )
    params = abstract_params(model)  # jax.eval_shape: nothing allocated.
    millions = count_params(params, model=model) / 1e6
    assert round(millions, 2) == PRESETS[name].params_millions
    # One answer to "is this the same model?": the config's and the built model's signatures.
    assert config_signature(config) == model_signature(model)
    assert model_signature(model)["model.width"] == PRESETS[name].width


def test_workdir_records_that_named_a_preset_still_check_against_its_sizes(tmp_path):
    config = _paper_config("xar_b")
    recorded = {"model.preset": "xar_b", "latent.grid_size": 16, "latent.channels": 16,
                "latent.num_classes": 1000, "model.mlp_multiple": 128, "model.scan_layers": True,
                "entity.kind": "cell", "entity.cell_size": 8}  # fmt: skip
    record = workdir.RunRecord(config={}, model=recorded, data={}, mesh={}, versions={},
                               history=[])  # fmt: skip
    workdir.check_model(record, config, str(tmp_path), "sample")  # The same network: accepted.
    config.model.preset = ""
    config.model.width, config.model.num_heads = 768, 12  # xar_b's sizes, given one by one.
    config.model.encoder_depth = config.model.decoder_depth = 8
    workdir.check_model(record, config, str(tmp_path), "sample")
    config.model.preset = "xar_l"
    with pytest.raises(workdir.WorkdirMismatchError, match="model.width: 768 in the workdir, 1024"):
        workdir.check_model(record, config, str(tmp_path), "sample")


def _parse(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return fv.config


def test_command_line_overrides_apply_and_unknown_fields_fail():
    demo = f"--config={os.path.join(CONFIGS, 'demo.py')}"
    config = _parse(
        [
            "prog",
            demo,
            "--config.train.num_steps=7",
            "--config.mesh.fsdp=2",
            "--config.model.dtype=bfloat16",
        ]
    )
    assert (config.train.num_steps, config.mesh.fsdp, config.model.dtype) == (7, 2, "bfloat16")
    with pytest.raises((flags.Error, KeyError, AttributeError), match="lerning_rate"):
        _parse(["prog", demo, "--config.optim.lerning_rate=1"])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.dtype", "fp8", "config.model.dtype='fp8' is not allowed; allowed: float32 |"),
        ("entity.cell_size", 3, "entity.cell_size=3 must be a positive divisor of the grid 8x8"),
        ("train.grad_accum_steps", 3, "config.train.grad_accum_steps=3 is not allowed"),
        ("optim.decay_start_epoch", 1000.0, "config.optim.decay_start_epoch=1000.0"),
        ("model.num_heads", 5, "config.model.num_heads=5 is not allowed"),
        ("latent.num_classes", 1001, "config.latent.num_classes=1001"),
        ("sample.num_steps", 1, "config.sample.num_steps=1"),
        ("mesh.fsdp", 0, "mesh.fsdp=0"),
    ],
)
def test_impossible_values_fail_naming_the_field(field, value, message):
    config = load("demo")
    section, leaf = field.split(".")
    config[section][leaf] = value
    with pytest.raises(ValueError) as err:
        validate_config(config, num_devices=1)
    assert message in str(err.value)


def _paper_config(name):
    """A paper config with the data path that must come from the command line."""
    config = load(name)
    config.data.cache_dir = "/data/latent_cache"
    return config


def test_fused_attention_needs_no_attention_dropout_only_for_training():
    config = _paper_config("xar_b")
    config.model.attention_impl = "cudnn"  # The fast GPU sampler; attn_dropout stays 0.1.
    validate_config(config, num_devices=256, training=False)
    with pytest.raises(ValueError, match="config.model.attn_dropout=0.1"):
        validate_config(config, num_devices=256)


def _documented_gpu_config(name, row_start):
    """``name``'s config with the --config overrides of the docs/training.md table row that starts
    with ``row_start``, parsed as the command line would."""
    with open(os.path.join(CONFIGS, "..", "docs", "training.md")) as f:
        row = next(line for line in f if line.startswith(row_start))
    overrides = row.split(" | ")[1].strip("`").split()
    argv = [f"--config={os.path.join(CONFIGS, name + '.py')}", *overrides]
    return _parse(["prog", *argv, "--config.data.cache_dir=/data/latent_cache"])


@pytest.mark.parametrize("name", ["xar_b", "xar_l", "xar_h"])
def test_documented_gpu_overrides_validate(name):
    """The 'On NVIDIA GPUs' table without attention dropout: 'auto' then takes cuDNN."""
    from xar_jax.attention import resolve as resolve_attention_impl

    config = _documented_gpu_config(name, f"| `{name}.py` | `--config.model")
    assert config.model.attention_impl == "auto" and config.model.attn_dropout == 0.0
    assert resolve_attention_impl("auto", 0.0, "bfloat16", backend="gpu") == "cudnn"
    validate_config(config, num_devices=256)


@pytest.mark.parametrize("name", ["xar_b", "xar_l", "xar_h"])
def test_paper_configs_train_the_paper_recipe_on_the_auto_attention(name):
    config = _paper_config(name)
    assert config.model.attention_impl == "auto" and config.model.attn_dropout == 0.1
    assert config.model.dropout_impl == "hash" and config.model.dropout == 0.1
    validate_config(config, num_devices=256)  # 'auto' keeps attention dropout: accepted.
    for platform, kernel in (("gpu", "pallas"), ("tpu", "xla"), ("cpu", "xla")):
        settings = experiment.resolve_model_settings(config.model, platform)
        assert settings.attention_impl == kernel, platform


@pytest.mark.parametrize("name", ["xar_b", "xar_l", "xar_h"])
def test_documented_gpu_layers_are_what_auto_resolves_to(name):
    """The paper-recipe GPU table lists the layers the configs' 'auto' takes on a GPU."""
    with open(os.path.join(CONFIGS, "..", "docs", "training.md")) as f:
        row = next(line for line in f if line.startswith(f"| `{name}.py` (paper) |"))
    documented = dict(kv.split("=") for kv in row.split(" | ")[1].strip("`").split())
    resolved = experiment.resolve_config(_paper_config(name), "gpu").model
    assert documented == {"scan_layers": str(resolved.scan_layers), "remat": resolved.remat}


def test_mesh_must_cover_devices_and_batch_must_split():
    config = load("demo")
    config.mesh.data, config.mesh.fsdp = 3, 1
    with pytest.raises(ValueError, match="must equal the 8 devices"):
        validate_config(config, num_devices=8)
    config.mesh.data, config.mesh.fsdp = -1, 1
    config.train.global_batch_size = 60
    with pytest.raises(ValueError, match="global_batch_size=60"):
        validate_config(config, num_devices=8)
    assert sharding.resolve_mesh_shape(-1, 2, 1, 8) == (4, 2, 1)
    assert jax.device_count() == 1  # The rest of the suite runs on one device.


def test_inference_modes_accept_fused_attention_with_attention_dropout():
    """Sampling has no dropout: the fast sampler needs no change of the training recipe."""
    c = load_config_file(os.path.join(CONFIGS, "tiny.py"))
    c.model.attention_impl = "cudnn"
    c.model.attn_dropout = 0.1
    for mode in ("sample", "eval"):
        experiment.build(c, mode)  # Validated once, for the mode at hand.
    with pytest.raises(ValueError, match="config.model.attn_dropout"):
        experiment.build(c, "train")


@pytest.mark.parametrize(
    "name, gpu",
    [("xar_b", (False, "none")), ("xar_l", (True, "dots")), ("xar_h", (True, "matmuls"))],
)
def test_auto_layers_resolve_once_per_preset_and_backend(name, gpu):
    """docs/training.md's GPU settings are the paper configs' defaults; TPU and CPU scan."""
    config = _paper_config(name)
    assert (config.model.scan_layers, config.model.remat) == ("auto", "auto")
    resolved = experiment.resolve_config(config, "gpu")
    assert (resolved.model.scan_layers, resolved.model.remat) == gpu
    for backend in ("tpu", "cpu"):
        resolved = experiment.resolve_config(config, backend)
        assert (resolved.model.scan_layers, resolved.model.remat) == (True, "dots_no_batch")
    sampling = experiment.resolve_config(config, "gpu", mode="sample")
    assert (sampling.model.scan_layers, sampling.model.remat) == (True, "dots_no_batch")
    assert config.model.scan_layers == "auto"  # The given config is not changed.
    config.model.remat = "full"  # An explicit value is kept; only 'auto' is resolved.
    assert experiment.resolve_config(config, "gpu").model.remat == "full"


def test_a_recorded_run_keeps_its_layer_layout_under_auto(tmp_path):
    """A run started scanned (a TPU, or before 'auto') resumes scanned on a GPU: its checkpoints
    hold stacked params. The record holds resolved values, and a changed PRNG is refused."""
    from xar_jax import experiment
    from xar_jax import workdir as workdir_lib

    config = _paper_config("xar_b")
    on_tpu = experiment.resolve_config(config, "tpu")
    workdir_lib.write_record(
        str(tmp_path),
        workdir_lib.RunRecord.for_config(on_tpu, {"data": 1, "fsdp": 1, "tensor": 1}, 1, "train"),
    )
    assert workdir_lib.read_record(str(tmp_path)).model["model.scan_layers"] is True
    resumed = experiment.resolve_config(config, "gpu", str(tmp_path))
    assert (resumed.model.scan_layers, resumed.model.remat) == (True, "dots_no_batch")
    record = workdir_lib.read_record(str(tmp_path))
    workdir_lib.check_model(record, resumed, str(tmp_path), "train")  # Accepted.
    assert "prng_impl" not in record.model  # JAX's default is left out of the record.
    with resumed.unlocked():
        resumed.prng_impl = "rbg"
    with pytest.raises(workdir_lib.WorkdirMismatchError, match="prng_impl"):
        workdir_lib.check_model(record, resumed, str(tmp_path), "train")


@pytest.mark.parametrize(
    "field, value",
    [
        ("model.scan_layers", 0),
        ("model.scan_layers", "yes"),
        ("model.remat", "fast"),
        ("prng_impl", "philox"),
    ],
)
def test_layer_and_prng_settings_fail_naming_the_field(field, value):
    config = load("tiny")
    *path, leaf = field.split(".")
    node = config[path[0]] if path else config
    node[leaf] = value
    with pytest.raises(ValueError, match=f"config.{field}="):
        validate_config(config, num_devices=1)


def test_print_config_shows_what_auto_resolves_to_here():
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xar_jax.main",
            f"--config={os.path.join(CONFIGS, 'xar_l.py')}",
            "--print_config",
            "--config.data.cache_dir=/data/latent_cache",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    model = json.loads(out.stdout)["model"]
    assert (model["scan_layers"], model["remat"]) == (True, "dots_no_batch")  # CPU: the scan.
