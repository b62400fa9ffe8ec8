"""Converted weights: the directories `python -m xar_jax.convert` writes, and the one loader.

A converted directory holds ``params/`` (an Orbax ``StandardCheckpointer`` tree of float32
arrays) and ``metadata.json``: the kind (`KINDS`), what rebuilds the module, the source, and the
marker ``"written_by": "xar_jax.convert"``. xAR params are stored as the release has them: layers
unrolled (``block_{i}``), the MLP unpadded. `read_metadata` reads the metadata and checks the kind
once; the loaders restore the arrays straight onto the module's parameter tree, laying out a
layer scan or MLP padding from the stored arrays (`xar_param_layout`). A directory that is
missing, of another kind or of another model raises `WeightsError`, naming the path and the
command that writes the right one.

Training, sampling and evaluation load weights through this module; `xar_jax.convert` (the
offline converter) writes them with `save_params` and lays out xAR params with the same function.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from xar_jax import entities as ent
from xar_jax import fileio
from xar_jax import model as xar_model
from xar_jax import vae as vae_lib
from xar_jax.errors import CorruptInputError, UserError, describe

METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"
# metadata.json key and value marking a directory as converter output.
MARKER_KEY = "written_by"
MARKER = "xar_jax.convert"
# The kinds of converted weights, with the converter command that writes each.
KINDS = {
    "xar": "python -m xar_jax.convert xar --src xAR-*.pth --out DIR",
    "vae": "python -m xar_jax.convert vae --src kl16.ckpt --out DIR",
    "inception_v3_compat": "python -m xar_jax.convert inception "
    "--src weights-inception-2015-12-05-6726825d.pth --out DIR",
}
# The metadata fields that rebuild an `XAR` (besides its layout).
_XAR_FIELDS = ("width", "encoder_depth", "decoder_depth", "encoder_heads", "decoder_heads",
               "in_channels", "num_classes")  # fmt: skip


class WeightsError(UserError, ValueError):
    """A weights directory is missing, holds another kind of weights, or another model."""


# ----------------------------------------------------------------------------------------------
# The directory format.
def read_metadata(path: str, kind: str) -> dict[str, Any]:
    """``metadata.json`` of the converted directory ``path``, checked to hold ``kind`` weights.

    Raises:
      WeightsError: no converted directory at ``path``, or one of another kind.
    """
    meta_path = fileio.as_path(path) / METADATA_FILE
    if not meta_path.exists():
        raise WeightsError(
            f"{meta_path} not found: {path} is not a converted weights directory (write one with "
            f"`{KINDS[kind]}`)."
        )
    redo = f"Convert it again with `{KINDS[kind]}`."
    meta = fileio.read_json(meta_path, remedy=redo)
    if not isinstance(meta, dict):
        raise CorruptInputError(f"{meta_path} is damaged: not a JSON object. {redo}")
    found = meta.get("kind", meta.get("model"))  # Inception directories once named it 'model'.
    if found != kind:
        raise WeightsError(
            f"{path} holds converted {found!r} params, not {kind!r} params (write those with "
            f"`{KINDS[kind]}`)."
        )
    return meta


def restore_params(path: str, target: Any | None = None) -> Any:
    """The params tree of a converted directory; ``target`` (arrays or ShapeDtypeStructs with
    shardings) places it, else NumPy arrays on the host.

    Raises:
      CorruptInputError naming the directory when its files cannot be read (truncated, damaged).
    """
    params_dir = fileio.as_path(path) / PARAMS_DIR
    try:
        with ocp.StandardCheckpointer() as ckptr:
            if target is None:
                return ckptr.restore(params_dir)
            return ckptr.restore(params_dir, target)
    except Exception as e:  # Orbax and tensorstore raise many types for damaged files.
        raise CorruptInputError(
            f"{params_dir} is damaged or incomplete ({describe(e, 160)}). Convert it again with "
            "`python -m xar_jax.convert {xar,vae,inception} --src FILE --out DIR`."
        ) from None


def save_params(out_dir: str, params: Any, metadata: dict[str, Any], *,
                overwrite: bool = False) -> None:  # fmt: skip
    """Writes ``params`` and ``metadata`` (plus the converter marker) to ``out_dir`` atomically.

    Writing goes to a fresh temporary sibling directory, renamed into place only when complete;
    an existing output is moved aside, the new one renamed in, then the old one removed. So an
    interrupted conversion never leaves a half-written directory, nor a half-deleted old one.

    Raises:
      FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or it is not a converter
        output (see `check_writable`); nothing is touched.
    """
    out_dir = os.path.abspath(out_dir)
    check_writable(out_dir, overwrite)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    # A fresh name: never clobbers a user's directory, nor a concurrent conversion's.
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}.converting-", dir=parent)
    try:
        params = jax.tree.map(lambda x: np.asarray(x), params)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp_dir, PARAMS_DIR), params)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp_dir, METADATA_FILE), "w") as f:
            json.dump({**metadata, MARKER_KEY: MARKER}, f, indent=2, sort_keys=True)
        check_writable(out_dir, overwrite)  # Again: the conversion may have taken minutes.
        _swap_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def converter_output_problem(path: str) -> str | None:
    """Why ``path`` is not a directory written by `save_params`, or None when it is one.

    A directory from before the marker existed counts when it holds exactly ``params/`` and a
    ``metadata.json`` JSON object, the layout `save_params` has always written.
    """
    if os.path.islink(path):
        return "it is a symbolic link"
    if not os.path.isdir(path):
        return "it is not a directory"
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_path):
        return f"it has no {METADATA_FILE}"
    try:
        with open(meta_path) as f:
            metadata = json.load(f)
    except (OSError, ValueError) as e:
        return f"its {METADATA_FILE} is not readable JSON ({e})"
    if not isinstance(metadata, dict):
        return f"its {METADATA_FILE} is not a JSON object"
    if metadata.get(MARKER_KEY) == MARKER:
        return None
    if sorted(os.listdir(path)) == sorted([METADATA_FILE, PARAMS_DIR]) and os.path.isdir(
        os.path.join(path, PARAMS_DIR)
    ):
        return None  # Written before the marker.
    return f'its {METADATA_FILE} lacks "{MARKER_KEY}": "{MARKER}"'


def check_writable(out_dir: str, overwrite: bool) -> None:
    """Raises FileExistsError unless `save_params` may write ``out_dir``.

    It may when ``out_dir`` does not exist, or when ``overwrite`` is True and ``out_dir`` is an
    earlier converter output. Converters call it before reading their source, so a refused run
    does no work; nothing is deleted here.
    """
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it."
        )
    problem = converter_output_problem(out_dir)
    if problem is not None:
        raise FileExistsError(
            f"Refusing to overwrite {out_dir}: {problem}, so it is not a directory written by "
            "`python -m xar_jax.convert`, and --overwrite only replaces those. Nothing was "
            "deleted; choose another --out, or remove it yourself if it really is disposable."
        )


def _swap_into_place(new_dir: str, out_dir: str) -> None:
    """Renames ``new_dir`` to ``out_dir``; an existing ``out_dir`` is removed only afterwards."""
    if not os.path.lexists(out_dir):
        os.rename(new_dir, out_dir)
        return
    old_dir = new_dir + ".old"
    os.rename(out_dir, old_dir)
    try:
        os.rename(new_dir, out_dir)
    except BaseException:
        os.rename(old_dir, out_dir)  # Put the previous output back.
        raise
    shutil.rmtree(old_dir)


# ----------------------------------------------------------------------------------------------
# xAR.
def xar_metadata(model: xar_model.XAR) -> dict[str, Any]:
    """What rebuilds ``model``'s network from converted xAR weights (`xar_from_metadata`)."""
    lay = model.layout
    return {
        "kind": "xar",
        **{name: getattr(model, name) for name in _XAR_FIELDS},
        "layout": {
            "kind": lay.kind,
            "grid_size": list(lay.grid_size),
            "cell_size": lay.cell_size,
            "subsample_factor": lay.subsample_factor,
            "scale_sizes": list(lay.scale_sizes),
        },
    }


