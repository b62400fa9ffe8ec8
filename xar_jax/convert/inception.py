"""torch-fidelity's InceptionV3 weights (``inception-v3-compat``) -> `xar_jax.inception`.

The released file is ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity v0.2.0), a flat
PyTorch state dict. Names map one to one (the Flax tree mirrors the PyTorch module names)::

    <block>.conv.weight          (O, I, kh, kw) -> params[<block>]['conv']['kernel'] (kh, kw, I, O)
    <block>.bn.weight / .bias    -> ['bn']['scale'] / ['bn']['bias']
    <block>.bn.running_mean/var  -> ['bn']['mean'] / ['bn']['var']
    fc.weight (1008, 2048)       -> params['fc']['kernel'] (2048, 1008);  fc.bias -> ['fc']['bias']

where ``<block>`` is e.g. ``Conv2d_1a_3x3`` or ``Mixed_6b.branch7x7_2``. Batch-norm counters
(``num_batches_tracked``) are ignored; every other missing or unexpected name is an error.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from xar_jax import inception as inception_lib
from xar_jax import weights
from xar_jax.convert import torch_io

MODEL_KIND = "inception_v3_compat"
RELEASED_FILE_NAME = "weights-inception-2015-12-05-6726825d.pth"
RELEASED_FILE_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + RELEASED_FILE_NAME
)
_BN_TORCH_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIX = ".num_batches_tracked"


def torch_name(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict name of the Flax parameter at ``path``."""
    *module, leaf = path
    if module[-1] == "bn":
        leaf = _BN_TORCH_NAMES[leaf]
    elif leaf == "kernel":
        leaf = "weight"
    return ".".join([*module, leaf])


def _to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if value.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
        return np.transpose(value, (2, 3, 1, 0))
    return value.T  # linear (out, in) -> (in, out)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def inception_from_torch(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any],
    *,
    allow_unsafe_pickle: bool = False,
) -> tuple[inception_lib.InceptionV3, dict[str, Any]]:
    """Builds the Flax InceptionV3 and its parameters from torch-fidelity's weights.

    Args:
      state_dict_or_path: a ``{name: tensor/array}`` mapping, or a ``.pth`` / ``.npz`` file.
      allow_unsafe_pickle: unpickle a ``.pth`` without the allow-list (trusted files only).

    Returns:
      ``(model, params)``: the module and a nested dict of float32 NumPy arrays; use them with
      `xar_jax.inception.inception_features(params, images)`.

    Raises:
      ValueError: names missing or unexpected (all listed), or a parameter of the wrong shape.
    """
    state = torch_io.load_state_dict(
        state_dict_or_path, prefer=("state_dict",), allow_unsafe_pickle=allow_unsafe_pickle
    )
    shapes = inception_lib.param_shapes()
    names = {torch_name(path): path for path in shapes}
    ignored = {n for n in state if n.endswith(_IGNORED_SUFFIX)}
    torch_io.check_names(set(state), set(names), ignored=ignored, what="Inception checkpoint")
    params: dict[str, Any] = {}
    for name, path in names.items():
        value = _to_flax_layout(path, np.asarray(state[name], dtype=np.float32))
        torch_io.check_shape(name, value, shapes[path])
        _set(params, path, value)
    return inception_lib.InceptionV3(), params


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_file(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    allow_unsafe_pickle: bool = False,
) -> None:
    """Converts torch-fidelity's ``.pth`` (or an ``.npz`` of it) to a converted-params directory.

    Args:
      src: the weights file.
      out: the directory to write (Orbax params + ``metadata.json``), written atomically.
      overwrite: replace ``out`` if it exists and is an earlier converter output.
      allow_unsafe_pickle: unpickle a ``.pth`` without the allow-list (trusted files only).

    Raises:
      FileExistsError: ``out`` exists and ``overwrite`` is False, or it is not a converter output
        (checked before reading ``src``).
    """
    src, out = os.fspath(src), os.fspath(out)
    weights.check_writable(out, overwrite)
    _, params = inception_from_torch(src, allow_unsafe_pickle=allow_unsafe_pickle)
    metadata = {
        "kind": MODEL_KIND,
        "source_file": os.path.basename(src),
        "source_sha256": _sha256(src),
    }
    weights.save_params(out, params, metadata, overwrite=overwrite)
