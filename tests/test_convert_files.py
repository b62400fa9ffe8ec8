"""Converter files: --overwrite replaces only converter output, atomically; .pth files are
unpickled without running code unless --allow_unsafe_pickle says the file is trusted."""

import argparse
import os
import shlex

import jax
import numpy as np
import pytest
from conftest import golden_path, import_torch

from xar_jax import weights
from xar_jax.convert import __main__ as convert_cli
from xar_jax.convert import torch_io
from xar_jax.convert import vae as convert_vae
from xar_jax.convert import xar as convert_xar


@pytest.fixture(scope="module")
def vae_npz(tmp_path_factory):
    """The ch=32 golden VAE state dict as an .npz source (small and quick to convert)."""
    with np.load(golden_path("vae_ch32_golden.npz")) as z:
        state = {k.removeprefix("param/"): z[k] for k in z.files if k.startswith("param/")}
    path = tmp_path_factory.mktemp("src") / "kl16.npz"
    np.savez(path, **state)
    return str(path)


def snapshot(root) -> dict[str, bytes | None]:
    """Every path under ``root`` (``root`` itself too) with its bytes (None for directories)."""
    out = {".": None if root.is_dir() else root.read_bytes()}
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            out[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return out


def siblings(path) -> list[str]:
    return sorted(os.listdir(path.parent))


# ---------------------------------------------------------------------------------------------
# --overwrite


def test_overwrite_replaces_an_earlier_conversion(tmp_path, vae_npz):
    out = tmp_path / "vae"
    assert convert_cli.main(["vae", "--src", vae_npz, "--out", str(out)]) == 0
    assert weights.read_metadata(str(out), "vae")[weights.MARKER_KEY] == weights.MARKER
    (out / "stale.txt").write_text("from the earlier conversion")
    assert convert_cli.main(["vae", "--src", vae_npz, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert sorted(os.listdir(out)) == [weights.METADATA_FILE, weights.PARAMS_DIR]
    assert weights.load_vae(str(out))[0].ch == 32
    assert siblings(out) == ["vae"]  # No temporary or moved-aside directory is left.


@pytest.mark.parametrize("kind", ["xar", "vae", "inception"])
def test_overwrite_refuses_a_directory_the_converter_did_not_write(tmp_path, kind, capsys):
    workdir = tmp_path / "train_workdir"
    (workdir / "checkpoints" / "1000").mkdir(parents=True)
    (workdir / "checkpoints" / "1000" / "state.bin").write_bytes(os.urandom(64))
    (workdir / "config.json").write_text('{"lr": 4e-4}')
    (workdir / "metadata.json").write_text('{"kind": "xar"}')  # Look-alike, without the marker.
    before = snapshot(workdir)
    # The source does not exist: the refusal comes before it is read.
    argv = [kind, "--src", str(tmp_path / "missing.pth"), "--out", str(workdir), "--overwrite"]
    assert convert_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"Refusing to overwrite {workdir}" in err and "not a directory written by" in err
    assert "Nothing was deleted" in err
    assert snapshot(workdir) == before
    assert siblings(workdir) == ["train_workdir"]


def test_overwrite_refuses_a_file_and_a_directory_without_metadata(tmp_path, vae_npz):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(FileExistsError, match="it is not a directory"):
        convert_vae.convert_file(vae_npz, str(a_file), overwrite=True)
    assert a_file.read_text() == "keep me"
    home = tmp_path / "home"
    (home / "params").mkdir(parents=True)
    (home / ".bashrc").write_text("export A=1")
    before = snapshot(home)
    with pytest.raises(FileExistsError, match="has no metadata.json"):
        convert_vae.convert_file(vae_npz, str(home), overwrite=True)
    assert snapshot(home) == before


def test_a_failed_conversion_keeps_the_previous_output(tmp_path, vae_npz):
    out = tmp_path / "vae"
    convert_vae.convert_file(vae_npz, str(out))
    before = snapshot(out)
    with np.load(vae_npz) as z:
        broken = {k: z[k] for k in z.files if k != "encoder.conv_in.bias"}
    bad_src = tmp_path / "broken.npz"
    np.savez(bad_src, **broken)
    with pytest.raises(ValueError, match="missing"):
        convert_vae.convert_file(str(bad_src), str(out), overwrite=True)
    assert snapshot(out) == before

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    # A failure while writing the new params: the old output is untouched, the temp dir removed.
    orig = weights.ocp.StandardCheckpointer.save
    weights.ocp.StandardCheckpointer.save = failing_save
    try:
        with pytest.raises(OSError, match="disk full"):
            convert_vae.convert_file(vae_npz, str(out), overwrite=True)
    finally:
        weights.ocp.StandardCheckpointer.save = orig
    assert snapshot(out) == before
    assert siblings(out) == ["broken.npz", "vae"]


def test_directories_converted_before_the_marker_count_as_converter_output(tmp_path):
    out = tmp_path / "old"
    weights.save_params(str(out), {"w": np.zeros(2, np.float32)}, {"kind": "xar"})
    meta = weights.read_metadata(str(out), "xar")
    del meta[weights.MARKER_KEY]
    (out / weights.METADATA_FILE).write_text(str(meta).replace("'", '"'))
    assert weights.converter_output_problem(str(out)) is None
    (out / "extra.txt").write_text("not ours")  # No longer exactly the converter's layout.
    assert "lacks" in weights.converter_output_problem(str(out))


# ---------------------------------------------------------------------------------------------
# Safe unpickling


class TrainingConfig:
    """Stands in for a custom class a checkpoint might pickle (not on the allow-list)."""

    def __init__(self, lr):
        self.lr = lr


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def mar_style_checkpoint(torch, state_dict, args):
    """What MAR/xAR's `misc.save_model` writes: weights, EMA, optimizer, scaler, epoch, args."""
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}
    return {
        "model": tensors,
        "model_ema": {k: v.clone() for k, v in tensors.items()},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 4e-4}]},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "epoch": 3,
        "args": args,
    }