def xar_from_metadata(meta: dict[str, Any], **model_kwargs: Any) -> xar_model.XAR:
    """The `XAR` that converted weights with metadata ``meta`` fit; ``model_kwargs`` sets the
    fields the weights do not decide (dtype, attention_impl, scan_layers, mlp_multiple, ...)."""
    lay = meta["layout"]
    layout = ent.make_layout(
        lay["kind"],
        tuple(lay["grid_size"]),
        cell_size=lay["cell_size"],
        subsample_factor=lay["subsample_factor"],
        scale_sizes=tuple(lay["scale_sizes"]),
    )
    return xar_model.XAR(layout=layout, **{k: meta[k] for k in _XAR_FIELDS}, **model_kwargs)


def check_xar_fits(path: str, meta: dict[str, Any], model: xar_model.XAR) -> None:
    """Refuses converted xAR weights (metadata ``meta``) whose network is not ``model``'s.

    Raises:
      WeightsError naming each differing field of `model.model_signature`.
    """
    stored = xar_model.model_signature(xar_from_metadata(meta), storage=False)
    wanted = xar_model.model_signature(model, storage=False)
    diff = {k: (stored.get(k), wanted.get(k)) for k in sorted(set(stored) | set(wanted))
            if stored.get(k) != wanted.get(k)}  # fmt: skip
    if diff:
        details = "; ".join(f"{k}: {old!r} in the weights, {new!r} in the config"
                            for k, (old, new) in diff.items())  # fmt: skip
        raise WeightsError(
            f"config.weights={path!r} does not fit the config's model ({details}). Use the "
            "config of the released model (configs/xar_b.py, xar_l.py, xar_h.py)."
        )


