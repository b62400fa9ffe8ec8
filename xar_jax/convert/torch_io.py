"""Reading PyTorch-style checkpoints into plain NumPy dictionaries.

Every converter in `xar_jax.convert` works on a flat ``{name: np.ndarray}`` mapping. This module
turns what users hold into that mapping: an in-memory mapping of NumPy arrays or torch tensors,
a ``.npz`` file, or a ``.pth``/``.ckpt`` file written by ``torch.save`` (which needs torch).

Torch files are unpickled with ``weights_only=True``: only tensors, containers and the globals in
`SAFE_GLOBALS` (what the authors' files hold) are rebuilt, so a malicious checkpoint cannot run
code. ``allow_unsafe_pickle=True`` (``--allow_unsafe_pickle``) lifts that for a trusted file.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

TORCH_MISSING_MESSAGE = (
    "Reading '{path}' needs PyTorch, which is not installed. Install the optional extra with "
    "`pip install 'xar-jax[torch]'` (or `pip install torch`), or convert the file to .npz elsewhere "
    "with `numpy.savez(out, **{{k: v.numpy() for k, v in state_dict.items()}})`."
)


# Globals a released checkpoint may reference beyond tensors and containers: xAR (MAR-style)
# training checkpoints store their command line as `argparse.Namespace` under 'args'. MAR's
# kl16.ckpt ({'model': state_dict}) and torch-fidelity's Inception weights (a flat state dict)
# need nothing beyond torch's defaults.
SAFE_GLOBALS = (argparse.Namespace,)


class UnsafePickleError(ValueError):
    """A torch file references a global outside the allow-list; it was not unpickled."""


def to_numpy(value: Any) -> np.ndarray:
    """Converts a NumPy array, JAX array or torch tensor to a NumPy array (float32 stays float32)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch.
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def load_torch_file(path: str | os.PathLike, *, allow_unsafe_pickle: bool = False) -> Any:
    """Loads a ``torch.save`` file on the CPU without running code from it.

    Args:
      path: the ``.pth`` / ``.ckpt`` file.
      allow_unsafe_pickle: unpickle with ``weights_only=False`` (any global, so any code the file
        carries runs); only for files from a trusted source.

    Raises:
      ImportError: torch is not installed (with the install hint).
      UnsafePickleError: the file references a global outside `SAFE_GLOBALS` (named).
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(TORCH_MISSING_MESSAGE.format(path=path)) from e
    path = os.fspath(path)
    if allow_unsafe_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refused = _refused_globals(torch, path) or [f"(torch says: {_last_line(e)})"]
            raise UnsafePickleError(
                f"Refused to unpickle {path}: it references {', '.join(refused)}, which is not "
                "on the allow-list of tensors, containers and "
                f"{', '.join(f'{g.__module__}.{g.__qualname__}' for g in SAFE_GLOBALS)}. "
                "Loading it would run whatever code the file names. If you trust the file's "
                "source, pass --allow_unsafe_pickle (allow_unsafe_pickle=True) to load it with "
                "torch.load(weights_only=False)."
            ) from None


def _refused_globals(torch: Any, path: str) -> list[str]:
    """Globals the file names beyond the allow-list (read from its pickle opcodes, not run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - only improves the message; torch's own is the fallback.
        return []


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
    return lines[0] if lines else str(error).strip().splitlines()[-1]


def load_state_dict(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    prefer: tuple[str, ...] = (),
    strip_prefixes: tuple[str, ...] = ("module.", "_orig_mod."),
    allow_unsafe_pickle: bool = False,
) -> dict[str, np.ndarray]:
    """Returns a flat ``{name: np.ndarray}`` state dict from a mapping, a ``.npz`` or a torch file.

    Args:
      source: a mapping of names to arrays/tensors, or a path to ``.npz`` / ``.pth`` / ``.ckpt``.
      prefer: keys of a wrapping dictionary to look in, in order (for example ``('model_ema',
        'model')`` for xAR releases, ``('state_dict', 'model')`` for Lightning/LDM checkpoints).
        The first key present is used; when none is present the mapping itself is the state dict.
      strip_prefixes: name prefixes added by DataParallel / torch.compile wrappers, removed.
      allow_unsafe_pickle: see `load_torch_file` (torch files only).

    Returns:
      A new dictionary of NumPy arrays.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                mapping: Mapping[str, Any] = {k: data[k] for k in data.files}
        else:
            mapping = load_torch_file(path, allow_unsafe_pickle=allow_unsafe_pickle)
    else:
        mapping = source
    if not isinstance(mapping, Mapping):
        raise TypeError(f"Expected a mapping of parameter names to arrays, got {type(mapping)}.")
    for key in prefer:
        if key in mapping and isinstance(mapping[key], Mapping):
            mapping = mapping[key]
            break
    out = {}
    for name, value in mapping.items():
        for prefix in strip_prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = to_numpy(value)
    return out


def check_names(
    given: set[str],
    expected: set[str],
    *,
    ignored: set[str] = frozenset(),
    what: str = "checkpoint",
) -> None:
    """Raises a ValueError listing missing and unexpected names (strict conversion)."""
    missing = sorted(expected - given)
    extra = sorted(given - expected - set(ignored))
    if missing or extra:
        lines = [f"The {what} does not match the model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
        if extra:
            lines.append(f"  unexpected ({len(extra)}): {', '.join(extra)}")
        raise ValueError("\n".join(lines))


def check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    """Raises a ValueError naming the parameter when its shape is not the expected one."""
    if tuple(array.shape) != tuple(shape):
        raise ValueError(
            f"Parameter '{name}' has shape {tuple(array.shape)}, expected {tuple(shape)}."
        )