def test_xar_training_checkpoint_with_an_argparse_namespace_loads(tmp_path, xar_golden_state_dict):
    torch = import_torch()
    path = tmp_path / "checkpoint-last.pth"
    args = argparse.Namespace(model="xar_b", lr=None, blr=5e-5, cfg=2.7, num_iter=4)
    torch.save(mar_style_checkpoint(torch, xar_golden_state_dict, args), path)
    loaded = torch_io.load_torch_file(path)
    assert loaded["args"] == args and loaded["epoch"] == 3
    model, params = convert_xar.xar_from_torch(str(path))
    ref_model, ref_params = convert_xar.xar_from_torch(xar_golden_state_dict)
    assert model == ref_model
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)


def test_vae_and_inception_file_layouts_need_no_extra_globals(tmp_path):
    torch = import_torch()
    from collections import OrderedDict

    conv = {"conv.weight": torch.ones(2, 1, 3, 3), "bn.num_batches_tracked": torch.tensor(7)}
    files = {
        # MAR's kl16.ckpt: {'model': state_dict}; an LDM/Lightning one: 'state_dict' + counters.
        "kl16.ckpt": {"model": conv},
        "lightning.ckpt": {
            "state_dict": conv,
            "epoch": 1,
            "global_step": 10,
            "pytorch-lightning_version": "1.4.2",
        },
        # torch-fidelity's Inception weights: a flat OrderedDict state dict.
        "inception.pth": OrderedDict(conv),
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        sd = torch_io.load_state_dict(tmp_path / name, prefer=("state_dict", "model"))
        assert sorted(sd) == sorted(conv), name


def test_a_pickled_custom_class_is_refused_with_its_name_and_loads_when_trusted(
    tmp_path, xar_golden_state_dict, capsys
):
    torch = import_torch()
    src = tmp_path / "xar.pth"
    torch.save(mar_style_checkpoint(torch, xar_golden_state_dict, TrainingConfig(4e-4)), src)
    out = tmp_path / "out"
    assert convert_cli.main(["xar", "--src", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{__name__}.TrainingConfig" in err and "--allow_unsafe_pickle" in err
    assert not out.exists()
    argv = ["xar", "--src", str(src), "--out", str(out), "--allow_unsafe_pickle"]
    assert convert_cli.main(argv) == 0
    model, _ = weights.load_xar(str(out))
    assert model.width == xar_golden_state_dict["z_proj.weight"].shape[0]


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    torch = import_torch()
    marker = tmp_path / "code_ran"
    src = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": RunsCode(marker)}, src)
    with pytest.raises(torch_io.UnsafePickleError, match="system") as info:
        torch_io.load_state_dict(src, prefer=("model",))
    assert "allow_unsafe_pickle" in str(info.value)
    assert not marker.exists()
    with pytest.raises(ValueError, match="Refused to unpickle"):
        convert_vae.convert_file(str(src), str(tmp_path / "vae"))
    assert not marker.exists()
    assert not (tmp_path / "vae").exists()
