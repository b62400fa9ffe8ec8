"""Saving and loading converted parameter pytrees as Orbax checkpoint directories.

A converted checkpoint directory holds ``params/`` (an Orbax ``StandardCheckpointer`` tree of float32
arrays) and ``metadata.json`` (what the params are: model kind and the hyperparameters needed to
rebuild the module, plus the marker ``"written_by": "xar_jax.convert"``). The marker is what lets
``--overwrite`` replace an earlier conversion while refusing any other directory (a training
workdir, a home directory), which it never deletes.

Writing goes to a fresh temporary sibling directory and is renamed into place only when complete;
an existing output is moved aside, the new one renamed in, then the old one removed. So an
interrupted or failed conversion never leaves a half-written directory, nor a half-deleted old one.
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

from xar_jax import fileio
from xar_jax.errors import CorruptInputError, MissingInputError, describe

METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"
# metadata.json key and value marking a directory as converter output.
MARKER_KEY = "written_by"
MARKER = "xar_jax.convert"


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
    return f"its {METADATA_FILE} lacks \"{MARKER_KEY}\": \"{MARKER}\""


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


def save_params(
    out_dir: str, params: Any, metadata: dict[str, Any], *, overwrite: bool = False
) -> None:
    """Writes ``params`` and ``metadata`` (plus the converter marker) to ``out_dir`` atomically.

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


REDO = "Convert it again: `python -m xar_jax.convert {xar,vae,inception} --src FILE --out DIR`."


def load_metadata(ckpt_dir: str) -> dict[str, Any]:
    """Reads ``metadata.json`` of a converted checkpoint directory.

    Raises:
      MissingInputError / CorruptInputError naming the file.
    """
    path = fileio.as_path(ckpt_dir) / METADATA_FILE
    if not path.exists():
        raise MissingInputError(
            f"{path} not found: {ckpt_dir} is not a converted checkpoint directory "
            "(create one with `python -m xar_jax.convert ...`)."
        )
    metadata = fileio.read_json(path, remedy=f"Damaged conversion: {REDO}")
    if not isinstance(metadata, dict):
        raise CorruptInputError(f"{path} is damaged: not a JSON object. {REDO}")
    return metadata


def load_params(ckpt_dir: str, target: Any | None = None) -> Any:
    """Restores the params pytree; ``target`` (arrays or ShapeDtypeStructs with shardings) places it.

    Raises:
      CorruptInputError naming the directory when its files cannot be read (truncated, damaged).
    """
    path = fileio.as_path(ckpt_dir) / PARAMS_DIR
    try:
        with ocp.StandardCheckpointer() as ckptr:
            if target is None:
                return ckptr.restore(path)
            return ckptr.restore(path, target)
    except Exception as e:  # Orbax and tensorstore raise many types for damaged files.
        raise CorruptInputError(
            f"{path} is damaged or incomplete ({describe(e, 160)}). {REDO}"
        ) from None