def xar_param_layout(params: dict, model: xar_model.XAR) -> dict:
    """xAR params in the release's layout (unrolled, MLP unpadded) laid out for ``model``: the
    blocks of each stack stacked for a layer scan, the MLP zero-padded to ``mlp_multiple``."""
    hidden = model.mlp_hidden
    padded = xar_model.round_up(hidden, model.mlp_multiple)
    out = dict(params)
    for stack, depth in (("encoder_blocks", model.encoder_depth),
                         ("decoder_blocks", model.decoder_depth)):  # fmt: skip
        blocks = [_pad_mlp(params[stack][f"block_{i}"], padded) for i in range(depth)]
        if model.scan_layers:
            out[stack] = {"blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
        else:
            out[stack] = {f"block_{i}": b for i, b in enumerate(blocks)}
    return out


def _pad_mlp(block: dict, width: int) -> dict:
    """A block's MLP with its hidden width zero-padded to ``width`` (the padding stays zero)."""
    mlp = block["mlp"]
    if mlp["fc2"]["kernel"].shape[0] == width:
        return block
    pad = lambda x, axis: np.pad(x, [(0, width - x.shape[axis]) if a == axis else (0, 0)
                                     for a in range(x.ndim)])  # fmt: skip
    fc1 = lambda lin: {"kernel": pad(lin["kernel"], 1), "bias": pad(lin["bias"], 0)}
    mlp = {
        "fc1_g": fc1(mlp["fc1_g"]),
        "fc1_x": fc1(mlp["fc1_x"]),
        "fc2": {"kernel": pad(mlp["fc2"]["kernel"], 0), "bias": mlp["fc2"]["bias"]},
    }
    return {**block, "mlp": mlp}


def load_xar_params(path: str, model: xar_model.XAR, target: Any | None = None) -> Any:
    """Converted xAR params laid out for ``model`` (the caller checked that they fit).

    With ``target`` (``model``'s abstract params with shardings) and a module that keeps the
    stored layout, the arrays are restored sharded, straight into place; otherwise they are
    read on the host and laid out (`xar_param_layout`), NumPy arrays for the caller to place.
    """
    if not model.scan_layers and model.mlp_multiple == 1:
        return restore_params(path, target)
    return xar_param_layout(restore_params(path), model)


def load_xar(path: str, **model_kwargs: Any) -> tuple[xar_model.XAR, Any]:
    """``(model, params)`` of a converted xAR directory; ``model_kwargs`` as `xar_from_metadata`.

    Raises:
      WeightsError: ``path`` is not a converted xAR directory.
    """
    model = xar_from_metadata(read_metadata(path, "xar"), **model_kwargs)
    return model, load_xar_params(path, model)


# ----------------------------------------------------------------------------------------------
# The KL-16 VAE and the FID Inception network.
def load_vae(path: str, **overrides: Any) -> tuple[vae_lib.VAE, Any]:
    """``(model, params)`` of a converted VAE directory (float32 params).

    Args:
      path: the converted directory.
      **overrides: non-architecture module fields, e.g. ``dtype=jnp.bfloat16``.

    Raises:
      WeightsError: ``path`` is not a converted VAE directory.
    """
    meta = read_metadata(path, "vae")
    model = vae_lib.VAE.from_config(meta["config"], **overrides)
    return model, restore_params(path, vae_lib.abstract_params(model))


def load_inception_params(path: str) -> Any:
    """The FID Inception network's params from a converted directory.

    Raises:
      WeightsError: ``path`` is not a converted Inception directory.
    """
    read_metadata(path, "inception_v3_compat")
    return restore_params(path)


def is_converted(path: str) -> bool:
    """Whether ``path`` (local or gs://) holds converted weights of any kind."""
    return fileio.exists(fileio.as_path(path) / METADATA_FILE)
