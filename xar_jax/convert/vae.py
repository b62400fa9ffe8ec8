"""MAR's KL-16 VAE checkpoint (``kl16.ckpt``, an LDM ``AutoencoderKL`` state dict) -> Flax params.

Our parameter tree mirrors the PyTorch module tree, so every Flax leaf has exactly one PyTorch
name: path segments ``down_i`` / ``up_i`` / ``block_j`` / ``attn_j`` become ``down.i`` /
``up.i`` / ``block.j`` / ``attn.j`` (except inside ``mid``, whose ``block_1``, ``attn_1`` and
``block_2`` are literal torch names), ``kernel`` and GroupNorm ``scale`` become ``weight``.
Conv kernels go from OIHW to HWIO. Conversion is strict: missing or unexpected names, and wrong
shapes, raise an error that names them.

Command line (through ``python -m xar_jax.convert``): ``vae --src kl16.ckpt --out DIR``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from xar_jax import vae as vae_lib
from xar_jax.convert import params_io, torch_io
from xar_jax.errors import CorruptInputError

KIND = "vae"
# An LDM AutoencoderKL checkpoint may carry its training loss (LPIPS network, discriminator,
# learned logvar) under these prefixes; they are not part of the autoencoder and are skipped.
IGNORED_PREFIXES = ("loss.",)
_INDEXED = re.compile(r"^(down|up|block|attn)_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_name(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict name of the Flax param at ``path`` (dict keys, outermost first)."""
    parts = []
    for i, seg in enumerate(path[:-1]):
        match = _INDEXED.match(seg)
        inside_mid = i > 0 and path[i - 1] == "mid"
        parts.append(f"{match[1]}.{match[2]}" if match and not inside_mid else seg)
    parts.append(_LEAF_NAMES[path[-1]])
    return ".".join(parts)


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:  # HWIO -> OIHW
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(flax_shape)


def _to_flax(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, np.float32)
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0)) if array.ndim == 4 else array


def params_from_state_dict(model: vae_lib.VAE, state_dict: Mapping[str, np.ndarray]) -> Any:
    """Converts a flat PyTorch state dict to ``model``'s params pytree (float32 NumPy leaves).

    Raises:
      ValueError: names missing from / unexpected in ``state_dict`` (listed), or a wrong shape.
    """
    abstract = vae_lib.abstract_params(model)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [torch_name(tuple(k.key for k in path)) for path, _ in paths_leaves]
    given = set(state_dict)
    ignored = {n for n in given if n.startswith(IGNORED_PREFIXES)}
    torch_io.check_names(given, set(names), ignored=ignored, what="VAE checkpoint")
    leaves = []
    for name, (_, leaf) in zip(names, paths_leaves, strict=True):
        torch_io.check_shape(name, state_dict[name], _torch_shape(leaf.shape))
        leaves.append(_to_flax(state_dict[name]))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def vae_from_torch(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any],
    *,
    ch: int | None = None,
    allow_unsafe_pickle: bool = False,
) -> tuple[vae_lib.VAE, Any]:
    """Builds the KL-16 VAE and its params from a released checkpoint.

    Args:
      state_dict_or_path: ``kl16.ckpt`` / a ``.pth`` / a ``.npz``, or a mapping of names to arrays
        or tensors (``{'model': ...}`` and ``{'state_dict': ...}`` wrappers are unwrapped).
      ch: base width; None infers it from ``encoder.conv_in.weight`` (128 for the release).
      allow_unsafe_pickle: unpickle a torch file without the allow-list (trusted files only).

    Returns:
      ``(model, params)``: a float32 ``VAE`` and its params pytree (NumPy leaves).
    """
    state_dict = torch_io.load_state_dict(
        state_dict_or_path, prefer=("state_dict", "model"), allow_unsafe_pickle=allow_unsafe_pickle
    )
    if ch is None:
        if "encoder.conv_in.weight" not in state_dict:
            shown = ", ".join(sorted(state_dict)[:8])
            raise ValueError(
                "Cannot infer the VAE width: 'encoder.conv_in.weight' is not in the checkpoint "
                f"(is it a KL-16 VAE? its first names are: {shown}). Pass ch= explicitly."
            )
        ch = int(np.shape(state_dict["encoder.conv_in.weight"])[0])
    model = vae_lib.VAE(**{**vae_lib.vae_config("kl16"), "ch": ch})
    return model, params_from_state_dict(model, state_dict)


def convert_file(
    src: str, out: str, *, overwrite: bool = False, allow_unsafe_pickle: bool = False
) -> None:
    """Converts a released VAE checkpoint file into a converted-params directory at ``out``.

    ``out`` is written atomically (temp dir, then rename) and never touched when it exists and
    ``overwrite`` is False, or when it is not an earlier converter output; that check happens
    before reading ``src``. ``allow_unsafe_pickle`` unpickles a trusted file without the allow-list.
    """
    params_io.check_writable(out, overwrite)
    model, params = vae_from_torch(src, allow_unsafe_pickle=allow_unsafe_pickle)
    metadata = {
        "kind": KIND,
        "ch": model.ch,
        "config": model.arch_config(),
        "latent_scale": vae_lib.LATENT_SCALE,
        "source": os.path.basename(os.fspath(src)),
    }
    params_io.save_params(out, params, metadata, overwrite=overwrite)


def load_converted(out_dir: str, **overrides: Any) -> tuple[vae_lib.VAE, Any]:
    """Loads a directory written by ``convert_file``.

    Args:
      out_dir: the converted directory.
      **overrides: non-architecture module fields, e.g. ``dtype=jnp.bfloat16``.

    Returns:
      ``(model, params)`` with float32 params.
    """
    metadata = params_io.load_metadata(out_dir)
    if metadata.get("kind") != KIND:
        raise CorruptInputError(
            f"{out_dir} holds converted '{metadata.get('kind')}' params, not '{KIND}' params."
        )
    model = vae_lib.VAE.from_config(metadata["config"], **overrides)
    params = params_io.load_params(out_dir, vae_lib.abstract_params(model))
    return model, params
