"""The authors' xAR state dict <-> our `XAR` params (unrolled or scanned, MLP padded or not).

Torch Linear weights are (out, in); Flax kernels are (in, out). Derived buffers (RoPE tables, the
mask) are not parameters: they are checked against ours when present, then dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import linen as nn

from xar_jax import entities as ent
from xar_jax import model as xar_model
from xar_jax.convert import params_io, torch_io
from xar_jax.errors import CorruptInputError
from xar_jax.layers import rope_tables

_DERIVED_SUFFIXES = ("attn.rope.freqs", "attn.rope.freqs_cos", "attn.rope.freqs_sin")
_TOP_LINEARS = {
    "time_embed.mlp.0": ("time_embed", "mlp_0"),
    "time_embed.mlp.2": ("time_embed", "mlp_2"),
    "z_proj": ("z_proj",),
    "decoder_embed": ("decoder_embed",),
    "pred": ("pred",),
}
_BLOCK_LINEARS = {
    "attn.qkv": ("attn", "qkv"),
    "attn.proj": ("attn", "proj"),
    "mlp.fc1_g": ("mlp", "fc1_g"),
    "mlp.fc1_x": ("mlp", "fc1_x"),
    "mlp.fc2": ("mlp", "fc2"),
    "ada_lin.1": ("ada_lin",),
}
_NORMS = ("z_proj_ln", "encoder_norm", "decoder_norm")
_POS = ("encoder_pos_embed_learned", "decoder_pos_embed_learned")


def _is_derived(name: str) -> bool:
    return name == "mask" or name.endswith(_DERIVED_SUFFIXES)


def _depth(sd: Mapping[str, np.ndarray], stack: str) -> int:
    indices = {int(k.split(".")[1]) for k in sd if k.startswith(stack + ".")}
    if indices != set(range(len(indices))):
        raise ValueError(f"{stack} indices are not contiguous: {sorted(indices)}")
    return len(indices)


def _infer_heads(sd: Mapping[str, np.ndarray], stack: str, width: int) -> int:
    key = f"{stack}.0.attn.rope.freqs_cos"
    if key not in sd:
        raise ValueError(
            f"num_heads was not given and the state dict has no '{key}' buffer to infer it from; "
            "pass num_heads=(encoder_heads, decoder_heads)."
        )
    return width // sd[key].shape[-1]


def torch_names(model: xar_model.XAR) -> list[str]:
    """The parameter names of the release's state dict for ``model`` (no derived buffers)."""
    names = ["class_emb.weight", *(f"{n}.weight" for n in _NORMS), *_POS]
    names += [f"{n}.{p}" for n in _TOP_LINEARS for p in ("weight", "bias")]
    for stack, depth in (
        ("encoder_blocks", model.encoder_depth),
        ("decoder_blocks", model.decoder_depth),
    ):
        for i in range(depth):
            names += [f"{stack}.{i}.{n}.{p}" for n in _BLOCK_LINEARS for p in ("weight", "bias")]
    return names


