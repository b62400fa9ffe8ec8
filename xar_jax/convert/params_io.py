"""Saving and loading converted parameter pytrees as Orbax checkpoint directories.

A converted checkpoint directory holds ``params/`` (an Orbax ``StandardCheckpointer`` tree of float32
arrays) and ``metadata.json`` (what the params are: model kind and the hyperparameters needed to
rebuild the module). Writing goes to a temporary sibling directory first and is renamed into place
only when complete, so an interrupted conversion never leaves a directory that loads.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"


def check_writable(out_dir: str, overwrite: bool) -> None:
    """Raises FileExistsError when ``out_dir`` exists and ``overwrite`` is False.

    Converters call it before reading their source, so a refused run does no work.
    """
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it."
        )


def save_params(
    out_dir: str, params: Any, metadata: dict[str, Any], *, overwrite: bool = False
) -> None:
    """Writes ``params`` and ``metadata`` to ``out_dir`` atomically.

    Raises:
      FileExistsError: ``out_dir`` exists and ``overwrite`` is False (nothing is touched).
    """
    out_dir = os.path.abspath(out_dir)
    check_writable(out_dir, overwrite)
    tmp_dir = out_dir + ".tmp-converting"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    params = jax.tree.map(lambda x: np.asarray(x), params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp_dir, PARAMS_DIR), params)
        ckptr.wait_until_finished()
    with open(os.path.join(tmp_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp_dir, out_dir)


def load_metadata(ckpt_dir: str) -> dict[str, Any]:
    """Reads ``metadata.json`` of a converted checkpoint directory."""
    path = os.path.join(os.path.abspath(ckpt_dir), METADATA_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not a converted checkpoint directory "
            "(create one with `python -m xar_jax.convert ...`)."
        )
    with open(path) as f:
        return json.load(f)


def load_params(ckpt_dir: str, target: Any | None = None) -> Any:
    """Restores the params pytree; ``target`` (arrays or ShapeDtypeStructs with shardings) places it."""
    path = os.path.join(os.path.abspath(ckpt_dir), PARAMS_DIR)
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        return ckptr.restore(path, target)
