"""Converter files: --overwrite replaces only converter output, atomically."""

import os

import numpy as np
import pytest

from conftest import golden_path
from xar_jax.convert import __main__ as convert_cli
from xar_jax.convert import params_io
from xar_jax.convert import vae as convert_vae


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
    assert params_io.load_metadata(str(out))[params_io.MARKER_KEY] == params_io.MARKER
    (out / "stale.txt").write_text("from the earlier conversion")
    assert convert_cli.main(["vae", "--src", vae_npz, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert sorted(os.listdir(out)) == [params_io.METADATA_FILE, params_io.PARAMS_DIR]
    assert convert_vae.load_converted(str(out))[0].ch == 32
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
    orig = params_io.ocp.StandardCheckpointer.save
    params_io.ocp.StandardCheckpointer.save = failing_save
    try:
        with pytest.raises(OSError, match="disk full"):
            convert_vae.convert_file(vae_npz, str(out), overwrite=True)
    finally:
        params_io.ocp.StandardCheckpointer.save = orig
    assert snapshot(out) == before
    assert siblings(out) == ["broken.npz", "vae"]


def test_directories_converted_before_the_marker_count_as_converter_output(tmp_path):
    out = tmp_path / "old"
    params_io.save_params(str(out), {"w": np.zeros(2, np.float32)}, {"kind": "xar"})
    meta = params_io.load_metadata(str(out))
    del meta[params_io.MARKER_KEY]
    (out / params_io.METADATA_FILE).write_text(str(meta).replace("'", '"'))
    assert params_io.converter_output_problem(str(out)) is None
    (out / "extra.txt").write_text("not ours")  # No longer exactly the converter's layout.
    assert "lacks" in params_io.converter_output_problem(str(out))