def xar_from_torch(
    state_dict: Any,
    num_heads: int | tuple[int, int] | None = None,
    *,
    layout: ent.EntityLayout | None = None,
    prefer: tuple[str, ...] = ("model_ema", "model"),
    allow_unsafe_pickle: bool = False,
    **model_kwargs: Any,
) -> tuple[xar_model.XAR, dict]:
    """Builds the configured `XAR` and its params from the authors' weights.

    Args:
      state_dict: a mapping of names to arrays/tensors, an ``.npz`` path, or a released ``.pth``
        (``{'model', 'model_ema'}``; the EMA weights are used unless ``prefer`` says otherwise).
      num_heads: int or (encoder, decoder) pair; inferred from the RoPE buffers when omitted.
      layout: entity layout; default the release's cell 8 on the 16x16 grid.
      prefer: wrapper keys to look in, in order.
      allow_unsafe_pickle: unpickle a ``.pth`` without the allow-list (trusted files only).
      **model_kwargs: further `XAR` fields (dtype, attention_impl, scan_layers, mlp_multiple, ...).

    Returns:
      ``(model, params)``.
    """
    sd = torch_io.load_state_dict(
        state_dict, prefer=prefer, allow_unsafe_pickle=allow_unsafe_pickle
    )
    width = sd["z_proj.weight"].shape[0] if "z_proj.weight" in sd else None
    if width is None:
        raise ValueError("The state dict has no 'z_proj.weight': not an xAR checkpoint.")
    if num_heads is None:
        heads = (
            _infer_heads(sd, "encoder_blocks", width),
            _infer_heads(sd, "decoder_blocks", width),
        )
    elif isinstance(num_heads, int):
        heads = (num_heads, num_heads)
    else:
        heads = tuple(num_heads)
    n_tokens = (
        sd["encoder_pos_embed_learned"].shape[1] if "encoder_pos_embed_learned" in sd else 256
    )
    if layout is None:
        side = int(round(np.sqrt(n_tokens)))
        layout = ent.make_layout("cell", side, cell_size=side // 2)
    model = xar_model.XAR(
        layout=layout,
        width=width,
        encoder_depth=_depth(sd, "encoder_blocks"),
        decoder_depth=_depth(sd, "decoder_blocks"),
        encoder_heads=heads[0],
        decoder_heads=heads[1],
        in_channels=sd["z_proj.weight"].shape[1],
        num_classes=sd["class_emb.weight"].shape[0] - 1 if "class_emb.weight" in sd else 1000,
        **model_kwargs,
    )
    _check_derived_buffers(sd, model)
    params_sd = {k: v for k, v in sd.items() if not _is_derived(k)}
    return model, params_from_torch(params_sd, model)


def _check_derived_buffers(sd: Mapping[str, np.ndarray], model: xar_model.XAR) -> None:
    """RoPE tables in the checkpoint must equal ours: a mismatch means a different layout."""
    for stack, heads in (
        ("encoder_blocks", model.encoder_heads),
        ("decoder_blocks", model.decoder_heads),
    ):
        key = f"{stack}.0.attn.rope.freqs_cos"
        if key in sd:
            cos, _ = rope_tables(model.layout.positions, model.width // heads)
            if sd[key].shape != cos.shape or not np.allclose(sd[key], cos, atol=1e-5):
                raise ValueError(
                    f"The checkpoint's RoPE table {key} {sd[key].shape} does not match the layout "
                    f"{model.layout.kind} on {model.layout.grid_size} with {heads} heads."
                )


def params_from_torch(sd: Mapping[str, np.ndarray], model: xar_model.XAR) -> dict:
    """Maps a (derived-buffer-free) state dict to the params of ``model``; strict on names/shapes."""
    torch_io.check_names(set(sd), set(torch_names(model)), what="xAR state dict")
    d = model.width
    hidden = model.mlp_hidden
    padded = xar_model.round_up(hidden, model.mlp_multiple)
    params: dict[str, Any] = {
        "class_emb": {"embedding": _shaped(sd, "class_emb.weight", (model.num_classes + 1, d))},
    }
    for name in _NORMS:
        params[name] = {"weight": _shaped(sd, f"{name}.weight", (d,))}
    for name in _POS:
        params[name] = _shaped(sd, name, (1, model.layout.num_tokens, d))
    for tname, path in _TOP_LINEARS.items():
        _put(params, path, _linear(sd, tname))
    for stack, depth in (
        ("encoder_blocks", model.encoder_depth),
        ("decoder_blocks", model.decoder_depth),
    ):
        blocks = []
        for i in range(depth):
            block: dict[str, Any] = {}
            for tname, path in _BLOCK_LINEARS.items():
                lin = _linear(sd, f"{stack}.{i}.{tname}")
                if padded != hidden and tname in ("mlp.fc1_g", "mlp.fc1_x"):
                    lin = {
                        "kernel": _pad(lin["kernel"], 1, padded),
                        "bias": _pad(lin["bias"], 0, padded),
                    }
                elif padded != hidden and tname == "mlp.fc2":
                    lin = {"kernel": _pad(lin["kernel"], 0, padded), "bias": lin["bias"]}
                _put(block, path, lin)
            blocks.append(block)
        params[stack] = _stack_layout(blocks, model.scan_layers)
    _check_against_model(params, model)
    return params


def params_to_torch(params: Any, model: xar_model.XAR) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch`: our params -> the release's state dict (NumPy)."""
    params = nn.meta.unbox(params)
    hidden = model.mlp_hidden
    sd: dict[str, np.ndarray] = {"class_emb.weight": np.asarray(params["class_emb"]["embedding"])}
    for name in _NORMS:
        sd[f"{name}.weight"] = np.asarray(params[name]["weight"])
    for name in _POS:
        sd[name] = np.asarray(params[name])
    for tname, path in _TOP_LINEARS.items():
        _unlinear(sd, tname, _get(params, path))
    for stack, depth in (
        ("encoder_blocks", model.encoder_depth),
        ("decoder_blocks", model.decoder_depth),
    ):
        for i in range(depth):
            block = _block_params(params[stack], i, model.scan_layers)
            for tname, path in _BLOCK_LINEARS.items():
                lin = dict(_get(block, path))
                if tname in ("mlp.fc1_g", "mlp.fc1_x"):
                    lin = {
                        "kernel": np.asarray(lin["kernel"])[:, :hidden],
                        "bias": np.asarray(lin["bias"])[:hidden],
                    }
                elif tname == "mlp.fc2":
                    lin = {"kernel": np.asarray(lin["kernel"])[:hidden], "bias": lin["bias"]}
                _unlinear(sd, f"{stack}.{i}.{tname}", lin)
    return sd


# ----------------------------------------------------------------------------------------------
def _shaped(sd, name, shape):
    torch_io.check_shape(name, sd[name], shape)
    return np.asarray(sd[name], np.float32)


def _linear(sd, prefix):
    w = np.asarray(sd[f"{prefix}.weight"], np.float32)
    b = np.asarray(sd[f"{prefix}.bias"], np.float32)
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise ValueError(f"'{prefix}' is not a Linear layer: weight {w.shape}, bias {b.shape}.")
    return {"kernel": np.ascontiguousarray(w.T), "bias": b}


def _unlinear(sd, prefix, lin):
    sd[f"{prefix}.weight"] = np.ascontiguousarray(np.asarray(lin["kernel"]).T)
    sd[f"{prefix}.bias"] = np.asarray(lin["bias"])


def _pad(x, axis, size):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np.pad(x, pad)


def _put(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _stack_layout(blocks: list[dict], scanned: bool) -> dict:
    if scanned:
        import jax

        return {"blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
    return {f"block_{i}": b for i, b in enumerate(blocks)}


def _block_params(stack_params, i, scanned):
    if scanned:
        import jax

        return jax.tree.map(lambda x: np.asarray(x)[i], stack_params["blocks"])
    return stack_params[f"block_{i}"]


def _check_against_model(params, model) -> None:
    """Every leaf must have the shape the module expects (catches layout/width mismatches)."""
    import jax

    expected = nn.meta.unbox(xar_model.abstract_params(model))
    exp_flat = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    got_flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    if set(exp_flat) != set(got_flat):
        raise ValueError("Converted params do not match the module's parameter tree.")
    for path, leaf in exp_flat.items():
        if tuple(got_flat[path].shape) != tuple(leaf.shape):
            raise ValueError(
                f"{jax.tree_util.keystr(path)}: converted shape {got_flat[path].shape}, "
                f"module expects {leaf.shape}."
            )


# ----------------------------------------------------------------------------------------------
def model_metadata(model: xar_model.XAR) -> dict[str, Any]:
    """What `load_converted` needs to rebuild the module."""
    lay = model.layout
    return {
        "kind": "xar",
        "width": model.width,
        "encoder_depth": model.encoder_depth,
        "decoder_depth": model.decoder_depth,
        "encoder_heads": model.encoder_heads,
        "decoder_heads": model.decoder_heads,
        "in_channels": model.in_channels,
        "num_classes": model.num_classes,
        "layout": {
            "kind": lay.kind,
            "grid_size": list(lay.grid_size),
            "cell_size": lay.cell_size,
            "subsample_factor": lay.subsample_factor,
            "scale_sizes": list(lay.scale_sizes),
        },
    }


def convert_file(
    src: str,
    out: str,
    *,
    overwrite: bool = False,
    use_ema: bool = True,
    allow_unsafe_pickle: bool = False,
) -> None:
    """Converts a released ``.pth`` (or ``.npz``) to a params directory (EMA weights by default).

    ``overwrite`` replaces only an earlier converter output (see `params_io.check_writable`);
    ``allow_unsafe_pickle`` unpickles a trusted ``.pth`` without the allow-list.
    """
    params_io.check_writable(out, overwrite)  # Before reading src.
    prefer = ("model_ema", "model") if use_ema else ("model",)
    model, params = xar_from_torch(
        os.fspath(src), prefer=prefer, allow_unsafe_pickle=allow_unsafe_pickle
    )
    meta = model_metadata(model) | {"source": os.path.abspath(src), "ema": use_ema}
    params_io.save_params(out, params, meta, overwrite=overwrite)


def load_converted(ckpt_dir: str, **model_kwargs: Any) -> tuple[xar_model.XAR, dict]:
    """Loads a directory written by `convert_file` as ``(model, params)`` (unrolled layout)."""
    meta = params_io.load_metadata(ckpt_dir)
    if meta.get("kind") != "xar":
        raise CorruptInputError(f"{ckpt_dir} holds a {meta.get('kind')!r} checkpoint, not 'xar'.")
    lay = meta["layout"]
    layout = ent.make_layout(
        lay["kind"],
        tuple(lay["grid_size"]),
        cell_size=lay["cell_size"],
        subsample_factor=lay["subsample_factor"],
        scale_sizes=tuple(lay["scale_sizes"]),
    )
    fields = {
        k: meta[k]
        for k in (
            "width",
            "encoder_depth",
            "decoder_depth",
            "encoder_heads",
            "decoder_heads",
            "in_channels",
            "num_classes",
        )
    }
    model = xar_model.XAR(layout=layout, **fields, **model_kwargs)
    params = params_io.load_params(ckpt_dir)
    if model.scan_layers or model.mlp_multiple > 1:
        # Stored unrolled and unpadded; re-layout for the requested module.
        plain = xar_model.XAR(layout=layout, **fields)
        params = params_from_torch(params_to_torch(params, plain), model)
    return model, params
