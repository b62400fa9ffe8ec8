"""ImageNet-1k from TFDS: the random-access source and the reference (ADM) preprocessing.

The reference pipeline (ADM's ``center_crop_arr``, used by MAR and xAR) is, for an image opened with
PIL and converted to RGB: halve both sides with a BOX filter while the short side is at least twice
the target, resize so that the short side equals the target with BICUBIC (new sides are
``round(side * scale)``), crop the centre, then ``ToTensor`` and ``Normalize(0.5, 0.5)``, i.e.
``(x / 255 - 0.5) / 0.5``. The flip happens later, in the Grain pipeline.

The dataset is read with ``tfds.data_source`` (ArrayRecord, no TensorFlow needed); preparing it
needs TensorFlow once, in a separate environment (docs/data.md).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

# Where `tfds build` expects the two ImageNet tars (relative to the data dir).
MANUAL_DIR = os.path.join("downloads", "manual")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's ``center_crop_arr``: the ImageNet preprocessing of ADM/MAR/xAR and their FID stats.

    The one implementation, shared by the training input and `xar_jax.evaluation.image_sources`.
    Images in another mode (grey, CMYK, palette) are converted to RGB first.

    Returns:
      ``(size, size, 3)`` uint8.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - size) // 2
    left = (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [-1, 1], as torchvision's ToTensor + Normalize(0.5, 0.5)."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def open_rgb(image: Any) -> Image.Image:
    """An RGB PIL image from encoded bytes (JPEG/PNG) or a decoded ``(h, w[, c])`` uint8 array."""
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
        with Image.open(io.BytesIO(bytes(image))) as opened:
            return opened.convert("RGB")
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(
            f"expected encoded bytes or a uint8 (h, w[, c]) image, got {pixels.dtype} "
            f"{pixels.shape}"
        )
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(pixels).convert("RGB")


def decode_imagenet_example(example: dict[str, Any], *, image_size: int) -> dict[str, np.ndarray]:
    """A TFDS imagenet2012 example -> ``{'images': (S, S, 3) float32 [-1, 1], 'labels': int32}``."""
    pixels = adm_center_crop(open_rgb(example["image"]), image_size)
    return {"images": to_unit_range(pixels), "labels": np.int32(example["label"])}


def resolve_data_dir(data_dir: str) -> str:
    """The TFDS data dir: ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return (
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    )


def prepare_command(data_dir: str, tfds_name: str) -> str:
    """The command (TensorFlow environment) that prepares ``tfds_name`` as ArrayRecord."""
    return (
        f"tfds build {tfds_name.partition(':')[0]} --data_dir={data_dir} --file_format=array_record"
    )


def _not_prepared_error(data_dir: str, tfds_name: str, problem: str) -> FileNotFoundError:
    manual = os.path.join(data_dir, MANUAL_DIR)
    return FileNotFoundError(
        f"{problem}\nPrepare it once, in an environment with TensorFlow (docs/data.md): put "
        f"{' and '.join(IMAGENET_TARS)} in {manual}/ and run\n"
        f"  {prepare_command(data_dir, tfds_name)}"
    )


def _version_key(path) -> tuple:
    parts = path.name.split(".")
    return tuple(int(p) if p.isdigit() else -1 for p in parts)


def check_tfds_prepared(data_dir: str, tfds_name: str) -> str:
    """Checks that ``tfds_name`` is prepared as ArrayRecord under ``data_dir``.

    Returns:
      The version directory (e.g. ``<data_dir>/imagenet2012/5.1.0``).

    Raises:
      FileNotFoundError: naming the path looked at and the command that prepares the dataset.
    """
    name, _, version = tfds_name.partition(":")
    root = epath.Path(data_dir) / name
    if version:
        candidates = [root / version]
    elif root.exists():
        candidates = sorted((p for p in root.iterdir() if p.is_dir()), key=_version_key)
    else:
        candidates = []
    prepared = [p for p in candidates if (p / "dataset_info.json").exists()]
    if not prepared:
        where = candidates[0] if version else root
        raise _not_prepared_error(
            data_dir,
            tfds_name,
            f"No prepared TFDS dataset {tfds_name!r} at {where} (no <version>/dataset_info.json).",
        )
    version_dir = prepared[-1]
    info = json.loads((version_dir / "dataset_info.json").read_text())
    file_format = info.get("fileFormat", "tfrecord")
    if file_format != "array_record":
        raise _not_prepared_error(
            data_dir,
            tfds_name,
            f"{version_dir} was prepared as {file_format!r}; random access "
            "(tfds.data_source) needs file_format=array_record.",
        )
    return os.fspath(version_dir)


def open_tfds_source(data_dir: str, tfds_name: str, split: str, *, image_decoder: str = "pil"):
    """Opens ``tfds.data_source(tfds_name, split=...)`` after checking that it is prepared.

    Args:
      data_dir: TFDS data dir ('' = default, see :func:`resolve_data_dir`).
      tfds_name: e.g. 'imagenet2012' or 'imagenet2012:5.1.0'.
      split: TFDS split ('train', 'validation', 'train[:1%]').
      image_decoder: 'pil' returns the JPEG bytes (decoded later with PIL, as the reference);
        'tfds' lets TFDS decode to uint8 arrays.

    Returns:
      A random-access source of dicts with 'image' (bytes or (h, w, 3) uint8) and 'label'.
    """
    import tensorflow_datasets as tfds

    data_dir = resolve_data_dir(data_dir)
    version = os.path.basename(check_tfds_prepared(data_dir, tfds_name))
    decoders = {"image": tfds.decode.SkipDecoding()} if image_decoder == "pil" else None
    # Name the version found on disk: TFDS would otherwise look for its code's default version.
    return tfds.data_source(
        f"{tfds_name.partition(':')[0]}:{version}",
        split=split,
        data_dir=data_dir,
        download=False,
        decoders=decoders,
    )


def describe_tfds_index(source, index: int) -> str:
    """Human-readable location of example ``index`` of a TFDS data source (file and record)."""
    where = f"{source!r} example {index}"
    try:
        from tensorflow_datasets.core.data_sources import base

        offset = 0
        for instruction in base.file_instructions(source.dataset_info, source.split):
            if index < offset + instruction.take:
                record = instruction.skip + index - offset
                return f"{where} (file {instruction.filename}, record {record})"
            offset += instruction.take
    except Exception:  # noqa: BLE001 - the location is a courtesy; never mask the real error.
        pass
    return where
